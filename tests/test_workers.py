"""Several workers on one exploration through a real PostgreSQL server (and SQLite): nothing lost, nothing
duplicated, deterministic stages identical to one worker's. The server: $MAXDNN_TEST_POSTGRES (a URL whose
user may create databases), started by .ci/run with .ci/postgres-up; without it these tests fail."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need
from maxdnn.cli import app
from maxdnn.exploration.explorer import BUDGETS
from maxdnn.exploration.storage import RunStorage

TINY = BUDGETS["tiny"]
ARGS = ["--budget", "tiny", "--approach", "filter", "--compensation", "bias"]


@pytest.fixture
def pg_url():
    """A fresh database on the test server, dropped afterwards."""
    admin = os.environ.get("MAXDNN_TEST_POSTGRES")
    if not admin:
        pytest.fail("MAXDNN_TEST_POSTGRES is not set: start a throwaway server with eval \"$(.ci/postgres-up)\"")
    import sqlalchemy as sa

    name = f"maxdnn_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    yield admin.rsplit("/", 1)[0] + "/" + name
    with engine.connect() as c:
        c.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    engine.dispose()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    run = tmp_path_factory.mktemp("one")
    r = CliRunner().invoke(app, ["explore", "--out", str(run), "--data", str(need(LOSSLESS_ZIP)), *ARGS])
    assert r.exit_code == 0, r.output
    return run


def trials(run, storage=None):
    store = RunStorage.of_run(run)
    if storage:
        store = RunStorage(storage, store.scope)
    return store.points(["filter"])


def test_three_workers_on_postgres_equal_one_worker(one_worker, pg_url, tmp_path):
    run = tmp_path / "three"
    t0 = time.time()
    r = CliRunner().invoke(app, ["explore", "--out", str(run), "--data", str(LOSSLESS_ZIP), "--storage", pg_url,
                                 "--workers", "3", *ARGS])
    assert r.exit_code == 0, r.output
    assert time.time() - t0 < 600
    one = {(p["summary"], p["val_accuracy"], p["energy_gain"]) for p in trials(one_worker) if p["source"] == "sweep"}
    pts = trials(run)
    sweep = [p for p in pts if p["source"] == "sweep"]
    assert {(p["summary"], p["val_accuracy"], p["energy_gain"]) for p in sweep} == one  # the same sweep
    assert len(sweep) == len({p["genome"] for p in sweep})
    assert sum(p["source"] == "nsga2" for p in pts) == TINY.nsga_trials  # none lost, none duplicated
    for k in ("direct_loss", "direct_acc", "validation"):  # resilience identical, in every worker's copy
        ref = np.load(one_worker / "resilience.npz")[k]
        for d in (run, run / "workers" / "w1", run / "workers" / "w2"):
            np.testing.assert_array_equal(np.load(d / "resilience.npz")[k], ref)
    a = json.loads((one_worker / "confirm_eval.json").read_text())
    b = json.loads((run / "confirm_eval.json").read_text())
    assert a == b  # the same candidates, measurements and choices
    import sqlalchemy as sa

    with sa.create_engine(pg_url).connect() as c:  # every unit finished (which worker did which is timing)
        assert {s for (s,) in c.execute(sa.text("select state from maxdnn_units")).all()} == {"done"}


def test_claims_are_exclusive_and_dead_workers_units_are_taken_over(pg_url, monkeypatch):
    import maxdnn.runs.work_units as wu

    a, b = wu.WorkUnits(pg_url, "s"), wu.WorkUnits(pg_url, "s")
    assert a.claim("k1") and not b.claim("k1")  # exactly one wins
    assert b.map(["k0"], lambda k: {"v": 0}) == {"k0": {"v": 0}} and not a.claim("k0")  # done: nobody claims it
    monkeypatch.setattr(wu, "GRACE_SECONDS", 0.5)
    time.sleep(1.0)  # a's heartbeat thread renews every HEARTBEAT_SECONDS (10 s): its claim on k1 is now stale
    got = b.map(["k1", "k2"], lambda k: k.upper())
    assert got == {"k1": "K1", "k2": "K2"} and b.results(prefix="k") == {"k0": {"v": 0}, "k1": "K1", "k2": "K2"}
    assert wu.WorkUnits(pg_url, "other").results(prefix="k") == {}  # scopes are separate explorations
    assert a.store("c1", [1, 0.5]) == [1, 0.5] and b.store("c1", [9]) == [1, 0.5]  # the first stored stays
    many = [f"m{i}" for i in range(600)]
    assert len(b.map(many, lambda ks: [k.upper() for k in ks], batch=100)) == 600
    asked = many + [f"x{i}" for i in range(600)]  # more keys than one query takes, half of them unknown
    assert a.results(asked) == {k: k.upper() for k in many} and a.results(["c1", "k0"]) == {"c1": [1, 0.5], "k0": {"v": 0}}
    calls = []

    def failing(k):
        calls.append(k)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        a.map(["k3"], failing)
    assert b.claim("k3")  # a failed unit is released at once, not after the grace period


def test_worker_killed_mid_run_loses_and_duplicates_nothing(pg_url, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAXDNN_HEARTBEAT_GRACE": "4"}
    cmd = [sys.executable, "-m", "maxdnn", "explore", "--data", str(need(LOSSLESS_ZIP)), "--storage", pg_url, *ARGS]
    victim = subprocess.Popen(cmd + ["--out", str(tmp_path / "a")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        time.sleep(0.3)
        try:
            with engine.connect() as c:
                claimed = c.execute(sa.text("select count(*) from maxdnn_units where state = 'claimed' "
                                            "and key like 'sweep|%'")).scalar()
        except sa.exc.SQLAlchemyError:
            continue
        if claimed:
            break
    assert victim.poll() is None, "finished before it could be killed"
    victim.send_signal(signal.SIGKILL)  # mid-unit: it holds a sweep point
    victim.wait()
    r = subprocess.run(cmd + ["--out", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    pts = trials(tmp_path / "b")
    sweep = [p["genome"] for p in pts if p["source"] == "sweep"]
    store = RunStorage.of_run(tmp_path / "b")
    lib = json.loads((tmp_path / "b" / "run.json").read_text())["library"]
    assert len(sweep) == len(set(sweep)) == len(lib) * len(TINY.sweep_fractions)  # nothing lost or repeated
    assert sum(p["source"] == "nsga2" for p in pts) == TINY.nsga_trials
    with engine.connect() as c:
        assert c.execute(sa.text("select count(*) from maxdnn_units where state <> 'done'")).scalar() == 0
    engine.dispose()
    assert store.scope  # a shared server: the exploration's studies carry its scope


def test_two_workers_fine_tune_each_assignment_once(tmp_path):
    """Two workers sharing a fine-tuning exploration (its own SQLite database) train every assignment once
    between them: each fine-tuned graph is in exactly one worker's folder, the ladder's rungs included."""
    run = tmp_path / "two"
    r = CliRunner().invoke(app, ["explore", "--out", str(run), "--data", str(need(LOSSLESS_ZIP)), "--budget", "tiny",
                                 "--approach", "layer", "--workers", "2"])
    assert r.exit_code == 0, r.output
    done = json.loads((run / "finetune_eval.json").read_text())
    graphs = [p.name for d in (run, run / "workers" / "w1") for p in (d / "finetuned").glob("*.npz")]
    assert sorted(graphs) == sorted(f"{k}.npz" for k in ["exact", *done["assignments"]])


def test_unreachable_server_is_one_line_within_seconds(tmp_path):
    t0 = time.time()
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--data", str(need(LOSSLESS_ZIP)),
                                 "--storage", "postgresql://nobody@10.255.255.1:5432/none", *ARGS])
    assert r.exit_code == 2 and "cannot open the study storage" in r.output
    assert len(r.output.strip().splitlines()) == 1 and time.time() - t0 < 20
    assert not (tmp_path / "x").exists()


def test_progress_counts_units_finished_before(tmp_path):
    """A resumed stage's bar starts at the units finished before, and ends at the total."""
    import maxdnn.runs.work_units as wu

    units = wu.WorkUnits(f"sqlite:///{tmp_path / 'units.db'}")
    units.map(["a", "b"], lambda k: 1)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    assert units.map(["a", "b", "c"], lambda k: 2, bar) == {"a": 1, "b": 1, "c": 2} and bar.n == 3


