"""Units of work claimed through a database, so that several workers share one exploration.

A unit (one resilience measurement, one proxy-validation bin, one sweep point,
one NSGA-II trial slot, one test-set evaluation, one fine-tuning) has a key.
A worker claims it by inserting its row (the primary key makes the claim
atomic: exactly one worker wins), computes it, and stores the result in the
row. While it holds units a background thread renews their heartbeat; a unit
whose heartbeat is older than the grace period belongs to a dead worker (for
example one killed with SIGKILL) and is taken over by the next worker that
asks, with one conditional update, so that again exactly one wins. Results
are JSON and live in the database, so any worker can resume, and any worker
can read every result.

The table (``maxdnn_units``) lives in the exploration's study storage: SQLite
in RUN_DIR by default, or a shared server (``--storage postgresql://...``),
through SQLAlchemy, which Optuna already uses. ``scope`` separates
explorations sharing one database.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterable

import sqlalchemy as sa

STOP = threading.Event()  # set by a SIGTERM (maxdnn.runs.workers.sigterm_interrupts): no unit starts after it

GRACE_SECONDS = float(os.environ.get("MAXDNN_HEARTBEAT_GRACE", 60))  # a unit not renewed for this long is free
HEARTBEAT_SECONDS = min(10.0, GRACE_SECONDS / 3)
POLL_SECONDS = 1.0

_META = sa.MetaData()
UNITS = sa.Table(
    "maxdnn_units", _META,
    sa.Column("scope", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("state", sa.String(8), nullable=False),  # claimed | done
    sa.Column("worker", sa.String(128), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("result", sa.Text),
)


class WorkUnits:
    def __init__(self, url: str, scope: str = "", engine_kwargs: dict | None = None):
        self.scope = scope
        self.engine = sa.create_engine(url, **(engine_kwargs or {}))
        _META.create_all(self.engine, checkfirst=True)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None

    # ---------------------------------------------------------------- rows
    def _where(self, key: str):
        return sa.and_(UNITS.c.scope == self.scope, UNITS.c.key == key)

    def results(self, keys: Iterable[str] | None = None, prefix: str | None = None) -> dict[str, object]:
        """Finished results: of ``keys``, or of every key starting with ``prefix``."""
        q = sa.select(UNITS.c.key, UNITS.c.result).where(UNITS.c.scope == self.scope, UNITS.c.state == "done")
        if prefix is not None:
            q = q.where(UNITS.c.key.startswith(prefix, autoescape=True))
        if keys is None:
            with self.engine.connect() as c:
                return {k: json.loads(r) for k, r in c.execute(q).all()}
        keys = list(dict.fromkeys(keys))
        out = {}
        with self.engine.connect() as c:
            for i in range(0, len(keys), 500):  # the rows asked for only, a bounded number of parameters a query
                out.update({k: json.loads(r) for k, r in c.execute(q.where(UNITS.c.key.in_(keys[i:i + 500]))).all()})
        return out

    def store(self, key: str, result):
        """Keep a result nobody needs to claim (a cache entry: whoever computes it first stores it, later ones
        keep the stored one, which is the same); returns it as every worker reads it."""
        try:
            with self.engine.begin() as c:
                c.execute(UNITS.insert().values(scope=self.scope, key=key, state="done", worker=self.worker,
                                                heartbeat=time.time(), result=json.dumps(result)))
        except sa.exc.IntegrityError:
            return self.results([key]).get(key, json.loads(json.dumps(result)))
        return json.loads(json.dumps(result))

    def claim(self, key: str) -> bool:
        """True if this worker now holds ``key``: a new unit, or one whose holder stopped renewing it."""
        now = time.time()
        try:
            with self.engine.begin() as c:
                c.execute(UNITS.insert().values(scope=self.scope, key=key, state="claimed", worker=self.worker,
                                                heartbeat=now))
            won = True
        except sa.exc.IntegrityError:
            with self.engine.begin() as c:
                r = c.execute(UNITS.update().where(self._where(key), UNITS.c.state == "claimed",
                                                   UNITS.c.heartbeat < now - GRACE_SECONDS)
                              .values(worker=self.worker, heartbeat=now))
            won = r.rowcount == 1
        if won:
            with self._lock:
                self._held.add(key)
            self._ensure_heartbeat()
        return won

    def complete(self, key: str, result):
        """Store a held unit's result; returns it as every worker reads it (through JSON)."""
        text = json.dumps(result)
        with self.engine.begin() as c:
            c.execute(UNITS.update().where(self._where(key)).values(state="done", result=text, heartbeat=time.time()))
        with self._lock:
            self._held.discard(key)
        return json.loads(text)

    def release(self, key: str) -> None:
        """Give up a held unit (its computation failed or was interrupted): another worker may take it now."""
        with self.engine.begin() as c:
            c.execute(UNITS.delete().where(self._where(key), UNITS.c.state == "claimed", UNITS.c.worker == self.worker))
        with self._lock:
            self._held.discard(key)

    def release_mine(self) -> None:
        """Give up every unit this worker holds (it is stopping: claimed units waiting for their batch too)."""
        with self.engine.begin() as c:
            c.execute(UNITS.delete().where(UNITS.c.scope == self.scope, UNITS.c.state == "claimed",
                                           UNITS.c.worker == self.worker))
        with self._lock:
            self._held.clear()

    def release_all_claims(self) -> int:
        """Free every unfinished unit of the scope: for a database only one worker uses (RUN_DIR's own), where
        a claim left behind belongs to an interrupted earlier process."""
        with self.engine.begin() as c:
            return c.execute(UNITS.delete().where(UNITS.c.scope == self.scope, UNITS.c.state == "claimed")).rowcount

    def _compute(self, keys: list[str], compute_many: Callable[[list[str]], list]) -> dict[str, object]:
        try:
            if STOP.is_set():  # a SIGTERM whose KeyboardInterrupt was swallowed (raised inside a destructor)
                raise KeyboardInterrupt
            results = compute_many(list(keys))
        except BaseException:
            for key in keys:
                self.release(key)
            raise
        return {key: self.complete(key, r) for key, r in zip(keys, results)}

    def _ensure_heartbeat(self) -> None:
        if self._beat is not None and self._beat.is_alive():
            return

        def beat():
            while True:
                time.sleep(HEARTBEAT_SECONDS)
                with self._lock:
                    held = list(self._held)
                if not held:
                    continue
                try:
                    with self.engine.begin() as c:
                        c.execute(UNITS.update().where(UNITS.c.scope == self.scope, UNITS.c.worker == self.worker,
                                                       UNITS.c.state == "claimed").values(heartbeat=time.time()))
                except sa.exc.SQLAlchemyError:  # a transient database error: the next beat retries
                    pass

        self._beat = threading.Thread(target=beat, daemon=True, name="maxdnn-heartbeat")
        self._beat.start()

    # ---------------------------------------------------------------- the common loop
    def map(self, keys: list[str], compute: Callable, bar=None, batch: int = 1) -> dict[str, object]:
        """Every key's result: computed here for the units this worker claims, read from the database for the
        others, waiting for units other workers hold (and taking over those whose worker died).
        ``compute(key)`` returns one unit's result; with ``batch`` > 1, ``compute(keys)`` takes up to
        ``batch`` claimed keys at once (one pass over the data for all of them) and returns their results
        in order. ``bar``: a tqdm bar over ``keys`` (advanced as results arrive)."""
        many = compute if batch > 1 else (lambda ks: [compute(ks[0])])
        done = self.results(keys)
        seen = 0  # units finished before (a resumed run) advance the bar at once
        pending: list[str] = []

        def advance(flush: bool) -> None:
            nonlocal seen
            if pending and (flush or len(pending) >= batch):
                done.update(self._compute(pending, many))
                pending.clear()
            if bar is not None:
                bar.update(len(done) - seen)
                seen = len(done)

        try:
            advance(False)
            for key in keys:
                if key in done:
                    continue
                if self.claim(key):
                    pending.append(key)
                else:
                    done.update(self.results([key]))
                advance(False)
            advance(True)
            while missing := [k for k in keys if k not in done]:
                done.update(self.results(missing))
                for key in [k for k in missing if k not in done]:
                    if self.claim(key):  # its worker stopped: take it over
                        pending.append(key)
                        advance(False)
                advance(True)
                if any(k not in done for k in keys):
                    time.sleep(POLL_SECONDS)
        except BaseException:  # interrupted or failed: what this worker holds is free for others at once
            try:
                self.release_mine()
            except sa.exc.SQLAlchemyError:  # the database is gone too: the grace period frees them
                pass
            raise
        return {k: done[k] for k in keys}
