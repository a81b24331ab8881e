"""Liberty-based energy: a hand-made library with known numbers, and FreePDK45's FlexLib end to end."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from maxdnn.cli import app
from maxdnn.hardware.liberty import LibertyError, read_liberty
from maxdnn.hardware.netlist import Netlist
from maxdnn.hardware.power import netlist_for, stream_energy, uniform_stream
from maxdnn.multipliers.models import get_multiplier

# capacitance in pF, voltage in mV, leakage in nW: every unit is converted
HANDMADE = """
library (toy) {
  capacitive_load_unit (1, pf) ;
  voltage_unit : "1mV" ;
  leakage_power_unit : "1nW" ;
  nom_voltage : 1100 ;
  power_lut_template (e2x2) {
    variable_1 : input_transition_time ;
    variable_2 : total_output_net_capacitance ;
    index_1 ("10, 30, 50") ;
    index_2 ("0.001, 0.005") ;
  }
  cell (INV) {
    area : 1.5 ;
    cell_leakage_power : 3.0 ;
    pin (A) { direction : input ; capacitance : 0.002 ; }
    pin (Y) {
      direction : output ; function : "!A" ;
      internal_power () {
        related_pin : "A" ;
        rise_power (e2x2) { values ("9, 9", "2, 6", "9, 9") ; }
        fall_power (e2x2) { values ("9, 9", "4, 8", "9, 9") ; }
      }
    }
  }
  cell (NAND2) {
    area : 2.0 ;
    cell_leakage_power : 5.0 ;
    pin (A) { direction : input ; capacitance : 0.003 ; }
    pin (B) { direction : input ; capacitance : 0.001 ; }
    pin (Y) {
      direction : output ; function : "(A B)'" ;
      internal_power () {
        related_pin : "A" ;
        rise_power (e2x2) { values ("9, 9", "10, 20", "9, 9") ; }
        fall_power (e2x2) { values ("9, 9", "10, 20", "9, 9") ; }
      }
      internal_power () {
        related_pin : "B" ;
        rise_power (e2x2) { values ("9, 9", "30, 40", "9, 9") ; }
        fall_power (e2x2) { values ("9, 9", "30, 40", "9, 9") ; }
      }
    }
  }
  cell (DFF) {
    area : 6.0 ;
    ff (IQ, IQN) { next_state : "D" ; clocked_on : "CK" ; }
    pin (D) { direction : input ; capacitance : 0.001 ; }
    pin (CK) { direction : input ; capacitance : 0.001 ; clock : true ; }
    pin (Q) { direction : output ; function : "IQ" ; }
  }
}
"""


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.lib"
    path.write_text(HANDMADE)
    return path


def test_handmade_library_units_and_energies(toy):
    lib = read_liberty(toy)
    assert lib.voltage == pytest.approx(1.1)
    inv, nand = lib.cells["INV"], lib.cells["NAND2"]
    assert inv.input_cap == {"A": pytest.approx(2.0)} and nand.input_cap == {"A": pytest.approx(3.0), "B": pytest.approx(1.0)}
    assert inv.leakage_nw == 3.0 and nand.area == 2.0
    y = inv.outputs["Y"]
    assert y.slew == 30  # the middle of the slew index
    np.testing.assert_allclose(y.loads, [1.0, 5.0])  # fF
    # table unit pF * mV^2 = 1e-12 F * 1e-6 V^2 = 1e-3 fJ; the row at 30 ps, rise (2, 6) and fall (4, 8) averaged
    np.testing.assert_allclose(y.energy, [0.003, 0.007])
    assert y.energy_at(3.0) == pytest.approx(0.005)  # halfway between 1 and 5 fF
    assert y.energy_at(0.0) == pytest.approx(0.003) and y.energy_at(99) == pytest.approx(0.007)  # clamped
    np.testing.assert_allclose(nand.outputs["Y"].energy, [0.020, 0.030])  # related pins averaged
    assert not lib.cells["DFF"].outputs  # sequential: not simulated


def test_mapped_netlist_simulates_and_costs_by_hand(toy):
    """n1 = NAND(x0, w0) drives an INV (2 fF) and a NAND's A pin (3 fF): 5 fF."""
    lib = read_liberty(toy)
    doc = {"modules": {"mul": {"ports": {"x": {"direction": "input", "bits": [2, 3]},
                                         "w": {"direction": "input", "bits": [4, 5]},
                                         "p": {"direction": "output", "bits": [7, 8]}},
                               "cells": {"g1": {"type": "NAND2", "connections": {"A": [2], "B": [4], "Y": [6]}},
                                         "g2": {"type": "INV", "connections": {"A": [6], "Y": [7]}},
                                         "g3": {"type": "NAND2", "connections": {"A": [6], "B": [3], "Y": [8]}}}}}}
    net = Netlist.from_yosys_json(doc, liberty=lib)
    x, w = np.arange(4).repeat(4), np.tile(np.arange(4), 4)
    n1 = ~((x & 1).astype(bool) & (w & 1).astype(bool))
    p0, p1 = ~n1, ~(n1 & ((x >> 1) & 1).astype(bool))
    raw = net.simulate(x=x, w=w)["p"] & 3
    assert np.array_equal(raw, p0.astype(int) | (p1.astype(int) << 1))
    e = dict(zip(net.gate_type, net.gate_energy))
    assert sorted(net.gate_energy) == pytest.approx(sorted([0.030 + 0.5 * 5 * 1.21, 0.020, 0.003]))
    assert e["INV.Y"] == pytest.approx(0.003)  # drives only an output: the table's smallest load, no pin
    assert net.cell_area == pytest.approx(5.5) and net.leakage_nw == pytest.approx(13.0)
    toggles, _ = net.toggles(x=x, w=w)
    res = stream_energy(net, uniform_stream(50, bits=2))
    assert res["energy"] > 0 and toggles.sum() > 0


