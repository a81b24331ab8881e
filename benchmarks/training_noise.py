"""How much a ladder rung's loss moves with the fine-tuning's seed alone.

    python benchmarks/training_noise.py --data cifar10-jpeg.zip --run runs/full --epochs 2 --seeds 1 2 3

For each rung of a run's ladder chosen by ``--rungs`` (indices by increasing gain, default: the two around
85% and 90%), the rung is fine-tuned again from the rung below it as the run fine-tuned it (``RUN/finetuned/``),
as the exploration does (weight scales fitted, distilled from the quantized model, ``epochs`` on 20,000 training
images outside the hold-out), once per seed: training starts from the same graph, and the seed sets only
the order and augmentation of the training batches. Loss: paired, on the 5,000 held-out training images the exploration
confirms on, against the run's fine-tuned exact model, in points, with its standard error; seed 0 is the run's
own measurement of its graph.
"""
import tempfile
from pathlib import Path

import numpy as np

from maxdnn.compensate.finetune import finetune
from maxdnn.engine.approx import assignment_key, layer_assignment
from maxdnn.exploration.paired import paired_loss
from maxdnn.ir.graph import QuantizedGraph
from confirmation import ladder_rungs, on_images, run_arguments, setup  # benchmarks/ is the script's folder

p = run_arguments(epochs=2)
p.add_argument("--rungs", type=int, nargs="*")
p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
args = p.parse_args()

q, train, conf, tr, _ = setup(args.data, args.images)
measure = on_images(conf)
ft = Path(args.run, "finetuned")
rungs = ladder_rungs(args.run, q)
gains = np.array([g for g, _ in rungs])
chosen = args.rungs or sorted({int(np.argmin(abs(gains - t))) for t in (0.85, 0.90)})

ref = measure(QuantizedGraph.load(ft / "exact.npz"), layer_assignment(q, {}))
print(f"reference: the run's fine-tuned exact model, {100 * ref['accuracy']:.2f}% on {len(conf)} held-out training "
      f"images ({conf.source}); each rung fine-tuned {args.epochs} epoch(s) on {len(tr)} training images per seed")
print("| rung's gain | seed | loss +- SE |")
print("|---|---|---|")
with tempfile.TemporaryDirectory() as tmp:
    for k in chosen:
        if k == 0:
            continue
        g, a = rungs[k]
        below = QuantizedGraph.load(ft / f"{assignment_key(rungs[k - 1][1])}.npz")
        loss, se = paired_loss(ref, measure(QuantizedGraph.load(ft / f"{assignment_key(a)}.npz"), a))
        losses = [loss]
        print(f"| {100 * g:.1f}% | 0 (the run's) | {loss:.2f} +- {se:.2f} |", flush=True)
        for seed in args.seeds:
            t = finetune(below, a, train.images[tr], train.labels[tr], Path(tmp) / f"{k}-{seed}.npz",
                         epochs=args.epochs, seed=seed, log=lambda m: None, progress=False, teacher=q)
            loss, se = paired_loss(ref, measure(t, a))
            losses.append(loss)
            print(f"| {100 * g:.1f}% | {seed} | {loss:.2f} +- {se:.2f} |", flush=True)
        print(f"| {100 * g:.1f}% | spread | {min(losses):.2f} .. {max(losses):.2f} (SD {np.std(losses, ddof=1):.2f}) |",
              flush=True)
