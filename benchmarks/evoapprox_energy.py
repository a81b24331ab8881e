"""EvoApproxLib's 8x8 multipliers imported as they are: maxdnn's energy against EvoApprox's power.

    python benchmarks/evoapprox_energy.py PATH/TO/evoapprox [--data cifar10-jpeg.zip] [--liberty FlexLib_nom.lib]

Imports every ``8x8_unsigned/pareto_pwr_mae/mul8u_*.v`` (``--w-format sign-magnitude``) and every
``8x8_signed/pareto_pwr_mae/mul8s_*.v`` (``--x-signed``) into a temporary library, and prints per design:
EvoApprox's published PDK45 power and area (from the file's header), maxdnn's simulated energy per
multiplication (unit delay, uniform stream; NAND2-toggle equivalents) relative to EvoApprox's exact design of
the same signedness (mul8u_1JFF, mul8s_1KV8) and to maxdnn's exact radix-4 Booth design of the same x format
(signed designs: the uniform stream with signed x and the Booth design with signed x), and the NAND2-equivalent
area; then, per set and over both, the Spearman rank correlation and the median ratio error of the relative
figures. With ``--data``, the unsigned designs' energy on the ResNet-8 stream too.

With ``--liberty``, the absolute comparison: the exact Booth design and EvoApprox's exact designs mapped to that
library's cells, energy in fJ per multiplication (unit-delay, glitches counted, and zero-delay) beside
EvoApprox's published power as an energy per operation at 1 GHz and at the design's published delay, and
Horowitz's 45 nm figure for an 8-bit multiplication (0.2 pJ, ISSCC 2014).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("evoapprox", type=Path)
ap.add_argument("--data")
ap.add_argument("--liberty", type=Path)
args = ap.parse_args()
os.environ["MAXDNN_MULTIPLIERS"] = tempfile.mkdtemp(prefix="maxdnn-evo-")

from maxdnn.hardware.design_import import import_verilog  # noqa: E402
from maxdnn.hardware.power import uniform_stream  # noqa: E402

streams = [uniform_stream()]
if args.data:
    from maxdnn.hardware.power import model_stream
    from maxdnn.ir.quant import calibration_images
    from maxdnn.workload import Workload

    wl = Workload.open(None, args.data)
    streams.append(model_stream(wl.quantized(), calibration_images(wl.split("train").images, 2, seed=1),
                                name="resnet8"))
SETS = {"unsigned": ("8x8_unsigned", "mul8u_*.v", "mul8u_1JFF"), "signed": ("8x8_signed", "mul8s_*.v", "mul8s_1KV8")}
rows = {}
for kind, (folder, pattern, _) in SETS.items():
    files = sorted((args.evoapprox / folder / "pareto_pwr_mae").glob(pattern))
    if not files:
        sys.exit(f"{args.evoapprox}: no {folder}/pareto_pwr_mae/{pattern}")
    signed = kind == "signed"
    rows[kind] = [(f.stem, import_verilog(f, None, f.stem.lower(), streams=streams, x_signed=signed,
                                          w_format="signed" if signed else "sign-magnitude")) for f in files]
print("| design | NMED | PDK45 power (mW) | power / exact EvoApprox | energy / exact EvoApprox (uniform) | "
      "energy / Booth exact (uniform)" + (" | energy / Booth exact (resnet8)" if args.data else "")
      + " | PDK45 area (um2) | area NAND2 eq. |")
print("|---|---|---|---|---|---|" + ("---|" if args.data else "") + "---|---|")
rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
every_pub, every_ours = [], []
summary = []
for kind, (_, _, exact_stem) in SETS.items():
    exact = dict(rows[kind])[exact_stem]
    pub, ours = [], []
    for stem, m in rows[kind]:
        p = m["published"]["pdk45_pwr_mw"] / exact["published"]["pdk45_pwr_mw"]
        e = m["energy"]["uniform"] / exact["energy"]["uniform"]
        if stem != exact_stem:
            pub.append(p)
            ours.append(e)
        on_model = m["energy_rel"].get("resnet8")
        print(f"| {stem}{' (exact)' if stem == exact_stem else ''} | {m['metrics']['nmed']:.2e} | "
              f"{m['published']['pdk45_pwr_mw']:.3f} | {p:.3f} | {e:.3f} | {m['energy_rel']['uniform']:.3f}"
              + ((f" | {on_model:.3f}" if on_model is not None else " | n/a") if args.data else "")
              + f" | {m['published']['pdk45_area_um2']:.1f} | {m['area_nand2']:.1f} |")
    pos = [(o, p) for o, p in zip(ours, pub) if p > 0]  # a design of no gates (constant output) has no ratio
    rho = float(np.corrcoef(rank(pub), rank(ours))[0, 1])
    err = np.median([abs(o / p - 1) for o, p in pos])
    summary.append(f"{kind}: {len(pub)} approximate designs, Spearman {rho:.3f}, median ratio error {100 * err:.1f}% "
                   f"over the {len(pos)} with a non-zero published power")
    every_pub += pub
    every_ours += ours
pos = [(o, p) for o, p in zip(every_ours, every_pub) if p > 0]
summary.append(f"all: {len(every_pub)} approximate designs, Spearman {np.corrcoef(rank(every_pub), rank(every_ours))[0, 1]:.3f}, "
               f"median ratio error {100 * np.median([abs(o / p - 1) for o, p in pos]):.1f}% over {len(pos)} "
               "(each relative to the exact EvoApprox design of its set)")
print("\n" + "\n".join(summary))

if args.liberty:
    from maxdnn.hardware.liberty import read_liberty
    from maxdnn.hardware.power import netlist_for, stream_energy

    lib = read_liberty(args.liberty)
    print(f"\nAbsolute energy per multiplication, uniform operands, {lib.name} cells at {lib.voltage:g} V (fJ):\n")
    print("| design | unit-delay (glitches) | zero-delay | published PDK45 power (mW) | as energy at 1 GHz (fJ) | "
          "at its published delay (fJ) | unit-delay / published at 1 GHz |")
    print("|---|---|---|---|---|---|---|")
    measured = [("maxdnn exact Booth, unsigned x", netlist_for("exact", liberty=lib), uniform_stream(), None),
                ("maxdnn exact Booth, signed x", netlist_for("exact", liberty=lib, x_signed=True),
                 uniform_stream(x_signed=True), None)]
    from maxdnn.hardware.power import Stream, netlist_for as nf

    for kind, (_, _, exact_stem) in SETS.items():
        m = dict(rows[kind])[exact_stem]
        s = uniform_stream(x_signed=kind == "signed")
        if kind == "unsigned":
            s = Stream(s.name, s.x, np.abs(s.w))  # sign-magnitude: the circuit's port sees |w|
        measured.append((f"EvoApprox {exact_stem}", nf(exact_stem.lower(), liberty=lib), s, m["published"]))
    for label, net, s, pubd in measured:
        e = stream_energy(net, s)
        cells = f"| {label} | {e['energy']:.0f} | {e['energy_zero_delay']:.0f} | "
        if pubd:
            at1 = pubd["pdk45_pwr_mw"] * 1e3  # mW x 1 ns = pJ; in fJ
            atd = pubd["pdk45_pwr_mw"] * pubd["pdk45_delay_ns"] * 1e3
            cells += f"{pubd['pdk45_pwr_mw']:.3f} | {at1:.0f} | {atd:.0f} | {e['energy'] / at1:.1f}x |"
        else:
            cells += "- | - | - | - |"
        print(cells)
    print("\nHorowitz (ISSCC 2014), 45 nm, 0.9 V: 8-bit integer multiplication 200 fJ.")
