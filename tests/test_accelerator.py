"""Accelerator-level energy through ZigZag, on a small network: the exact network's per-layer numbers are
ZigZag's own, an assignment changes the MAC energy only, by its PE energy, and bad descriptions are one line."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

import maxdnn
from conftest import one_line_error
from maxdnn.accelerator import AcceleratorError, accelerator_energy, resolve, workload, zigzag_layers
from maxdnn.cli import app
from maxdnn.energy import energy_table
from maxdnn.engine.approx import Assignment


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x / 255.0))
        x = F.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    torch.manual_seed(0)
    imgs = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    return maxdnn.quantize(Small().eval(), imgs)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def own_cache(module_cache, monkeypatch):
    """One cache for the module, not the user's: ZigZag maps the small network once (about 10 s), and every
    test after the first that needs it reads it back, as an exploration does."""
    monkeypatch.setenv("MAXDNN_CACHE", str(module_cache))


def test_exact_network_is_zigzags_own_run_to_the_pj(graph, tmp_path):
    """Our per-layer numbers against ZigZag's own cost-model objects for the same workload and mapping."""
    import yaml
    from zigzag.api import get_hardware_performance_zigzag

    from maxdnn.accelerator import _mapping_for

    r = accelerator_energy(graph, Assignment.uniform(graph, "exact"), "tpu_like")
    hw, mp, _ = resolve("tpu_like")
    hw_doc = yaml.safe_load(hw.read_text())
    sizes = dict(zip(hw_doc["operational_array"]["dimensions"], hw_doc["operational_array"]["sizes"]))
    layers = workload(graph)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_mapping_for(layers, yaml.safe_load(mp.read_text()), sizes, mp)))
    total, _, cmes = get_hardware_performance_zigzag(layers, str(hw), str(tmp_path / "m.yaml"), opt="energy",
                                                     dump_folder=str(tmp_path / "zz"), loma_show_progress_bar=False)
    own = {c.layer.name: c for c, _ in cmes[0][1]}
    assert set(own) == set(graph.layers) == set(r["layers"])
    for name, lay in r["layers"].items():
        assert lay["total_exact_pj"] == pytest.approx(own[name].energy_total, abs=1e-6)
        assert lay["mac_exact_pj"] == pytest.approx(own[name].mac_energy, abs=1e-6) == lay["mac_pj"]
        assert lay["mac_exact_pj"] + sum(lay["memory_pj"].values()) == pytest.approx(lay["total_exact_pj"], abs=1e-6)
        assert lay["macs"] * 0.04 == pytest.approx(lay["mac_exact_pj"])  # tpu_like: 0.04 pJ per MAC
    assert r["total"]["total_exact_pj"] == pytest.approx(total, abs=1e-6) and r["total"]["gain"] == 0
    assert set(r["total"]["memory_pj"]) == {"rf_128B", "rf_2B", "sram_2MB", "dram"} and r["unit"] == "pJ per image"


def test_an_assignment_scales_the_mac_energy_by_its_pe_energy(graph, monkeypatch):
    exact = accelerator_energy(graph, Assignment.uniform(graph, "exact"), "tpu_like")
    import zigzag.api

    monkeypatch.setattr(zigzag.api, "get_hardware_performance_zigzag", lambda *a, **k: pytest.fail("not cached"))
    names = list(graph.layers)
    a = maxdnn.layer_assignment(graph, {names[1]: "roup-p2r2"})
    r = accelerator_energy(graph, a, "tpu_like")  # from the cache: the mapping search ran once
    pe = energy_table(["exact", "roup-p2r2"]).pe["roup-p2r2"]
    for n in names:
        want = exact["layers"][n]["mac_pj"] * (pe if n == names[1] else 1.0)
        assert r["layers"][n]["mac_pj"] == pytest.approx(want)
        assert r["layers"][n]["memory_pj"] == exact["layers"][n]["memory_pj"]
    saved = exact["layers"][names[1]]["mac_pj"] * (1 - pe)
    assert r["total"]["gain"] == pytest.approx(saved / exact["total"]["total_exact_pj"]) and 0 < r["total"]["gain"] < 0.05
    assert "ZigZag (tpu_like" in r["source"] and "PE" in r["source"]


