"""Worker processes on one machine sharing an exploration through its database (``maxdnn explore --workers N``),
and the signal that stops a run cleanly.

Example::

    threads = threads_per_worker(3)
    procs = start_workers(Path("runs/quick"), 2, ["--budget", "quick", "--storage", url], threads)
    ...                      # this process works too
    wait_for_workers(procs)  # WorkerError (one line) if one failed
    stop_workers(procs)      # after a failure or an interrupt: none goes on alone
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def wait_for_workers(procs, poll_s: float = 0.5) -> None:
    """Wait for every worker; the first to fail, in time, raises ``WorkerError`` with the last line of its log
    (at once: not after the workers started before it have finished)."""
    while True:
        codes = [p.poll() for _, p in procs]
        for (wdir, _), code in zip(procs, codes):
            if code not in (None, 0):
                tail = (wdir / "worker.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise WorkerError(f"worker {wdir} failed: {tail[0]}")
        if all(code == 0 for code in codes):
            return
        time.sleep(poll_s)


def stop_workers(procs, timeout_s: float = 60.0) -> None:
    """Terminate the workers still running (SIGTERM: each releases its claimed units, as on Ctrl-C) and wait
    for them, so that none goes on with the run after the command that started it has ended; one that does
    not stop within ``timeout_s`` is killed (its claims are taken over as a dead worker's)."""
    for _, p in procs:
        if p.poll() is None:
            p.terminate()
    for _, p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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
