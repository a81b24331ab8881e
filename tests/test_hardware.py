import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from maxdnn.cli import app
from maxdnn.energy import multiplication_counts
from maxdnn.hardware.booth_verilog import booth_multiplier_verilog
from maxdnn.hardware.netlist import Netlist
from maxdnn.hardware.power import hardware_report, netlist_for, stream_energy, uniform_stream
from maxdnn.hardware.synth import synthesize
from maxdnn.multipliers.models import get_multiplier, roup_specs

XS = np.repeat(np.arange(256), 256)
WS = np.tile(np.arange(-128, 128), 256)


def _gate(t, a, b, y):
    conns = {"A": [a], "Y": [y]}
    if b is not None:
        conns["B"] = [b]
    return {"type": f"$_{t}_", "connections": conns}


def tiny(cells, inputs, outputs):
    return Netlist.from_yosys_json({"modules": {"mul": {
        "ports": {**{k: {"direction": "input", "bits": v} for k, v in inputs.items()},
                  **{k: {"direction": "output", "bits": v} for k, v in outputs.items()}},
        "cells": {f"c{i}": c for i, c in enumerate(cells)}}}})


def test_simulator_full_adder_truth_table():
    # listed out of order on purpose: the reader sorts topologically
    cells = [_gate("XOR", 10, 4, 5), _gate("XOR", 2, 3, 10), _gate("AND", 2, 3, 11), _gate("AND", 10, 4, 12), _gate("OR", 11, 12, 6)]
    n = tiny(cells, {"a": [2], "b": [3], "c": [4]}, {"s": [5, 6, "0"]})  # (sum, carry, 0): unsigned 3-bit word
    a, b, c = np.array([0, 1] * 4), np.repeat([0, 1], 2).tolist() * 2, np.repeat([0, 1], 4)
    out = n.simulate(a=a, b=np.array(b), c=c)["s"]
    assert list(out) == list(a + np.array(b) + c)
    assert n.depth() == 3


def test_unit_delay_counts_glitches():
    # y = a XOR NOT(NOT(a)) is 0 when settled, but glitches to 1 for two steps when a toggles
    cells = [_gate("NOT", 2, None, 3), _gate("NOT", 3, None, 4), _gate("XOR", 2, 4, 5)]
    n = tiny(cells, {"a": [2]}, {"y": [5, "0"]})
    toggles, zero = n.toggles(a=np.array([0, 1, 0, 1]))
    assert zero[2] == 0 and toggles[2] == 6  # 3 transitions, each a 0 -> 1 -> 0 glitch
    assert toggles[0] == 3 and toggles[1] == 3


@pytest.mark.parametrize("rounding", ["folded", "incrementer"])
@pytest.mark.parametrize("spec", ["exact"] + [s for s in roup_specs(8) if s != "roup-p0r0"])
def test_synthesized_netlist_exhaustively_equals_model(spec, rounding):
    net = netlist_for(spec, rounding=rounding)
    assert np.array_equal(net.simulate(x=XS, w=WS)["p"], get_multiplier(spec)(XS, WS)), spec


@pytest.mark.parametrize("rounding", ["folded", "incrementer"])
@pytest.mark.parametrize("p,r", [(0, 0), (1, 2), (2, 5), (0, 7)])
def test_signed_multiplicand_designs(p, r, rounding):
    net, _ = synthesize(booth_multiplier_verilog(p, r, x_signed=True, rounding=rounding))
    xs = np.repeat(np.arange(-128, 128), 256)
    m = get_multiplier(f"roup-p{p}r{r}", x_signed=True)
    assert np.array_equal(net.simulate(x=xs & 255, w=WS)["p"], m(xs, WS))


