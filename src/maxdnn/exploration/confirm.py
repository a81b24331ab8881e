"""The choice of an exploration's answer, and its test-set numbers.

The search ranks points on a small validation split (``Budget.val_images``),
which measures an accuracy near 84% only to about +-2.3 points at 1,000
images: the point of largest gain "within 1 point" on it is often several
points away on test. This stage therefore, per approach and compensation
level (``ptq``: as quantized; ``bias``: bias-corrected; ``finetune``: the
fine-tuned points of ``maxdnn.exploration.finetune_stage``):

1. takes the candidates near the thresholds: the level's validation-Pareto
   points within the largest threshold plus the validation noise, the points
   of largest gain within each threshold first, then spread in gain, up to
   ``Budget.confirm_points``;
2. measures them again on the confirmation split (``Budget.confirm_images``
   held-out training images, the validation images among them), image by
   image (``maxdnn.exploration.paired``);
3. chooses, per threshold t, the candidate of largest gain whose paired loss
   against the level's reference on those images, plus ``Z_CHOICE`` standard
   errors, is at most t (``choose``). The reference is the exact model as
   quantized for ``ptq`` and ``bias``, and the better (on the confirmation
   images) of that and the exact model fine-tuned the same way for
   ``finetune``: a gain bought by training the exact model longer is not a
   gain of approximation;
4. measures the chosen points, and the references, on the test images.

The test split is never used to choose anything. Results go to
RUN_DIR/confirm_eval.json (measurements with their per-image bits), and
every validation-front point's assignment to RUN_DIR/pareto/.
"""

from __future__ import annotations

import json

from maxdnn.engine.approx import ApproxNetwork, Assignment, assignment_key
from maxdnn.atomic import read_json, write_json
from maxdnn.errors import MaxdnnError
from maxdnn.exploration.front import THRESHOLDS, largest_gain_within, pareto_front, point_key, spread_in_gain
from maxdnn.exploration.paired import correctness, paired_loss


class ConfirmError(MaxdnnError, ValueError):
    """The confirmation stage's own results in the run directory (confirm_eval.json) cannot be read.

    Example:

    >>> from maxdnn.exploration.confirm import ConfirmError
    >>> str(ConfirmError("runs/a/confirm_eval.json: not a readable result file (JSONDecodeError)"))
    'runs/a/confirm_eval.json: not a readable result file (JSONDecodeError)'
    """


Z_CHOICE = 1.0  # standard errors of the paired confirmation loss a chosen point must stay within its threshold
LEVELS = ("ptq", "bias", "finetune")


def levels_of(compensation: str) -> tuple[str, ...]:
    """The compensation levels an exploration reports."""
    return {"none": ("ptq",), "bias": ("ptq", "bias"), "finetune": LEVELS}[compensation]


def level_points(points: list[dict], level: str) -> list[dict]:
    """The points with ``val_accuracy`` / ``val_loss`` of ``level`` (``ptq``: as quantized; ``bias``: as ranked)."""
    if level == "ptq":
        return [{**p, "val_accuracy": p["ptq_val_accuracy"], "val_loss": p["ptq_val_loss"]} for p in points]
    return list(points)


def candidates(front: list[dict], base_val_accuracy: float, val_noise: float, k: int) -> list[dict]:
    """The front points measured again on the confirmation split (module docstring, step 1)."""
    loss = lambda p: 100 * (base_val_accuracy - p["val_accuracy"])  # noqa: E731
    near = [p for p in front if loss(p) <= max(THRESHOLDS) + val_noise]
    cited = [largest_gain_within(near, loss, t) for t in THRESHOLDS]
    cited += [largest_gain_within(near, loss, t + val_noise / 2) for t in THRESHOLDS]
    cited = [p for p in cited if p is not None]
    return spread_in_gain(near, k, list({id(p): p for p in cited}.values())[:k])


def choose(rows: list[dict], threshold: float, z: float = Z_CHOICE) -> dict | None:
    """The row of largest gain whose ``confirm_loss_pts + z * confirm_loss_se`` is at most ``threshold``
    (rows without confirmation numbers are not candidates); None when there is none."""
    ok = [r for r in rows if r.get("confirm_loss_pts") is not None
          and r["confirm_loss_pts"] + z * r["confirm_loss_se"] <= threshold + 1e-9]
    return max(ok, key=lambda r: (r["energy_gain"], -r["confirm_loss_pts"])) if ok else None


def reference_for(level: str, refs: dict) -> tuple[str, dict]:
    """(name, measurement) of the reference a level's points are compared with (module docstring, step 3)."""
    if level == "finetune" and refs.get("finetune") and \
            refs["finetune"]["confirm"]["accuracy"] > refs["ptq"]["confirm"]["accuracy"]:
        return "exact fine-tuned", refs["finetune"]
    return "exact", refs["ptq"]


def with_confirmation(p: dict, entry: dict | None, ref: dict) -> dict:
    """``p`` with its paired confirmation loss against ``ref`` (None fields when not measured)."""
    if not entry or "confirm" not in entry:
        return {**p, "confirm_loss_pts": None, "confirm_loss_se": None}
    loss, se = paired_loss(ref["confirm"], entry["confirm"])
    return {**p, "confirm_loss_pts": loss, "confirm_loss_se": se}


