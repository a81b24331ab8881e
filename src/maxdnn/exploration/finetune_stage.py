"""The fine-tuning stage of an exploration (``maxdnn explore``, ``--compensation finetune``: the default).

After the search, some of each approach's validation-Pareto points are
fine-tuned with their assignment fixed (``maxdnn.compensate.finetune``) and measured
again, on validation, on the confirmation images and on test, through the
integer engine (``maxdnn.exploration.confirm`` chooses among them). Which points:
per approach, up to ``points`` of the validation front within
``max_val_loss_pts`` of the exact baseline (fine-tuning recovers several
points, not tens) and of at least the gain of the point of largest gain within
``floor_pts`` validation points (below it, training has little to win; 0.5: the
points that bias correction already brings within 1 point are fine-tuned too,
since fine-tuning can take them below half a point), spread in gain
(``maxdnn.exploration.front.spread_in_gain``): both ends, then halving the largest gaps.
Everything is chosen on validation, as in the search. The ladder's points
(``maxdnn.exploration.search.ladder``: configurations whose error lies in the
weights alone, which training absorbs) are fine-tuned too, whatever their loss
untrained, each rung starting from the rung below it as fine-tuned (its weights
already on the grid of the layers the rungs share), so that the layers of the
upper rungs have had several rungs' training at the cost of one each; all
learn the answers of the quantized model itself (``distill``). Identical assignments
(layer-level and ALWANN-style often share points) are fine-tuned once. The
exact model is fine-tuned the same way: it is the fair baseline
(a gain bought by extra training of the exact model is not a gain from
approximation).

Fine-tuning starts from the quantized model without bias correction even when
the exploration corrects biases: the trained biases absorb the mean error, and
correcting them afterwards removes it twice.

Results go to RUN_DIR/finetune_eval.json, one entry per assignment as it
completes, and the fine-tuned graphs to RUN_DIR/finetuned/; an interrupted
stage resumes after the last finished point (and a point's training after its
last finished epoch).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from maxdnn.engine.approx import ApproxNetwork, Assignment, assignment_key
from maxdnn.atomic import read_json, write_json
from maxdnn.data import training_sample
from maxdnn.compensate.finetune import FinetuneError, check_finetunable, finetune
from maxdnn.exploration.front import largest_gain_within, pareto_front, point_key, spread_in_gain
from maxdnn.exploration.paired import correctness
from maxdnn.ir.graph import QuantizedGraph


@dataclass(frozen=True)
class FinetuneBudget:
    epochs: int
    images: int | None  # training images outside the validation hold-out (None: all of them)
    points: int  # per approach
    max_val_loss_pts: float = 12.0
    floor_pts: float = 0.5  # fine-tune no point of less gain than the largest-gain point within this validation loss
    lr: float = 1e-3
    batch_size: int = 64
    fit_scales: bool = True  # weight scales fitted to the multipliers' weight grids first (compensate.weight_scales)
    distill: bool = True  # learn the exact quantized model's logits, not the labels (compensate.finetune)
    ladder_points: int = 5  # rungs of the fine-tuning ladder (search.ladder): its foot and this minus 1 fractions 0 ... 1
    ladder_warm: bool = True  # each ladder rung's training starts from the rung below it, fine-tuned


FINETUNE_BUDGETS = {
    "quick": FinetuneBudget(epochs=1, images=20000, points=3, max_val_loss_pts=12.0, ladder_points=9),
    "full": FinetuneBudget(epochs=2, images=20000, points=4, max_val_loss_pts=12.0, ladder_points=13),
    "tiny": FinetuneBudget(epochs=1, images=64, points=1, max_val_loss_pts=100.0, ladder_points=3),  # for tests
}


def finetune_candidates(points: list[dict], base_val_accuracy: float, fb: FinetuneBudget) -> list[dict]:
    """The validation-Pareto points of one approach to fine-tune (module docstring), by increasing gain."""
    loss = lambda p: 100 * (base_val_accuracy - p["val_accuracy"])  # noqa: E731
    front = [p for p in pareto_front(points) if p["energy_gain"] > 0 and loss(p) <= fb.max_val_loss_pts + 1e-9]
    low = largest_gain_within(front, loss, fb.floor_pts)  # below its gain, training has little to win
    if low is not None:
        front = [p for p in front if p["energy_gain"] >= low["energy_gain"]]
    return spread_in_gain(front, fb.points)


def _to_finetune(explorer, approaches, res: dict, fb: FinetuneBudget) -> tuple[dict, list[list[str]]]:
    """What the stage fine-tunes: ({assignment key: (assignment, [point keys])}, the exact model first; the
    ladders, each a list of its distinct rung keys from the bottom up)."""
    base_val = explorer.info["baseline"]["val_accuracy"]
    by_key = {"exact": (Assignment.uniform(explorer.q, "exact"), [])}
    ladders = []
    for ap in approaches:
        pts = explorer.store.points([ap])
        # the ladder's rungs, fine-tuned whatever their loss untrained, from the bottom up
        ladder = sorted((p for p in pts if p["source"] == "ladder"), key=lambda p: (p.get("rung", 0), p["energy_gain"]))
        keys = {}
        for p in finetune_candidates(pts, base_val, fb) + ladder:
            a = explorer.build(ap, {k: tuple(v) for k, v in json.loads(p["genome"]).items()}, res)
            keys[point_key(p)] = key = assignment_key(a)
            by_key.setdefault(key, (a, []))[1].append(point_key(p))
        if ladder:
            ladders.append(list(dict.fromkeys(keys[point_key(p)] for p in ladder)))
    return by_key, ladders


class _Stage:
    """The fine-tuning and measurement of ``finetune_front``'s assignments in one run directory."""

    def __init__(self, explorer, fb: FinetuneBudget, settings: dict, by_key: dict, below: dict, tr, local: dict):
        self.explorer, self.fb, self.settings, self.by_key, self.below = explorer, fb, settings, by_key, below
        self.images, self.labels = explorer.train.images[tr], explorer.train.labels[tr]
        self.local = local  # results of this run directory so far (finetune_eval.json)
        self.out_dir = Path(explorer.run_dir) / "finetuned"
        self.out_dir.mkdir(exist_ok=True)
        self.recipe = {"epochs": fb.epochs, "lr": fb.lr, "batch_size": fb.batch_size, "seed": explorer.seed,
                       "images": len(tr), "fit_scales": fb.fit_scales, "distill": fb.distill}

    def trained(self, key: str) -> QuantizedGraph:
        """The fine-tuned graph of assignment ``key``; a ladder rung's starts from the rung below."""
        npz = self.out_dir / f"{key}.npz"
        if npz.exists():  # trained before an interruption, or as the start of a rung above it
            g = QuantizedGraph.load(npz)
            made = {k: g.meta.get("finetune", {}).get(k) for k in self.recipe}
            if made != self.recipe:
                raise FinetuneError(f"{npz}: fine-tuned with {made}, not {self.recipe}; delete RUN_DIR/finetuned")
            return g
        fb, q = self.fb, self.explorer.q
        start = self.trained(self.below[key]) if key in self.below else q
        return finetune(start, self.by_key[key][0], self.images, self.labels, npz, epochs=fb.epochs,
                        batch_size=fb.batch_size, lr=fb.lr, seed=self.explorer.seed, log=lambda m: None,
                        progress=False, fit_scales=fb.fit_scales, distill=fb.distill, teacher=q)

    def measure(self, key: str) -> dict:
        """One assignment's entry; kept in finetuned/KEY.json as soon as measured (a ladder unit interrupted
        half-way keeps its rungs' measurements)."""
        kept = self.out_dir / f"{key}.json"
        if self.local.get(key) is not None:
            return self.local[key]
        if (k := read_json(kept, FinetuneError, default={})).get("settings") == self.settings and "entry" in k:
            return k["entry"]
        ex, a = self.explorer, self.by_key[key][0]
        t0 = time.time()
        g = self.trained(key)
        val_acc, val_loss = ex.val_metrics(a, g)
        net = [ApproxNetwork(g, a)]
        confirm = correctness(net, ex.confirm.images, ex.confirm.labels)[0]
        test = correctness(net, ex.test.images, ex.test.labels)[0]
        entry = {"val_accuracy": val_acc, "val_loss": val_loss, "confirm": confirm, "test": test,
                 "test_accuracy": test["accuracy"], "test_images": test["images"], "seconds": time.time() - t0,
                 "graph": f"finetuned/{key}.npz", "worker": ex.units.worker}
        write_json(kept, {"settings": self.settings, "entry": entry})
        return entry


