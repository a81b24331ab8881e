"""EvoApproxLib's 8x8 multipliers, imported as they are: each circuit equals EvoApprox's own C model on all
65,536 operand pairs, and the imported table equals the C model under the recorded operand mapping
(unsigned designs: sign-magnitude weights; signed designs: signed x). The C models are compiled with gcc.

EvoApprox's conventions, as measured here: a signed design's C model takes the Verilog's A and B in that
order, C(A, B); an unsigned design's C model takes them swapped, C(B, A) (for the approximate, asymmetric
ones the difference shows: mul8u_2AC differs on 53,890 pairs if read the other way). maxdnn feeds x to the
first Verilog input (A) unless --x-port says otherwise, so an unsigned design's table is C(w, x)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, SHARED, need, one_line_error
from maxdnn.cli import app
from maxdnn.hardware.design_import import import_verilog, synthesize_design
from maxdnn.multipliers.models import get_multiplier

EVO = SHARED / "multipliers" / "evoapprox"
UNSIGNED = sorted((EVO / "8x8_unsigned" / "pareto_pwr_mae").glob("mul8u_*.v")) if EVO.exists() else []
SIGNED = sorted((EVO / "8x8_signed" / "pareto_pwr_mae").glob("mul8s_*.v")) if EVO.exists() else []
HARNESS = """
#include <stdio.h>
#include <stdint.h>
#include "{c}"
int main(void) {{
  for (int a = {lo}; a <= {hi}; a++)
    for (int b = {lo}; b <= {hi}; b++) {{
      {t} p = {f}(({a_t})a, ({a_t})b);
      fwrite(&p, sizeof p, 1, stdout);
    }}
  return 0;
}}
"""


@pytest.fixture
def library(tmp_path, monkeypatch):
    d = tmp_path / "library"
    monkeypatch.setenv("MAXDNN_MULTIPLIERS", str(d))
    return d


def c_model(v_path, tmp_path) -> np.ndarray:
    """EvoApprox's C model of the design, on every operand pair: [A, B] (A, B over the design's own range)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "the EvoApprox tests compile its C models: install gcc"
    signed = v_path.name.startswith("mul8s")
    lo, hi = (-128, 127) if signed else (0, 255)
    src = tmp_path / f"{v_path.stem}_harness.c"
    src.write_text(HARNESS.format(c=v_path.with_suffix(".c"), lo=lo, hi=hi, f=v_path.stem,
                                  t="int16_t" if signed else "uint16_t", a_t="int8_t" if signed else "uint8_t"))
    exe = tmp_path / v_path.stem
    subprocess.run([gcc, "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype=np.int16 if signed else np.uint16).astype(np.int64).reshape(256, 256)


def test_every_shared_design_is_found():
    assert len(need(EVO) and UNSIGNED) == 9 and len(SIGNED) == 8


@pytest.mark.slow
@pytest.mark.parametrize("path", UNSIGNED + SIGNED, ids=lambda p: p.stem)
def test_circuit_and_imported_table_equal_the_c_model(path, tmp_path, library):
    ref = c_model(path, tmp_path)
    signed = path.name.startswith("mul8s")
    net, info = synthesize_design(path, None)  # the module named as the file, beside its helper cells
    assert info["top"] == path.stem and (info["x"], info["w"], info["product"]) == ("A", "B", "O")
    vals = np.arange(-128, 128) if signed else np.arange(256)
    a, b = np.meshgrid(vals, vals, indexing="ij")
    p = net.simulate(x=a.reshape(-1), w=b.reshape(-1))["p"].reshape(256, 256)
    if not signed:
        p = np.where(p < 0, p + (1 << 16), p)  # the 16-bit product of an unsigned circuit
    # the circuit is EvoApprox's on all 65,536 pairs (module docstring: the unsigned C models take B first)
    assert np.array_equal(p, ref if signed else ref.T)
    meta = import_verilog(path, None, "evo", x_signed=signed, w_format="signed" if signed else "sign-magnitude")
    table = get_multiplier("evo", 8, signed).lut()
    x, w = np.meshgrid(np.arange(-128, 128) if signed else np.arange(256), np.arange(-128, 128), indexing="ij")
    if signed:
        want = ref  # table[x + 128, w + 128] = C(x, w)
    else:  # sign-magnitude: M(x, |w|) = C(|w|, x), negated for w < 0 (not zeroed at w = 0: M(x, 0) may not be 0)
        want = np.where(w < 0, -1, 1) * ref[np.abs(w), x]
    assert np.array_equal(table, want)
    stored = json.loads((library / "evo" / "meta.json").read_text())
    assert stored["w_format"] == ("signed" if signed else "sign-magnitude")
    header = path.read_text()
    pwr = float(re.search(r"PDK45_PWR = ([0-9.]+) mW", header)[1])
    assert meta["published"]["pdk45_pwr_mw"] == pwr and "pdk45_area_um2" in meta["published"]
    exact = "1JFF" in path.stem or "1KV8" in path.stem  # EvoApprox's exact designs
    assert (meta["metrics"]["error_rate"] == 0) == exact


def test_operand_mappings_that_do_not_fit_are_one_line(tmp_path, library):
    runner = CliRunner()
    exact_u = need(EVO / "8x8_unsigned" / "pareto_pwr_mae" / "mul8u_1JFF.v")
    one_line_error(runner.invoke(app, ["multipliers", "import", str(exact_u), "--name", "a"]),
                   "wrong sign on", "--w-format sign-magnitude")
    one_line_error(runner.invoke(app, ["multipliers", "import", str(exact_u), "--name", "a", "--w-format",
                                       "unsigned"]), "--w-format unsigned", "sign-magnitude")
    one_line_error(runner.invoke(app, ["multipliers", "import", str(exact_u), "--name", "a", "--w-format", "odd"]),
                   "--w-format odd: expected signed or sign-magnitude")
    exact_s = need(EVO / "8x8_signed" / "pareto_pwr_mae" / "mul8s_1KV8.v")
    one_line_error(runner.invoke(app, ["multipliers", "import", str(exact_s), "--name", "a"]), "wrong sign on")
    r = runner.invoke(app, ["multipliers", "import", str(exact_s), "--name", "forced", "--force"])
    assert r.exit_code == 0, r.output  # --force: imported as asked
    renamed = tmp_path / "other.v"  # several modules, none named as the file: --top is needed
    renamed.write_text(exact_u.read_text())
    one_line_error(runner.invoke(app, ["multipliers", "import", str(renamed), "--name", "a", "--w-format",
                                       "sign-magnitude"]), "none named as the file", "--top")
    r = runner.invoke(app, ["multipliers", "import", str(renamed), "--name", "a", "--w-format", "sign-magnitude",
                            "--top", "mul8u_1JFF"])
    assert r.exit_code == 0, r.output
    assert "published in the file: PDK45 power (mW) 0.391" in r.output and "(sign-magnitude)" in r.output


@pytest.mark.slow
def test_kernel_level_exploration_with_an_evoapprox_library(tmp_path, library):
    """Two approximate EvoApprox designs with energy on the exploration's stream, chosen at kernel level; the
    hardware report measures them with their published figures beside."""
    from maxdnn.exploration.explorer import BUDGETS, Explorer, run_exploration
    from maxdnn.hardware.power import model_stream, uniform_stream
    from maxdnn.ir.quant import calibration_images
    from maxdnn.workload import Workload

    wl = Workload.open(None, need(LOSSLESS_ZIP))
    stream = model_stream(wl.quantized(), calibration_images(wl.split("train").images, 2, seed=1), name="resnet8")
    names = []
    for stem in ("mul8u_2AC", "mul8u_185Q"):
        path = need(EVO / "8x8_unsigned" / "pareto_pwr_mae" / f"{stem}.v")
        meta = import_verilog(path, None, stem.lower(), streams=[uniform_stream(), stream], w_format="sign-magnitude")
        assert 0 < meta["energy_rel"]["resnet8"] < 1.5
        names.append(stem.lower())
    ex = Explorer(tmp_path / "run", wl, BUDGETS["tiny"], progress=False, log=lambda m: None, library=names)
    run_exploration(ex, ["kernel"])
    used = {s for p in ex.store.points() for s, _ in json.loads(p["genome"]).values()}
    assert used & set(names)
    r = CliRunner().invoke(app, ["hardware", "report", "--spec", names[0], "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output[r.output.index("["):])[-1]
    assert row["spec"] == names[0] and row["w_format"] == "sign-magnitude" and row["published"]["pdk45_pwr_mw"] > 0


def test_signed_reference_booth_design_is_exact_on_every_pair():
    from maxdnn.hardware.power import netlist_for

    net = netlist_for("exact", x_signed=True)
    x, w = np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij")
    assert np.array_equal(net.simulate(x=x.reshape(-1), w=w.reshape(-1))["p"], (x * w).reshape(-1))


def test_signed_designs_get_energy_on_the_signed_stream(library):
    """An x-signed import is measured on the uniform stream with signed x against the signed-x exact Booth
    design; an approximate design costs less than EvoApprox's exact one, as its published power says; the
    hardware report lists it with the model stream n/a; energy accounting takes its figure."""
    runner = CliRunner()
    d = need(EVO / "8x8_signed" / "pareto_pwr_mae")
    for stem, name in (("mul8s_1KV8", "s-exact"), ("mul8s_1KR3", "s-approx")):
        r = runner.invoke(app, ["multipliers", "import", str(d / f"{stem}.v"), "--name", name, "--x-signed"])
        assert r.exit_code == 0, r.output
        assert "energy / exact Booth: uniform" in r.output
    exact, approx = (json.loads((library / n / "meta.json").read_text()) for n in ("s-exact", "s-approx"))
    assert 0.5 < exact["energy_rel"]["uniform"] < 1.5 and set(exact["energy_rel"]) == {"uniform"}
    assert approx["energy_rel"]["uniform"] < 0.5 * exact["energy_rel"]["uniform"]  # published: 0.052 vs 0.425 mW
    r = runner.invoke(app, ["hardware", "report", "--spec", "exact", "--spec", "s-approx", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["spec"]: row for row in json.loads(r.stdout)}
    assert rows["s-approx"]["energy_rel"]["uniform"] == approx["energy_rel"]["uniform"]
    assert "NAND2-toggle" in rows["s-approx"]["energy_unit"] and rows["exact"]["energy_zero_delay"]["uniform"] > 0
    from maxdnn.energy import energy_table

    t = energy_table(["exact", "s-approx"])
    assert t["s-approx"] == approx["energy_rel"]["uniform"] and "x-signed s-approx" in t.source