def test_folded_rounding_has_no_adder_and_costs_less():
    """Folded rounding adds one XOR-and-gate per row instead of an incrementer: smaller than the
    incrementer design for small R, and never more than the exact multiplier."""
    exact = netlist_for("exact").area_nand2()
    for r in range(1, 8):
        folded = netlist_for(f"roup-p0r{r}").area_nand2()
        inc = netlist_for(f"roup-p0r{r}", rounding="incrementer").area_nand2()
        assert folded < exact, r
        if r <= 3:
            assert folded < inc, r
    v = booth_multiplier_verilog(1, 3)
    assert "x[2]" in v and "folded rounding" in v


def test_energy_ordering_and_exact_equivalence():
    rows = {r["spec"]: r for r in hardware_report(["exact", "roup-p0r0"] + roup_specs(8)[1:], [uniform_stream(4000)])}
    assert rows["roup-p0r0"]["energy"] == rows["exact"]["energy"] and rows["roup-p0r0"]["energy_rel"]["uniform"] == 1.0
    for r in range(8):
        e = [rows[f"roup-p{p}r{r}"]["energy"]["uniform"] for p in range(4)]
        assert e == sorted(e, reverse=True) and len(set(e)) == 4, (r, e)  # more perforation, less energy
        a = [rows[f"roup-p{p}r{r}"]["area_nand2"] for p in range(4)]
        assert a == sorted(a, reverse=True)