def finetune_front(explorer, approaches, res: dict, fb: FinetuneBudget) -> dict:
    """Fine-tune the chosen validation-Pareto points and the exact model; returns finetune_eval.json's content:
    {"settings", "exact": entry, "assignments": {key: entry}, "points": {point key: assignment key}}, each entry
    {val_accuracy, val_loss, confirm, test (``maxdnn.exploration.paired.pack``ed correctness on the
    confirmation and test images), test_accuracy, test_images, seconds, graph, worker}. A warm-started ladder
    is one work unit (its rungs can only be trained one after the other), so no two workers train a rung."""
    check_finetunable(explorer.q)
    path = Path(explorer.run_dir) / "finetune_eval.json"
    settings = {**asdict(fb), "seed": explorer.seed}
    done = read_json(path, FinetuneError, default={})
    if done and done.get("settings") != settings:
        raise FinetuneError(f"{path}: made with fine-tuning settings {done.get('settings')}; "
                            "delete it (and RUN_DIR/finetuned) or rerun with the same budget")
    done = {"settings": settings, "exact": done.get("exact"), "assignments": done.get("assignments", {}),
            "points": done.get("points", {})}
    by_key, ladders = _to_finetune(explorer, approaches, res, fb)
    ladders = [r for r in ladders if fb.ladder_warm and len(r) > 1]
    below = {k: b for rungs in ladders for b, k in zip(rungs, rungs[1:])}  # rung -> the rung it starts from
    for key, (a, pkeys) in by_key.items():
        for pk in pkeys:
            done["points"][pk] = key
    tr = training_sample(len(explorer.train), fb.images, explorer.seed)
    stage = _Stage(explorer, fb, settings, by_key, below, tr, {"exact": done["exact"], **done["assignments"]})

    tag = json.dumps(settings, sort_keys=True)
    ladder_units = {f"finetune-ladder|{tag}|{','.join(r)}": r for r in ladders}  # its rung keys, bottom up
    in_ladder = {k for r in ladders for k in r}
    single_units = {f"finetune|{tag}|{key}": key for key in by_key if key not in in_ladder}

    def measure(unit: str):
        if unit in single_units:
            return stage.measure(single_units[unit])
        out = {}
        for i, key in enumerate(ladder_units[unit], 1):
            bar.set_postfix_str(f"ladder rung {i}/{len(ladder_units[unit])}")
            out[key] = stage.measure(key)
        bar.set_postfix_str("")
        return out

    units = [*ladder_units, *single_units]
    chained = f"; {len(in_ladder)} of them ladder rungs, each trained from the one below" if below else ""
    explorer.log(f"fine-tuning {len(by_key)} assignments ({fb.epochs} epoch(s) on {len(tr)} training images "
                 f"outside the validation hold-out{chained}), then measuring them on validation and test")
    with explorer.progress_bar("fine-tuning: front points and ladder", len(units)) as bar:
        measured = explorer.units.map(units, measure, bar)
    for unit, entry in measured.items():
        entries = entry if unit in ladder_units else {single_units[unit]: entry}
        for key, e in entries.items():
            if key == "exact":
                done["exact"] = e
            else:
                done["assignments"][key] = e
    write_json(path, done)
    return done
