"""Bias correction on an exploration's front points: test loss with and without it.

    python benchmarks/bias_correction_front.py RUN_DIR --data cifar10-jpeg.zip

For each approach and loss threshold of the report, the point chosen as quantized (PTQ) is measured on the
whole test split as it is and with its biases corrected (maxdnn.compensate.bias_correction, 256 training images
outside the validation hold-out). The run must have been made on the committed ResNet-8.
"""
import argparse
from pathlib import Path
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.compensate.bias_correction import bias_corrected, correction_images
from maxdnn.exploration.report import best_at_thresholds, read_points, THRESHOLDS
from maxdnn.workload import Workload

ap_ = argparse.ArgumentParser()
ap_.add_argument("run", type=Path)
ap_.add_argument("--data", required=True)
args = ap_.parse_args()
run = args.run
wl = Workload.open(None, args.data)
q = wl.quantized()
test = wl.split("test")
ci = correction_images(wl.split("train").images)
base = float((q.predict(test.images) == test.labels).mean())
print(f"exact int8 test {100 * base:.2f}% ({len(test)} images)")
print("| approach | validation loss <= | energy gain | test loss | test loss, bias-corrected | assignment |")
print("|---|---|---|---|---|---|")
rows = read_points(run / "points.csv")
best = best_at_thresholds(rows, level="ptq")  # the points as quantized (a compensated run: its PTQ choices)
seen = {}
for ap in ("layer", "filter", "kernel"):
    for t in THRESHOLDS:
        r = best[ap][t]
        if r is None:
            continue
        f = run / "pareto" / f"{ap}-{r['source']}-{r['trial']}.json"
        if f not in seen:
            a = Assignment.load(f, q)
            plain = float((ApproxNetwork(q, a).predict(test.images) == test.labels).mean())
            qc = bias_corrected(q, a, ci)
            fixed = float((ApproxNetwork(qc, a).predict(test.images) == test.labels).mean())
            seen[f] = (plain, fixed)
        plain, fixed = seen[f]
        print(f"| {ap} | {t:g} pt | {100 * r['energy_gain']:.1f}% | {100 * (base - plain):.2f} | {100 * (base - fixed):.2f} "
              f"| {f.name} |", flush=True)
