"""Worker processes on one machine sharing an exploration through its database (``maxdnn explore --workers N``),
and the signal that stops a run cleanly.

Example::

    threads = threads_per_worker(3)
    procs = start_workers(Path("runs/quick"), 2, ["--budget", "quick", "--storage", url], threads)
    ...                      # this process works too
    wait_for_workers(procs)  # WorkerError (one line) if one failed
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from maxdnn.errors import MaxdnnError
from maxdnn.runs.work_units import STOP


class WorkerError(MaxdnnError):
    """A worker process that failed, with the last line of its log."""


def threads_per_worker(workers: int) -> int:
    """The machine's cores shared out between the workers (more threads than cores slow every one of them)."""
    return max(1, (os.cpu_count() or 1) // workers)


def start_workers(out: Path, n: int, args: list[str], threads: int) -> list:
    """Start ``n`` more ``maxdnn explore`` processes with ``args``, each in OUT/workers/wK (its log: worker.log),
    each with ``threads`` compute threads; returns [(folder, process)]."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    procs = []
    for k in range(1, n + 1):
        wdir = out / "workers" / f"w{k}"
        wdir.mkdir(parents=True, exist_ok=True)
        with open(wdir / "worker.log", "a") as log:
            procs.append((wdir, subprocess.Popen([sys.executable, "-m", "maxdnn", "explore", "--out", str(wdir), *args],
                                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)))
    return procs


def wait_for_workers(procs) -> None:
    """Wait for every worker; the first that failed raises ``WorkerError`` with the last line of its log."""
    for wdir, p in procs:
        if p.wait() != 0:
            tail = (wdir / "worker.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise WorkerError(f"worker {wdir} failed: {tail[0]}")


def _interrupt(signum, frame):
    # the flag stops the next unit even where Python swallows the exception (a signal that lands in a destructor)
    STOP.set()
    raise KeyboardInterrupt


@contextmanager
def sigterm_interrupts():
    """While it lasts, SIGTERM stops the process as Ctrl-C does (its claims released, its time counted)."""
    STOP.clear()
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
        if STOP.is_set():  # terminated after the last unit, the exception swallowed: still an interruption
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGTERM, before)
        STOP.clear()
