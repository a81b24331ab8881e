"""Fitted weight scales before fine-tuning: accuracy with and without them, and the energy they move.

    python benchmarks/weight_scales.py --data cifar10-jpeg.zip [--specs roup-p3r0,roup-p2r0,roup-p2r4]
                                       [--epochs 2 --images 10000] [--energy]

Each spec runs on every layer but the stem (the committed ResNet-8, maxdnn's quantization on 1,000 training
images, as ``maxdnn explore`` quantizes it). It is fine-tuned the way the quick exploration fine-tunes
(maxdnn.compensate.finetune: EPOCHS epochs on a seeded IMAGES of the training images outside the validation
hold-out) with the calibrated weight scales kept and with them fitted to the multiplier's weight grid
(maxdnn.compensate.weight_scales), and measured through the integer engine on the 5,000 held-out training images
that the exploration confirms its choices on. With ``--energy`` the spec's energy relative to the exact
multiplier is also measured on each graph's own operand stream (maxdnn.hardware.power.model_stream of 200
training images, unit-delay toggle simulation; needs maxdnn[hardware]): fitted scales change which weights the
multiplier sees.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from maxdnn.compensate.finetune import finetune
from maxdnn.data import training_sample
from maxdnn.engine.approx import Assignment
from confirmation import setup  # benchmarks/ is the script's folder

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--specs", default="roup-p3r0,roup-p2r0,roup-p2r4")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--images", type=int, default=10000)
p.add_argument("--energy", action="store_true")
args = p.parse_args()

q, train, conf, tr, accuracy = setup(args.data, args.images)


def rel_energy(g, spec) -> float:
    from maxdnn.hardware.power import model_stream, netlist_for, stream_energy

    s = model_stream(g, train.images[training_sample(len(train), 200, 1)])
    return stream_energy(netlist_for(spec), s)["energy"] / stream_energy(netlist_for("exact"), s)["energy"]


exact = Assignment.uniform(q, "exact")
base = accuracy(q, exact)
print(f"exact int8 {100 * base:.2f}% on {len(conf)} held-out training images ({conf.source}); fine-tuning "
      f"{args.epochs} epoch(s) on {len(tr)} training images")
head = "| spec (every layer but the stem) | PTQ | fine-tuned, calibrated scales | fine-tuned, fitted scales | filters moved |"
print(head + (" rel. energy, calibrated / fitted graph's stream |" if args.energy else ""))
print("|---" * (head.count("|") - 1 + args.energy) + "|")
with tempfile.TemporaryDirectory() as tmp:
    for spec in args.specs.split(","):
        a = Assignment(["exact", spec], {n: np.full(l.weight.shape[:2], int(n != next(iter(q.layers))))
                                          for n, l in q.layers.items()})
        row, graphs = [accuracy(q, a)], {}
        for fit in (False, True):
            t0 = time.time()
            logs: list[str] = []
            g = finetune(q, a, train.images[tr], train.labels[tr], Path(tmp) / f"{spec}-{fit}.npz",
                         epochs=args.epochs, log=logs.append, progress=False, fit_scales=fit)
            graphs[fit] = g
            row.append(accuracy(g, a))
        moved = sum(graphs[True].meta.get("weight_scales", {}).get("fitted", {}).values())
        cells = [f"{100 * v:.2f}% ({100 * (base - v):.2f})" for v in row]
        line = f"| {spec} | " + " | ".join(cells) + f" | {moved} |"
        if args.energy:
            line += f" {rel_energy(graphs[False], spec):.4f} / {rel_energy(graphs[True], spec):.4f} |"
        print(line, flush=True)
