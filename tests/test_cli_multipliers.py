import json

import numpy as np
from typer.testing import CliRunner

from maxdnn.cli import app

runner = CliRunner()


def test_multipliers_json_default_family():
    r = runner.invoke(app, ["multipliers", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    specs = [x["spec"] for x in rows]
    assert specs[0] == "exact" and "roup-p3r7" in specs and "mitchell" in specs
    assert set(rows[0]) >= {"spec", "bits", "error_rate", "bias", "med", "nmed", "mred", "wce"}
    assert rows[0]["med"] == 0


def test_multipliers_table_and_lut(tmp_path):
    r = runner.invoke(app, ["multipliers", "--spec", "roup-p1r2"])
    assert r.exit_code == 0 and "roup-p1r2" in r.stdout
    out = tmp_path / "lut.npy"
    r = runner.invoke(app, ["multipliers", "--spec", "roup-p1r2", "--lut", str(out)])
    assert r.exit_code == 0, r.output
    t = np.load(out)
    assert t.shape == (256, 256)
    assert t[3, 2 + 128] == 16  # R_2(3) * R_2(2) = 4 * 4
    assert t[5, -3 + 128] == -4 * 4  # R_2(5) = 4, R_2(-3) = -4


def test_multipliers_bad_spec_one_line():
    r = runner.invoke(app, ["multipliers", "--spec", "roup-p9r0"])
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "roup-p9r0" in lines[0] and "valid forms" in lines[0]


def test_multipliers_16_bit_sampled():
    r = runner.invoke(app, ["multipliers", "--bits", "16", "--spec", "roup-p2r3", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)[0]["samples"] > 0


def test_lut_unwritable_path_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, ["multipliers", "--spec", "exact", "--lut", str(blocker / "sub" / "lut.npy")])
    assert r.exit_code == 2 and "cannot write" in r.output and len(r.output.strip().splitlines()) == 1
