"""Where an exploration's results live: its Optuna studies and work units, in one database.

By default the database is SQLite in RUN_DIR (``study.db``, one worker), opened
in write-ahead-log mode. With ``--storage URL`` it is a shared server
(PostgreSQL), where several explorations may live side by side: each one's
studies and units carry its scope. ``RunStorage.of_run`` opens a finished or
running run's storage from its run.json alone (no data, no model), which is
all ``maxdnn report`` needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maxdnn.errors import MaxdnnError
from maxdnn.exploration.front import APPROACHES
from maxdnn.runs.work_units import WorkUnits


class RunError(MaxdnnError, ValueError):
    """A run directory or its study storage that cannot be used, as one line naming it.

    Example:

    >>> from maxdnn.exploration.storage import RunError, read_run_info
    >>> try:
    ...     read_run_info("no-such-run")
    ... except RunError as e:
    ...     print(e)
    no-such-run: not an exploration run (no run.json)
    """


class RunStorage:
    def __init__(self, url: str, scope: str = "", shared: bool = True):
        """``shared``: a database other workers may use at the same time (False: RUN_DIR's own SQLite file,
        where a claim or a running trial left behind belongs to an interrupted run)."""
        self.url = url
        self.scope = scope
        self.shared = shared
        self._rdb = None
        self._lock = None

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, url: str | None) -> "RunStorage":
        """``url``, or (None) the run's own SQLite database, checked: a bad URL, a missing driver or an
        unreachable server is one line (RunError)."""
        store = cls(url or f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}", shared=url is not None)
        if url is None:  # the run's own database: one process at a time (it takes over what is left there)
            store._lock = lock_run_dir(Path(run_dir))
        store.check()
        return store

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike) -> "RunStorage":
        """The storage a run recorded in its run.json."""
        run_dir = Path(run_dir)
        info = read_run_info(run_dir)
        url = info.get("storage")
        if url in (None, "study.db"):
            db = run_dir / "study.db"
            if not db.exists():
                raise RunError(f"{db}: the run's study database is missing")
            if not db.is_file():
                raise RunError(f"{db}: not a file (the run's study database is an SQLite file)")
            with open(db, "rb") as f:
                if f.read(16) != b"SQLite format 3\0":
                    raise RunError(f"{db}: not an SQLite database (empty, truncated or overwritten)")
            return cls(f"sqlite:///{db.resolve()}", info.get("scope", ""), shared=False)
        return cls(url, info.get("scope", ""))

    def check(self) -> None:
        try:
            self.optuna()
        except ModuleNotFoundError as e:
            hint = " (install maxdnn[postgres] for PostgreSQL)" if "postgres" in self.url else ""
            raise RunError(f"--storage {self.url}: no database driver '{e.name}'{hint}") from None
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's many connection errors, in one line
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RunError(f"--storage {self.url}: cannot open the study storage ({msg})") from None

    def engine_kwargs(self) -> dict:
        if self.url.startswith("sqlite:///"):
            return {"creator": _sqlite_connector(self.url[len("sqlite:///"):])}
        return {"connect_args": {"connect_timeout": 5}} if self.url.startswith("postgres") else {}

    def optuna(self):
        """The Optuna storage, opened once (each opening is a connection and a schema check)."""
        import optuna

        if self._rdb is None:
            # no Optuna heartbeats: a dead worker's unit is retried through maxdnn.runs.work_units, and the trial it
            # left RUNNING is never counted (only COMPLETE trials are points)
            self._rdb = schema_retry(lambda: optuna.storages.RDBStorage(self.url, engine_kwargs=self.engine_kwargs()))
        return self._rdb

    def work_units(self) -> WorkUnits:
        units = schema_retry(lambda: WorkUnits(self.url, self.scope, self.engine_kwargs()))
        if not self.shared:  # one worker: claims left are an interrupted run's
            units.release_all_claims()
        return units

    def study_name(self, name: str) -> str:
        """``name`` within this exploration's scope."""
        return f"{self.scope}/{name}" if self.scope else name

    def study(self, name: str, sampler=None):
        """A two-objective (accuracy, energy gain) study, created or resumed."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.study_name(name), storage=self.optuna(),
                                    directions=["maximize", "maximize"], sampler=sampler, load_if_exists=True)
        if not self.shared:  # trials left RUNNING belong to an interrupted process
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        return study

    def points(self, approaches=APPROACHES) -> list[dict]:
        """Every completed sweep, NSGA-II and ladder point of these approaches (``source``: the study's kind)."""
        import optuna

        out = []
        for ap in approaches:
            for kind in ("sweep", "nsga2") + (("ladder",) if ap == "layer" else ()):  # the ladder is layer-level
                try:
                    study = optuna.load_study(study_name=self.study_name(f"{ap}-{kind}"), storage=self.optuna())
                except KeyError:
                    continue
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                    u = point_attrs(t)
                    out.append({"approach": ap, "source": kind, "trial": t.number, "summary": u["summary"],
                                "genome": u["genome"], "granularity": u.get("granularity", ""),
                                "val_accuracy": u["val_accuracy"], "val_loss": u["val_loss"],
                                "ptq_val_accuracy": u.get("ptq_val_accuracy", u["val_accuracy"]),
                                "ptq_val_loss": u.get("ptq_val_loss", u["val_loss"]),
                                "energy": u["energy"], "energy_gain": u["energy_gain"],
                                "mult_energy_gain": u.get("mult_energy_gain", u["energy_gain"]),
                                **{k: u[k] for k in ("fraction", "rung") if k in u}})
        return out


def read_run_info(run_dir: Path) -> dict:
    """RUN_DIR/run.json as a dict; ``RunError`` naming the file when it is missing, unreadable or not one."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{run_dir}: not an exploration run (no run.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not a readable run description ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("baseline", {}), dict):
        raise RunError(f"{path}: not a maxdnn run description (expected a JSON object with the run's settings)")
    return info


def add_wall_seconds(run_dir: Path, seconds: float, **fields) -> None:
    """Add ``seconds`` to RUN_DIR/run.json's wall time (summed over every run of the exploration, interrupted
    ones included), and set ``fields``, in one atomic write."""
    from maxdnn.atomic import write_json

    info = read_run_info(Path(run_dir))
    info["wall_seconds"] = info.get("wall_seconds", 0) + seconds
    write_json(Path(run_dir) / "run.json", {**info, **fields})


def schema_retry(open_storage, attempts: int = 8):
    """``open_storage()``, tried again where workers started together on an empty database race to create its
    tables and types (PostgreSQL: a unique violation on pg_type): one of them wins, the others then find the
    schema made."""
    import random
    import time

    import sqlalchemy.exc

    for k in range(attempts):
        try:
            return open_storage()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            if k == attempts - 1 or "duplicate" not in str(e).lower() and "already exists" not in str(e).lower():
                raise
            time.sleep(random.uniform(0.1, 0.5) * (k + 1))


def lock_run_dir(run_dir: Path):
    """An exclusive lock on RUN_DIR for this process's life (released by the system when it ends, even by
    kill -9). A second process on a live run stops with one line instead of taking over its live claims."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _HELD:  # this process holds it already (a second Explorer on the same run)
        return _HELD[key]
    f = open(run_dir / ".explore.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{run_dir}: another maxdnn explore ({holder}) is running on this run directory; wait for "
                       "it, or share the work with --workers N or --storage URL") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _HELD[key] = f
    return f


_HELD: dict = {}  # run directories this process has locked, by resolved path


def point_attrs(trial) -> dict:
    """A told trial's attributes: one ``point`` attribute, or (runs made before it) one attribute each."""
    u = trial.user_attrs
    return {**u, **u["point"]} if "point" in u else u


def _sqlite_connector(path: str):
    """Connections to a run's SQLite database in write-ahead-log mode with normal synchronisation: a commit
    is a write, not a disk flush (about 20x faster; an exploration commits thousands of times). Committed
    work survives a killed process; a power loss may lose the last commits, never the database."""
    import sqlite3

    def connect():
        c = sqlite3.connect(path, timeout=60, check_same_thread=False)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        return c

    return connect
