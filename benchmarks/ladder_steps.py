"""What each step of the fine-tuning ladder costs once trained, against what it costs untrained.

    python benchmarks/ladder_steps.py --data cifar10-jpeg.zip --run runs/quick

The ladder (``maxdnn.exploration.search.ladder_rungs``) orders its steps by their untrained loss per energy saved,
since that is what the resilience analysis measures. This script measures the trained cost of the second steps
(``under`` to ``top``) one layer at a time, from the ladder's foot: for each layer the foot leaves on ``under``,
the foot with that layer alone on ``top``, fine-tuned as the exploration fine-tunes a rung (from the foot's
fine-tuned graph, ``RUN/finetuned/``; weight scales fitted, distilled from the quantized model; 1 epoch on the
quick exploration's 20,000 training images). Loss: paired, on the 5,000 held-out training images the exploration
confirms its choices on, against the foot as fine-tuned (with its standard error); ``untrained``: the foot's
fine-tuned graph run with the step's assignment as it is. The committed ResNet-8, quantized as ``maxdnn explore``
quantizes it.
"""
import json
import tempfile
from pathlib import Path

from maxdnn.compensate.finetune import finetune
from maxdnn.energy import energy_table, network_energy
from maxdnn.engine.approx import assignment_key, layer_assignment
from maxdnn.exploration.paired import paired_loss
from maxdnn.ir.graph import QuantizedGraph
from confirmation import ladder_rungs, on_images, run_arguments, setup  # benchmarks/ is the script's folder

p = run_arguments(epochs=1)
args = p.parse_args()

q, train, conf, tr, _ = setup(args.data, args.images)
measure = on_images(conf)
rungs = ladder_rungs(args.run, q)
gain0, foot = rungs[0]
top = "roup-p3r0"
on_foot = {n: foot.specs[int(m.flat[0])] for n, m in foot.maps.items()}
foot_graph = QuantizedGraph.load(Path(args.run, "finetuned", f"{assignment_key(foot)}.npz"))


ref = measure(foot_graph, foot)
print(f"foot: {100 * gain0:.1f}% gain, {100 * ref['accuracy']:.2f}% on {len(conf)} held-out training images "
      f"({conf.source}); each step fine-tuned {args.epochs} epoch(s) on {len(tr)} training images from it")
print("| layer | on top | gain | step's gain | untrained loss | trained loss +- SE |")
print("|---|---|---|---|---|---|")
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for name in q.layers:
        spec = on_foot[name]
        if spec == "exact" or spec == top:
            continue
        a = layer_assignment(q, {**on_foot, name: top})
        gain = network_energy(q, a, energy_table(list(a.specs)))["energy_gain"]
        untrained, _ = paired_loss(ref, measure(foot_graph, a))
        g = finetune(foot_graph, a, train.images[tr], train.labels[tr], Path(tmp) / f"{name}.npz", epochs=args.epochs,
                     log=lambda m: None, progress=False, teacher=q)
        loss, se = paired_loss(ref, measure(g, a))
        rows.append({"layer": name, "gain": gain, "step": gain - gain0, "untrained": untrained, "loss": loss, "se": se})
        print(f"| {name} | {spec} -> {top} | {100 * gain:.1f}% | {100 * (gain - gain0):.1f} | {untrained:.2f} | "
              f"{loss:.2f} +- {se:.2f} |", flush=True)  # paired_loss: in points already
print(json.dumps(rows))