def test_a_sigterm_stops_the_next_unit_even_when_its_exception_is_swallowed(tmp_path):
    """Python drops an exception raised in a destructor, so the KeyboardInterrupt of a SIGTERM that lands in one
    is lost: the flag the handler sets stops the next unit, and the end of the run, all the same."""
    import maxdnn.runs.work_units as wu
    from maxdnn.runs.workers import sigterm_interrupts

    units = wu.WorkUnits(f"sqlite:///{tmp_path / 'units.db'}")
    with pytest.raises(KeyboardInterrupt):
        with sigterm_interrupts():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except KeyboardInterrupt:  # swallowed, as in a destructor
                pass
            assert wu.STOP.is_set()
            units.map(["a"], lambda k: pytest.fail("a unit started after the SIGTERM"))
    assert not wu.STOP.is_set() and units.map(["a"], lambda k: 1) == {"a": 1}  # released, not left claimed
    with pytest.raises(KeyboardInterrupt):  # a SIGTERM after the last unit still ends the run as interrupted
        with sigterm_interrupts():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except KeyboardInterrupt:
                pass


OPEN_TOGETHER = """
import sys, time
from maxdnn.exploration.storage import RunStorage
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every process opens the empty database at the same moment
store = RunStorage(sys.argv[1], "race")
store.check()
store.work_units()
store.study("layer-sweep")
print("opened")
"""


