"""Bad input and faults, each one 'maxdnn: error:' line naming the file and the problem, exit code 2,
nothing written as if whole."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need, one_line_error
from maxdnn.cli import app
from maxdnn.multipliers.models import get_multiplier

runner = CliRunner()
FMT = "maxdnn-assignment-v1"


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    from maxdnn.zoo.models import load_model
    from maxdnn.frontends.pytorch import quantize_module

    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    path = tmp_path_factory.mktemp("graph") / "g.npz"
    quantize_module(load_model("resnet8"), images).save(path)
    return path


def _evaluate(*args):
    return runner.invoke(app, ["evaluate", "--data", str(need(LOSSLESS_ZIP)), "--limit", "2", *args])


def _corrupt(src, dst):
    raw = bytearray(src.read_bytes())
    i = raw.index(b"PK\x03\x04", 100)  # a byte of the second member's data, so that its CRC fails
    raw[i - 20] ^= 0xFF
    dst.write_bytes(bytes(raw))
    return dst


def test_bad_graph_files(tmp_path, graph_file):
    cases = {"empty.npz": (b"", "empty file"), "cut.npz": (graph_file.read_bytes()[:4000], "truncated or corrupt")}
    for name, (raw, problem) in cases.items():
        (tmp_path / name).write_bytes(raw)
        one_line_error(_evaluate("--model", str(tmp_path / name), "--precision", "int8"), name, problem)
    bad = _corrupt(graph_file, tmp_path / "crc.npz")
    one_line_error(_evaluate("--model", str(bad), "--precision", "int8"), "crc.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    one_line_error(_evaluate("--model", str(tmp_path / "other.npz"), "--precision", "int8"), "other.npz",
                   "not a readable maxdnn quantized graph")


def _assignment(tmp_path, **doc):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"format": FMT, "specs": ["exact", "roup-p1r2"], "layers": {"fc": 1}, **doc}))
    return p


def test_bad_assignments(tmp_path):
    one_line_error(_evaluate("--assign", str(_assignment(tmp_path, arrays=5))), "a.json", "'arrays' must name")
    one_line_error(_evaluate("--assign", str(_assignment(tmp_path, arrays="../x.npz"))), "'arrays' must name")
    for name, raw, problem in [("cut.npz", b"PK\x03\x04\x14\x00", "truncated or corrupt"), ("none.npz", b"", "empty file")]:
        (tmp_path / name).write_bytes(raw)
        a = _assignment(tmp_path, arrays=name, layers={"fc": "npz"})
        one_line_error(_evaluate("--assign", str(a)), name, problem)
    one_line_error(_evaluate("--assign", str(tmp_path)), str(tmp_path), "a folder, not an assignment file")
    p = tmp_path / "inf.json"
    p.write_text('{"format": "%s", "specs": ["exact", "roup-p1r2"], "layers": {"fc": Infinity}}' % FMT)
    one_line_error(_evaluate("--assign", str(p)), "inf.json", "layer fc: inf is not an index")
    p.write_text('{"format": "%s", "specs": ["exact", "roup-p1r2"], "layers": {"fc": [NaN]}}' % FMT)
    one_line_error(_evaluate("--assign", str(p)), "inf.json", "layer fc: nan is not an index")
    one_line_error(_evaluate("--assign", str(_assignment(tmp_path, bits=16))), "16-bit multipliers",
                   "8-bit operands")
    one_line_error(_evaluate("--assign", str(_assignment(tmp_path, bits="8"))), "'bits' must be")


def test_a_head_that_does_not_match_the_classes_is_refused(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(4, 5))
    ep = torch.export.export(m.eval(), (torch.zeros(2, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, tmp_path / "five.pt2")
    for precision in ("float", "int8"):
        one_line_error(_evaluate("--model", str(tmp_path / "five.pt2"), "--precision", precision), "five.pt2",
                       "outputs [5] per image; the data has 10 classes")


@pytest.fixture
def library(tmp_path, monkeypatch):
    d = tmp_path / "library"
    monkeypatch.setenv("MAXDNN_MULTIPLIERS", str(d))
    return d


def test_tables_and_library_entries(tmp_path, library):
    huge = tmp_path / "huge.npy"
    t = get_multiplier("exact").lut().astype(np.int64)
    t[3, 4] = np.iinfo(np.int64).max
    np.save(huge, t)
    one_line_error(runner.invoke(app, ["multipliers", "import", str(huge), "--name", "huge", "--energy", "0.5"]),
                   "huge.npy", "cannot come from 8-bit operands")
    good = tmp_path / "good.npy"
    np.save(good, get_multiplier("roup-p1r2").lut())
    assert runner.invoke(app, ["multipliers", "import", str(good), "--name", "good", "--energy", "0.5"]).exit_code == 0
    broken = library / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("[1]")
    # a damaged entry blocks only what names it: built-ins and other entries still work
    r = runner.invoke(app, ["multipliers", "--spec", "roup-p1r2", "--spec", "good", "--json"])
    assert r.exit_code == 0, r.output
    assert {row["spec"] for row in json.loads(r.stdout)} == {"roup-p1r2", "good"}
    one_line_error(runner.invoke(app, ["multipliers", "--spec", "broken"]), "broken", "not a maxdnn multiplier entry")
    (library / "good" / "table.npy").write_bytes((library / "good" / "table.npy").read_bytes()[:300])
    one_line_error(runner.invoke(app, ["multipliers", "--spec", "good"]), "table.npy", "not a NumPy .npy array")


def test_unwritable_table_is_refused_before_synthesis(tmp_path):
    one_line_error(runner.invoke(app, ["hardware", "report", "--spec", "exact", "--save-table",
                                       "/proc/no-such-dir/x.json"]), "/proc/no-such-dir/x.json", "cannot write")


def _finished_tiny(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["explore", "--data", str(need(LOSSLESS_ZIP)), "--budget", "tiny", "--approach", "layer",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_report_on_damaged_run_files(tmp_path):
    import shutil

    import sqlite3

    run = _finished_tiny(tmp_path)
    with sqlite3.connect(run / "study.db") as c:  # everything into the main file (none left in the log)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for f in run.glob("study.db-*"):
        f.unlink()
    db = (run / "study.db").read_bytes()
    info = (run / "run.json").read_text()
    for what, damage, frags in [
        ("truncated db", lambda: (run / "study.db").write_bytes(db[:5000]), ["study.db"]),
        ("garbage db", lambda: (run / "study.db").write_bytes(b"garbage" * 100), ["study.db", "not an SQLite"]),
        ("db folder", lambda: ((run / "study.db").unlink(), (run / "study.db").mkdir()), ["study.db", "not a file"]),
        ("run.json list", lambda: (run / "run.json").write_text("[1]"), ["run.json", "not a maxdnn run description"]),
        ("run.json cut", lambda: (run / "run.json").write_text(info[:40]), ["run.json", "not a readable run description"]),
    ]:
        damage()
        one_line_error(runner.invoke(app, ["report", str(run)]), *frags)
        if (run / "study.db").is_dir():
            shutil.rmtree(run / "study.db")
        (run / "study.db").write_bytes(db)
        (run / "run.json").write_text(info)


def test_a_second_explore_on_a_live_run_is_refused(tmp_path):
    from maxdnn.exploration.storage import lock_run_dir

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from maxdnn.exploration.storage import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = runner.invoke(app, ["explore", "--data", str(need(LOSSLESS_ZIP)), "--budget", "tiny", "--out", str(out)])
        one_line_error(r, str(out), "another maxdnn explore (pid", "is running on this run directory")
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(out)  # released with its process, even killed
    lock_run_dir(out)  # and taken again by the same process without a conflict


def test_a_full_disk_is_one_line(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is part of every Linux system this suite runs on")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "maxdnn", "evaluate", "--data", str(need(LOSSLESS_ZIP)), "--limit", "2",
                            "--json"], stdout=full, stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("maxdnn: error: no room to write"), r.stderr


def test_archives_keep_members_inside(tmp_path):
    """An image zip whose member names climb out of the tree is read by name only: nothing is extracted."""
    from maxdnn.data import CLASSES, DataError, load_cifar10

    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for c in CLASSES:
            zf.writestr(f"../../test/{c}/0.png", b"x")
    with pytest.raises(DataError):
        load_cifar10(z, "test", use_cache=False)
    assert not (tmp_path.parent.parent / "test").exists()
