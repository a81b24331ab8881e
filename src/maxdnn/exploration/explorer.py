"""MAx-DNN exploration: resilience analysis, layer/filter/kernel approaches, NSGA-II search.

Data: the search evaluates on a validation split carved from the training
images (the same seeded hold-out ``maxdnn train`` keeps out of training); final
numbers of the Pareto-front points are measured on the test split. The test
split is never used to choose anything.

Approaches (a genome gives each layer a configuration and, for filter and
kernel, a fraction of its units; units are approximated least sensitive first):
- ``layer``: one ROUP configuration per layer;
- ``filter``: per layer, a fraction of its filters with a ROUP configuration;
- ``kernel``: the same over kernels (filter x input channel);
- ``alwann``: ALWANN-style layer-wise assignment, one multiplier per layer
  from the whole library (every ROUP configuration that saves energy, and
  the multipliers of a library given with ``library``, imported ones included).
Non-separable multipliers (lookup tables) take part like ROUP and run through
the lookup-table engine.

``Explorer`` holds what every stage shares (data, quantized graph, library,
energy table, storage, the evaluation of assignments); the stages are their
own units, run in order by ``run_exploration``:
- resilience (``maxdnn.exploration.resilience``);
- per approach, a sweep and an NSGA-II search (``maxdnn.exploration.search``);
- with ``compensation="finetune"``, the fine-tuning ladder of weight-grid points
  (``maxdnn.exploration.search.ladder``), then fine-tuning of front and ladder points
  (``maxdnn.exploration.finetune_stage``);
- the choice of each threshold's point on a larger held-out split, and its test-set numbers
  (``maxdnn.exploration.confirm``).

Every evaluated point is stored as it completes (``maxdnn.exploration.storage``:
Optuna studies and work units, SQLite in RUN_DIR by default); rerunning
resumes without redoing finished points.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.engine.approx import ApproxNetwork, Assignment, assignment_key, logits_shared
from maxdnn.compensate.bias_correction import bias_corrected, correction_images
from maxdnn.atomic import write_json
from maxdnn.data import training_sample, validation_split
from maxdnn.errors import MaxdnnError
from maxdnn.energy import energy_table, hardware_table, network_energy, with_per_layer
from maxdnn.multipliers.metrics import error_metrics
from maxdnn.exploration.resilience import resilience
from maxdnn.exploration.search import ladder, nsga, sweep
from maxdnn.exploration.confirm import confirm_and_test
from maxdnn.exploration.front import APPROACHES
from maxdnn.multipliers.models import get_multiplier, roup_specs
from maxdnn.ir.graph import QuantizedGraph
from maxdnn.exploration.storage import RunError, RunStorage, read_run_info
from maxdnn.workload import Workload, check_outputs, describe_data


@dataclass
class Budget:
    name: str
    val_images: int
    proxy_images: int
    sweep_fractions: tuple[float, ...]
    library_size: int  # ROUP configurations used (energy/error Pareto-optimal ones first)
    nsga_trials: int
    population: int
    validation_sample: int  # filters / kernels per proxy-validation sample
    confirm_images: int  # held-out training images the candidates near each threshold are measured on again
    confirm_points: int  # candidates per approach and compensation level measured on them


BUDGETS = {
    "quick": Budget("quick", 1000, 128, (0.25, 0.5, 0.75, 1.0), 8, 36, 12, 8, 5000, 6),
    "full": Budget("full", 2000, 256, tuple(np.arange(1, 9) / 8), 16, 120, 24, 16, 5000, 12),
    "tiny": Budget("tiny", 64, 16, (0.5, 1.0), 3, 6, 4, 3, 96, 2),  # for tests
}
COMPENSATIONS = ("none", "bias", "finetune")
MIN_SPREAD_ENERGY = 0.04  # a spread library reaches down to this relative energy (roup-p3r4 on the folded table)


def roup_library(size: int, error: dict[str, float] | None = None) -> list[str]:
    """``size`` ROUP configurations that save energy, by decreasing energy: the configurations Pareto-optimal
    in (energy, error) spread evenly in log energy from the mildest down to ``MIN_SPREAD_ENERGY`` (so that a
    small library reaches gains above 90%); a size beyond that front adds the others, mildest first. ``error``:
    per spec, the error measure of the front (default: NMED on all operand pairs; a compensated exploration
    passes ``compensated_error``)."""
    hw = hardware_table() or {}
    cands = []
    for s in roup_specs(8):
        e = hw.get(s)
        if e is None or e >= 1.0:
            continue
        cands.append((s, e, error_metrics(get_multiplier(s)).nmed if error is None else error[s]))
    front = [c for c in cands if not any(o[1] <= c[1] and o[2] <= c[2] and (o[1] < c[1] or o[2] < c[2]) for o in cands)]
    span = sorted([c for c in front if c[1] >= MIN_SPREAD_ENERGY], key=lambda c: -c[1])
    if size < len(span):
        lo, hi = np.log(span[-1][1]), np.log(span[0][1])
        chosen: list = []
        for t in np.linspace(hi, lo, size):  # nearest free front configuration to each target
            free = [c for c in span if c not in chosen]
            chosen.append(min(free, key=lambda c: (abs(np.log(c[1]) - t), -c[1])))
    else:
        rest = sorted([c for c in front if c not in span], key=lambda c: -c[1]) + \
            sorted([c for c in cands if c not in front], key=lambda c: -c[1])
        chosen = (span + rest)[:size]
    return [c[0] for c in sorted(chosen, key=lambda c: -c[1])]


def compensated_error(q: QuantizedGraph, images: np.ndarray) -> dict[str, float] | None:
    """Per ROUP configuration, the standard deviation of its product error on the graph's own weight-stationary
    operand stream (``maxdnn.hardware.power.model_stream`` of ``images``) once the mean error is removed: what
    bias correction and fine-tuning leave to the network. On ResNet-8 it ranks perforation (whose weight error
    fine-tuning absorbs) far milder than NMED does, and the rounding of small activations harsher. Sums in
    integers: the same on every CPU. None for a graph without a layer of unsigned inputs (no stream)."""
    from maxdnn.hardware.power import model_stream

    if all(l.x_signed for l in q.layers.values()):
        return None
    stream = model_stream(q, images)
    exact = stream.x * stream.w
    n = len(exact)
    out = {}
    for s in roup_specs(8):
        e = np.asarray(get_multiplier(s)(stream.x, stream.w), dtype=np.int64) - exact
        s1, s2 = int(e.sum()), int((e * e).sum())
        out[s] = float(np.sqrt(max(s2 * n - s1 * s1, 0) / (n * n)))
    return out


WEIGHT_GRID = ("roup-p2r0", "roup-p3r0")  # weight-only error: what fine-tuning trains the weights onto


def default_library(q: QuantizedGraph, train, size: int, compensated: bool, seed: int = 0,
                    finetune: bool = False) -> list[str]:
    """An exploration's default library of ``size`` ROUP configurations: spread over the (energy, NMED) front,
    or for a compensated exploration over the (energy, ``compensated_error``) front on the graph's own operands
    (64 training images of ``train`` outside the hold-out). A fine-tuning exploration also takes the
    ``WEIGHT_GRID`` configurations, whose error lies in the weights alone (perforation without rounding): the
    ladder of fine-tuned points is made of them (``maxdnn.exploration.search.ladder``)."""
    if not compensated:
        return roup_library(size)
    images = train.images[training_sample(len(train), 64, seed)]
    lib = roup_library(size, compensated_error(q, images))  # None (no unsigned-input layer): NMED
    if finetune:
        hw = hardware_table() or {}
        lib = sorted(dict.fromkeys(lib + list(WEIGHT_GRID)), key=lambda s: -hw.get(s, 1.0))
    return lib


class ExploreError(MaxdnnError, ValueError):
    """Exploration settings that cannot be used (a library, a compensation), as one line.

    Example:

    >>> from maxdnn.exploration.explorer import ExploreError
    >>> str(ExploreError("--library: 'exact' is always a choice; list approximate multipliers only"))
    "--library: 'exact' is always a choice; list approximate multipliers only"
    """


def check_library(q: QuantizedGraph, library: list[str]) -> None:
    """Every library multiplier exists for every layer's operand format (one line otherwise)."""
    from maxdnn.multipliers.models import SpecError

    if "exact" in library:
        raise ExploreError("--library: 'exact' is always a choice; list approximate multipliers only")
    for spec in library:
        for signed in sorted({layer.x_signed for layer in q.layers.values()}):
            try:
                get_multiplier(spec, 8, signed)
            except SpecError as e:
                raise ExploreError(f"--library {spec}: {e}") from None