def test_energy_cached(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("MAXDNN_CACHE", str(tmp_path))
    net = netlist_for("roup-p1r1")
    s = uniform_stream(3000, seed=5)
    first = stream_energy(net, s)
    t = time.time()
    assert stream_energy(net, s) == first and time.time() - t < 0.05


def test_committed_energy_table_matches_fresh_simulation():
    from importlib import resources

    doc = json.loads((resources.files("maxdnn") / "data_files" / "energy-8bit.json").read_text())
    rows = {r["spec"]: r for r in doc["designs"]}
    assert set(rows) == {"exact"} | set(roup_specs(8)) - {"roup-p0r0"}
    fresh = hardware_report(["roup-p1r2"], [uniform_stream()])[0]
    assert fresh["energy"]["uniform"] == rows["roup-p1r2"]["energy"]["uniform"]
    assert fresh["area_nand2"] == rows["roup-p1r2"]["area_nand2"]


def test_cli_hardware(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["hardware", "report", "--spec", "exact", "--spec", "roup-p2r2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {"spec", "area_nand2", "depth", "energy", "energy_rel"} <= set(rows[0])
    assert rows[1]["energy_rel"]["uniform"] < 1
    r = runner.invoke(app, ["hardware", "report", "--spec", "mitchell"])
    assert r.exit_code == 2 and "no hardware design" in r.output and len(r.output.strip().splitlines()) == 1
    out = tmp_path / "m.v"
    r = runner.invoke(app, ["hardware", "verilog", "roup-p1r2", "--out", str(out)])
    assert r.exit_code == 0 and "module mul(" in out.read_text()
    r = runner.invoke(app, ["hardware", "verilog", "drum-k4", "--out", str(out)])
    assert r.exit_code == 2


def test_committed_table_energy_ordering_with_folded_rounding():
    """With folded rounding every configuration saves energy; energy falls with P at every R, and with R
    except at R = 1 for P >= 1 (explained in the README from the netlist)."""
    from importlib import resources

    doc = json.loads((resources.files("maxdnn") / "data_files" / "energy-8bit.json").read_text())
    assert doc["rounding"] == "folded"
    e = {r["spec"]: r["energy_rel"] for r in doc["designs"]}
    e["roup-p0r0"] = e["exact"]
    for stream in ("uniform", "resnet8"):
        for s in roup_specs(8):
            if s != "roup-p0r0":
                assert e[s][stream] < 1.0, (s, stream)
        for r in range(8):
            col = [e[f"roup-p{p}r{r}"][stream] for p in range(4)]
            assert col == sorted(col, reverse=True), (stream, r)
        for p in range(4):
            row = [e[f"roup-p{p}r{r}"][stream] for r in range(8)]
            start = 0 if p == 0 else 1
            assert row[start:] == sorted(row[start:], reverse=True), (stream, p)


def test_layer_streams_hold_each_layers_own_operands(qnet, lossless_test):
    import torch

    from maxdnn.hardware.power import layer_streams, per_layer_relative

    imgs = lossless_test.images[:2]
    streams = layer_streams(qnet, imgs, pairs=500)
    assert set(streams) == {n for n, l in qnet.layers.items() if not l.x_signed}
    taps: dict = {}
    qnet.forward_int(torch.as_tensor(imgs), taps=taps)
    for name, s in streams.items():
        assert 0 < len(s.x) <= 500 and s.name == f"layer:{name}"
        assert set(np.unique(s.w)) <= set(np.unique(qnet.layers[name].weight))
        assert set(np.unique(s.x)) <= set(np.unique(taps[name].numpy()))
    assert streams["conv1"].digest() == layer_streams(qnet, imgs, pairs=500)["conv1"].digest()  # seeded
    rows = hardware_report(["exact", "roup-p2r2"], list(streams.values()))
    rel = per_layer_relative(rows, qnet)
    mults = {n: multiplication_counts(qnet)[n] * np.prod(qnet.layers[n].weight.shape[:2]) for n in rel}
    avg = sum(mults[n] * rel[n]["exact"] for n in rel) / sum(mults.values())
    assert avg == pytest.approx(1.0, abs=1e-4)  # the unit: one exact multiplication, averaged over layers
    assert all(rel[n]["roup-p2r2"] < rel[n]["exact"] for n in rel)


def test_cli_per_layer_needs_one_model_stream():
    r = CliRunner().invoke(app, ["hardware", "report", "--per-layer", "--spec", "exact"])
    one_line_error(r, "--per-layer")


@pytest.mark.parametrize("spec", ["exact", "roup-p2r2"])
def test_processing_element_netlist_adds_the_product_to_the_accumulator(spec):
    from maxdnn.hardware.power import PE_ACC_BITS, accumulator_inputs, pe_energy

    net = netlist_for(spec, unit="mac")
    rng = np.random.default_rng(1)
    acc = rng.integers(-(1 << (PE_ACC_BITS - 2)), 1 << (PE_ACC_BITS - 2), XS.size)
    assert np.array_equal(net.simulate(x=XS, w=WS, acc=acc)["s"], acc + get_multiplier(spec)(XS, WS))
    s = uniform_stream(300)
    a = accumulator_inputs(spec, s)
    prods = get_multiplier(spec)(s.x, s.w)
    assert a[0] == 0 and a[1] == prods[0] and a[64] == 0 and a[65] == prods[64]  # dot products of 64
    e = pe_energy(spec, s)
    stored = a + prods
    flips = sum(bin(int(v) & ((1 << PE_ACC_BITS) - 1)).count("1") for v in stored[1:] ^ stored[:-1]) / (len(s.x) - 1)
    assert e["register_bit_toggles"] == pytest.approx(flips)
    assert e["energy"] == pytest.approx(e["datapath"] + e["register"]) and e["datapath"] > stream_energy(netlist_for(spec), s)["energy"]


def test_pe_gain_in_network_energy(qnet):
    import json as _json
    from importlib import resources

    from maxdnn.engine.approx import Assignment
    from maxdnn.energy import network_energy

    doc = _json.loads((resources.files("maxdnn") / "data_files" / "energy-8bit.json").read_text())
    pe = {r["spec"]: r["pe_energy_rel"]["resnet8"] for r in doc["designs"]}
    e = network_energy(qnet, Assignment.uniform(qnet, "roup-p2r2"))
    assert e["pe_energy_gain"] == pytest.approx(1 - pe["roup-p2r2"])
    assert 0 < e["pe_energy_gain"] < e["energy_gain"]  # the accumulator is not approximated
