import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import LOSSLESS_ZIP, need
from maxdnn.engine.approx import Assignment, assignment_key
from maxdnn.exploration.explorer import BUDGETS, Explorer, run_exploration
from maxdnn.exploration.resilience import taylor_proxy
from maxdnn.exploration.front import APPROACHES, pareto_front, point_key
from maxdnn.exploration.report import best_at_thresholds, read_points, write_report
from maxdnn.workload import Workload

TINY = BUDGETS["tiny"]


def expected_points(ex):
    n_sweep = len(ex.library) * len(TINY.sweep_fractions)
    return {("layer", "sweep"): n_sweep, ("filter", "sweep"): n_sweep, ("kernel", "sweep"): n_sweep,
            ("layer", "nsga2"): TINY.nsga_trials, ("filter", "nsga2"): TINY.nsga_trials,
            ("kernel", "nsga2"): TINY.nsga_trials, ("alwann", "nsga2"): TINY.nsga_trials}


def counts(points):
    out = {}
    for p in points:
        out[(p["approach"], p["source"])] = out.get((p["approach"], p["source"]), 0) + 1
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    ex = Explorer(run, Workload.open(None, need(LOSSLESS_ZIP)), TINY, progress=False, log=lambda m: None)
    run_exploration(ex)
    write_report(run, ex.store)
    return run, ex


def test_tiny_exploration_end_to_end(finished_run):
    run, ex = finished_run
    for f in ["points.csv", "pareto.png", "pareto.svg", "report.md", "run.json", "resilience.npz", "study.db"]:
        assert (run / f).exists(), f
    assert counts(ex.store.points()) == expected_points(ex)
    info = json.loads((run / "run.json").read_text())
    assert info["baseline"]["val_images"] == TINY.val_images and info["baseline"]["test_images"] == 1000
    # no point is evaluated twice within a sweep
    pts = ex.store.points()
    for ap in ("layer", "filter", "kernel"):
        sums = [p["genome"] for p in pts if p["approach"] == ap and p["source"] == "sweep"]
        assert len(sums) == len(set(sums))
    # every front point has a saved assignment; the chosen ones have confirmation and test numbers
    rows = read_points(run / "points.csv")
    front = [r for r in rows if r["on_front"]]
    assert len(list((run / "pareto").glob("*.json"))) == len(front)
    chosen = [r for per in best_at_thresholds(rows).values() for r in per.values() if r is not None]
    assert chosen and all(r["test_accuracy"] is not None and r["confirm_accuracy"] is not None for r in chosen)
    assert all(r["confirm_images"] == TINY.confirm_images and r["test_images"] == 1000 for r in chosen)
    # each distinct assignment is measured on the confirmation images once, however many points build it
    units = ex.units.results(prefix="confirm|")
    by_assignment = {}
    for f in (run / "pareto").glob("*.json"):
        by_assignment.setdefault(assignment_key(Assignment.load(f, ex.q)), []).append(f.stem)
    assert "confirm|exact" in units and set(units) - {"confirm|exact"} <= {f"confirm|ptq|{k}" for k in by_assignment}
    assert any(len(v) > 1 for v in by_assignment.values())  # layer and ALWANN-style share points here
    conf = json.loads((run / "confirm_eval.json").read_text())
    for stems in by_assignment.values():  # points sharing an assignment share its measurements
        got = {json.dumps(conf["points"].get(f"ptq|{point_key(_point(ex, s))}")) for s in stems}
        assert len(got - {"null"}) <= 1


def _point(ex, stem):
    ap, source, trial = stem.rsplit("-", 2)
    return next(p for p in ex.store.points([ap]) if p["source"] == source and p["trial"] == int(trial))


def test_an_assignment_is_measured_once_per_exploration(finished_run, monkeypatch):
    run, ex = finished_run
    measured = []
    real = Explorer.val_metrics_many

    def counting(self, assignments, graphs=None):
        measured.extend(assignments)
        return real(self, assignments, graphs)

    monkeypatch.setattr(Explorer, "val_metrics_many", counting)
    pts = ex.store.points()
    again = ex.evaluate_many([ex.build(p["approach"], {k: tuple(v) for k, v in json.loads(p["genome"]).items()},
                                       ex.resilience()) for p in pts])
    assert not measured  # every point's assignment was kept when first measured
    assert [(r["val_accuracy"], r["val_loss"]) for r in again] == [(p["val_accuracy"], p["val_loss"]) for p in pts]
    rng = np.random.default_rng(5)
    new = Assignment(["exact", "roup-p1r3", "roup-p0r2"], {n: rng.integers(0, 3, l.weight.shape[:2])
                                                          for n, l in ex.q.layers.items()})
    twin = Assignment(list(new.specs), {n: m.copy() for n, m in new.maps.items()})
    got = ex.evaluate_many([new, twin, new])
    assert len(measured) == 1 and got[0] == got[1] == got[2]
    assert (got[0]["val_accuracy"], got[0]["val_loss"]) == real(ex, [new])[0]
    resumed = Explorer(run, Workload.open(None, LOSSLESS_ZIP), TINY, progress=False, log=lambda m: None)
    assert resumed.evaluate(twin) == got[0] and len(measured) == 1  # kept in the storage, for resumes and workers