def test_workers_started_together_on_an_empty_database_all_open_it(pg_url):
    """Workers launched at one moment (as a cluster scheduler starts them) race to create the schema of a fresh
    PostgreSQL database; every one of them must open it."""
    import sqlalchemy as sa

    admin = sa.create_engine(os.environ["MAXDNN_TEST_POSTGRES"], isolation_level="AUTOCOMMIT")
    base, name = pg_url.rsplit("/", 1)
    for attempt in range(3):  # three rounds, each on a database nobody has opened yet
        url = pg_url
        if attempt:
            url = f"{base}/{name}_r{attempt}"
            with admin.connect() as c:
                c.execute(sa.text(f"CREATE DATABASE {name}_r{attempt}"))
        try:
            start = time.time() + 3.0
            procs = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, url, str(start)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(4)]
            for p in procs:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0 and out.strip() == "opened", err[-1500:]
        finally:
            if attempt:
                with admin.connect() as c:
                    c.execute(sa.text(f"DROP DATABASE {name}_r{attempt} WITH (FORCE)"))
    admin.dispose()


def test_a_failed_worker_is_reported_at_once_and_the_others_are_stopped(tmp_path):
    """A worker that fails is one line as soon as it fails, even while a worker started before it still runs;
    stopping the workers leaves none running (a SIGTERM, or a kill after the timeout)."""
    from maxdnn.runs.workers import WorkerError, stop_workers, wait_for_workers

    procs = []
    for k, code in enumerate(["import time; time.sleep(120)",
                              "import sys; print('a first line'); print('no such data: x.zip'); sys.exit(2)",
                              "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('ready', flush=True); time.sleep(120)"]):
        wdir = tmp_path / f"w{k}"
        wdir.mkdir()
        with open(wdir / "worker.log", "w") as log:
            procs.append((wdir, subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)))
    deadline = time.time() + 60
    while "ready" not in (tmp_path / "w2" / "worker.log").read_text() and time.time() < deadline:
        time.sleep(0.05)  # the third has set its handler (a loaded machine starts Python slowly)
    t0 = time.time()
    with pytest.raises(WorkerError, match=r"w1 failed: no such data: x\.zip$"):
        wait_for_workers(procs, poll_s=0.1)
    assert time.time() - t0 < 10
    assert procs[0][1].poll() is None and procs[2][1].poll() is None  # still running: the failure did not wait
    stop_workers(procs, timeout_s=2.0)
    assert procs[0][1].returncode == -signal.SIGTERM and procs[2][1].returncode == -signal.SIGKILL
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for_workers([(tmp_path, ok)], poll_s=0.05)  # all finished well: returns
    assert ok.returncode == 0
