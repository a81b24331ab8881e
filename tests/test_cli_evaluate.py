import json

import pytest
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, REPO, need
from maxdnn.cli import app

runner = CliRunner()


def test_evaluate_float_and_int8_json():
    data = str(need(LOSSLESS_ZIP))
    for precision in ["float", "int8"]:
        r = runner.invoke(app, ["evaluate", "--data", data, "--precision", precision, "--limit", "200", "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["precision"] == precision and out["images"] == 200
        assert {"accuracy", "correct", "model", "data"} <= set(out)
        assert "lossless" in out["data"]
        assert ("float_note" in out) == (precision == "float")  # float numbers are labelled as such


@pytest.mark.parametrize("gran", ["layer", "filter", "kernel"])
def test_evaluate_example_assignments(gran):
    data = str(need(LOSSLESS_ZIP))
    path = REPO / "examples" / f"resnet8-{gran}-level.json"
    r = runner.invoke(app, ["evaluate", "--data", data, "--assign", str(path), "--limit", "100", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["granularity"] == gran and 0 < out["energy_gain"] < 1
    assert {"energy", "energy_gain", "assignment"} <= set(out)


def test_evaluate_errors_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MAXDNN_DATA", raising=False)
    monkeypatch.setenv("MAXDNN_CACHE", str(tmp_path))
    r = runner.invoke(app, ["evaluate"])
    assert r.exit_code == 2 and "download-data" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "nope.zip")])
    assert r.exit_code == 2 and "no such file" in r.output
    bad = tmp_path / "a.json"
    bad.write_text("[]")
    r = runner.invoke(app, ["evaluate", "--data", str(need(LOSSLESS_ZIP)), "--assign", str(bad), "--limit", "5"])
    assert r.exit_code == 2 and "not a maxdnn assignment" in r.output
    r = runner.invoke(app, ["evaluate", "--data", str(LOSSLESS_ZIP), "--model", str(tmp_path / "m.pt")])
    assert r.exit_code == 2 and "no such model file" in r.output