def report_cells(text: str, level_col: int) -> dict:
    """{(approach, threshold): cell} of report.md's per-threshold tables, column ``level_col``."""
    out, t = {}, None
    for line in text.splitlines():
        m = re.match(r"\*\*<= ([\d.]+) points?\*\*", line)
        if m:
            t = float(m.group(1))
        elif t is not None and line.startswith("| ") and not line.startswith("| approach"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[(cells[0], t)] = cells[1 + level_col]
        elif line.startswith("## Against"):
            break
    return out


def check_report_table(run, level: str, level_col: int) -> None:
    rows = read_points(run / "points.csv")
    cells = report_cells((run / "report.md").read_text(), level_col)
    best = best_at_thresholds(rows, level=level)
    assert best
    for ap, per in best.items():
        for t, r in per.items():
            cell = cells[(ap, t)]
            if r is None:
                assert cell == "-"
            else:
                gain = float(re.match(r"([-\d.]+)%", cell).group(1))
                assert gain == pytest.approx(100 * r["energy_gain"], abs=0.05)
                assert f"/ {r['test_loss_pts']:.2f} +-{r['test_loss_ci95']:.2f}" in cell


def test_report_recomputable_from_points_csv(finished_run):
    run, _ = finished_run
    check_report_table(run, "ptq", 0)
    rows = read_points(run / "points.csv")
    # front flags agree with a recomputation from the csv
    for ap in {r["approach"] for r in rows}:
        mine = [r for r in rows if r["approach"] == ap]
        front = pareto_front(mine)
        vals = {(r["val_accuracy"], r["energy_gain"]) for r in front}
        assert vals == {(r["val_accuracy"], r["energy_gain"]) for r in mine if r["on_front"]}


def test_resume_after_interruption_loses_and_repeats_nothing(tmp_path, monkeypatch):
    """An interruption loses only the batch of units under way (asked, not told); a rerun evaluates
    exactly the points that were not finished."""
    wl = Workload.open(None, need(LOSSLESS_ZIP))
    ex = Explorer(tmp_path, wl, TINY, progress=False, log=lambda m: None)
    ex.resilience()
    calls = {"n": 0}
    real = Explorer.evaluate_many

    def interrupting(self, assignments):
        calls["n"] += len(assignments)
        if calls["n"] >= 9:
            raise KeyboardInterrupt
        return real(self, assignments)

    monkeypatch.setattr(Explorer, "evaluate_many", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_exploration(ex)
    done_first = len(ex.store.points())
    assert 0 < done_first < 9
    calls2 = {"n": 0}

    def counting(self, assignments):
        calls2["n"] += len(assignments)
        return real(self, assignments)

    monkeypatch.setattr(Explorer, "evaluate_many", counting)
    ex2 = Explorer(tmp_path, wl, TINY, progress=False, log=lambda m: None)
    run_exploration(ex2)
    total = sum(expected_points(ex2).values())
    assert counts(ex2.store.points()) == expected_points(ex2)
    assert calls2["n"] == total - done_first  # nothing finished was redone


def test_resilience_keeps_each_measurement_when_interrupted(tmp_path, monkeypatch):
    """A kill inside the resilience phase loses only the batch of measurements under way (one layer's
    configurations, measured in one pass)."""
    wl = Workload.open(None, need(LOSSLESS_ZIP))
    real = Explorer.evaluate_many
    calls = {"n": 0}
    n_specs = TINY.library_size

    def interrupting(self, assignments):
        calls["n"] += len(assignments)
        if calls["n"] > 1 + 2 * n_specs:  # the exact baseline, then two layers' measurements, then the kill
            raise KeyboardInterrupt
        return real(self, assignments)

    monkeypatch.setattr(Explorer, "evaluate_many", interrupting)
    ex = Explorer(tmp_path, wl, TINY, progress=False, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        ex.resilience()
    assert not (tmp_path / "resilience.npz").exists()
    assert len(ex.units.results(prefix="resilience|")) == 2 * n_specs  # kept in the run's database as they finished
    calls2 = {"n": 0}

    def counting(self, assignments):
        calls2["n"] += len(assignments)
        return real(self, assignments)

    monkeypatch.setattr(Explorer, "evaluate_many", counting)
    res = Explorer(tmp_path, wl, TINY, progress=False, log=lambda m: None).resilience()
    n_layers, n_specs = res["direct_loss"].shape
    bins = 2 * TINY.validation_sample
    assert calls2["n"] == 1 + n_layers * n_specs - 2 * n_specs + bins
    # the same numbers as an uninterrupted run
    fresh = Explorer(tmp_path / "fresh", wl, TINY, progress=False, log=lambda m: None).resilience()
    for k in ("direct_loss", "direct_acc", "validation"):
        np.testing.assert_array_equal(res[k], fresh[k])


def _explore_until_trials(run, n_trials: int, sig):
    """Start a tiny filter-level exploration in a process, send it ``sig`` once ``n_trials`` trials are complete;
    returns (the command, the process's exit code, its stderr)."""
    import sqlite3

    cmd = [sys.executable, "-m", "maxdnn", "explore", "--data", str(need(LOSSLESS_ZIP)), "--budget", "tiny",
           "--out", str(run), "--approach", "filter"]
    p = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(run / "study.db") as db:
                if db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] >= n_trials:
                    break
        except sqlite3.Error:
            continue
    assert p.poll() is None, "finished before it could be stopped"
    p.send_signal(sig)
    return cmd, p.wait(), p.stderr.read()


def test_resume_after_kill_9(tmp_path):
    run = tmp_path / "run"
    cmd, _, _ = _explore_until_trials(run, 2, signal.SIGKILL)
    r = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ex = Explorer(run, Workload.open(None, LOSSLESS_ZIP), TINY, progress=False, log=lambda m: None,
                  compensation="finetune")  # the command's default
    pts = ex.store.points(["filter"])
    assert counts(pts) == {("filter", "sweep"): len(ex.library) * len(TINY.sweep_fractions), ("filter", "nsga2"): TINY.nsga_trials}
    sweep = [p["genome"] for p in pts if p["source"] == "sweep"]
    assert len(sweep) == len(set(sweep))


def test_terminated_run_keeps_its_time_and_resumes(tmp_path):
    import sqlite3

    run = tmp_path / "run"
    cmd, code, err = _explore_until_trials(run, 2, signal.SIGTERM)
    assert code == 130 and err.strip().splitlines()[-1] == f"maxdnn: {run}: interrupted; the same command resumes it"
    first = json.loads((run / "run.json").read_text())["wall_seconds"]
    assert first > 0
    with sqlite3.connect(run / "study.db") as db:  # its claims were released, not left to the heartbeat
        assert db.execute("select count(*) from maxdnn_units where state = 'claimed'").fetchone()[0] == 0
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["wall_seconds"] > first


def test_run_dir_mismatch_is_refused(finished_run):
    run, _ = finished_run
    with pytest.raises(ValueError, match="budget"):
        Explorer(run, Workload.open(None, LOSSLESS_ZIP), BUDGETS["quick"], progress=False, log=lambda m: None)


def test_taylor_proxy_tracks_exact_accumulator_change(qnet, lossless_test):
    """With a linear loss the proxy's signed sum is exact: check it against the integer engines."""
    imgs = lossless_test.images[:8]
    res = taylor_proxy(qnet, imgs, lossless_test.labels[:8], ["roup-p0r0", "roup-p1r2"])
    for name in ["s2.conv2", "fc"]:
        k = res[name]["kernel"]
        assert k.shape == (2,) + qnet.layers[name].weight.shape[:2]
        assert np.all(k[0] == 0)  # the exact multiplier changes nothing
        assert k[1].sum() > 0 and res[name]["filter"][1].shape == (qnet.layers[name].weight.shape[0],)


def test_cli_report_and_errors(finished_run, tmp_path):
    from typer.testing import CliRunner

    from maxdnn.cli import app

    run, _ = finished_run
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not an exploration run" in r.output
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--approach", "nope", "--data", str(LOSSLESS_ZIP)])
    assert r.exit_code == 2


def test_wilson_interval_and_noise():
    from maxdnn.exploration.report import noise_pts, wilson

    lo, hi = wilson(0.84, 1000)
    assert 0.815 < lo < 0.84 < hi < 0.865
    assert wilson(1.0, 10)[1] == pytest.approx(1.0) and wilson(0.0, 10)[0] == pytest.approx(0.0)
    assert noise_pts(0.84, 1000) == pytest.approx(2.27, abs=0.01)


def test_points_csv_has_intervals(finished_run):
    run, _ = finished_run
    rows = read_points(run / "points.csv")
    tested = [r for r in rows if r["test_accuracy"] is not None]
    assert tested and all(r["test_ci95_low"] <= r["test_accuracy"] <= r["test_ci95_high"] for r in tested)
    assert "95% Wilson interval" in (run / "report.md").read_text()


def test_explore_says_what_it_does_from_the_start(tmp_path):
    """Progress from the first second: setup steps are logged, and bars name their phase."""
    msgs = []
    ex = Explorer(tmp_path, Workload.open(None, need(LOSSLESS_ZIP)), TINY, progress=False, log=msgs.append)
    assert [m.split(" ")[0] for m in msgs[:3]] == ["reading", "quantizing", "exact"], msgs
    ex.phase, ex.progress = "[phase 2/9] ", True
    bar = ex.progress_bar("layer: sweep", 2)
    assert bar.desc == "[phase 2/9] layer: sweep" and bar.leave
    bar.close()


def test_finetune_candidates_spread_over_the_front():
    from maxdnn.exploration.finetune_stage import FinetuneBudget, finetune_candidates

    pts = [{"approach": "kernel", "source": "sweep", "trial": i, "val_accuracy": 0.84 - 0.01 * i,
            "energy_gain": 0.1 * i} for i in range(10)]
    fb = FinetuneBudget(epochs=1, images=10, points=3, max_val_loss_pts=6.0)
    got = [p["trial"] for p in finetune_candidates(pts, 0.84, fb)]
    assert got == [1, 4, 6]  # trial 0 saves nothing, trials 7..9 lose more than 6 points; gains 0.6, 0.35, 0.1
    assert [p["trial"] for p in finetune_candidates(pts, 0.84, FinetuneBudget(1, 10, 20, 6.0))] == list(range(1, 7))
    # the floor: no point of less gain than the largest-gain point within floor_pts validation points
    pts = [{**p, "val_accuracy": 0.84 - 0.003 * p["trial"]} for p in pts]  # trial i loses 0.3 i points
    assert [p["trial"] for p in finetune_candidates(pts, 0.84, FinetuneBudget(1, 10, 20, 6.0))] == list(range(1, 10))
    assert [p["trial"] for p in finetune_candidates(pts, 0.84, FinetuneBudget(1, 10, 20, 6.0, floor_pts=1.0))] == \
        list(range(3, 10))


@pytest.fixture(scope="module")
def compensated_run(tmp_path_factory):
    """The default exploration: ranked bias-corrected, front points fine-tuned, chosen on confirmation images."""
    run = tmp_path_factory.mktemp("comp")
    ex = Explorer(run, Workload.open(None, need(LOSSLESS_ZIP)), TINY, progress=False, log=lambda m: None,
                  compensation="finetune")
    run_exploration(ex)
    write_report(run, ex.store)
    return run, ex


def test_compensated_exploration_reports_every_level(compensated_run):
    """Points ranked bias-corrected keep their uncorrected numbers; fine-tuned points are measured through the
    integer engine on the confirmation and test images; the report gives the three levels, recomputable
    from points.csv."""
    from maxdnn.compensate.bias_correction import bias_corrected
    from maxdnn.engine.approx import ApproxNetwork
    from maxdnn.exploration.paired import paired_loss, unpack
    from maxdnn.ir.graph import QuantizedGraph

    run, ex = compensated_run
    rows = read_points(run / "points.csv")
    assert {r["compensation"] for r in rows} == {"ptq", "bias", "finetune"}
    # a point's bias level is its corrected graph's accuracy, its ptq level the plain one's
    p = max(ex.store.points(["kernel"]), key=lambda p: p["energy_gain"])
    a = ex.build("kernel", {k: tuple(v) for k, v in json.loads(p["genome"]).items()}, ex.resilience())
    assert p["ptq_val_accuracy"] == ex.val_metrics(a, ex.q)[0]
    assert p["val_accuracy"] == ex.val_metrics(a, bias_corrected(ex.q, a, ex.correction_images))[0]
    # one fine-tuned point, measured again: its bits are the integer engine's on confirmation and test images
    done = json.loads((run / "finetune_eval.json").read_text())
    assert done["exact"]["confirm"]["images"] == TINY.confirm_images and done["exact"]["test"]["images"] == 1000
    pk, key = next((pk, k) for pk, k in done["points"].items() if k != "exact")
    p = next(p for p in ex.store.points() if point_key(p) == pk)
    a = ex.build(p["approach"], {k: tuple(v) for k, v in json.loads(p["genome"]).items()}, ex.resilience())
    g = QuantizedGraph.load(run / done["assignments"][key]["graph"])
    for split in ("confirm", "test"):
        data = getattr(ex, split)
        got = ApproxNetwork(g, a).predict(data.images) == data.labels
        assert np.array_equal(got, unpack(done["assignments"][key][split]))
    assert any(not np.array_equal(l.weight, ex.q.layers[n].weight) or not np.array_equal(l.bias, ex.q.layers[n].bias)
               for n, l in g.layers.items())  # it was trained
    ft_rows = [r for r in rows if r["compensation"] == "finetune"]
    assert len(ft_rows) == sum(1 for p in ex.store.points() if done["points"].get(point_key(p), "exact") != "exact")
    assert all(r["test_accuracy"] is not None and r["confirm_accuracy"] is not None for r in ft_rows)
    # paired losses against the level's reference (the better exact model on the confirmation images)
    conf = json.loads((run / "confirm_eval.json").read_text())
    ref = conf["reference"]["ptq"]
    if done["exact"]["confirm"]["accuracy"] > ref["confirm"]["accuracy"]:
        ref = done["exact"]
    r = next(r for r in ft_rows if r["approach"] == p["approach"] and r["trial"] == str(p["trial"]))
    assert (r["confirm_loss_pts"], r["confirm_loss_se"]) == paired_loss(ref["confirm"],
                                                                        done["assignments"][key]["confirm"])
    for col, level in enumerate(("ptq", "bias", "finetune")):
        check_report_table(run, level, col)
    text = (run / "report.md").read_text()
    assert "fine-tuned: gain / test loss" in text and "The choice held on test" in text
    # the paper's 2x is answered from the ratios of the claims table, not left to the reader
    claims = text.split("## Against the paper's claims")[1].split("\n\n- ")[0]
    ratios = [float(x) for x in re.findall(r": ([0-9.]+)x", claims)]
    line = next(x for x in text.splitlines() if x.startswith("- 2x layer-wise: "))
    if max(ratios) >= 2.0:
        assert line.startswith(f"- 2x layer-wise: reproduced in {sum(r >= 2.0 for r in ratios)} of {len(ratios)} cells")
    else:
        assert line.startswith(f"- 2x layer-wise: not reproduced: the largest ratio is {max(ratios):.2f}x")
        assert line.endswith(f"fine-grained ahead in {sum(r > 1.0 for r in ratios)} of {len(ratios)} cells.")


def test_finetune_stage_resumes_and_refuses_other_settings(compensated_run, monkeypatch):
    import maxdnn.exploration.finetune_stage as ef

    run, ex = compensated_run
    res = ex.resilience()
    fb = ef.FINETUNE_BUDGETS["tiny"]
    done = json.loads((run / "finetune_eval.json").read_text())
    monkeypatch.setattr(ef, "finetune", lambda *a, **k: pytest.fail("trained again"))
    assert ef.finetune_front(ex, APPROACHES, res, fb) == done
    with pytest.raises(ValueError, match="fine-tuning settings"):
        ef.finetune_front(ex, ["layer"], res, ef.FinetuneBudget(epochs=2, images=64, points=1))


def test_choice_takes_the_largest_gain_within_the_upper_bound():
    from maxdnn.exploration.confirm import choose

    rows = [{"energy_gain": 0.5, "confirm_loss_pts": 0.4, "confirm_loss_se": 0.2},
            {"energy_gain": 0.7, "confirm_loss_pts": 0.8, "confirm_loss_se": 0.3},
            {"energy_gain": 0.9, "confirm_loss_pts": None, "confirm_loss_se": None}]
    assert choose(rows, 1.0)["energy_gain"] == 0.5  # 0.8 + 0.3 > 1
    assert choose(rows, 1.1)["energy_gain"] == 0.7
    assert choose(rows, 0.5) is None and choose(rows, 1.1, z=2.0)["energy_gain"] == 0.5


def test_paired_loss_is_the_mean_difference_per_image():
    from maxdnn.exploration.paired import pack, paired_loss, unpack

    rng = np.random.default_rng(0)
    ref = rng.random(1001) < 0.84
    cand = ref.copy()
    cand[rng.choice(1001, 30, replace=False)] ^= True
    assert np.array_equal(unpack(pack(cand)), cand)
    d = ref.astype(float) - cand.astype(float)
    loss, se = paired_loss(pack(ref), pack(cand))
    assert loss == pytest.approx(100 * d.mean()) and se == pytest.approx(100 * d.std() / np.sqrt(1001))
    assert paired_loss(pack(ref), pack(ref)) == (0.0, 0.0)


def test_cli_explore_finetune_refuses_tflite_before_the_search(tmp_path):
    from typer.testing import CliRunner

    from conftest import SHARED
    from maxdnn.cli import app

    tfl = need(SHARED / "models" / "mlperf-tiny-resnet8" / "pretrainedResnet_quant.tflite")
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--model", str(tfl), "--data",
                                 str(need(LOSSLESS_ZIP)), "--budget", "tiny"])
    assert r.exit_code == 2 and "TFLite" in r.output and not (tmp_path / "x").exists()


