"""MAx-DNN exploration: resilience analysis, layer/filter/kernel approaches, NSGA-II search.

Data: the search evaluates on a validation split carved from the training
images (the same seeded hold-out ``maxdnn train`` keeps out of training); final
numbers of the Pareto-front points are measured on the test split. The test
split is never used to choose anything.

Resilience (cached in RUN_DIR/resilience.npz):
- direct, per layer and ROUP configuration: the change of validation loss and
  accuracy when that layer alone uses the configuration;
- proxy, per filter and per kernel: a first-order Taylor estimate of the loss
  change caused by the product errors,
      S = mean_n | sum_{outputs} dL/dy * (delta accumulator) * s_in * s_w[f] |,
  with dL/dy the gradient of the float model's loss at the layer's
  pre-activation output y and the accumulator change computed exactly from
  the integer operands (R_R(x) R_2P(w) - x w) over the kernel's (or the
  filter's) products. The proxy is validated against direct measurements
  (every layer; bins of filters and of kernels sorted by proxy, each bin
  approximated alone); the Spearman rank correlations are reported.

Approaches (a genome gives each layer a configuration and, for filter and
kernel, a fraction of its units; units are approximated least sensitive first):
- ``layer``: one ROUP configuration per layer;
- ``filter``: per layer, a fraction of its filters with a ROUP configuration;
- ``kernel``: the same over kernels (filter x input channel);
- ``alwann``: ALWANN-style layer-wise assignment, one multiplier per layer
  from the whole library (every ROUP configuration that saves energy, and
  the multipliers of a library given with ``library``, imported ones included).
Non-separable multipliers (lookup tables) take part like ROUP: their proxy
sums the gradient times each product's exact error (a compiled gather), and
they run through the lookup-table engine.
Each approach runs a sweep over (configuration x fraction), applied to every
layer (for ``layer``: the fraction of layers least sensitive to the
configuration), and an NSGA-II search (Optuna) over per-layer genomes
maximising validation accuracy and energy gain.

Every evaluated point is stored as it completes (Optuna storage, SQLite in
RUN_DIR by default); rerunning resumes without redoing finished points.
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

from ._lut_kernel import lut_error_taps
from .approx import ApproxNetwork, Assignment, assignment_key, logits_shared
from .bias_correction import bias_corrected, correction_images
from .atomic import atomic_path, write_json
from .data import validation_split
from .energy import energy_table, hardware_table, network_energy, with_per_layer
from .error_metrics import error_metrics
from .multipliers import get_multiplier, roup_specs
from .graph import QuantizedGraph
from .work_units import WorkUnits
from .workload import Workload, describe_data

APPROACHES = ("layer", "filter", "kernel", "alwann")
THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # validation accuracy losses (points) the report's table is read at
FRACTION_STEP = 0.125
EVAL_BATCH = 8  # units a worker claims at once and evaluates in one pass over the images


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
    test_points: int = 0  # front points per approach measured on the test set (0: all)


BUDGETS = {
    "quick": Budget("quick", 1000, 128, (0.25, 0.5, 0.75, 1.0), 8, 36, 12, 8, test_points=4),
    "full": Budget("full", 5000, 512, tuple(np.arange(1, 9) / 8), 31, 300, 40, 16),
    "tiny": Budget("tiny", 64, 16, (0.5, 1.0), 3, 6, 4, 3),  # for tests
}


def roup_library(size: int) -> list[str]:
    """ROUP configurations that save energy, Pareto-optimal in (energy, NMED) first."""
    hw = hardware_table() or {}
    cands = []
    for s in roup_specs(8):
        e = hw.get(s)
        if e is None or e >= 1.0:
            continue
        cands.append((s, e, error_metrics(get_multiplier(s)).nmed))
    front = [c for c in cands if not any(o[1] <= c[1] and o[2] <= c[2] and (o[1] < c[1] or o[2] < c[2]) for o in cands)]
    rest = [c for c in cands if c not in front]
    ordered = sorted(front, key=lambda c: -c[1]) + sorted(rest, key=lambda c: -c[1])
    chosen = ordered[:size]
    return [c[0] for c in sorted(chosen, key=lambda c: -c[1])]


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


class Explorer:
    def __init__(self, run_dir: str | os.PathLike, workload: Workload, budget: Budget, storage: str | None = None,
                 seed: int = 0, log=print, progress: bool = True, library: list[str] | None = None,
                 bias_correction: bool = False, energy: str = "average"):
        """``library``: the multipliers the approaches choose from (any specs, imported ones included);
        default: the budget's share of the ROUP configurations that save energy. ``bias_correction``:
        every point is evaluated with its biases corrected (``maxdnn.bias_correction``). ``energy``: average,
        per-layer or a per-layer table file (``maxdnn.energy.with_per_layer``)."""
        self.energy = energy
        self.user_library = list(dict.fromkeys(library)) if library else None
        self.bias_correction = bias_correction
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.wl = workload
        self.budget = budget
        self.seed = seed
        self.log = log
        self.progress = progress
        self.storage_arg = storage  # None: SQLite in RUN_DIR, recorded relative so that the folder can move
        self.storage_url = storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"
        self._check_storage()
        self._setup()

    def _check_storage(self) -> None:
        """Open the storage before any work: a bad URL, a missing driver or an unreachable server is one line."""
        try:
            self._storage()
        except ModuleNotFoundError as e:
            hint = " (install maxdnn[postgres] for PostgreSQL)" if "postgres" in self.storage_url else ""
            raise ValueError(f"--storage {self.storage_url}: no database driver '{e.name}'{hint}") from None
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's many connection errors, in one line
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"--storage {self.storage_url}: cannot open the study storage ({msg})") from None

    @classmethod
    def reader(cls, run_dir: str | os.PathLike) -> "Explorer":
        """An explorer that only reads a finished or running run's points (no data, no model)."""
        run_dir = Path(run_dir)
        ex = cls.__new__(cls)
        ex.run_dir = run_dir
        stored = json.loads((run_dir / "run.json").read_text()).get("storage")
        if stored in (None, "study.db"):
            db = run_dir / "study.db"
            if not db.exists():
                raise ValueError(f"{db}: the run's study database is missing")
            stored = f"sqlite:///{db.resolve()}"
        ex.storage_url = stored
        ex.scope = json.loads((run_dir / "run.json").read_text()).get("scope", "")
        return ex

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        b = self.budget
        self.log(f"reading the data ({self.wl.data_path})")
        train = self.wl.split("train")
        _, val_idx = validation_split(len(train), 5000, seed=0)
        val_idx = np.sort(val_idx[: b.val_images])  # a random sample of the hold-out (class mix kept)
        self.val = train.subset(val_idx)
        self.train = train
        self.test = self.wl.split("test")
        self.correction_images = correction_images(train.images) if self.bias_correction else None
        qpath = self.run_dir / "quantized.npz"
        if qpath.exists():
            self.q = QuantizedGraph.load(qpath)
        else:
            self.log(f"quantizing the model ({self.wl.model_path})")
            self.q = self.wl.quantized()
            self.q.save(qpath)
        self.library = self.user_library or roup_library(b.library_size)
        self._check_library()
        self.table = with_per_layer(energy_table(list(dict.fromkeys(["exact"] + roup_specs(8) + self.library))),
                                    self.energy, self.q)
        run_json = self.run_dir / "run.json"
        info = {"model": self.wl.model_path, "data": str(self.wl.data_path), "budget": json.loads(json.dumps(asdict(b))), "seed": self.seed,
                "storage": self.storage_arg or "study.db", "library": self.library,
                "bias_correction": self.bias_correction, "energy": self.energy,
                "validation": f"{len(self.val)} held-out training images of {describe_data(train)}",
                "test": describe_data(self.test), "energy_source": self.table.source}
        if run_json.exists():
            old = json.loads(run_json.read_text())
            old.setdefault("bias_correction", False)
            old.setdefault("energy", "average")
            if isinstance(old.get("budget"), dict):
                old["budget"].setdefault("test_points", 0)  # runs made before the field: every front point
            for k in ("model", "data", "budget", "seed", "library", "bias_correction", "energy"):
                if old.get(k) != info[k]:
                    was = old.get(k)["name"] if k == "budget" and isinstance(old.get(k), dict) else old.get(k)
                    raise ValueError(f"{run_json}: this run was made with {k} {was!r}; rerun with it or use another RUN_DIR")
            info["baseline"] = old.get("baseline")
            info.update({k: v for k, v in old.items() if k not in info})  # wall time so far, resilience summary
        if not info.get("baseline"):
            self.log(f"exact int8 baseline on {len(self.val)} validation and {len(self.test)} test images")
            val_acc, val_loss = self.val_metrics(Assignment.uniform(self.q, "exact"))
            test_acc = float((self.q.predict(self.test.images) == self.test.labels).mean())
            info["baseline"] = {"val_accuracy": val_acc, "val_loss": val_loss, "test_accuracy": test_acc,
                                "val_images": len(self.val), "test_images": len(self.test)}
        # a shared server may hold several explorations: this one's studies and units carry its scope
        ident = {k: info[k] for k in ("budget", "seed", "library", "bias_correction", "energy")}
        ident.update(model=Path(str(info["model"])).name, data=Path(str(info["data"])).name)
        info["scope"] = "" if self.storage_arg is None else hashlib.sha256(
            json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        self.scope = info["scope"]
        self.units = WorkUnits(self.storage_url, self.scope, self._engine_kwargs())
        if self.storage_arg is None:  # RUN_DIR's own database has one worker: claims left are an interrupted run's
            self.units.release_all_claims()
        self.info = info
        write_json(run_json, info)

    def _check_library(self) -> None:
        """Every library multiplier exists for every layer's operand format (one line otherwise)."""
        from .multipliers import SpecError

        if "exact" in self.library:
            raise ValueError("--library: 'exact' is always a choice; list approximate multipliers only")
        for spec in self.library:
            for signed in sorted({layer.x_signed for layer in self.q.layers.values()}):
                try:
                    get_multiplier(spec, 8, signed)
                except SpecError as e:
                    raise ValueError(f"--library {spec}: {e}") from None

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
        """Validation accuracy and loss, energy and gain of each assignment. An assignment measured before in
        this exploration (by any stage, approach or worker: approaches often build the same one) is read back
        from the storage; the others are measured in one pass and kept there."""
        keys = [f"val|{assignment_key(a)}" for a in assignments]
        known = self.units.results(keys)
        todo = {k: a for k, a in zip(keys, assignments) if k not in known}
        for k, m in zip(todo, self.val_metrics_many(list(todo.values()))):
            known[k] = self.units.store(k, list(m))
        out = []
        for a, k in zip(assignments, keys):
            acc, loss = known[k]
            en = network_energy(self.q, a, self.table)
            out.append({"val_accuracy": acc, "val_loss": loss, "energy": en["energy"], "energy_gain": en["energy_gain"]})
        return out

    # ------------------------------------------------------------------ resilience
    def resilience(self) -> dict:
        """The resilience arrays (module docstring): RUN_DIR/resilience.npz; with several workers, computed once
        (measurements shared unit by unit) and kept in the storage, from which every worker writes its copy."""
        path = self.run_dir / "resilience.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        mine = self._resilience()  # every worker takes part: the measurements are units of their own
        stored = self.units.map(["resilience"], lambda _: {k: v.tolist() for k, v in mine.items()})
        res = {k: np.asarray(v, dtype=np.float64) for k, v in stored["resilience"].items()}
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, **res)
        return res

    def _resilience(self) -> dict:
        t0 = time.time()
        layers = list(self.q.layers)
        specs = self.library
        res: dict[str, np.ndarray] = {}
        exact = self.evaluate(Assignment.uniform(self.q, "exact"))
        direct_loss = np.zeros((len(layers), len(specs)))
        direct_acc = np.zeros((len(layers), len(specs)))
        pairs = {f"resilience|{layers[li]}|{specs[si]}": (li, si) for li in range(len(layers)) for si in range(len(specs))}

        def one_layer(key):  # one layer alone with one configuration
            li, si = pairs[key]
            return Assignment(["exact", specs[si]], {n: np.full(self.q.layers[n].weight.shape[:2], int(n == layers[li]))
                                                     for n in layers})

        def measure(keys):  # a layer's configurations in one pass: the exact layers before it run once
            return [[r["val_loss"], r["val_accuracy"]] for r in self.evaluate_many([one_layer(k) for k in keys])]

        # each measurement is kept in the storage as it completes, and shared with other workers
        with self.progress_bar("resilience: layer x configuration", total=len(pairs)) as bar:
            measured = self.units.map(list(pairs), measure, bar, batch=len(specs))
        for key, (li, si) in pairs.items():
            direct_loss[li, si] = measured[key][0] - exact["val_loss"]
            direct_acc[li, si] = exact["val_accuracy"] - measured[key][1]
        res["direct_loss"], res["direct_acc"] = direct_loss, direct_acc
        proxy = taylor_proxy(self.q, self.val.images[: self.budget.proxy_images],
                             self.val.labels[: self.budget.proxy_images], specs)
        for name in layers:
            res[f"kernel/{name}"] = proxy[name]["kernel"]  # [S, F, C]
            res[f"filter/{name}"] = proxy[name]["filter"]  # [S, F]
        res["layer_proxy"] = np.array([[proxy[n]["layer"][s] for s in range(len(specs))] for n in layers])
        res["validation"] = self._validate_proxy(res, exact)
        res["seconds"] = np.array(time.time() - t0)
        return res

    def _validate_proxy(self, res, exact) -> np.ndarray:
        """Spearman rho of proxy vs direct loss change: [layers, filter bins, kernel bins].

        Layers: proxy and direct change of every layer for the library's middle
        configuration. Filters (of the hidden layer with the most
        multiplications, besides the kernel layer) and kernels (of the hidden layer with the most kernels): the
        units are sorted by proxy and cut into ``validation_sample`` equal bins;
        each bin alone is approximated and its direct loss change measured
        (single units change the loss by less than the measurement's noise).
        """
        layers = list(self.q.layers)
        specs = self.library
        mid = len(specs) // 2
        rho_layer = _spearman(res["layer_proxy"][:, mid], res["direct_loss"][:, mid])
        k = self.budget.validation_sample
        fl, kl = proxy_validation_layers(self.q)
        jobs = []
        for kind, name in (("filter", fl), ("kernel", kl)):
            proxy = res[f"{kind}/{name}"][mid].reshape(-1)
            order = np.argsort(proxy, kind="stable")
            for b in np.array_split(order, min(k, len(order))):
                jobs.append((kind, name, b, float(proxy[b].sum())))
        direct = {"filter": [], "kernel": []}
        proxies = {"filter": [], "kernel": []}
        by_key = {f"bin|{kind}|{name}|{specs[mid]}|"
                  f"{hashlib.sha256(','.join(map(str, units)).encode()).hexdigest()[:16]}": (kind, name, units)
                  for kind, name, units, _ in jobs}

        def one_bin(key):  # one bin of units alone with the middle configuration
            kind, name, units = by_key[key]
            m = np.zeros(self.q.layers[name].weight.shape[:2], dtype=np.int64)
            if kind == "filter":
                m[units] = 1
            else:
                m.flat[units] = 1
            return Assignment(["exact", specs[mid]], {name: m})

        def measure(keys):
            return [r["val_loss"] for r in self.evaluate_many([one_bin(k) for k in keys])]

        with self.progress_bar("resilience: proxy validation", total=len(by_key)) as bar:
            measured = self.units.map(list(by_key), measure, bar, batch=EVAL_BATCH)
        for key, (kind, _, _), (_, _, _, psum) in zip(by_key, by_key.values(), jobs):
            direct[kind].append(measured[key] - exact["val_loss"])
            proxies[kind].append(psum)
        rho_f = _spearman(proxies["filter"], direct["filter"])
        rho_k = _spearman(proxies["kernel"], direct["kernel"])
        self.log(f"proxy vs direct (Spearman, {specs[mid]}): {len(layers)} layers {rho_layer:.2f}, "
                 f"{len(direct['filter'])} filter bins of {fl} {rho_f:.2f}, {len(direct['kernel'])} kernel bins of {kl} {rho_k:.2f}")
        return np.array([rho_layer, rho_f, rho_k])

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

    @staticmethod
    def summary(genome: dict[str, tuple[str, float]]) -> str:
        parts = [f"{n}={s}" + (f"@{f:g}" if f < 1 else "") for n, (s, f) in genome.items() if s != "exact" and f > 0]
        return "; ".join(parts) if parts else "all exact"

    # ------------------------------------------------------------------ searches
    def _engine_kwargs(self) -> dict:
        if self.storage_url.startswith("sqlite"):
            return {"connect_args": {"timeout": 60}}
        return {"connect_args": {"connect_timeout": 5}} if self.storage_url.startswith("postgres") else {}

    def _storage(self):
        import optuna

        # no Optuna heartbeats: a dead worker's unit is retried through maxdnn.work_units, and the trial it
        # left RUNNING is never counted (only COMPLETE trials are points)
        return optuna.storages.RDBStorage(self.storage_url, engine_kwargs=self._engine_kwargs())

    def study_name(self, name: str) -> str:
        """``name`` within this exploration's scope (a shared server may hold several explorations)."""
        return f"{self.scope}/{name}" if getattr(self, "scope", "") else name

    def _study(self, name: str, sampler=None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.study_name(name), storage=self._storage(), directions=["maximize", "maximize"],
                                    sampler=sampler, load_if_exists=True)
        if self.storage_arg is None:
            # RUN_DIR's own database, one worker: trials left RUNNING belong to an interrupted process
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        return study

    def _record_many(self, study, asked: list, approach: str, source: str, res: dict) -> None:
        """Evaluate the asked trials (``asked``: (trial, genome, extra attributes) triples) in one pass and
        tell them."""
        built = [self.build(approach, genome, res) for _, genome, _ in asked]
        for (trial, genome, extra), a, r in zip(asked, built, self.evaluate_many(built)):
            # one attribute, one write to the storage (each write is a transaction)
            trial.set_user_attr("point", {**r, **extra, "approach": approach, "source": source,
                                          "summary": self.summary(genome), "genome": json.dumps(genome),
                                          "granularity": a.granularity()})
            study.tell(trial, [r["val_accuracy"], r["energy_gain"]])

    def sweep(self, approach: str, res: dict) -> None:
        """Every (configuration, fraction) of the grid once: each point is a unit (shared by workers)."""
        import optuna

        study = self._study(f"{approach}-sweep", optuna.samplers.RandomSampler(seed=self.seed))
        fractions = self.budget.sweep_fractions
        grid = {f"sweep|{approach}|{s}|{float(f):g}": (s, float(f)) for s in self.library for f in fractions}
        layers = list(self.q.layers)

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
                asked.append((trial, self._sweep_genome(approach, spec, frac, res, layers), {"config": spec, "fraction": frac}))
                numbers.append(trial.number)
            self._record_many(study, asked, approach, "sweep", res)
            return numbers

        with self.progress_bar(f"{approach}: sweep", total=len(grid)) as bar:
            self.units.map(list(grid), points, bar, batch=EVAL_BATCH)

    def _sweep_genome(self, approach, spec, frac, res, layers):
        if approach in ("layer", "alwann"):
            si = self.library.index(spec)
            order = np.argsort(res["direct_loss"][:, si], kind="stable")
            chosen = {layers[i] for i in order[: int(round(frac * len(layers)))]}
            return {n: (spec, 1.0) for n in layers if n in chosen}
        return {n: (spec, frac) for n in layers}

    def nsga(self, approach: str, res: dict) -> None:
        """The budget's NSGA-II trials: each trial slot is a unit, so that several workers run exactly the
        budget's number of trials between them (the sampler reads every finished trial from the storage)."""
        import optuna

        sampler = optuna.samplers.NSGAIISampler(population_size=self.budget.population, seed=self.seed)
        study = self._study(f"{approach}-nsga2", sampler)
        if approach == "alwann":
            choices = self.alwann_choices()
        else:
            choices = ["exact"] + self.library
        layers = list(self.q.layers)

        def seed_generation(_):
            # first generation: seeded with the sweep's validation-Pareto genomes (random genomes alone
            # start far from the useful, mildly approximated region)
            if study.get_trials(deepcopy=False):
                return 0
            seeds = self._seed_genomes(approach)[: self.budget.population // 2]
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
        legacy = 0 if self.units.results(prefix=f"nsga|{approach}|") else \
            len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        self.units.map([f"nsga-seed|{approach}"], seed_generation)

        def trial_slots(keys):  # up to a generation's slots: asked together, evaluated in one pass, told
            numbers, asked = [], []
            told = {point_attrs(t).get("unit"): t.number
                    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
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
            self._record_many(study, asked, approach, "nsga2", res)
            return numbers

        slots = [f"nsga|{approach}|{i}" for i in range(self.budget.nsga_trials)]
        with self.progress_bar(f"{approach}: NSGA-II", total=len(slots)) as bar:
            self.units.map(slots, trial_slots, bar, batch=self.budget.population)

    def _seed_genomes(self, approach: str) -> list[dict]:
        source = "layer" if approach == "alwann" else approach
        front = pareto_front([p for p in self.points([source]) if p["source"] == "sweep"])
        # most accurate first
        return [{k: tuple(v) for k, v in json.loads(p["genome"]).items()} for p in sorted(front, key=lambda p: -p["val_accuracy"])]

    phase = ""  # "[k/n] " while run_exploration runs

    def progress_bar(self, desc: str, total: int):
        """A bar of ``total`` steps named after the phase; the caller advances it (``WorkUnits.map`` does)."""
        from tqdm import tqdm

        return tqdm(desc=self.phase + desc, total=total, disable=not self.progress, leave=True, mininterval=1)

    # ------------------------------------------------------------------ points and test evaluation
    def points(self, approaches=APPROACHES) -> list[dict]:
        import optuna

        out = []
        for ap in approaches:
            for kind in ("sweep", "nsga2"):
                try:
                    study = optuna.load_study(study_name=self.study_name(f"{ap}-{kind}"), storage=self._storage())
                except KeyError:
                    continue
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                    u = point_attrs(t)
                    out.append({"approach": ap, "source": kind, "trial": t.number, "summary": u["summary"],
                                "genome": u["genome"], "granularity": u.get("granularity", ""),
                                "val_accuracy": u["val_accuracy"], "val_loss": u["val_loss"],
                                "energy": u["energy"], "energy_gain": u["energy_gain"]})
        return out

    def evaluate_front(self, approaches=APPROACHES, res=None) -> None:
        """Test accuracy of the validation-Pareto points (all, or the budget's ``test_points`` per approach:
        ``test_selection``): each distinct assignment a unit (shared by workers; points of several approaches
        that build the same assignment are measured once), every point's result written to
        RUN_DIR/test_eval.json, and every front point's assignment to RUN_DIR/pareto/."""
        res = res if res is not None else self.resilience()
        path = self.run_dir / "test_eval.json"
        local = json.loads(path.read_text()) if path.exists() else {}  # by point key
        front_dir = self.run_dir / "pareto"
        front_dir.mkdir(exist_ok=True)
        chosen: dict[str, tuple[Assignment, list[str]]] = {}  # unit -> (assignment, its points' keys)
        base_val = self.info["baseline"]["val_accuracy"]
        for ap in approaches:
            front = pareto_front(self.points([ap]))
            picked = {id(p) for p in test_selection(front, base_val, self.budget.test_points)}
            for p in front:
                genome = {k: tuple(v) for k, v in json.loads(p["genome"]).items()}
                a = self.build(ap, genome, res)
                a.meta = {"approach": ap, "summary": p["summary"], "val_accuracy": p["val_accuracy"],
                          "energy_gain": p["energy_gain"]}
                a.save(front_dir / f"{ap}-{p['source']}-{p['trial']}.json")
                if id(p) in picked:
                    chosen.setdefault(f"test|{assignment_key(a)}", (a, []))[1].append(point_key(p))

        def known(unit):  # measured before by this run directory (runs made before units were per assignment)
            return next((local[k] for k in chosen[unit][1] if k in local), None)

        def measure(units):  # several assignments in one pass over the test images
            todo = [u for u in units if known(u) is None]
            nets = [ApproxNetwork(self.graph_for(chosen[u][0]), chosen[u][0]) for u in todo]
            correct = np.zeros(len(todo), dtype=np.int64)
            for i in range(0, len(self.test) if todo else 0, 250):
                y = torch.as_tensor(self.test.labels[i:i + 250])
                for j, out in enumerate(logits_shared(nets, torch.as_tensor(self.test.images[i:i + 250]))):
                    correct[j] += int((out.argmax(1) == y).sum())
            mine = {u: {"test_accuracy": int(c) / len(self.test), "test_images": int(len(self.test))}
                    for u, c in zip(todo, correct)}
            return [mine[u] if u in mine else known(u) for u in units]

        with self.progress_bar("test set: Pareto points", total=len(chosen)) as bar:
            measured = self.units.map(list(chosen), measure, bar, batch=EVAL_BATCH)
        write_json(path, {**local, **{pk: measured[u] for u, (_, pkeys) in chosen.items() for pk in pkeys}})


def largest_gain_within(front: list[dict], loss_pts, threshold: float) -> dict | None:
    """The point of ``front`` with the largest energy gain among those whose accuracy loss ``loss_pts(p)``
    (points) is at most ``threshold``; None when there is none."""
    ok = [p for p in front if loss_pts(p) <= threshold + 1e-9]
    return max(ok, key=lambda p: p["energy_gain"]) if ok else None


def test_selection(front: list[dict], base_val_accuracy: float, cap: int) -> list[dict]:
    """The front points measured on the test set: all when ``cap`` is 0 or the front is no larger; else the
    points the report's table cites (largest gain within each of ``THRESHOLDS`` validation points), then
    points evenly spread in gain, up to ``cap``."""
    if cap <= 0 or len(front) <= cap:
        return list(front)
    picked: dict[int, dict] = {}  # by id: the same point may be cited at several thresholds
    for t in THRESHOLDS:
        best = largest_gain_within(front, lambda p: 100 * (base_val_accuracy - p["val_accuracy"]), t)
        if best is not None:
            picked.setdefault(id(best), best)
    by_gain = sorted(front, key=lambda p: p["energy_gain"])
    for i in _spread_order(len(by_gain)):
        if len(picked) >= cap:
            break
        picked.setdefault(id(by_gain[i]), by_gain[i])
    return list(picked.values())


def _spread_order(n: int) -> list[int]:
    """The indices 0..n-1 in an order that spreads picks evenly: the ends first, then halving the gaps."""
    order, seen = [], set()
    k = 1
    while len(order) < n:
        for i in np.round(np.linspace(0, n - 1, k + 1)).astype(int):
            if int(i) not in seen:
                seen.add(int(i))
                order.append(int(i))
        k *= 2
    return order


def point_attrs(trial) -> dict:
    """A told trial's attributes: one ``point`` attribute, or (runs made before it) one attribute each."""
    u = trial.user_attrs
    return {**u, **u["point"]} if "point" in u else u


def point_key(p: dict) -> str:
    return hashlib.sha256(f"{p['approach']}|{p['genome']}".encode()).hexdigest()[:16]


def pareto_front(points: list[dict], acc="val_accuracy", gain="energy_gain") -> list[dict]:
    """Points not dominated in (accuracy, energy gain), both maximised; sorted by gain."""
    front = []
    for p in points:
        if not any(q[acc] >= p[acc] and q[gain] >= p[gain] and (q[acc] > p[acc] or q[gain] > p[gain]) for q in points):
            front.append(p)
    uniq = {}
    for p in front:
        uniq.setdefault((p[acc], p[gain]), p)
    return sorted(uniq.values(), key=lambda p: p[gain])


def proxy_validation_layers(q: QuantizedGraph) -> tuple[str, str]:
    """(filter layer, kernel layer) whose bins validate the proxy: the hidden layer with the most
    kernels, and the hidden layer with the most multiplications besides it."""
    from .energy import multiplication_counts

    counts = multiplication_counts(q)
    hidden = [n for n in q.layers if n != q.output.name] or list(q.layers)
    kl = max(hidden, key=lambda n: (int(np.prod(q.layers[n].weight.shape[:2])), -hidden.index(n)))
    rest = [n for n in hidden if n != kl] or hidden
    fl = max(rest, key=lambda n: (counts[n] * int(np.prod(q.layers[n].weight.shape[:2])), -rest.index(n)))
    return fl, kl


def taylor_proxy(q: QuantizedGraph, images: np.ndarray, labels: np.ndarray, specs: list[str]) -> dict:
    """First-order Taylor sensitivity of every layer, filter and kernel to each spec (see module docstring).

    The gradient is that of the loss of the graph's real-valued twin (``QuantizedGraph.float_forward``)
    at each multiplying layer's real pre-activation output."""
    outs: dict = {}
    x = torch.as_tensor(images)
    logits = q.float_forward(x, outputs=outs)
    loss = F.cross_entropy(logits, torch.as_tensor(labels), reduction="sum")
    loss.backward()
    grads = {n: o.grad.detach().double() for n, o in outs.items()}
    taps: dict = {}
    q.forward_int(x, taps=taps)
    result = {}
    for name, layer in q.layers.items():
        mults = [get_multiplier(s, x_signed=layer.x_signed) for s in specs]
        g = grads[name]
        n, f = g.shape[:2]
        groups = layer.groups
        g = g.reshape(n, groups, f // groups, -1)  # [N, G, F/G, L]
        xin = taps[name].double()
        cg, kh, kw = layer.weight.shape[1:]
        w = torch.as_tensor(layer.weight, dtype=torch.float64).reshape(f, -1)  # [F, C/G*K]
        scale = torch.as_tensor(layer.acc_scale)[None, :, None]  # [1, F, 1]

        def a_for(xt):
            cols = F.unfold(F.pad(xt, layer.pads), (kh, kw), stride=layer.stride)  # [N, C*K, L]
            cols = cols.reshape(n, groups, cg * kh * kw, -1)
            return torch.einsum("ngfl,ngkl->ngfk", g, cols).reshape(n, f, -1)  # [N, F, C/G*K]

        a0 = a_for(xin) * w[None]
        by_r = {}
        kern, filt, lay = [], [], []
        lut_cols = None
        for m in mults:
            if not m.separable:  # lookup table: the gradient times each product's exact error, gathered
                if lut_cols is None:
                    idx = F.pad(xin - m.x_format.min + 1, layer.pads)  # row 0 of the error table: padding
                    lut_cols = F.unfold(idx, (kh, kw), stride=layer.stride).round().to(torch.int32)
                    lut_cols = lut_cols.reshape(n, groups, cg * kh * kw, -1).numpy()
                    lut_g = np.ascontiguousarray(g.reshape(n, f, -1).numpy())
                    widx = (layer.weight.reshape(f, -1) - m.w_format.min).astype(np.int64)
                xs, ws = m.x_format.values(), m.w_format.values()
                err = np.zeros((len(xs) + 1, len(ws)))
                err[1:] = m.lut() - xs[:, None] * ws[None, :]
                d = torch.from_numpy(lut_error_taps(lut_g, lut_cols, widx, err)) * scale
            else:
                key = m.x_transform(np.arange(-128, 256)).tobytes()
                if key not in by_r:
                    by_r[key] = a_for(torch.as_tensor(m.x_transform(xin.long().numpy()), dtype=torch.float64))
                wt = torch.as_tensor(m.w_transform(layer.weight).reshape(f, -1), dtype=torch.float64)
                d = (by_r[key] * wt[None] - a0) * scale  # [N, F, C/G*K]
            dk = d.reshape(n, f, cg, kh * kw).sum(3)  # [N, F, C/G]
            kern.append(dk.abs().mean(0).numpy())
            filt.append(dk.sum(2).abs().mean(0).numpy())
            lay.append(float(dk.sum((1, 2)).abs().mean()))
        result[name] = {"kernel": np.stack(kern), "filter": np.stack(filt), "layer": lay}
    return result


def run_exploration(explorer: Explorer, approaches=APPROACHES, finetune=None) -> dict:
    """Resilience, then per approach its sweep (not for alwann) and NSGA-II, then test-set numbers; with a
    ``finetune`` budget (``maxdnn.explore_finetune.FinetuneBudget``), then the fine-tuning of front points."""
    t0 = time.time()
    steps = [("resilience", None)] + [(kind, ap) for ap in approaches
                                      for kind in (("nsga",) if ap == "alwann" else ("sweep", "nsga"))] + [("test", None)]
    steps += [("finetune", None)] if finetune is not None else []
    res = None
    for k, (kind, ap) in enumerate(steps, 1):
        explorer.phase = f"[phase {k}/{len(steps)}] "
        if kind == "resilience":
            res = explorer.resilience()
        elif kind == "sweep":
            explorer.sweep(ap, res)
        elif kind == "nsga":
            explorer.nsga(ap, res)
        elif kind == "test":
            explorer.evaluate_front(approaches, res)
        else:
            from .explore_finetune import finetune_front

            finetune_front(explorer, approaches, res, finetune)
    explorer.phase = ""
    return {"seconds": time.time() - t0}