def test_bad_liberty_is_one_line(tmp_path, toy):
    r = CliRunner().invoke(app, ["hardware", "report", "--liberty", str(tmp_path / "none.lib"), "--spec", "exact"])
    one_line_error(r, "none.lib", "cannot read")
    bad = tmp_path / "bad.lib"
    bad.write_text("this is { not liberty")
    one_line_error(CliRunner().invoke(app, ["hardware", "report", "--liberty", str(bad), "--spec", "exact"]),
                   "bad.lib", "not a liberty file")
    nofunc = tmp_path / "nofunc.lib"
    nofunc.write_text('library (x) { nom_voltage : 1.0 ; cell (A) { pin (Y) { direction : output ; } } }')
    one_line_error(CliRunner().invoke(app, ["hardware", "report", "--liberty", str(nofunc), "--spec", "exact"]),
                   "nofunc.lib", "no cell with a logic function")
    with pytest.raises(LibertyError, match="nom_voltage"):
        (tmp_path / "nov.lib").write_text(HANDMADE.replace("nom_voltage : 1100 ;", ""))
        read_liberty(tmp_path / "nov.lib")


@pytest.fixture(scope="session")
def flexlib(tmp_path_factory) -> Path:
    """FreePDK45 FlexLib (copyleft, never committed): $MAXDNN_LIBERTY, or fetched from PyPI's sdist."""
    if os.environ.get("MAXDNN_LIBERTY"):
        return Path(os.environ["MAXDNN_LIBERTY"])
    d = tmp_path_factory.mktemp("flexlib")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(d), "c4m-pdk-freepdk45"], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot fetch c4m-pdk-freepdk45 for its FlexLib liberty: {r.stderr[-300:]}"
    with tarfile.open(next(d.glob("c4m_pdk_freepdk45-*.tar.gz"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".reserve/liberty/FlexLib_nom.lib"))
        tar.extract(member, d, filter="data")
    return d / member.name


@pytest.mark.parametrize("spec", ["exact", "roup-p0r1", "roup-p1r2", "roup-p3r7"])
def test_flexlib_mapped_designs_equal_the_model_exhaustively(flexlib, spec):
    lib = read_liberty(flexlib)
    net = netlist_for(spec, liberty=lib)
    assert all("." in t for t in net.gate_type)  # library cells only
    x, w = np.arange(256).repeat(256), np.tile(np.arange(-128, 128), 256)
    assert np.array_equal(net.simulate(x=x, w=w)["p"], get_multiplier(spec).lut()[x, w + 128])


def test_flexlib_report_end_to_end(flexlib, tmp_path):
    import json

    table = tmp_path / "t.json"
    r = CliRunner().invoke(app, ["hardware", "report", "--liberty", str(flexlib), "--spec", "exact", "--spec",
                                 "roup-p2r2", "--json", "--save-table", str(table)])
    assert r.exit_code == 0, r.output
    rows = {row["spec"]: row for row in json.loads(r.stdout)}
    assert rows["exact"]["energy_rel"]["uniform"] == 1.0
    assert 0.1 < rows["roup-p2r2"]["energy_rel"]["uniform"] < 0.6
    assert rows["exact"]["leakage_nw"] > rows["roup-p2r2"]["leakage_nw"] > 0
    assert rows["exact"]["area_lib"] is None  # FlexLib's cells have area 0: the NAND2 model stands in
    assert rows["exact"]["energy_unit"].startswith("fJ per multiplication") and rows["exact"]["leakage_unit"] == "nW"
    assert "zero-delay" in rows["exact"]["energy_zero_delay_unit"] and "NAND2 model" in rows["exact"]["area_lib_unit"]
    assert 0 < rows["exact"]["energy_zero_delay"]["uniform"] < rows["exact"]["energy"]["uniform"]  # glitches cost
    doc = json.loads(table.read_text())
    assert doc["unit"].startswith("fJ per multiplication") and doc["liberty"] == str(flexlib)


def test_flexlib_processing_element_register_from_the_flip_flop(flexlib):
    from maxdnn.hardware.power import PE_ACC_BITS, pe_energy

    lib = read_liberty(flexlib)
    flop = lib.flop()
    assert flop.cell == "sff1_x4" and flop.clock > 0 and flop.data > 0 and flop.q > 0
    e = pe_energy("exact", uniform_stream(400), liberty=lib)
    assert e["flop"] == "sff1_x4"
    assert e["register"] == pytest.approx(e["register_bit_toggles"] * (flop.data + flop.q) + PE_ACC_BITS * flop.clock)