def test_explore_with_per_layer_energy_is_recorded_and_checked_on_resume(tmp_path):
    ex = Explorer(tmp_path, Workload.open(None, need(LOSSLESS_ZIP)), TINY, progress=False, log=lambda m: None,
                  energy="per-layer")
    assert ex.table.per_layer is not None and "per layer" in ex.table.source
    assert json.loads((tmp_path / "run.json").read_text())["energy"] == "per-layer"
    a = ex.build("layer", {"s3.conv2": ("roup-p2r2", 1.0)}, {})
    r = ex.evaluate(a)
    per = ex.table.per_layer["s3.conv2"]
    from maxdnn.energy import multiplication_counts

    counts = multiplication_counts(ex.q)
    mults = {n: counts[n] * int(np.prod(l.weight.shape[:2])) for n, l in ex.q.layers.items()}
    exact = sum(mults[n] * ex.table.per_layer[n]["exact"] for n in mults)
    assert r["energy_gain"] == pytest.approx(mults["s3.conv2"] * (per["exact"] - per["roup-p2r2"]) / exact)
    with pytest.raises(ValueError, match="energy"):
        Explorer(tmp_path, Workload.open(None, LOSSLESS_ZIP), TINY, progress=False, log=lambda m: None)


def test_rerun_of_a_finished_run_adds_to_its_wall_time(finished_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from maxdnn.cli import app

    src, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    info = json.loads((run / "run.json").read_text())
    info["wall_seconds"] = 1000.0
    (run / "run.json").write_text(json.dumps(info))
    r = CliRunner().invoke(app, ["explore", "--out", str(run), "--data", str(LOSSLESS_ZIP), "--budget", "tiny",
                                 "--compensation", "none"])
    assert r.exit_code == 0, r.output
    wall = json.loads((run / "run.json").read_text())["wall_seconds"]
    assert 1000 < wall < 1300 and f"exploration wall time: {wall:.0f} s" in (run / "report.md").read_text()


def test_spread_in_gain_takes_the_ends_then_halves_the_largest_gaps():
    from maxdnn.exploration.front import spread_in_gain

    front = [{"energy_gain": g} for g in (0.0, 0.1, 0.15, 0.2, 0.3, 0.5, 0.9)]
    gains = lambda pts: [p["energy_gain"] for p in pts]  # noqa: E731
    assert gains(spread_in_gain(front, 1)) == [0.9]
    assert gains(spread_in_gain(front, 2)) == [0.0, 0.9]
    assert gains(spread_in_gain(front, 3)) == [0.0, 0.5, 0.9]  # nearest 0.45, the middle of the gap
    assert gains(spread_in_gain(front, 4)) == [0.0, 0.3, 0.5, 0.9]  # 0.2 and 0.3 both 0.2 away: the larger gain
    assert gains(spread_in_gain(front, 3, [front[2]])) == [0.0, 0.15, 0.9]  # chosen first, then the ends
    assert spread_in_gain(front, 7) == front and spread_in_gain(front, 9) == front


def test_test_selection_keeps_the_cited_points_and_spreads_the_rest():
    from maxdnn.exploration.front import THRESHOLDS, test_selection

    front = [{"val_accuracy": 0.84 - 0.0025 * i, "energy_gain": 0.03 * i} for i in range(25)]
    assert test_selection(front, 0.84, 0) == front and test_selection(front, 0.84, 30) == front
    chosen = test_selection(front, 0.84, 8)
    assert len(chosen) == 8 and len({id(p) for p in chosen}) == 8
    for t in THRESHOLDS:  # the table's point at each threshold is measured
        ok = [p for p in front if 100 * (0.84 - p["val_accuracy"]) <= t + 1e-9]
        assert max(ok, key=lambda p: p["energy_gain"]) in chosen
    gains = sorted(p["energy_gain"] for p in chosen)
    assert gains[0] == 0.0 and gains[-1] == front[-1]["energy_gain"]  # the ends of the front, then between


def test_default_library_reaches_high_gains_and_stays_on_the_front():
    """The quick library spreads over the energy/error front down to roup-p3r4-like energies (> 90% gain
    possible), and every pick is Pareto-optimal in (energy, NMED)."""
    from maxdnn.energy import hardware_table
    from maxdnn.exploration.explorer import MIN_SPREAD_ENERGY, roup_library
    from maxdnn.multipliers.metrics import error_metrics
    from maxdnn.multipliers.models import get_multiplier, roup_specs

    hw = hardware_table()
    lib = roup_library(BUDGETS["quick"].library_size)
    assert len(lib) == len(set(lib)) == 8
    energies = [hw[s] for s in lib]
    assert energies == sorted(energies, reverse=True) and min(energies) < 0.1 and max(energies) > 0.9
    assert min(energies) >= MIN_SPREAD_ENERGY
    saving = [s for s in roup_specs(8) if hw.get(s, 1.0) < 1.0]
    nmed = {s: error_metrics(get_multiplier(s)).nmed for s in saving}
    for s in lib:
        assert not any(hw[o] <= hw[s] and nmed[o] <= nmed[s] and (hw[o] < hw[s] or nmed[o] < nmed[s]) for o in saving)
    assert sorted(roup_library(31)) == sorted(saving)  # the full budget takes them all


def test_compensated_library_is_the_front_of_the_error_compensation_leaves(qnet, lossless_test):
    """A compensated exploration's library is spread over the (energy, error spread after mean removal on the
    graph's own operands) front: the measure equals a plain recomputation, every pick is on that front, it still
    reaches past 90% gain, and it keeps milder perforation (roup-p2r1/p2r2: small compensated error) that the
    NMED front leaves out."""
    from maxdnn.energy import hardware_table
    from maxdnn.exploration.explorer import compensated_error, roup_library
    from maxdnn.hardware.power import model_stream
    from maxdnn.multipliers.models import get_multiplier, roup_specs

    images = lossless_test.images[:32]
    err = compensated_error(qnet, images)
    s = model_stream(qnet, images)
    for spec in ("roup-p0r0", "roup-p2r4", "roup-p3r0"):
        e = (get_multiplier(spec)(s.x, s.w) - s.x * s.w).astype(np.float64)
        assert err[spec] == pytest.approx(e.std(), rel=1e-9)
    assert err["roup-p0r0"] == 0.0
    hw = hardware_table()
    lib = roup_library(BUDGETS["quick"].library_size, err)
    assert len(lib) == len(set(lib)) == 8 and min(hw[x] for x in lib) < 0.1
    saving = [x for x in roup_specs(8) if hw.get(x, 1.0) < 1.0]
    for x in lib:
        assert not any(hw[o] <= hw[x] and err[o] <= err[x] and (hw[o] < hw[x] or err[o] < err[x]) for o in saving)
    assert {"roup-p2r1", "roup-p2r2"} <= set(lib) and not {"roup-p2r1", "roup-p2r2"} & set(roup_library(8))
    # a graph whose layers all take signed inputs has no unsigned stream: the NMED library
    import dataclasses

    from maxdnn.ir.graph import MulLayer, QParams

    signed = dataclasses.replace(qnet, nodes=[dataclasses.replace(n, in_q=QParams(n.in_q.scale, 0, -128, 127))
                                              if isinstance(n, MulLayer) else n for n in qnet.nodes])
    assert compensated_error(signed, images) is None and roup_library(8, None) == roup_library(8)


def test_cli_explore_unknown_compensation_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from conftest import one_line_error
    from maxdnn.cli import app

    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--data", str(need(LOSSLESS_ZIP)),
                                 "--budget", "tiny", "--compensation", "some"])
    one_line_error(r, "--compensation some: expected none, bias or finetune")
    assert not (tmp_path / "x").exists()


