"""Bring your own multiplier: Verilog or a product table into the user library, then emulation and energy."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need, one_line_error
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.cli import app
from maxdnn.energy import EnergyModelError, energy_table, network_energy
from maxdnn.hardware.design_import import import_table, import_verilog
from maxdnn.hardware.power import uniform_stream, verilog_for
from maxdnn.multipliers.library import LibraryError
from maxdnn.multipliers.models import SpecError, TableMultiplier, get_multiplier

runner = CliRunner()

EXACT_V = """
// a handwritten exact multiplier: unsigned activation times signed weight
module my_exact (input [7:0] act, input signed [7:0] wgt, output signed [15:0] prod);
  assign prod = $signed({1'b0, act}) * wgt;
endmodule
"""

# drops the two least significant activation bits: product (x & ~3) * w
TRUNC_V = """
module drop2 (
  input  [7:0] x,
  input  signed [7:0] w,
  output signed [15:0] p
);
  wire [7:0] xt = {x[7:2], 2'b00};
  assign p = $signed({1'b0, xt}) * w;
endmodule
"""


@pytest.fixture
def library(tmp_path, monkeypatch):
    d = tmp_path / "library"
    monkeypatch.setenv("MAXDNN_MULTIPLIERS", str(d))
    return d


def all_pairs():
    x, w = np.meshgrid(np.arange(256), np.arange(-128, 128), indexing="ij")
    return x, w


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_verilog_exact_and_approximate_against_closed_forms(tmp_path, library):
    x, w = all_pairs()
    import_verilog(write(tmp_path, "e.v", EXACT_V), "my_exact", "my-exact", streams=[uniform_stream()])
    assert np.array_equal(get_multiplier("my-exact")(x, w), x * w)
    meta = import_verilog(write(tmp_path, "t.v", TRUNC_V), "drop2", "drop2", streams=[uniform_stream()])
    m = get_multiplier("drop2")
    assert isinstance(m, TableMultiplier) and not m.separable
    assert np.array_equal(m(x, w), (x & ~3) * w)
    assert meta["ports"] == {"x": "x", "w": "w", "product": "p"}
    assert meta["metrics"]["bias"] == pytest.approx(0.75)  # -E[x & 3] * E[w] = -1.5 * -0.5
    assert 0 < meta["energy_rel"]["uniform"] < 1.0  # two fewer multiplicand bits than the exact Booth design
    assert (library / "drop2" / "design.v").read_text() == TRUNC_V
    # operand formats are part of the import
    with pytest.raises(SpecError, match="imported for x u8"):
        get_multiplier("drop2", x_signed=True)


def test_example_truncated_array_equals_builtin_trunc_model(library):
    """The README's worked example: a handwritten truncated array multiplier equals trunc-k6 on every pair."""
    from conftest import REPO

    meta = import_verilog(REPO / "examples" / "trunc_array_mul.v", "trunc_array_mul", "trunc6-array",
                          streams=[uniform_stream()])
    x, w = all_pairs()
    assert np.array_equal(get_multiplier("trunc6-array")(x, w), get_multiplier("trunc-k6")(x, w))
    assert meta["energy_rel"]["uniform"] < 1.0


def test_imported_builtin_design_has_the_builtin_energy(tmp_path, library):
    """The exact Booth design, imported as user Verilog, measures the energy of the built-in one."""
    v = verilog_for("exact").replace("module mul", "module booth_copy")
    meta = import_verilog(write(tmp_path, "b.v", v), "booth_copy", "booth-copy", streams=[uniform_stream()])
    assert meta["energy_rel"]["uniform"] == pytest.approx(1.0, rel=0.02)
    x, w = all_pairs()
    assert np.array_equal(get_multiplier("booth-copy")(x, w), x * w)


def test_cli_import_list_and_table(tmp_path, library):
    r = runner.invoke(app, ["multipliers", "import", str(write(tmp_path, "t.v", TRUNC_V)), "--name", "drop2"])
    assert r.exit_code == 0, r.output
    assert "energy / exact Booth: uniform" in r.output
    r = runner.invoke(app, ["multipliers", "--json"])
    rows = {row["spec"]: row for row in json.loads(r.output)}
    assert "drop2" in rows and "roup-p1r2" in rows
    # a table with a stated energy, under another library folder given by option
    other = tmp_path / "other"
    table = tmp_path / "tab.npy"
    np.save(table, get_multiplier("roup-p1r2").lut().astype(np.int32))
    r = runner.invoke(app, ["--multiplier-dir", str(other), "multipliers", "import", str(table), "--name", "tab-roup",
                            "--energy", "0.5"])
    assert r.exit_code == 0, r.output
    assert (other / "tab-roup" / "table.npy").exists() and not (library / "tab-roup").exists()


LOOP_V = """
module loopy (input [7:0] x, input signed [7:0] w, output signed [15:0] p);
  wire a, b;
  assign a = ~(b & x[0]);
  assign b = a | w[0];
  assign p = {15'b0, b};
endmodule
"""

NARROW_V = """
module narrow (input [3:0] x, input signed [7:0] w, output signed [15:0] p);
  assign p = $signed({1'b0, x}) * w;
endmodule
"""

SHORT_V = """
module short (input [7:0] x, input signed [7:0] w, output signed [11:0] p);
  assign p = $signed({1'b0, x}) * w;
endmodule
"""


@pytest.mark.parametrize("case", ["no-module", "narrow-port", "short-product", "loop", "table-shape", "table-dtype",
                                  "builtin-name", "taken-name", "bad-suffix"])
def test_bad_imports_one_line(tmp_path, library, case):
    v = write(tmp_path, "t.v", TRUNC_V)
    if case == "no-module":
        args, frags = [str(v), "--name", "a", "--top", "nothere"], ["no module 'nothere'", "drop2"]
    elif case == "narrow-port":
        args, frags = [str(write(tmp_path, "n.v", NARROW_V)), "--name", "a"], ["port 'x' is 4 bits wide"]
    elif case == "short-product":
        args, frags = [str(write(tmp_path, "s.v", SHORT_V)), "--name", "a"], ["product port 'p' is 12 bits", "at least 16"]
    elif case == "loop":
        args, frags = [str(write(tmp_path, "l.v", LOOP_V)), "--name", "a"], ["combinational loop"]
    elif case == "table-shape":
        np.save(tmp_path / "t.npy", np.zeros((256, 255), dtype=np.int64))
        args, frags = [str(tmp_path / "t.npy"), "--name", "a", "--energy", "0.5"], ["shape (256, 255)", "(256, 256)"]
    elif case == "table-dtype":
        np.save(tmp_path / "t.npy", np.zeros((256, 256)))
        args, frags = [str(tmp_path / "t.npy"), "--name", "a", "--energy", "0.5"], ["dtype float64"]
    elif case == "builtin-name":
        args, frags = [str(v), "--name", "roup-p9r9"], ["built-in multiplier form"]
    elif case == "taken-name":
        assert runner.invoke(app, ["multipliers", "import", str(v), "--name", "a"]).exit_code == 0
        args, frags = [str(v), "--name", "a"], ["already imported", "--replace"]
    else:
        args, frags = [str(write(tmp_path, "t.txt", "x")), "--name", "a"], ["expected a Verilog design"]
    one_line_error(runner.invoke(app, ["multipliers", "import", *args]), *frags)
    if case != "taken-name":
        assert not (library / "a").exists() and not list(library.glob(".*")) if library.exists() else True


def test_table_energy_rules(tmp_path, library):
    np.save(tmp_path / "t.npy", get_multiplier("roup-p1r2").lut())
    import_table(tmp_path / "t.npy", "no-energy")
    with pytest.raises(EnergyModelError, match="no energy model"):
        energy_table(["exact", "no-energy"])
    import_table(tmp_path / "t.npy", "with-energy", energy=0.42)
    t = energy_table(["exact", "roup-p1r2", "with-energy"])
    assert t["with-energy"] == 0.42 and "imported: with-energy" in t.source
    with pytest.raises(LibraryError, match="energy"):
        import_table(tmp_path / "t.npy", "neg-energy", energy=-1.0)


def test_imported_table_runs_bit_exact_like_the_builtin(tmp_path, library, qnet, lossless_test):
    """A table import of roup-p1r2 gives the built-in's outputs (LUT path against the separable path),
    and its proxy (error gather) equals the separable proxy."""
    from maxdnn.exploration.resilience import taylor_proxy

    np.save(tmp_path / "t.npy", get_multiplier("roup-p1r2").lut())
    import_table(tmp_path / "t.npy", "as-table", energy=0.5)
    rng = np.random.default_rng(0)
    maps = {n: rng.integers(0, 2, l.weight.shape[:2]) for n, l in qnet.layers.items()}
    x = torch.as_tensor(lossless_test.images[:6])
    builtin = ApproxNetwork(qnet, Assignment(["exact", "roup-p1r2"], maps)).logits(x)
    imported = ApproxNetwork(qnet, Assignment(["exact", "as-table"], maps)).logits(x)
    assert torch.equal(builtin, imported)
    assert network_energy(qnet, Assignment(["exact", "as-table"], maps))["energy_gain"] > 0
    imgs, labels = lossless_test.images[:4], lossless_test.labels[:4]
    a = taylor_proxy(qnet, imgs, labels, ["roup-p1r2"])
    b = taylor_proxy(qnet, imgs, labels, ["as-table"])
    for name in qnet.layers:
        for kind in ("kernel", "filter"):
            np.testing.assert_allclose(b[name][kind], a[name][kind], rtol=1e-9, atol=1e-12)


def test_exploration_with_an_imported_library(tmp_path, library):
    """Layer/filter/kernel and ALWANN-style approaches choose imported designs; one without energy is refused."""
    from maxdnn.exploration.explorer import BUDGETS, Explorer, run_exploration
    from maxdnn.workload import Workload

    import_verilog(write(tmp_path, "t.v", TRUNC_V), "drop2", "drop2", streams=[uniform_stream()])
    np.save(tmp_path / "t.npy", get_multiplier("roup-p2r3").lut())
    import_table(tmp_path / "t.npy", "tab-p2r3", energy=0.4)
    wl = Workload.open(None, need(LOSSLESS_ZIP))
    with pytest.raises(ValueError, match="drop2.*uniform stream"):
        Explorer(tmp_path / "r0", wl, BUDGETS["tiny"], progress=False, log=lambda m: None, library=["drop2"])
    lib = ["roup-p1r2", "tab-p2r3"]
    ex = Explorer(tmp_path / "run", wl, BUDGETS["tiny"], progress=False, log=lambda m: None, library=lib)
    assert ex.library == lib and "tab-p2r3" in ex.alwann_choices()
    run_exploration(ex, ["kernel", "alwann"])
    pts = ex.store.points()
    used = {s for p in pts for s, _ in json.loads(p["genome"]).values()}
    assert "tab-p2r3" in used
    assert {p["approach"] for p in pts} == {"kernel", "alwann"}


def test_unwritable_library_one_line(tmp_path, library):
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["--multiplier-dir", str(tmp_path / "file" / "lib"), "multipliers", "import",
                            str(write(tmp_path, "t.v", TRUNC_V)), "--name", "a"])
    one_line_error(r, "cannot write the multiplier library")


def test_table_file_that_is_not_npy(tmp_path, library):
    bad = tmp_path / "t.npy"
    bad.write_text("not an array")
    one_line_error(runner.invoke(app, ["multipliers", "import", str(bad), "--name", "a", "--energy", "0.5"]),
                   "not a NumPy .npy array")


def test_hardware_report_measures_an_imported_verilog_design(tmp_path, library):
    """The report synthesizes an imported design again from its stored source: the same energy as at import."""
    r = runner.invoke(app, ["multipliers", "import", str(write(tmp_path, "t.v", TRUNC_V)), "--name", "drop2"])
    assert r.exit_code == 0, r.output
    meta = json.loads((library / "drop2" / "meta.json").read_text())
    r = runner.invoke(app, ["hardware", "report", "--spec", "drop2", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)[0]
    assert row["energy_rel"]["uniform"] == meta["energy_rel"]["uniform"] and row["area_nand2"] == meta["area_nand2"]
    one_line_error(runner.invoke(app, ["hardware", "report", "--spec", "drop2", "--pe"]), "drop2", "--pe")
    np.save(tmp_path / "t.npy", get_multiplier("roup-p1r2").lut())
    assert runner.invoke(app, ["multipliers", "import", str(tmp_path / "t.npy"), "--name", "tab", "--energy",
                               "0.5"]).exit_code == 0
    one_line_error(runner.invoke(app, ["hardware", "report", "--spec", "tab"]), "tab", "imported as a product table")
