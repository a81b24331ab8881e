import subprocess
import sys

PROBE = """
import resource, sys
import numpy as np
from maxdnn.engine.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # batches: 128 MiB (past glibc's largest dynamic mmap threshold, 32 MiB) in use, then freed
    a = np.ones(128 << 20, dtype=np.uint8)
    del a
before = faults()
b = np.ones(128 << 20, dtype=np.uint8)
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def test_freed_buffers_are_reused_not_faulted_in_again():
    """A large buffer freed and allocated again, batch after batch: without the setting glibc maps it afresh
    each time and its pages fault in again (32,768 of 4 KiB, fewer where NumPy asks for huge pages); with it
    the heap hands the same memory back without a fault."""
    fresh, kept = page_faults("fresh"), page_faults("keep")
    assert fresh >= 50, fresh
    assert kept <= 10, kept
