"""The fine-tuning ladder's rungs trained from the rung below (as ``maxdnn explore`` trains them) or each from the
quantized model, on the quick exploration's recipe.

    python benchmarks/ladder_warm.py --data cifar10-jpeg.zip --run runs/quick [--train-warm]

The rungs are those of an exploration's run folder (``RUN/pareto/layer-ladder-*.json``, by increasing gain), on the
committed ResNet-8 quantized as ``maxdnn explore`` quantizes it. Each is fine-tuned
(``maxdnn.compensate.finetune``: weight scales fitted, distilled from the quantized model) 1 epoch on the quick
exploration's 20,000 training images from the quantized model; beside it, the run's own fine-tuned graph of the
rung (``RUN/finetuned/``), which the exploration trained from the rung below (``--train-warm``: trained here again
that way, the first rung from the quantized model; the same graphs, the training being deterministic). Accuracy
through the integer engine on the 5,000 held-out training images the exploration confirms its choices on; loss in
points against the exact model as quantized.
"""
import tempfile
from pathlib import Path

from maxdnn.compensate.finetune import finetune
from maxdnn.engine.approx import Assignment, assignment_key
from maxdnn.ir.graph import QuantizedGraph
from confirmation import ladder_rungs, run_arguments, setup  # benchmarks/ is the script's folder

p = run_arguments(epochs=1)
p.add_argument("--train-warm", action="store_true")
args = p.parse_args()

q, train, conf, tr, accuracy = setup(args.data, args.images)
rungs = ladder_rungs(args.run, q)
base = accuracy(q, Assignment.uniform(q, "exact"))
print(f"exact int8 {100 * base:.2f}% on {len(conf)} held-out training images ({conf.source}); {len(rungs)} rungs of "
      f"{args.run}, each fine-tuned {args.epochs} epoch(s) on {len(tr)} training images")
print("| gain | from the quantized model | from the rung below |")
print("|---|---|---|")
with tempfile.TemporaryDirectory() as tmp:
    below = None
    kw = dict(epochs=args.epochs, log=lambda m: None, progress=False, teacher=q)
    for k, (gain, a) in enumerate(rungs):
        cold = finetune(q, a, train.images[tr], train.labels[tr], Path(tmp) / f"cold-{k}.npz", **kw)
        if not args.train_warm:
            warm = QuantizedGraph.load(Path(args.run, "finetuned", f"{assignment_key(a)}.npz"))
        elif below is None:
            warm = cold
        else:
            warm = finetune(below, a, train.images[tr], train.labels[tr], Path(tmp) / f"warm-{k}.npz", **kw)
        below = warm
        print(f"| {100 * gain:.1f}% | {100 * (base - accuracy(cold, a)):.2f} | {100 * (base - accuracy(warm, a)):.2f} |",
              flush=True)