def _front_candidates(explorer, approaches, res: dict, levels: list[str], tuned=()) -> tuple[dict, dict]:
    """(point key -> assignment of every validation-front point and of every fine-tuned point (keys ``tuned``),
    saved to RUN_DIR/pareto/; "LEVEL|APPROACH" -> its candidates, step 1)."""
    from maxdnn.exploration.report import noise_pts

    front_dir = explorer.run_dir / "pareto"
    front_dir.mkdir(exist_ok=True)
    base_val = explorer.info["baseline"]["val_accuracy"]
    val_noise = noise_pts(base_val, len(explorer.val))
    built: dict[str, Assignment] = {}
    cands: dict[str, list[dict]] = {}
    for ap in approaches:
        pts = explorer.store.points([ap])
        fronts = {lv: pareto_front(level_points(pts, lv)) for lv in levels}
        saved = {point_key(p): p for lv in levels for p in fronts[lv]}
        saved.update({point_key(p): p for p in pts if point_key(p) in tuned})
        for p in saved.values():
            a = explorer.build(ap, {k: tuple(v) for k, v in json.loads(p["genome"]).items()}, res)
            a.meta = {"approach": ap, "summary": p["summary"], "energy_gain": p["energy_gain"]}
            a.save(front_dir / f"{ap}-{p['source']}-{p['trial']}.json")
            built[point_key(p)] = a
        for lv in levels:
            cands[f"{lv}|{ap}"] = candidates(fronts[lv], base_val, val_noise, explorer.budget.confirm_points)
    return built, cands


def _measure(explorer, split_name: str, jobs: dict) -> dict:
    """Packed correctness on a split of each job (unit -> (level, assignment)): work units, a pass per batch."""
    split = getattr(explorer, split_name)

    def run(units):
        nets = [ApproxNetwork(explorer.graph_for(a) if lv == "bias" else explorer.q, a)
                for lv, a in (jobs[u] for u in units)]
        return correctness(nets, split.images, split.labels)

    with explorer.progress_bar(f"{split_name}: {len(jobs)} assignments", total=len(jobs)) as bar:
        return explorer.units.map(list(jobs), run, bar, batch=explorer.eval_batch)


def _choose_finetuned(explorer, approaches, finetuned: dict, refs: dict, chosen: dict) -> None:
    """Step 3 for the fine-tuned points, which their stage measured: into ``chosen``."""
    _, ref = reference_for("finetune", refs)
    for ap in approaches:
        rows = []
        for p in explorer.store.points([ap]):
            entry = finetuned["assignments"].get(finetuned["points"].get(point_key(p), ""))
            if entry:
                rows.append(with_confirmation(p, entry, ref))
        for t in THRESHOLDS:
            r = choose(rows, t)
            if r is not None:
                chosen[f"finetune|{ap}|{t:g}"] = point_key(r)


def confirm_and_test(explorer, approaches, res: dict, finetuned: dict | None = None) -> dict:
    """Steps 1-4 of the module docstring; returns confirm_eval.json's content: {"reference": {"ptq": m,
    "finetune": m}, "points": {"LEVEL|POINT_KEY": m}, "chosen": {"LEVEL|APPROACH|T": POINT_KEY}}, each
    measurement m {"confirm": packed, "test": packed (chosen points and references only)}. ``finetuned``:
    the fine-tuning stage's result (``finetune_front``), whose entries carry their own measurements."""
    path = explorer.run_dir / "confirm_eval.json"
    local = read_json(path, ConfirmError, default={})
    levels = [lv for lv in levels_of(explorer.compensation) if lv != "finetune"]
    built, cands = _front_candidates(explorer, approaches, res, levels, set((finetuned or {}).get("points", {})))
    exact = Assignment.uniform(explorer.q, "exact")
    jobs = {"confirm|exact": ("ptq", exact)}
    for key, pts in cands.items():
        for p in pts:
            a = built[point_key(p)]
            jobs.setdefault(f"confirm|{key.split('|')[0]}|{assignment_key(a)}", (key.split("|")[0], a))
    confirmed = _measure(explorer, "confirm", jobs)
    refs = {"ptq": {"confirm": confirmed["confirm|exact"]}}
    if finetuned and finetuned.get("exact"):
        refs["finetune"] = {k: finetuned["exact"][k] for k in ("confirm", "test")}
    points: dict[str, dict] = {}
    chosen: dict[str, str] = {}
    test_jobs = {"test|exact": ("ptq", exact)}
    for key, pts in cands.items():
        lv, ap = key.split("|")
        rows = []
        for p in pts:
            m = {"confirm": confirmed[f"confirm|{lv}|{assignment_key(built[point_key(p)])}"]}
            points[f"{lv}|{point_key(p)}"] = m
            rows.append(with_confirmation(p, m, refs["ptq"]))
        for t in THRESHOLDS:
            r = choose(rows, t)
            if r is not None:
                chosen[f"{lv}|{ap}|{t:g}"] = point_key(r)
                test_jobs.setdefault(f"test|{lv}|{assignment_key(built[point_key(r)])}", (lv, built[point_key(r)]))
    tested = _measure(explorer, "test", test_jobs)
    refs["ptq"]["test"] = tested["test|exact"]
    for pk_full, m in points.items():
        lv, pk = pk_full.split("|")
        unit = f"test|{lv}|{assignment_key(built[pk])}"
        if unit in tested:
            m["test"] = tested[unit]
    if finetuned:  # fine-tuned points: measured by their stage; chosen here on the confirmation images
        _choose_finetuned(explorer, approaches, finetuned, refs, chosen)
    out = {"z": Z_CHOICE, "confirm_images": len(explorer.confirm), "test_images": len(explorer.test),
           "reference": refs, "points": points, "chosen": chosen}
    if local != out:
        write_json(path, out)
    return out