def test_grouped_and_strided_layers_become_zigzag_loops(graph):
    lay = {L["name"]: L for L in workload(graph)}
    c2 = dict(zip(lay["c2"]["loop_dims"], lay["c2"]["loop_sizes"]))
    assert c2 == {"B": 1, "G": 1, "K": 16, "C": 8, "OY": 16, "OX": 16, "FY": 3, "FX": 3}
    assert lay["c2"]["dimension_relations"] == ["ix=2*ox+1*fx", "iy=2*oy+1*fy"]
    assert lay["c2"]["operand_source"] == {"I": 0} and lay["fc"]["loop_sizes"][4:] == [1, 1, 1, 1]


def test_bad_accelerators_are_one_line(graph, tmp_path):
    with pytest.raises(AcceleratorError, match="not a ZigZag template"):
        resolve("no_such_chip")
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: x\nmemories: {}\n")
    mp = tmp_path / "map.yaml"
    mp.write_text("- name: default\n  spatial_mapping: {D1: ['K, 4']}\n")
    with pytest.raises(AcceleratorError, match="operational_array"):
        zigzag_layers(graph, f"{bad}:{mp}")
    bad.write_text("memories: [unclosed\n")
    with pytest.raises(AcceleratorError, match=f"{bad}: not a readable"):
        zigzag_layers(graph, f"{bad}:{mp}")
    with pytest.raises(AcceleratorError, match="HW.yaml:MAPPING.yaml"):
        resolve(str(bad))
    r = CliRunner().invoke(app, ["evaluate", "--data", "x", "--assign", "a.json", "--accelerator", "no_such_chip"])
    one_line_error(r, "no_such_chip", "not a ZigZag template")
    r = CliRunner().invoke(app, ["evaluate", "--data", "x", "--accelerator", "tpu_like"])
    one_line_error(r, "--accelerator needs --assign")


def test_evaluate_json_gives_the_three_levels(graph, tmp_path):
    from conftest import LOSSLESS_ZIP, need

    graph.save(tmp_path / "small.npz")
    a = maxdnn.layer_assignment(graph, {n: "roup-p2r2" for n in graph.layers})
    a.save(tmp_path / "a.json")
    r = CliRunner().invoke(app, ["evaluate", "--data", str(need(LOSSLESS_ZIP)), "--model", str(tmp_path / "small.npz"),
                                 "--assign", str(tmp_path / "a.json"), "--limit", "20", "--accelerator", "tpu_like",
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert 0.7 < d["energy_gain"] < 0.8 and d["pe_energy_gain"] < d["energy_gain"]
    assert 0 < d["accelerator_energy_gain"] < d["pe_energy_gain"] and d["accelerator_energy_unit"] == "pJ per image"
    assert d["accelerator_energy_exact_pj"] == pytest.approx(sum(d["accelerator_memory_pj"].values())
                                                             + d["accelerator_mac_share_exact"]
                                                             * d["accelerator_energy_exact_pj"], rel=1e-6)


def _tiny_layer_exploration(graph, tmp_path, *options):
    """A tiny layer-level exploration of ``graph`` without compensation, with ``options``; its run folder."""
    from conftest import LOSSLESS_ZIP, need

    run = tmp_path / "run"
    graph.save(tmp_path / "small.npz")
    r = CliRunner().invoke(app, ["explore", "--out", str(run), "--data", str(need(LOSSLESS_ZIP)), "--budget", "tiny",
                                 "--model", str(tmp_path / "small.npz"), "--approach", "layer", "--compensation",
                                 "none", *options])
    assert r.exit_code == 0, r.output
    return run


def test_exploration_report_gives_the_chip_gain_of_front_points(graph, tmp_path):
    """explore --accelerator: every front point with a saved assignment gets its accelerator gain in points.csv,
    and the report's cells show it beside the PE gain."""
    from conftest import LOSSLESS_ZIP

    from maxdnn.exploration.report import read_points

    run = _tiny_layer_exploration(graph, tmp_path, "--accelerator", "tpu_like")
    rows = [r for r in read_points(run / "points.csv") if r["on_front"]]
    assert rows and all(r["accelerator_energy_gain"] is not None for r in rows)
    assert all(0 <= r["accelerator_energy_gain"] < r["pe_energy_gain"] + 1e-12 for r in rows if r["energy_gain"] > 0)
    text = (run / "report.md").read_text()
    assert "accelerator: tpu_like" in text and "chip " in text
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--data", str(LOSSLESS_ZIP), "--budget",
                                 "tiny", "--accelerator", "nope"])
    one_line_error(r, "nope", "not a ZigZag template")