def resume_run_info(run_dir: Path, info: dict) -> None:
    """Into a resumed run's ``info``: its earlier baseline, wall time and summaries, once the settings that
    define the run are checked equal to the earlier ones (one line otherwise)."""
    old = read_run_info(run_dir)
    old.setdefault("compensation", "bias" if old.get("bias_correction") else "none")  # older runs
    old.setdefault("energy", "average")
    for k in ("model", "data", "budget", "seed", "library", "compensation", "energy"):
        if old.get(k) != info[k]:
            was = old.get(k)["name"] if k == "budget" and isinstance(old.get(k), dict) else old.get(k)
            raise RunError(f"{run_dir / 'run.json'}: this run was made with {k} {was!r}; rerun with it or use "
                           f"another RUN_DIR")
    info["baseline"] = old.get("baseline")
    info.update({k: v for k, v in old.items() if k not in info})  # wall time so far, resilience summary


class Explorer:
    eval_batch = 8  # units a worker claims at once and evaluates in one pass over the images

    def __init__(self, run_dir: str | os.PathLike, workload: Workload, budget: Budget, storage: str | None = None,
                 seed: int = 0, log=print, progress: bool = True, library: list[str] | None = None,
                 compensation: str = "none", energy: str = "average"):
        """``library``: the multipliers the approaches choose from (any specs, imported ones included);
        default: the budget's share of the ROUP configurations that save energy. ``compensation``: ``none``
        (the search ranks points as quantized), ``bias`` (it ranks them with their biases corrected,
        ``maxdnn.compensate.bias_correction``, and keeps their uncorrected numbers beside) or ``finetune``
        (as ``bias``, then front points and the exact model are fine-tuned: ``run_exploration``). ``energy``:
        the objective's energy: multiplication energy, average, per-layer or a per-layer table file
        (``maxdnn.energy.with_per_layer``), or ``accelerator:NAME`` (a ZigZag template or
        ``HW.yaml:MAPPING.yaml``): the accelerator's energy per image (``maxdnn.accelerator.AcceleratorModel``;
        each point then also keeps its multiplication-energy gain, ``mult_energy_gain``)."""
        if compensation not in COMPENSATIONS:
            raise ExploreError(f"compensation {compensation!r}: expected one of {', '.join(COMPENSATIONS)}")
        self.energy = energy
        self.user_library = list(dict.fromkeys(library)) if library else None
        self.compensation = compensation
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.wl = workload
        self.budget = budget
        self.seed = seed
        self.log = log
        self.progress = progress
        self.storage_arg = storage  # None: SQLite in RUN_DIR, recorded relative so that the folder can move
        self.store = RunStorage.for_run(self.run_dir, storage)  # its scope is set once the run is known
        self._setup()

    @property
    def bias_correction(self) -> bool:
        """Whether points are ranked bias-corrected (every compensation but ``none``)."""
        return self.compensation != "none"

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        b = self.budget
        self.log(f"reading the data ({self.wl.data_path})")
        train = self.wl.split("train")
        _, val_idx = validation_split(len(train), 5000, seed=0)
        val_idx = np.sort(val_idx[: b.val_images])  # a random sample of the hold-out (class mix kept)
        self.val = train.subset(val_idx)
        self.train = train
        self.confirm = train.subset(np.sort(validation_split(len(train), 5000, seed=0)[1][: b.confirm_images]))
        self.test = self.wl.split("test")
        self.correction_images = correction_images(train.images) if self.bias_correction else None
        qpath = self.run_dir / "quantized.npz"
        if qpath.exists():
            self.q = QuantizedGraph.load(qpath)
        else:
            self.log(f"quantizing the model ({self.wl.model_path})")
            self.q = self.wl.quantized()
            self.q.save(qpath)
        check_outputs(self.q.outputs(self.test.images[:2]), self.wl.model_path)
        self.library = self.user_library or default_library(self.q, self.train, b.library_size, self.bias_correction,
                                                            self.seed, finetune=self.compensation == "finetune")
        check_library(self.q, self.library)
        table = energy_table(list(dict.fromkeys(["exact"] + roup_specs(8) + self.library)))
        self.chip = None
        if self.energy.startswith("accelerator:"):
            from maxdnn.accelerator import AcceleratorModel

            self.log(f"mapping the network onto {self.energy[len('accelerator:'):]} (ZigZag; cached after the first run)")
            self.table = table
            self.chip = AcceleratorModel(self.q, self.energy[len("accelerator:"):], table)
        else:
            self.table = with_per_layer(table, self.energy, self.q)
        run_json = self.run_dir / "run.json"
        info = {"model": self.wl.model_path, "data": str(self.wl.data_path), "budget": json.loads(json.dumps(asdict(b))), "seed": self.seed,
                "storage": self.storage_arg or "study.db", "library": self.library,
                "compensation": self.compensation, "energy": self.energy,
                "validation": f"{len(self.val)} held-out training images of {describe_data(train)}",
                "confirmation": f"{len(self.confirm)} held-out training images of {describe_data(train)} "
                                f"(the validation images among them)",
                "test": describe_data(self.test),
                "energy_source": self.chip.energy(Assignment.uniform(self.q, "exact"))["source"] if self.chip
                else self.table.source}
        if self.chip:
            info["accelerator"] = self.energy[len("accelerator:"):]  # also the report's chip column
        if run_json.exists():
            resume_run_info(self.run_dir, info)
        if not info.get("baseline"):
            self.log(f"exact int8 baseline on {len(self.val)} validation and {len(self.test)} test images")
            val_acc, val_loss = self.val_metrics(Assignment.uniform(self.q, "exact"))
            test_acc = float((self.q.predict(self.test.images) == self.test.labels).mean())
            info["baseline"] = {"val_accuracy": val_acc, "val_loss": val_loss, "test_accuracy": test_acc,
                                "val_images": len(self.val), "test_images": len(self.test)}
        # a shared server may hold several explorations: this one's studies and units carry its scope
        ident = {k: info[k] for k in ("budget", "seed", "library", "compensation", "energy")}
        ident.update(model=Path(str(info["model"])).name, data=Path(str(info["data"])).name)
        info["scope"] = "" if self.storage_arg is None else hashlib.sha256(
            json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        self.store.scope = info["scope"]
        self.units = self.store.work_units()
        self.info = info
        write_json(run_json, info)

    def alwann_choices(self) -> list[str]:
        """ALWANN-style layer-wise search: the whole library, i.e. every ROUP configuration that saves energy
        and every multiplier of a given library."""
        hw = hardware_table() or {}
        roup = [s for s in roup_specs(8) if s in hw and hw[s] < 1.0]
        return ["exact"] + list(dict.fromkeys(roup + (self.user_library or [])))

    def graph_for(self, a: Assignment) -> QuantizedGraph:
        """The graph an assignment runs on: the quantized model, bias-corrected for it if asked."""
        return bias_corrected(self.q, a, self.correction_images) if self.bias_correction else self.q

    def val_metrics(self, a: Assignment, graph: QuantizedGraph | None = None) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on the validation images; ``graph``: another graph than the
        assignment's own (a fine-tuned one)."""
        return self.val_metrics_many([a], [graph])[0]

    def val_metrics_many(self, assignments: list[Assignment], graphs: list | None = None) -> list[tuple[float, float]]:
        """``val_metrics`` of several assignments in one pass over the validation images (networks on one
        graph share their common layers: ``approx.logits_shared``)."""
        graphs = graphs or [None] * len(assignments)
        nets = [ApproxNetwork(g if g is not None else self.graph_for(a), a) for a, g in zip(assignments, graphs)]
        if not nets:
            return []
        correct, loss = np.zeros(len(nets), dtype=np.int64), np.zeros(len(nets))
        for i in range(0, len(self.val), 250):
            x = torch.as_tensor(self.val.images[i:i + 250])
            y = torch.as_tensor(self.val.labels[i:i + 250])
            for k, out in enumerate(logits_shared(nets, x)):
                logits = out.double() * self.q.logit_scale
                correct[k] += int((logits.argmax(1) == y).sum())
                loss[k] += float(F.cross_entropy(logits, y, reduction="sum"))
        return [(int(c) / len(self.val), float(v) / len(self.val)) for c, v in zip(correct, loss)]

    def evaluate(self, a: Assignment) -> dict:
        return self.evaluate_many([a])[0]

    def evaluate_many(self, assignments: list[Assignment]) -> list[dict]:
        """Validation accuracy and loss, energy and gain of each assignment: ``val_accuracy`` / ``val_loss`` as
        the search ranks it (bias-corrected when the exploration compensates), ``ptq_val_accuracy`` /
        ``ptq_val_loss`` as quantized. An assignment measured before in this exploration (by any stage,
        approach or worker: approaches often build the same one) is read back from the storage; the others
        are measured in one pass and kept there."""
        ptq = [f"val|{assignment_key(a)}" for a in assignments]
        bias = [f"valbc|{assignment_key(a)}" for a in assignments] if self.bias_correction else []
        known = self.units.results(ptq + bias)
        todo = [(k, a, None) for k, a in zip(ptq, assignments) if k not in known]
        todo += [(k, a, "bias") for k, a in zip(bias, assignments) if k not in known]
        todo = list({k: (k, a, c) for k, a, c in todo}.values())
        graphs = [self.graph_for(a) if c else self.q for _, a, c in todo]
        for (k, _, _), m in zip(todo, self.val_metrics_many([a for _, a, _ in todo], graphs)):
            known[k] = self.units.store(k, list(m))
        out = []
        for i, a in enumerate(assignments):
            acc, loss = known[ptq[i]]
            ranked = known[bias[i]] if bias else (acc, loss)
            en = network_energy(self.q, a, self.table)
            r = {"val_accuracy": ranked[0], "val_loss": ranked[1], "ptq_val_accuracy": acc, "ptq_val_loss": loss,
                 "energy": en["energy"], "energy_gain": en["energy_gain"]}
            if self.chip:  # the objective is the accelerator's energy (pJ per image)
                t = self.chip.energy(a)["total"]
                r.update(energy=t["total_pj"], energy_gain=t["gain"], mult_energy_gain=en["energy_gain"])
            out.append(r)
        return out

    # ------------------------------------------------------------------ resilience
    def resilience(self) -> dict:
        """The resilience arrays (``maxdnn.exploration.resilience``), measured once and cached."""
        return resilience(self)

    # ------------------------------------------------------------------ genomes
    def build(self, approach: str, genome: dict[str, tuple[str, float]], res: dict) -> Assignment:
        """Assignment for per-layer (spec, fraction) genes (missing layers: exact)."""
        specs = ["exact"] + sorted({g[0] for g in genome.values()} - {"exact"})
        maps = {}
        for name, layer in self.q.layers.items():
            shape = layer.weight.shape[:2]
            spec, frac = genome.get(name, ("exact", 0.0))
            m = np.zeros(shape, dtype=np.int64)
            if spec != "exact" and frac > 0:
                idx = specs.index(spec)
                if approach in ("layer", "alwann"):
                    m[:] = idx
                else:
                    si = self.library.index(spec)
                    if approach == "filter":
                        order = np.argsort(res[f"filter/{name}"][si], kind="stable")
                        m[order[: int(round(frac * shape[0]))]] = idx
                    else:
                        order = np.argsort(res[f"kernel/{name}"][si].reshape(-1), kind="stable")
                        m.flat[order[: int(round(frac * m.size))]] = idx
            maps[name] = m
        return Assignment(specs, maps)

    # ------------------------------------------------------------------ progress
    phase = ""  # "[k/n] " while run_exploration runs

    def progress_bar(self, desc: str, total: int):
        """A bar of ``total`` steps named after the phase; the caller advances it (``WorkUnits.map`` does)."""
        from tqdm import tqdm

        return tqdm(desc=self.phase + desc, total=total, disable=not self.progress, leave=True, mininterval=1)


def run_exploration(explorer: Explorer, approaches=APPROACHES, finetune=None) -> dict:
    """Resilience, then per approach its sweep (not for alwann) and NSGA-II; when the exploration fine-tunes
    (``compensation`` ``finetune``), the fine-tuning of front points (``finetune``: a
    ``maxdnn.exploration.finetune_stage.FinetuneBudget``, default the budget's own); then the choice on the
    confirmation images and the test-set numbers (``maxdnn.exploration.confirm``)."""
    from maxdnn.exploration.finetune_stage import FINETUNE_BUDGETS, finetune_front

    t0 = time.time()
    if explorer.compensation == "finetune" and finetune is None:
        finetune = FINETUNE_BUDGETS[explorer.budget.name] if explorer.budget.name in FINETUNE_BUDGETS \
            else FINETUNE_BUDGETS["quick"]
    elif explorer.compensation != "finetune":
        finetune = None
    steps = [("resilience", None)] + [(kind, ap) for ap in approaches
                                      for kind in (("nsga",) if ap == "alwann" else ("sweep", "nsga"))]
    if finetune is not None:
        steps += [("ladder", "layer")] if "layer" in approaches else []
        steps += [("finetune", None)]
    steps += [("confirm", None)]
    res, tuned = None, None
    for k, (kind, ap) in enumerate(steps, 1):
        explorer.phase = f"[phase {k}/{len(steps)}] "
        if kind == "resilience":
            res = resilience(explorer)
        elif kind == "sweep":
            sweep(explorer, ap, res)
        elif kind == "nsga":
            nsga(explorer, ap, res)
        elif kind == "ladder":
            ladder(explorer, res, finetune.ladder_points)
        elif kind == "finetune":
            tuned = finetune_front(explorer, approaches, res, finetune)
        else:
            confirm_and_test(explorer, approaches, res, tuned)
    explorer.phase = ""
    return {"seconds": time.time() - t0}
