"""The test-set stage of an exploration: the validation-Pareto points measured on the test images.

The test split is never used to choose anything: the searches rank points by
validation accuracy only; this stage measures the chosen front points once more,
on the test images, for the report.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from maxdnn.engine.approx import ApproxNetwork, Assignment, assignment_key, logits_shared
from maxdnn.atomic import write_json
from maxdnn.exploration.front import pareto_front, point_key, test_selection


def evaluate_front(explorer, approaches, res: dict) -> None:
    """Test accuracy of the validation-Pareto points (all, or the budget's ``test_points`` per approach:
    ``test_selection``): each distinct assignment a unit (shared by workers; points of several approaches
    that build the same assignment are measured once), every point's result written to
    RUN_DIR/test_eval.json, and every front point's assignment to RUN_DIR/pareto/."""
    path = explorer.run_dir / "test_eval.json"
    local = json.loads(path.read_text()) if path.exists() else {}  # by point key
    front_dir = explorer.run_dir / "pareto"
    front_dir.mkdir(exist_ok=True)
    chosen: dict[str, tuple[Assignment, list[str]]] = {}  # unit -> (assignment, its points' keys)
    base_val = explorer.info["baseline"]["val_accuracy"]
    for ap in approaches:
        front = pareto_front(explorer.store.points([ap]))
        picked = {id(p) for p in test_selection(front, base_val, explorer.budget.test_points)}
        for p in front:
            genome = {k: tuple(v) for k, v in json.loads(p["genome"]).items()}
            a = explorer.build(ap, genome, res)
            a.meta = {"approach": ap, "summary": p["summary"], "val_accuracy": p["val_accuracy"],
                      "energy_gain": p["energy_gain"]}
            a.save(front_dir / f"{ap}-{p['source']}-{p['trial']}.json")
            if id(p) in picked:
                chosen.setdefault(f"test|{assignment_key(a)}", (a, []))[1].append(point_key(p))

    def known(unit):  # measured before by this run directory (runs made before units were per assignment)
        return next((local[k] for k in chosen[unit][1] if k in local), None)

    def measure(units):  # several assignments in one pass over the test images
        todo = [u for u in units if known(u) is None]
        nets = [ApproxNetwork(explorer.graph_for(chosen[u][0]), chosen[u][0]) for u in todo]
        correct = np.zeros(len(todo), dtype=np.int64)
        for i in range(0, len(explorer.test) if todo else 0, 250):
            y = torch.as_tensor(explorer.test.labels[i:i + 250])
            for j, out in enumerate(logits_shared(nets, torch.as_tensor(explorer.test.images[i:i + 250]))):
                correct[j] += int((out.argmax(1) == y).sum())
        mine = {u: {"test_accuracy": int(c) / len(explorer.test), "test_images": int(len(explorer.test))}
                for u, c in zip(todo, correct)}
        return [mine[u] if u in mine else known(u) for u in units]

    with explorer.progress_bar("test set: Pareto points", total=len(chosen)) as bar:
        measured = explorer.units.map(list(chosen), measure, bar, batch=explorer.eval_batch)
    write_json(path, {**local, **{pk: measured[u] for u, (_, pkeys) in chosen.items() for pk in pkeys}})
