"""User mistakes end in one 'maxdnn: error:' line with exit code 2 and leave no partial files."""

import json

import pytest
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need, one_line_error
from maxdnn.cli import app

runner = CliRunner()


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


def test_train_init_starts_from_the_checkpoint_and_checks_its_arch(tmp_path):
    import torch

    from maxdnn.zoo.models import load_model

    out = tmp_path / "m.pt"
    r = runner.invoke(app, ["train", "--data", str(need(LOSSLESS_ZIP)), "--out", str(out), "--epochs", "1",
                            "--holdout", "3900", "--lr", "1e-12", "--init", "resnet8"])
    assert r.exit_code == 0, r.output
    start, trained = load_model("resnet8"), load_model(str(out))
    convs = [k for k, v in start.state_dict().items() if v.dim() == 4]
    assert convs and all(torch.allclose(start.state_dict()[k], trained.state_dict()[k], atol=1e-6) for k in convs)
    assert "--init resnet8" in trained.meta["command"]
    r = runner.invoke(app, ["train", "--data", str(LOSSLESS_ZIP), "--out", str(tmp_path / "n.pt"), "--arch", "resnet20",
                            "--init", "resnet8"])
    one_line_error(r, "a resnet8 checkpoint, not resnet20")
    r = runner.invoke(app, ["train", "--data", str(LOSSLESS_ZIP), "--out", str(tmp_path / "n.pt"), "--init",
                            str(tmp_path / "none.pt")])
    one_line_error(r, "none.pt")


def _commands(cmd, path=()):
    import click

    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))


def test_help_describes_every_option_without_type_noise():
    """Every option and argument has a description; flags show no '<bool>'."""
    import typer.main

    for path, cmd in _commands(typer.main.get_command(app)):
        for p in cmd.params:
            if p.name != "help":
                assert getattr(p, "help", None), f"maxdnn {' '.join(path)}: {p.name} has no help"
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0 and "<bool>" not in r.output, (path, r.output)


def test_hardware_verilog_names_only_forms_with_a_design(tmp_path):
    r = runner.invoke(app, ["hardware", "verilog", "bogus-k3", "--out", str(tmp_path / "m.v")])
    one_line_error(r, "unknown multiplier 'bogus-k3'", "exact and roup-p{P}r{R}")
    assert "mitchell" not in r.output and "drum" not in r.output and not (tmp_path / "m.v").exists()


def test_report_on_a_run_without_points_warns(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "model": "resnet8", "data": "d", "validation": "v", "test": "t", "budget": {"name": "quick"}, "library": [],
        "energy_source": "e", "storage": "study.db",
        "baseline": {"val_accuracy": 0.8, "val_loss": 0.5, "test_accuracy": 0.8, "val_images": 10, "test_images": 10}}))
    import optuna

    optuna.create_study(study_name="layer-sweep", storage=f"sqlite:///{run / 'study.db'}")
    r = runner.invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "no evaluated points" in r.output
    assert "no evaluated points yet" in (run / "report.md").read_text()
