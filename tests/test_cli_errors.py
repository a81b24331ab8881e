"""User mistakes end in one 'maxdnn: error:' line with exit code 2 and leave no partial files."""

import json

import pytest
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need
from maxdnn.cli import app

runner = CliRunner()


def one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("maxdnn: error:"), r.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("maxdnn ")


@pytest.mark.parametrize("limit,msg", [("-5", "positive"), ("0", "positive"), ("5000", "has only 1000 images")])
def test_evaluate_limit(limit, msg):
    r = runner.invoke(app, ["evaluate", "--data", str(need(LOSSLESS_ZIP)), "--limit", limit])
    one_line_error(r, f"--limit {limit}", msg)


def test_assignment_index_must_be_an_integer(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"format": "maxdnn-assignment-v1", "specs": ["exact", "roup-p1r2"], "layers": {"fc": 1.5}}))
    r = runner.invoke(app, ["evaluate", "--data", str(need(LOSSLESS_ZIP)), "--assign", str(p), "--limit", "2"])
    one_line_error(r, "layer fc: index 1.5 is not an integer")


def test_explore_out_checked_before_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = runner.invoke(app, ["explore", "--data", str(need(LOSSLESS_ZIP)), "--out", str(f)])
    one_line_error(r, "exists and is not a directory")
    r = runner.invoke(app, ["explore", "--data", str(LOSSLESS_ZIP), "--out", str(f / "sub")])
    one_line_error(r, "cannot write the run directory")
    r = runner.invoke(app, ["explore", "--data", str(tmp_path / "nope.zip"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and not (tmp_path / "run").exists()


def test_explore_bad_storage_one_line_and_no_run_dir(tmp_path):
    import time

    t = time.time()
    r = runner.invoke(app, ["explore", "--data", str(need(LOSSLESS_ZIP)), "--out", str(tmp_path / "run"),
                            "--storage", "bogus://x"])
    one_line_error(r, "--storage bogus://x")
    assert not (tmp_path / "run").exists()
    r = runner.invoke(app, ["explore", "--data", str(LOSSLESS_ZIP), "--out", str(tmp_path / "run2"),
                            "--storage", "postgresql://nobody@127.0.0.1:1/none"])
    one_line_error(r, "--storage postgresql://")
    assert time.time() - t < 60 and not (tmp_path / "run2").exists()


def test_report_on_a_moved_run_and_a_missing_database(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"storage": "study.db", "baseline": {}}))
    r = runner.invoke(app, ["report", str(run)])
    one_line_error(r, "study.db: the run's study database is missing")


def test_train_out_checked_before_any_epoch(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = runner.invoke(app, ["train", "--data", str(need(LOSSLESS_ZIP)), "--out", str(f / "m.pt"), "--epochs", "1"])
    one_line_error(r, "cannot write the checkpoint there")
    r = runner.invoke(app, ["train", "--data", str(LOSSLESS_ZIP), "--out", str(tmp_path / "m.pt"), "--epochs", "0"])
    one_line_error(r, "--epochs")
