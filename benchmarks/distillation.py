"""Fine-tuning to the labels or to the exact model's answers (distillation), on the quick exploration's recipe.

    python benchmarks/distillation.py --data cifar10-jpeg.zip [--specs exact,roup-p2r0,roup-p3r0]
                                      [--epochs 1 --images 20000] [--stem]

Each spec runs on every layer but the stem (``--stem``: on every layer; the committed ResNet-8, quantized as
``maxdnn explore`` quantizes it) and is fine-tuned (``maxdnn.compensate.finetune``, weight scales fitted) once with
``distill=False`` (cross entropy on the labels) and once with ``distill=True`` (the default: divergence from the
exact quantized model's integer logits on the same augmented batch), EPOCHS epochs on a seeded IMAGES of the
training images outside the validation hold-out, as the quick exploration trains. Accuracy through the integer
engine on the 5,000 held-out training images the exploration confirms its choices on; loss in points against the
exact model as quantized.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from maxdnn.compensate.finetune import finetune
from maxdnn.energy import energy_table, network_energy
from maxdnn.engine.approx import Assignment
from confirmation import setup  # benchmarks/ is the script's folder

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--specs", default="exact,roup-p2r0,roup-p3r0")
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--images", type=int, default=20000)
p.add_argument("--stem", action="store_true", help="the spec on the stem too (every layer)")
args = p.parse_args()

q, train, conf, tr, accuracy = setup(args.data, args.images)


base = accuracy(q, Assignment.uniform(q, "exact"))
print(f"exact int8 {100 * base:.2f}% on {len(conf)} held-out training images ({conf.source}); fine-tuning "
      f"{args.epochs} epoch(s) on {len(tr)} training images")
print(f"| spec ({'every layer' if args.stem else 'every layer but the stem'}) | gain | PTQ | fine-tuned to the labels | distilled | seconds each |")
print("|---|---|---|---|---|---|")
with tempfile.TemporaryDirectory() as tmp:
    for spec in args.specs.split(","):
        a = Assignment(["exact", spec], {n: np.full(l.weight.shape[:2], int(args.stem or n != next(iter(q.layers))))
                                          for n, l in q.layers.items()})
        row, secs = [accuracy(q, a)], []
        for distill in (False, True):
            t0 = time.time()
            g = finetune(q, a, train.images[tr], train.labels[tr], Path(tmp) / f"{spec}-{distill}.npz",
                         epochs=args.epochs, log=lambda m: None, progress=False, distill=distill)
            secs.append(time.time() - t0)
            row.append(accuracy(g, a))
        gain = network_energy(q, a, energy_table(["exact", spec]))["energy_gain"]
        cells = [f"{100 * v:.2f}% ({100 * (base - v):.2f})" for v in row]
        print(f"| {spec} | {100 * gain:.1f}% | " + " | ".join(cells) + f" | {np.mean(secs):.0f} |", flush=True)