def test_kill_9_during_fine_tuning_resumes_to_the_same_result(tmp_path):
    """A run killed once the fine-tuning stage has begun resumes it and ends exactly as an uninterrupted run."""
    cmd = [sys.executable, "-m", "maxdnn", "explore", "--data", str(need(LOSSLESS_ZIP)), "--budget", "tiny",
           "--approach", "kernel"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    p = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (killed / "finetuned").exists():
        time.sleep(0.02)
    assert p.poll() is None, "finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "report.md").exists()
    for out in (killed, whole):
        r = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    for name in ("finetune_eval.json", "confirm_eval.json"):
        a, b = (json.loads((d / name).read_text()) for d in (killed, whole))
        if name == "finetune_eval.json":  # timing and worker names differ; results do not
            for doc in (a, b):
                for e in [doc["exact"], *doc["assignments"].values()]:
                    e.pop("seconds"), e.pop("worker")
        assert a == b, name


def test_ladder_specs_are_the_two_lowest_energy_weight_only_configurations():
    from maxdnn.energy import energy_table
    from maxdnn.exploration.search import ladder_specs

    table = energy_table(["roup-p0r1", "roup-p1r0", "roup-p2r0", "roup-p3r0", "roup-p3r4"])
    assert ladder_specs(["roup-p0r1", "roup-p1r0", "roup-p3r0", "roup-p2r0", "roup-p3r4"], table) == \
        ("roup-p3r0", "roup-p2r0")
    assert ladder_specs(["roup-p3r4", "roup-p2r0"], table) == ("roup-p2r0", "exact")
    assert ladder_specs(["roup-p0r1", "roup-p3r4", "drum-k4"], table) is None


def test_ladder_steps_order_layers_by_loss_per_energy_saved():
    from maxdnn.exploration.search import ladder_rungs

    # per layer: untrained loss with under alone, with top alone; energy saved by under over exact, top over under
    loss = np.array([[0.0, 0.5], [0.3, 0.4], [0.0, 0.1]])
    saved = np.array([[1.0, 1.0], [1.0, 2.0], [2.0, 1.0]])
    steps, rungs = ladder_rungs(loss, saved, [0.0, 0.5, 1.0])
    # loss per energy saved: (0,1) 0, (0,2) 0.5; (1,1) 0.3, (1,2) 0.1/2 = 0.05 but after its first step: 0.3;
    # (2,1) 0 (larger saving than (0,1): first), (2,2) 0.1
    assert steps == [(2, 1), (0, 1), (2, 2), (1, 1), (1, 2), (0, 2)]
    # the foot: the steps before the first top step (layer 1 exact: its under costs more than top on layer 2);
    # under on every layer saves 4, top on every layer 8, and the steps save 2, 3, 4, 5, 7, 8 in turn:
    # fractions 0, 1/2, 1 (savings 4, 6, 8) need 3, 5 and 6 steps
    assert rungs == [2, 3, 5, 6]
    # under = exact: nothing to save or lose on the first level; layers by top's loss per energy saved
    steps, rungs = ladder_rungs(np.array([[0.0, 0.5], [0.0, -0.1], [0.0, 0.2]]), np.array([[0.0, 1.0]] * 3),
                                [0.0, 1.0])
    assert steps[3:] == [(1, 2), (2, 2), (0, 2)] and rungs == [3, 6]
    # a layer that saves next to nothing (a classifier: 1e-4 of the rest) comes last, and no rung takes it
    loss = np.array([[0.0, 0.5], [0.0, 0.2], [1.0, 3.0]])
    saved = np.array([[1.0, 1.0], [1.0, 1.0], [1e-4, 1e-4]])
    steps, rungs = ladder_rungs(loss, saved, [0.0, 0.5, 1.0])
    assert steps[-2:] == [(2, 1), (2, 2)] and rungs == [2, 3, 4]


def test_ladder_points_are_fine_tuned_and_saved(compensated_run):
    """The fine-tuning exploration's library holds the weight-grid configurations; the ladder's points (top on
    a prefix of the layers by loss per energy saved, under on the rest) are all fine-tuned, whatever their loss
    untrained, and their assignments saved for ``maxdnn evaluate``."""
    from maxdnn.exploration.explorer import WEIGHT_GRID
    from maxdnn.exploration.search import NEGLIGIBLE, ladder_specs

    run, ex = compensated_run
    assert set(WEIGHT_GRID) <= set(ex.library)
    top, under = ladder_specs(ex.library, ex.table)
    assert (top, under) == ("roup-p3r0", "roup-p2r0")
    pts = sorted((p for p in ex.store.points(["layer"]) if p["source"] == "ladder"), key=lambda p: p["energy_gain"])
    layers = list(ex.q.layers)
    assert len(pts) >= 3 and pts[0]["fraction"] == 0.0 and 0.99 < pts[-1]["fraction"] <= 1.0
    assert [p["rung"] for p in pts] == sorted(p["rung"] for p in pts)
    level = {"exact": 0, under: 1, top: 2}
    levels = [[level[dict(json.loads(p["genome"])).get(n, ("exact", 1.0))[0]] for n in layers] for p in pts]
    assert 2 in levels[1] and 2 not in levels[0]
    # the top rung takes every layer to top but those that together save next to nothing (here the classifier,
    # 640 of ResNet-8's multiplications an image), which no rung takes
    mults = {d["name"]: d["multiplications"] for d in ex.q.describe_layers()}
    left = [n for n, lv in zip(layers, levels[-1]) if lv != 2]
    assert left == ["fc"] and mults["fc"] < NEGLIGIBLE * sum(mults.values())
    for a, b in zip(levels, levels[1:]):  # each rung takes layers up from the one below
        assert all(x <= y for x, y in zip(a, b)) and a != b
    done = json.loads((run / "finetune_eval.json").read_text())
    for p in pts:
        assert done["points"][point_key(p)] in done["assignments"]
        saved = Assignment.load(run / "pareto" / f"layer-ladder-{p['trial']}.json", ex.q)
        assert assignment_key(saved) == done["points"][point_key(p)]


def test_a_ladder_rung_is_trained_from_the_rung_below(compensated_run, tmp_path):
    """Each rung's fine-tuning starts from the rung below it as fine-tuned (distilled from the quantized model
    itself), not from the quantized model: the saved graph is that training's, byte for byte."""
    from maxdnn.compensate.finetune import finetune
    from maxdnn.data import training_sample
    from maxdnn.exploration.finetune_stage import FINETUNE_BUDGETS
    from maxdnn.ir.graph import QuantizedGraph

    run, ex = compensated_run
    fb = FINETUNE_BUDGETS["tiny"]
    done = json.loads((run / "finetune_eval.json").read_text())
    pts = sorted((p for p in ex.store.points(["layer"]) if p["source"] == "ladder"), key=lambda p: p["rung"])
    below, key = (done["points"][point_key(p)] for p in pts[-2:])
    a = Assignment.load(run / "pareto" / f"layer-ladder-{pts[-1]['trial']}.json", ex.q)
    tr = training_sample(len(ex.train), fb.images, ex.seed)
    kw = dict(epochs=fb.epochs, batch_size=fb.batch_size, lr=fb.lr, seed=ex.seed, log=lambda m: None,
              progress=False, teacher=ex.q)
    warm = finetune(QuantizedGraph.load(run / "finetuned" / f"{below}.npz"), a, ex.train.images[tr],
                    ex.train.labels[tr], tmp_path / "warm.npz", **kw)
    cold = finetune(ex.q, a, ex.train.images[tr], ex.train.labels[tr], tmp_path / "cold.npz", **kw)
    saved = QuantizedGraph.load(run / "finetuned" / f"{key}.npz")
    weights = lambda g: [l.weight for l in g.layers.values()]  # noqa: E731
    assert all(np.array_equal(x, y) for x, y in zip(weights(saved), weights(warm)))
    assert not all(np.array_equal(x, y) for x, y in zip(weights(saved), weights(cold)))


def test_the_ladder_is_one_work_unit_and_keeps_each_rung_measured(compensated_run):
    """A warm-started ladder's rungs can only be trained one after the other: they are one work unit (no two
    workers train a rung), bottom up; every other assignment is a unit of its own. Each rung's measurement is
    kept beside its graph as soon as it is made, so a ladder interrupted half-way keeps its finished rungs."""
    import sqlite3

    run, ex = compensated_run
    done = json.loads((run / "finetune_eval.json").read_text())
    pts = sorted((p for p in ex.store.points(["layer"]) if p["source"] == "ladder"), key=lambda p: p["rung"])
    rungs = list(dict.fromkeys(done["points"][point_key(p)] for p in pts))
    assert len(rungs) >= 2
    with sqlite3.connect(run / "study.db") as db:
        keys = [k for (k,) in db.execute("select key from maxdnn_units where key like 'finetune%'")]
    ladder = [k.rsplit("|", 1)[-1].split(",") for k in keys if k.startswith("finetune-ladder|")]
    singles = [k.rsplit("|", 1)[-1] for k in keys if k.startswith("finetune|")]
    assert ladder == [rungs] and not set(singles) & set(rungs)
    assert sorted(singles + rungs) == sorted(["exact", *done["assignments"]])
    for key in rungs:
        assert json.loads((run / "finetuned" / f"{key}.json").read_text())["entry"] == done["assignments"][key]


def test_a_graph_fine_tuned_with_another_recipe_is_refused_not_reused(compensated_run, tmp_path, monkeypatch):
    """A fine-tuned graph in RUN/finetuned made with other settings is refused in one line naming it (not taken
    as the stage's); ``maxdnn explore`` reports such a refusal as one line, exit 2, no traceback."""
    from typer.testing import CliRunner

    import maxdnn.exploration.explorer as explorer_module
    from maxdnn.cli import app
    from maxdnn.compensate.finetune import FinetuneError
    from maxdnn.data import training_sample
    from maxdnn.exploration.finetune_stage import FINETUNE_BUDGETS, _Stage
    from maxdnn.ir.graph import QuantizedGraph

    run, ex = compensated_run
    done = json.loads((run / "finetune_eval.json").read_text())
    key = next(iter(done["assignments"]))
    g = QuantizedGraph.load(run / "finetuned" / f"{key}.npz")
    g.meta["finetune"]["epochs"] += 1
    stale = run / "finetuned" / "stale-recipe.npz"
    g.save(stale)
    try:
        fb = FINETUNE_BUDGETS["tiny"]
        stage = _Stage(ex, fb, {}, {"stale-recipe": (Assignment.uniform(ex.q, "exact"), [])}, {},
                       training_sample(len(ex.train), fb.images, ex.seed), {})
        with pytest.raises(FinetuneError, match="stale-recipe.npz: fine-tuned with"):
            stage.trained("stale-recipe")
    finally:
        stale.unlink()

    def refused(*a, **k):
        raise FinetuneError(f"{stale}: fine-tuned with another recipe; delete RUN_DIR/finetuned")

    monkeypatch.setattr(explorer_module, "run_exploration", refused)
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--data", str(need(LOSSLESS_ZIP)),
                                 "--budget", "tiny", "--approach", "layer"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith(f"maxdnn: error: {stale}: fine-tuned")
    assert "Traceback" not in r.output


def test_a_damaged_result_file_in_the_run_is_one_line_not_a_traceback(compensated_run, tmp_path):
    """A run's own result files, resumed from, can still be damaged by hand or by a full disk: a measurement kept
    in finetuned/KEY.json, finetune_eval.json, confirm_eval.json. Each is refused in one line naming the file
    (the stage's error; ``maxdnn report``: exit 2), never a JSON traceback nor taken as empty."""
    import copy as copy_module
    import shutil

    from typer.testing import CliRunner

    from maxdnn.cli import app
    from maxdnn.compensate.finetune import FinetuneError
    from maxdnn.data import training_sample
    from maxdnn.exploration.confirm import ConfirmError, confirm_and_test
    from maxdnn.exploration.finetune_stage import FINETUNE_BUDGETS, _Stage, finetune_front

    run, ex = compensated_run
    done = json.loads((run / "finetune_eval.json").read_text())
    key = next(iter(done["assignments"]))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    kept = copy / "finetuned" / f"{key}.json"
    assert kept.exists()
    kept.write_text('{"settings": {"epochs": 1')  # cut short
    fb = FINETUNE_BUDGETS["tiny"]
    ex_copy = copy_module.copy(ex)  # the same exploration, reading its results from the damaged copy
    ex_copy.run_dir = copy
    stage = _Stage(ex_copy, fb, {}, {key: (Assignment.uniform(ex.q, "exact"), [])}, {},
                   training_sample(len(ex.train), fb.images, ex.seed), {})
    with pytest.raises(FinetuneError, match=f"{kept}: not a readable result file \\(JSONDecodeError\\)"):
        stage.measure(key)
    (copy / "finetune_eval.json").write_text("[1, 2]")
    with pytest.raises(FinetuneError, match="finetune_eval.json: not a maxdnn result file \\(a JSON list"):
        finetune_front(ex_copy, ["layer"], {}, fb)
    (copy / "confirm_eval.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfirmError, match="confirm_eval.json: not a readable result file \\(UnicodeDecodeError"):
        confirm_and_test(ex_copy, ["layer"], {})
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("maxdnn: error: ") and "confirm_eval.json" in r.output


def test_unusable_settings_and_a_changed_resume_are_maxdnn_errors(finished_run, tmp_path):
    """Settings the exploration cannot use, and a resume with other settings than the run's, are one line and
    a MaxdnnError (still ValueError), so the Python API's callers catch them with the rest."""
    import shutil

    from maxdnn.errors import MaxdnnError
    from maxdnn.exploration.explorer import check_library

    run, ex = finished_run
    wl = Workload.open(None, need(LOSSLESS_ZIP))
    with pytest.raises(MaxdnnError, match="compensation 'some': expected one of none, bias, finetune"):
        Explorer(tmp_path / "a", wl, TINY, progress=False, log=lambda m: None, compensation="some")
    with pytest.raises(MaxdnnError, match="--library: 'exact' is always a choice"):
        check_library(ex.q, ["roup-p2r0", "exact"])
    with pytest.raises(MaxdnnError, match="--library roup-p9r0: unknown or out-of-range"):
        check_library(ex.q, ["roup-p9r0"])
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(MaxdnnError, match="run.json: this run was made with seed 0; rerun with it"):
        Explorer(copy, wl, TINY, progress=False, log=lambda m: None, seed=1)


def test_a_point_whose_assignment_was_not_saved_takes_its_twins_gains(compensated_run, tmp_path):
    """The sweep and NSGA-II often find the same assignment, and a front tie saves one of the two: the other
    row of points.csv takes the saved one's PE gain instead of none."""
    import shutil

    run, ex = compensated_run
    rows = read_points(run / "points.csv")
    key = lambda r: (r["approach"], r["source"], r["trial"])  # noqa: E731
    pairs = [(r, o) for r in rows for o in rows if r["pe_energy_gain"] not in ("", None)
             and o["approach"] == r["approach"] and o["summary"] == r["summary"] and key(o) != key(r)]
    assert pairs, "the tiny run has no two points of one assignment"
    r, twin = pairs[0]
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("study.db*"))
    own = copy / "pareto" / "{}-{}-{}.json".format(*key(r))
    other = copy / "pareto" / "{}-{}-{}.json".format(*key(twin))
    shutil.copy(own, other)
    own.unlink()
    write_report(copy, ex.store)
    again = {(key(x), x["compensation"]): x for x in read_points(copy / "points.csv")}
    assert again[(key(r), r["compensation"])]["pe_energy_gain"] == r["pe_energy_gain"]