def test_exploration_can_minimise_the_accelerator_energy(graph, tmp_path):
    """explore --energy accelerator:tpu_like: the objective (energy, energy_gain) is the accelerator's energy per
    image, each point keeps its multiplication gain beside it, and the report says so."""
    from conftest import LOSSLESS_ZIP

    from maxdnn.accelerator import AcceleratorModel
    from maxdnn.exploration.report import read_points

    run = _tiny_layer_exploration(graph, tmp_path, "--energy", "accelerator:tpu_like")
    rows = read_points(run / "points.csv")
    chip = AcceleratorModel(graph, "tpu_like")
    exact_pj = chip.energy(Assignment.uniform(graph, "exact"))["total"]["total_exact_pj"]
    approx = [r for r in rows if r["energy_gain"] > 0]
    assert approx
    for r in approx:
        assert r["energy"] == pytest.approx(exact_pj * (1 - r["energy_gain"]), rel=1e-9)  # pJ per image
        assert 0 < r["energy_gain"] < r["multiplication_energy_gain"]  # memories dilute the gain
    for r in (r for r in rows if r["on_front"]):  # the chip column is the objective itself
        assert r["accelerator_energy_gain"] == pytest.approx(r["energy_gain"], rel=1e-9)
    text = (run / "report.md").read_text()
    assert "objective: the accelerator" in text and "(mult " in text
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--data", str(LOSSLESS_ZIP), "--budget",
                                 "tiny", "--energy", "accelerator:nope"])
    one_line_error(r, "nope", "not a ZigZag template")
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "x"), "--data", str(LOSSLESS_ZIP), "--budget",
                                 "tiny", "--energy", "accelerator:tpu_like", "--accelerator", "edge_tpu_like"])
    one_line_error(r, "give one of them")
    r = CliRunner().invoke(app, ["evaluate", "--data", str(LOSSLESS_ZIP), "--limit", "4", "--assign",
                                 str(run / "pareto" / next(p.name for p in (run / "pareto").iterdir())),
                                 "--model", str(tmp_path / "small.npz"), "--energy", "accelerator:tpu_like"])
    one_line_error(r, "objective of explore", "--accelerator tpu_like")


def test_api_evaluate_gives_the_three_levels(graph):
    imgs = np.random.default_rng(1).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    a = maxdnn.layer_assignment(graph, {n: "roup-p2r2" for n in graph.layers})
    r = maxdnn.evaluate(graph, imgs, np.zeros(6, dtype=np.int64), a, accelerator="tpu_like")
    assert r.accelerator_energy_gain == accelerator_energy(graph, a, "tpu_like")["total"]["gain"]
    assert 0 < r.accelerator_energy_gain < r.pe_energy_gain < r.energy_gain
    assert r.accelerator["unit"] == "pJ per image" and set(r.accelerator["layers"]) == set(graph.layers)
    assert maxdnn.evaluate(graph, imgs, np.zeros(6, dtype=np.int64), a).accelerator_energy_gain is None
    with pytest.raises(maxdnn.MaxdnnError, match="give an assignment"):
        maxdnn.evaluate(graph, imgs, np.zeros(6, dtype=np.int64), accelerator="tpu_like")
