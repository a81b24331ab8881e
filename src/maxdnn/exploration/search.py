"""The searches of an exploration: per approach, a sweep over (configuration x fraction) and NSGA-II; for a
fine-tuning exploration, the ladder of weight-grid points (``ladder``).

A genome gives each layer a configuration and, for filter and kernel, a
fraction of its units (approximated least sensitive first, by the resilience
proxy); ``Explorer.build`` turns it into an assignment. The sweep applies one
configuration and fraction to every layer (for ``layer``: the fraction of
layers least sensitive to the configuration). NSGA-II (Optuna) searches
per-layer genomes maximising validation accuracy and energy gain; its first
generation is seeded with the sweep's validation-Pareto genomes.

Every point is an Optuna trial, told as it is evaluated; every sweep point and
NSGA-II trial slot is a unit of work (``maxdnn.runs.work_units``), so that several
workers share the search and a rerun resumes it.
"""

from __future__ import annotations

import json

import numpy as np

from maxdnn.exploration.front import pareto_front
from maxdnn.exploration.storage import point_attrs


def genome_summary(genome: dict[str, tuple[str, float]]) -> str:
    """A search genome in one line: each approximated layer's multiplier and share (``s2.conv1=roup-p2r2@0.5``)."""
    parts = [f"{n}={s}" + (f"@{f:g}" if f < 1 else "") for n, (s, f) in genome.items() if s != "exact" and f > 0]
    return "; ".join(parts) if parts else "all exact"


FRACTION_STEP = 0.125  # the fractions NSGA-II chooses from: multiples of this


def _record_many(explorer, study, asked: list, approach: str, source: str, res: dict) -> None:
    """Evaluate the asked trials (``asked``: (trial, genome, extra attributes) triples) in one pass and
    tell them."""
    built = [explorer.build(approach, genome, res) for _, genome, _ in asked]
    for (trial, genome, extra), a, r in zip(asked, built, explorer.evaluate_many(built)):
        # one attribute, one write to the storage (each write is a transaction)
        trial.set_user_attr("point", {**r, **extra, "approach": approach, "source": source,
                                      "summary": genome_summary(genome), "genome": json.dumps(genome),
                                      "granularity": a.granularity()})
        study.tell(trial, [r["val_accuracy"], r["energy_gain"]])

def sweep(explorer, approach: str, res: dict) -> None:
    """Every (configuration, fraction) of the grid once: each point is a unit (shared by workers)."""
    import optuna

    study = explorer.store.study(f"{approach}-sweep", optuna.samplers.RandomSampler(seed=explorer.seed))
    fractions = explorer.budget.sweep_fractions
    grid = {f"sweep|{approach}|{s}|{float(f):g}": (s, float(f)) for s in explorer.library for f in fractions}
    layers = list(explorer.q.layers)

    def points(keys):
        numbers, asked = [], []
        finished = {}  # (config, fraction) -> the first trial that evaluated it
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            u = point_attrs(t)
            finished.setdefault((u["config"], round(u["fraction"], 6)), t.number)
        for key in keys:
            spec, frac = grid[key]
            if (spec, round(frac, 6)) in finished:  # evaluated before units were kept (an older run): not again
                numbers.append(finished[(spec, round(frac, 6))])
                continue
            trial = study.ask()
            asked.append((trial, _sweep_genome(explorer, approach, spec, frac, res, layers), {"config": spec, "fraction": frac}))
            numbers.append(trial.number)
        _record_many(explorer, study, asked, approach, "sweep", res)
        return numbers

    with explorer.progress_bar(f"{approach}: sweep", total=len(grid)) as bar:
        explorer.units.map(list(grid), points, bar, batch=explorer.eval_batch)

def _sweep_genome(explorer, approach, spec, frac, res, layers):
    if approach in ("layer", "alwann"):
        si = explorer.library.index(spec)
        order = np.argsort(res["direct_loss"][:, si], kind="stable")
        chosen = {layers[i] for i in order[: int(round(frac * len(layers)))]}
        return {n: (spec, 1.0) for n in layers if n in chosen}
    return {n: (spec, frac) for n in layers}

