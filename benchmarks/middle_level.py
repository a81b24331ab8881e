"""A middle level for the fine-tuning ladder: each rung of a run's ladder with its ``under`` layers (roup-p2r0)
on ``--middle`` (roup-p2r3) instead, fine-tuned bottom up, the foot from the run's own graph of that foot
assignment when it has one (else from the run's foot).

    python benchmarks/middle_level.py --data cifar10-jpeg.zip --run runs/full --epochs 2

For each rung: its gain and paired confirmation loss as the run measured it, the same rung's fine-tuned graph
run with ``--middle`` in place of ``--under`` (untrained), and that rung fine-tuned from the one below it as this
script trained it (``epochs`` on 20,000 training images outside the hold-out, distilled from the quantized model,
as the exploration fine-tunes a rung). ``--middle roup-p2r0`` trains the run's own ladder again, from its foot,
for instance with another ``--lr`` (0.001, the exploration's, by default). Loss: paired, on the 5,000 held-out
training images the exploration confirms on, against the run's fine-tuned exact model, in points, with its
standard error.
"""
import tempfile
from pathlib import Path

from maxdnn.compensate.finetune import finetune
from maxdnn.energy import energy_table, network_energy
from maxdnn.engine.approx import assignment_key, layer_assignment
from maxdnn.exploration.paired import paired_loss
from maxdnn.ir.graph import QuantizedGraph
from confirmation import ladder_rungs, on_images, run_arguments, setup  # benchmarks/ is the script's folder

p = run_arguments(epochs=2)
p.add_argument("--under", default="roup-p2r0")
p.add_argument("--middle", default="roup-p2r3", help="--middle roup-p2r0: the run's own two-level ladder again")
p.add_argument("--lr", type=float, default=1e-3)
args = p.parse_args()

q, train, conf, tr, _ = setup(args.data, args.images)
measure = on_images(conf)
ft = Path(args.run, "finetuned")


def gain(a):
    return network_energy(q, a, energy_table(list(a.specs)))["energy_gain"]


exact = QuantizedGraph.load(ft / "exact.npz")
ref = measure(exact, layer_assignment(q, {}))
print(f"reference: the run's fine-tuned exact model, {100 * ref['accuracy']:.2f}% on {len(conf)} held-out training "
      f"images ({conf.source}); rungs fine-tuned {args.epochs} epoch(s) on {len(tr)} training images, lr {args.lr:g}")
print(f"| run's rung: gain | loss +- SE | {args.middle} for {args.under}: gain | untrained | trained +- SE |")
print("|---|---|---|---|---|")
prev = None
with tempfile.TemporaryDirectory() as tmp:
    for k, (g2, a2) in enumerate(ladder_rungs(args.run, q)):
        on = {n: a2.specs[int(m.flat[0])] for n, m in a2.maps.items()}
        three = layer_assignment(q, {n: (args.middle if s == args.under else s) for n, s in on.items() if s != "exact"})
        g_two = QuantizedGraph.load(ft / f"{assignment_key(a2)}.npz")
        l2, se2 = paired_loss(ref, measure(g_two, a2))
        lu, _ = paired_loss(ref, measure(g_two, three))
        if prev is None:
            key = ft / f"{assignment_key(three)}.npz"
            start = QuantizedGraph.load(key) if key.exists() else g_two
        else:
            start = prev
        g3 = finetune(start, three, train.images[tr], train.labels[tr], Path(tmp) / f"{k}.npz", epochs=args.epochs,
                      lr=args.lr, log=lambda m: None, progress=False, teacher=q)
        l3, se3 = paired_loss(ref, measure(g3, three))
        prev = g3
        print(f"| {100 * g2:.1f}% | {l2:.2f} +- {se2:.2f} | {100 * gain(three):.1f}% | {lu:.2f} | "
              f"{l3:.2f} +- {se3:.2f} |", flush=True)
