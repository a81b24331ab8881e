"""EvoApproxLib's unsigned 8x8 multipliers imported as they are: maxdnn's energy against EvoApprox's power.

    python benchmarks/evoapprox_energy.py PATH/TO/evoapprox [--data cifar10-jpeg.zip]

Imports every ``8x8_unsigned/pareto_pwr_mae/mul8u_*.v`` (``--w-format sign-magnitude``) into a temporary
library, and prints per design: EvoApprox's published PDK45 power and area (from the file's header), maxdnn's
simulated energy per multiplication (unit delay, uniform stream; NAND2-toggle equivalents) relative to
EvoApprox's exact mul8u_1JFF and to maxdnn's exact radix-4 Booth design, and the NAND2-equivalent area;
then the Spearman rank correlation and the median ratio error of the relative figures. With ``--data``,
the energy on the ResNet-8 stream too.
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
files = sorted((args.evoapprox / "8x8_unsigned" / "pareto_pwr_mae").glob("mul8u_*.v"))
if not files:
    sys.exit(f"{args.evoapprox}: no 8x8_unsigned/pareto_pwr_mae/mul8u_*.v")
rows = []
for f in files:
    m = import_verilog(f, None, f.stem.lower(), streams=streams, w_format="sign-magnitude")
    rows.append((f.stem, m))
exact = dict(rows)["mul8u_1JFF"]
print("| design | NMED | PDK45 power (mW) | power / 1JFF | energy / 1JFF (uniform) | energy / Booth exact (uniform)"
      + (" | energy / Booth exact (resnet8)" if args.data else "") + " | PDK45 area (um2) | area NAND2 eq. |")
print("|---|---|---|---|---|---|" + ("---|" if args.data else "") + "---|---|")
pub, ours = [], []
for stem, m in rows:
    p = m["published"]["pdk45_pwr_mw"] / exact["published"]["pdk45_pwr_mw"]
    e = m["energy"]["uniform"] / exact["energy"]["uniform"]
    if stem != "mul8u_1JFF":
        pub.append(p)
        ours.append(e)
    print(f"| {stem} | {m['metrics']['nmed']:.2e} | {m['published']['pdk45_pwr_mw']:.3f} | {p:.3f} | {e:.3f} | "
          f"{m['energy_rel']['uniform']:.3f}" + (f" | {m['energy_rel']['resnet8']:.3f}" if args.data else "")
          + f" | {m['published']['pdk45_area_um2']:.1f} | {m['area_nand2']:.1f} |")
rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
rho = float(np.corrcoef(rank(pub), rank(ours))[0, 1])
pos = [(o, p) for o, p in zip(ours, pub) if p > 0]  # a design of no gates (constant output) has no ratio
err = np.median([abs(o / p - 1) for o, p in pos])
print(f"\n{len(pub)} approximate designs: Spearman {rho:.3f} between published power and maxdnn energy (both relative "
      f"to mul8u_1JFF); median ratio error {100 * err:.1f}% over the {len(pos)} with a non-zero published power")