def nsga(explorer, approach: str, res: dict) -> None:
    """The budget's NSGA-II trials: each trial slot is a unit, so that several workers run exactly the
    budget's number of trials between them (the sampler reads every finished trial from the storage)."""
    import optuna

    sampler = optuna.samplers.NSGAIISampler(population_size=explorer.budget.population, seed=explorer.seed)
    study = explorer.store.study(f"{approach}-nsga2", sampler)
    if approach == "alwann":
        choices = explorer.alwann_choices()
    else:
        choices = ["exact"] + explorer.library
    layers = list(explorer.q.layers)

    def seed_generation(_):
        # first generation: seeded with the sweep's validation-Pareto genomes (random genomes alone
        # start far from the useful, mildly approximated region)
        if study.get_trials(deepcopy=False):
            return 0
        seeds = _seed_genomes(explorer, approach)[: explorer.budget.population // 2]
        for genome in seeds:
            params = {}
            for n in layers:
                spec, frac = genome.get(n, ("exact", 0.0))
                params[f"cfg:{n}"] = spec if spec in choices else "exact"
                if approach not in ("layer", "alwann"):
                    params[f"frac:{n}"] = frac
            study.enqueue_trial(params)
        return len(seeds)

    # a run made before trial slots were units: its finished trials fill the first slots
    legacy = 0 if explorer.units.results(prefix=f"nsga|{approach}|") else \
        len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    explorer.units.map([f"nsga-seed|{approach}"], seed_generation)

    def trial_slots(keys):  # up to a generation's slots: asked together, evaluated in one pass, told
        numbers, asked = [], []
        told = _told_units(study)
        for key in keys:
            if int(key.rsplit("|", 1)[1]) < legacy:
                numbers.append(None)  # finished before units were kept: not again
                continue
            if key in told:
                numbers.append(told[key])  # told by a worker that died before it stored the unit: not again
                continue
            trial = study.ask()
            genome = {}
            for n in layers:
                spec = trial.suggest_categorical(f"cfg:{n}", choices)
                frac = 1.0 if approach in ("layer", "alwann") else trial.suggest_float(f"frac:{n}", 0.0, 1.0, step=FRACTION_STEP)
                genome[n] = (spec, frac)
            asked.append((trial, genome, {"unit": key}))
            numbers.append(trial.number)
        _record_many(explorer, study, asked, approach, "nsga2", res)
        return numbers

    slots = [f"nsga|{approach}|{i}" for i in range(explorer.budget.nsga_trials)]
    with explorer.progress_bar(f"{approach}: NSGA-II", total=len(slots)) as bar:
        explorer.units.map(slots, trial_slots, bar, batch=explorer.budget.population)

def _told_units(study) -> dict:
    """Unit key -> number of the study's completed trial that evaluated it (a worker may have told a trial and
    died before it stored the unit: that unit is not evaluated again)."""
    import optuna

    return {point_attrs(t).get("unit"): t.number
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}


def _seed_genomes(explorer, approach: str) -> list[dict]:
    source = "layer" if approach == "alwann" else approach
    front = pareto_front([p for p in explorer.store.points([source]) if p["source"] == "sweep"])
    # most accurate first
    return [{k: tuple(v) for k, v in json.loads(p["genome"]).items()} for p in sorted(front, key=lambda p: -p["val_accuracy"])]


def ladder_specs(library: list[str], table) -> tuple[str, str] | None:
    """(top, under) of the fine-tuning ladder: the library's two lowest-energy configurations whose error lies in
    the weights alone (separable, identity activation transform: ROUP without rounding, roup-pPr0), ``under``
    ``exact`` when the library has one; None when it has none."""
    from maxdnn.multipliers.models import get_multiplier

    xs = np.arange(0, 256)
    grid = []
    for s in library:
        m = get_multiplier(s)
        if m.separable and np.array_equal(np.asarray(m.x_transform(xs)), xs) and s in table.rel:
            grid.append(s)
    grid.sort(key=lambda s: table[s])
    if not grid:
        return None
    return grid[0], (grid[1] if len(grid) > 1 else "exact")


NEGLIGIBLE = 1e-3  # of the ladder's whole energy saving: steps saving less together are left to no rung


def ladder_rungs(loss: np.ndarray, saved: np.ndarray, fractions) -> tuple[list[tuple[int, int]], list[int]]:
    """(steps, rungs) of the fine-tuning ladder. ``loss`` and ``saved`` are [layers, 2]: per layer, the untrained
    loss with ``under`` alone on it and with ``top`` alone, and the energy that ``under`` saves over exact and
    ``top`` over ``under``. A step (layer, level) takes one layer one level up (1: exact to ``under``, 2: ``under``
    to ``top``). Steps are ordered by the loss they add (negative: 0) per energy they save (ties: the lower level,
    then the larger saving first); a layer's second step never comes before its first. A rung is a prefix of the
    steps (its length): the foot, every step before the first ``top`` step (``under`` wherever it costs less per
    energy than any ``top`` step, exact elsewhere), and for each fraction f the shortest prefix saving at least
    what ``under`` on every layer saves plus f of what ``top`` on every layer saves beyond it (f = 0 ... 1: the
    energies of the ``under`` / ``top`` mixes, each reached by the cheapest steps), less ``NEGLIGIBLE`` of the
    ladder's whole saving: the steps of a layer that saves next to nothing (a classifier of a few hundred
    multiplications) come last, and no rung takes them for the loss they add; each length once, ascending."""
    score = lambda i, lv: max(float(loss[i, lv - 1]) - (float(loss[i, 0]) if lv == 2 else 0.0), 0.0) / \
        max(float(saved[i, lv - 1]), 1e-300)  # noqa: E731
    key = {(i, lv): (max(score(i, 1), score(i, lv)), lv, -float(saved[i, lv - 1]), i)
           for i in range(len(loss)) for lv in (1, 2)}
    steps = sorted(key, key=key.get)
    foot = next(k for k, (_, lv) in enumerate(steps) if lv == 2)
    cum = np.concatenate([[0.0], np.cumsum([saved[i, lv - 1] for i, lv in steps])])
    under_all, top_all = float(saved[:, 0].sum()), float(saved.sum())
    targets = [under_all + f * (top_all - under_all) for f in fractions]
    slack = NEGLIGIBLE * top_all
    rungs = {foot} | {max(foot, int(np.searchsorted(cum, t - slack))) for t in targets}
    return steps, sorted(rungs)


def ladder(explorer, res: dict, n_rungs: int) -> None:
    """The fine-tuning ladder (``layer`` approach, fine-tuning explorations): each layer exact, ``under`` or
    ``top`` (``ladder_specs``), along the steps of ``ladder_rungs`` (one layer one level up, ordered by the
    untrained loss of the configuration alone on the layer (resilience, direct loss) per multiplication energy
    it saves); the ladder's foot and one rung per fraction f, ``n_rungs - 1`` fractions evenly from 0 to 1, a
    prefix length reached twice taken once. A weight-only error is what fine-tuning absorbs (the
    weights are trained onto the multiplier's grid), so these points are fine-tuned whatever their loss as
    quantized or bias-corrected, which ranks them far below what they reach once trained; each rung's training
    starts from the one below it, fine-tuned (``finetune_stage``). Each point is a unit, recorded in the
    ``layer-ladder`` study with source ``ladder``, its rung's prefix length as ``rung``."""
    import optuna

    from maxdnn.ir.graph import multiplication_counts

    pair = ladder_specs(explorer.library, explorer.table)
    if pair is None:
        return
    top, under = pair
    study = explorer.store.study("layer-ladder", optuna.samplers.RandomSampler(seed=explorer.seed))
    layers = list(explorer.q.layers)
    counts = multiplication_counts(explorer.q)
    t = explorer.table
    mults = np.array([counts[n] * int(np.prod(explorer.q.layers[n].weight.shape[:2])) for n in layers], dtype=float)
    energy = np.array([[t.for_layer(n, s) for s in ("exact", under, top)] for n in layers]) * mults[:, None]
    saved = energy[:, :2] - energy[:, 1:]
    lib = explorer.library
    loss = np.stack([res["direct_loss"][:, lib.index(under)] if under in lib else np.zeros(len(layers)),
                     res["direct_loss"][:, lib.index(top)]], axis=1)
    steps, rungs = ladder_rungs(loss, saved, np.linspace(0.0, 1.0, max(n_rungs - 1, 2)))
    grid = {f"ladder|layer|{top}|{under}|steps-{k}": k for k in rungs}
    total = sum(saved[i, lv - 1] for i, lv in steps[rungs[0]:])

    def points(keys):
        told = _told_units(study)
        numbers, asked = [], []
        for key in keys:
            if key in told:
                numbers.append(told[key])
                continue
            k = grid[key]
            level = np.zeros(len(layers), dtype=np.int64)
            for i, _ in steps[:k]:
                level[i] += 1
            genome = {n: (spec, 1.0) for n, lv in zip(layers, level) if (spec := ("exact", under, top)[lv]) != "exact"}
            reached = sum(saved[i, lv - 1] for i, lv in steps[rungs[0]:k])
            trial = study.ask()
            asked.append((trial, genome, {"unit": key, "config": top, "rung": k,
                                          "fraction": float(reached / total) if total > 0 else 1.0}))
            numbers.append(trial.number)
        _record_many(explorer, study, asked, "layer", "ladder", res)
        return numbers

    with explorer.progress_bar(f"layer: fine-tuning ladder ({top} over {under})", total=len(grid)) as bar:
        explorer.units.map(list(grid), points, bar, batch=explorer.eval_batch)
