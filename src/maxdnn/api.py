"""maxdnn's Python API: what the command line does, as functions (``import maxdnn``).

A typical session quantizes a network, assigns approximate multipliers and measures accuracy and energy::

    import maxdnn

    model = maxdnn.load_model("resnet8")                       # the committed float ResNet-8
    train = maxdnn.load_cifar10("cifar10-jpeg.zip", "train")
    test = maxdnn.load_cifar10("cifar10-jpeg.zip", "test")
    graph = maxdnn.quantize(model, train.images[:1000])        # the 8-bit integer graph
    a = maxdnn.layer_assignment(graph, {"s1.conv1": "roup-p1r2", "s3.conv2": "roup-p2r2"})
    r = maxdnn.evaluate(graph, test.images, test.labels, a)
    print(r.accuracy, r.energy_gain, r.pe_energy_gain)

Every number is the integer engine's, bit-exact; every user-facing error is a ``maxdnn.MaxdnnError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from maxdnn.engine.approx import ApproxNetwork, Assignment, check_layer_names
from maxdnn.engine.approx import filter_assignment as _filter_assignment
from maxdnn.engine.approx import layer_assignment as _layer_assignment
from maxdnn.data import Dataset, load_cifar10 as _load_cifar10
from maxdnn.errors import MaxdnnError
from maxdnn.ir.graph import QuantizedGraph
from maxdnn.multipliers.models import Multiplier, get_multiplier as _get_multiplier


def load_model(spec: str | os.PathLike | None = None) -> nn.Module | QuantizedGraph:
    """A model: a zoo name (``"resnet8"``, ``"resnet20"``), a maxdnn checkpoint (``.pt``), MLPerf Tiny's Keras
    ResNet-8 (``.h5``), a ``torch.export`` program (``.pt2``) or a float ONNX model (``.onnx``) as a float
    ``nn.Module``; an int8 TFLite model (``.tflite``) or int8 ONNX model (``.onnx``, onnxruntime's static
    quantization, QDQ or QOperator), each with its own quantization, or a saved integer graph (``.npz``) as a
    ``QuantizedGraph``.
    Nothing in the file runs code.

    Example::

        model = maxdnn.load_model("resnet8")
        graph = maxdnn.load_model("pretrainedResnet_quant.tflite")   # already integer
        graph = maxdnn.load_model("resnet8-int8.onnx")                # onnxruntime's arithmetic
    """
    from maxdnn.workload import load_any_model

    return load_any_model(spec)


def quantize(model: nn.Module | QuantizedGraph, calibration_images: np.ndarray,
             percentile: float = 99.99) -> QuantizedGraph:
    """The 8-bit integer graph of a float network, calibrated on ``calibration_images`` (uint8 [N, C, H, W],
    the network's input convention) on the integer graph itself: the same graph on every CPU. An already
    integer graph is returned as it is.

    Example::

        graph = maxdnn.quantize(maxdnn.load_model("resnet8"), train.images[:1000])
        graph.save("resnet8-int8.npz")
    """
    if isinstance(model, QuantizedGraph):
        return model
    from maxdnn.frontends.pytorch import quantize_module

    return quantize_module(model, calibration_images, percentile)


def load_cifar10(path: str | os.PathLike, split: str = "test") -> Dataset:
    """One split of CIFAR-10 (the official archive or folder, or a ``{train,test}/<class>/*`` image tree or
    zip): ``.images`` uint8 [N, 3, 32, 32] (NCHW), ``.labels`` int64 [N].

    Example::

        test = maxdnn.load_cifar10("cifar10-jpeg.zip", "test")
        test.images.shape        # (10000, 3, 32, 32)
    """
    return _load_cifar10(path, split)


def get_multiplier(spec: str, bits: int = 8, x_signed: bool = False) -> Multiplier:
    """A multiplier model by spec (``"exact"``, ``"roup-p2r4"``, ``"trunc-k3"``, ... or an imported one's name).

    Example::

        m = maxdnn.get_multiplier("roup-p1r2")
        m(np.array([200]), np.array([-77]))   # ROUP(1, 2)(200, -77) = R_2(200) * R_2(-77)
    """
    return _get_multiplier(spec, bits, x_signed)


class LayerInfo(dict):
    """One multiplying layer as ``maxdnn layers --json`` lists it; keys are also attributes.

    Example::

        first = maxdnn.layers(graph)[0]
        first.name == first["name"]        # True
    """

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def layers(graph: QuantizedGraph) -> list[LayerInfo]:
    """The multiplying layers of a graph, in execution order: name, kind, weight shape, stride, input
    signedness and range, multiplications per image.

    Example::

        [l.name for l in maxdnn.layers(graph)]     # ['conv1', 's1.conv1', ...]
    """
    return [LayerInfo(d) for d in graph.describe_layers()]


def layer_assignment(graph: QuantizedGraph, per_layer: Mapping[str, str]) -> Assignment:
    """One multiplier per layer (layers not named stay exact).

    Example::

        a = maxdnn.layer_assignment(graph, {"s1.conv1": "roup-p1r2"})
        a.save("a.json")
    """
    return _layer_assignment(graph, dict(per_layer))


def filter_assignment(graph: QuantizedGraph, per_filter: Mapping[str, Sequence[str]]) -> Assignment:
    """One multiplier per filter (output channel): ``{layer: [spec of filter 0, spec of filter 1, ...]}``.

    Example::

        f = graph.layers["s1.conv1"].weight.shape[0]
        a = maxdnn.filter_assignment(graph, {"s1.conv1": ["roup-p2r2"] * (f // 2) + ["exact"] * (f - f // 2)})
    """
    return _filter_assignment(graph, {k: list(v) for k, v in per_filter.items()})


def kernel_assignment(graph: QuantizedGraph, per_kernel: Mapping[str, Sequence[Sequence[str]]]) -> Assignment:
    """One multiplier per kernel (filter x input channel): ``{layer: [F][C] nested lists of specs}``.

    Example::

        f, c = graph.layers["s1.conv1"].weight.shape[:2]
        grid = [["roup-p1r2" if (i + j) % 2 else "exact" for j in range(c)] for i in range(f)]
        a = maxdnn.kernel_assignment(graph, {"s1.conv1": grid})
    """
    specs: list[str] = []
    maps = {}
    check_layer_names(graph, per_kernel)
    for name, grid in per_kernel.items():
        g = np.asarray(grid, dtype=object)
        idx = np.zeros(g.shape, dtype=np.int64)
        for pos, s in np.ndenumerate(g):
            if s not in specs:
                specs.append(str(s))
            idx[pos] = specs.index(s)
        maps[name] = idx
    return Assignment(specs or ["exact"], maps).bind(graph)


@dataclass
class Evaluation:
    """What ``evaluate`` measured: ``accuracy`` (fraction), ``correct``, ``images``; with an assignment
    ``energy_gain`` (multiplication energy) and ``pe_energy_gain`` (processing element: multiplier +
    accumulator), None where the energy table has no such figure; with ``accelerator``,
    ``accelerator_energy_gain`` (the network's energy per image on it) and ``accelerator``, the full
    ``maxdnn.accelerator_energy`` breakdown (pJ per image); ``outputs``: the integer output tensor per image
    (int64 [N, classes]); ``energy``: the full ``maxdnn.energy.network_energy`` breakdown.

    Example::

        r = maxdnn.evaluate(graph, test.images, test.labels, a, accelerator="tpu_like")
        r.accuracy, r.energy_gain, r.pe_energy_gain, r.accelerator_energy_gain, r.outputs.shape
    """

    accuracy: float
    correct: int
    images: int
    outputs: np.ndarray
    energy_gain: float | None = None
    pe_energy_gain: float | None = None
    energy: dict = field(default_factory=dict)
    accelerator_energy_gain: float | None = None
    accelerator: dict = field(default_factory=dict)


def evaluate(graph: QuantizedGraph, images: np.ndarray, labels: np.ndarray, assignment: Assignment | None = None,
             bias_correction: bool | np.ndarray = False, batch_size: int = 100, device: str = "cpu",
             energy: str = "average", accelerator: str | None = None) -> Evaluation:
    """Accuracy of the integer graph on ``images`` (uint8 NCHW) and ``labels``, exact or with ``assignment``'s
    multipliers; with ``bias_correction`` an array of uint8 training images (outside your validation data),
    the biases first cancel the assignment's mean accumulator error on them. ``energy``: ``"average"`` (one
    energy per multiplier), ``"per-layer"`` or a per-layer table file (``maxdnn.energy.with_per_layer``).
    ``accelerator`` (with an assignment): also the energy on that accelerator, a ZigZag template name or
    ``HW.yaml:MAPPING.yaml`` (``maxdnn.accelerator_energy``; needs ``maxdnn[accelerator]``).

    Example::

        r = maxdnn.evaluate(graph, test.images, test.labels, a, accelerator="tpu_like")
        print(f"{100 * r.accuracy:.2f}% at {100 * r.energy_gain:.1f}% multiplication energy gain "
              f"(PE {100 * r.pe_energy_gain:.1f}%, chip {100 * r.accelerator_energy_gain:.2f}%)")
    """
    from .workload import check_outputs

    images, labels = np.asarray(images), np.asarray(labels)
    breakdown: dict = {}
    if accelerator is not None and assignment is None:
        raise MaxdnnError("accelerator: give an assignment (an all-exact one for the exact network)")
    if assignment is None:
        outs = graph.outputs(images, batch_size, device)
    else:
        a = Assignment(list(assignment.specs), dict(assignment.maps), assignment.bits, dict(assignment.meta)).bind(graph)
        if bias_correction is not False and bias_correction is not None:
            if isinstance(bias_correction, bool):
                raise MaxdnnError("bias_correction: pass the training images to correct on (uint8 [N, C, H, W])")
            from .compensate.bias_correction import bias_corrected

            graph = bias_corrected(graph, a, np.asarray(bias_correction))
        breakdown = _energy(graph, a, energy)
        outs = ApproxNetwork(graph, a, device=device).outputs(images, batch_size)
    check_outputs(outs, str(graph.meta.get("model") or graph.meta.get("source") or "the graph"))
    correct = int((outs.argmax(1) == labels).sum()) if len(outs) else 0
    chip = {}
    if accelerator is not None:
        from .accelerator import accelerator_energy

        chip = accelerator_energy(graph, a, accelerator)
    return Evaluation(correct / max(len(labels), 1), correct, int(len(labels)), outs,
                      breakdown.get("energy_gain"), breakdown.get("pe_energy_gain"), breakdown,
                      chip["total"]["gain"] if chip else None, chip)


def _energy(graph: QuantizedGraph, a: Assignment, energy: str) -> dict:
    """``network_energy`` of the assignment; without an energy model for one of its multipliers, no figures and
    the reason as ``energy_source`` (accuracy still makes sense); per-layer energies asked for and missing: an
    error, never a silent average."""
    from .energy import EnergyModelError, energy_table, network_energy, with_per_layer

    try:
        table = energy_table(a.specs, a.bits)
    except EnergyModelError as e:
        return {"energy": None, "energy_gain": None, "pe_energy_gain": None, "energy_source": str(e)}
    return network_energy(graph, a, with_per_layer(table, energy, graph))


class ApproximateModule(nn.Module):
    """A graph with an assignment as a trainable ``nn.Module`` (see ``approximate``).

    Example::

        net = maxdnn.approximate(graph, a)
        net(torch.as_tensor(test.images[:8]))      # the integer engine's outputs
    """

    def __init__(self, graph: QuantizedGraph, assignment: Assignment, exact_forward: bool = True):
        super().__init__()
        from maxdnn.compensate.finetune import FakeQuantTwin

        self.twin = FakeQuantTwin(graph, assignment)
        self.assignment = self.twin.a
        self.exact_forward = exact_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The integer engine's outputs (float64 tensor of integers) for uint8 images x, with the twin's
        straight-through gradients (``exact_forward=False``: the twin's values, faster, not bit-exact)."""
        real = self.twin(x)
        scale = float(self.twin.q.output_scale)
        approx = real.to(torch.float64) / scale
        if not self.exact_forward:
            return approx
        with torch.no_grad():
            g = self.to_graph()
            exact = torch.as_tensor(ApproxNetwork(g, self.assignment).outputs(x.cpu().numpy().astype(np.uint8)),
                                    dtype=torch.float64, device=approx.device)
        return approx + (exact - approx).detach()

    def to_graph(self) -> QuantizedGraph:
        """The integer graph with the current (rounded) weights and biases."""
        return self.twin.export()


def approximate(graph: QuantizedGraph, assignment: Assignment | None = None,
                exact_forward: bool = True) -> ApproximateModule:
    """A ``torch.nn.Module`` whose forward takes uint8 images as the graph does and returns exactly the integer
    engine's outputs for them under ``assignment`` (default: all exact), and trains with straight-through
    gradients in your own loop: its parameters are the graph's weights and biases; ``.to_graph()`` gives the
    integer graph back.

    Example::

        net = maxdnn.approximate(graph, a)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        for x, y in loader:                                  # x: uint8 [N, 3, 32, 32]
            loss = torch.nn.functional.cross_entropy(net(x) * graph.output_scale, y)
            opt.zero_grad(); loss.backward(); opt.step()
        tuned = net.to_graph()
    """
    return ApproximateModule(graph, assignment or Assignment.uniform(graph, "exact"), exact_forward)


@dataclass
class Run:
    """An exploration's results, read from its run folder: ``points`` (every row of points.csv as a dict),
    ``fronts`` (each approach's validation-Pareto points), ``info`` (run.json) and ``best`` (the largest gain
    within each accuracy-loss threshold per approach, as in report.md).

    Example::

        run = maxdnn.Run.open("runs/quick")
        len(run.points), [p["energy_gain"] for p in run.fronts["kernel"]]
    """

    folder: Path
    info: dict
    points: list[dict]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Run":
        """A finished (or partly finished) run folder of ``maxdnn explore`` / ``maxdnn.explore``.

        Example::

            run = maxdnn.Run.open("runs/quick")
            run.best["kernel"][1.0]["energy_gain"]
        """
        from maxdnn.exploration.report import read_points
        from maxdnn.exploration.storage import read_run_info

        folder = Path(folder)
        info = read_run_info(folder)
        if not (folder / "points.csv").exists():
            raise MaxdnnError(f"{folder}: no points.csv yet (run 'maxdnn report {folder}')")
        return cls(folder, info, read_points(folder / "points.csv"))

    @property
    def search_level(self) -> str:
        """The compensation level the search ranked points by: ``bias`` when the run corrects biases, else
        ``ptq``."""
        return "bias" if any(p["compensation"] == "bias" for p in self.points) else "ptq"

    @property
    def fronts(self) -> dict[str, list[dict]]:
        """Each approach's validation-Pareto points as the search ranked them, by increasing gain."""
        out: dict[str, list[dict]] = {}
        for p in self.points:
            if p["on_front"] and p["compensation"] == self.search_level:
                out.setdefault(p["approach"], []).append(p)
        return {k: sorted(v, key=lambda p: p["energy_gain"]) for k, v in out.items()}

    @property
    def best(self) -> dict:
        """{approach: {threshold in points: chosen point or None}} at the level the search ranked by (see
        ``best_at``)."""
        return self.best_at(self.search_level)

    def best_at(self, level: str) -> dict:
        """{approach: {threshold in points: chosen point or None}} of one compensation level (``ptq``,
        ``bias``, ``finetune``), as in report.md: the largest gain whose paired loss on the confirmation
        images, plus one standard error, is within the threshold.

        Example::

            run = maxdnn.Run.open("runs/quick")
            p = run.best_at("finetune")["kernel"][1.0]
            p and (p["energy_gain"], p["test_loss_pts"])
        """
        from maxdnn.exploration.report import best_at_thresholds

        return best_at_thresholds(self.points, level=level)


def explore(out: str | os.PathLike, data: str | os.PathLike, model: str | None = None, budget: str = "quick",
            approaches: Sequence[str] | None = None, progress: bool = True, compensation: str = "finetune",
            accelerator: str | None = None, **options) -> Run:
    """The MAx-DNN exploration (``maxdnn explore``): resilience, layer / filter / kernel sweeps and NSGA-II, the
    ALWANN-style search, test-set numbers and the report, in the run folder ``out`` (rerun to resume).
    ``compensation``: ``finetune`` (default: the search ranks points bias-corrected, then front points, the
    fine-tuning ladder of weight-grid points and the exact model are fine-tuned, distilled from the exact
    model), ``bias`` or ``none``. ``accelerator``: also each front point's energy gain on
    that accelerator (``maxdnn.accelerator_energy``; column ``accelerator_energy_gain``). ``options`` go to
    ``maxdnn.exploration.explorer.Explorer`` (``library``, ``energy``, ``seed``, ``storage``);
    ``energy="accelerator:tpu_like"`` makes the accelerator's energy per image the objective (``energy_gain``
    is then the chip's gain, ``multiplication_energy_gain`` the multiplication gain beside it).

    Example::

        run = maxdnn.explore("runs/quick", "cifar10-jpeg.zip", budget="quick")
        for ap, per in run.best.items():
            print(ap, per[1.0] and per[1.0]["energy_gain"])
    """
    from maxdnn.exploration.explorer import BUDGETS, Explorer, run_exploration
    from maxdnn.exploration.front import APPROACHES
    from maxdnn.exploration.report import write_report
    from maxdnn.workload import Workload

    if budget not in BUDGETS:
        raise MaxdnnError(f"budget {budget!r}: expected one of {', '.join(BUDGETS)}")
    aps = list(approaches or APPROACHES)
    try:
        ex = Explorer(out, Workload.open(model, data), BUDGETS[budget], progress=progress,
                      log=print if progress else (lambda m: None), compensation=compensation, **options)
    except ValueError as e:
        if isinstance(e, MaxdnnError):
            raise
        raise MaxdnnError(str(e)) from None
    run_exploration(ex, aps)
    if accelerator:
        from maxdnn.exploration.storage import add_wall_seconds

        add_wall_seconds(out, 0.0, accelerator=accelerator)
    write_report(out, ex.store)
    return Run.open(out)
