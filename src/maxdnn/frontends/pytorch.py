"""PyTorch front end: any float CNN (an ``nn.Module`` or a ``torch.export`` .pt2 file) to the integer graph.

Convention: the network takes float pixels 0..255, NCHW. Input scaling and
normalization ((x / 255 - mean) / std, per channel or scalar) is read from the
graph: a plain scalar scale is folded into the input's scale exactly; anything
else becomes an integer ``Affine`` node producing a signed 8-bit tensor.

The module is traced with ``torch.export`` (ATen operators), lowered to float
nodes with fusions (conv/linear + batch norm + ReLU/ReLU6/hardtanh/clamp,
zero padding into the convolution, add + ReLU, a conv whose only consumer is
an add requantized straight into the add's scale), then quantized and calibrated
node by node on the integer graph itself (``maxdnn.ir.quantizer``: a high
percentile of each 8-bit tensor's real values, computed from the integer codes
of the nodes before it, of the values when they cannot be negative, of |values|
otherwise; the same graph on any CPU) into
a ``maxdnn.ir.graph.QuantizedGraph``. A trailing softmax / log-softmax is dropped
(argmax and accuracy do not change). Anything else stops with one line naming
the node and the operation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from maxdnn.ir.graph import U8, QParams, QuantizedGraph
from maxdnn.errors import ModelError
from maxdnn.ir.quant import conv_out_hw
from maxdnn.ir.quantizer import FNode, IntegerCalibration

from maxdnn.frontends.aten_lowering import UnsupportedModel, lower  # noqa: F401 - UnsupportedModel: part of this front end's API


# ---------------------------------------------------------------- tracing


def export(module: nn.Module, shape=(3, 32, 32)):
    """``torch.export`` of a float module with a dynamic batch dimension."""
    if isinstance(module, ExportedModule):
        return module.program
    module = module.eval()
    x = torch.zeros((2,) + tuple(shape))
    try:
        return torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), strict=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure is the model's problem, said in one line
        raise ModelError(f"{type(module).__name__}: torch.export failed on input of shape {list(shape)} "
                         f"({str(e).splitlines()[0][:200]})") from None


class ExportedModule(nn.Module):
    """A float network loaded from a ``torch.export`` .pt2 file, run by the front end's float executor
    (any batch size)."""

    def __init__(self, program, source: str):
        super().__init__()
        self.program = program
        self.source = source
        self.lowered = lower(program, source)
        # not a registered submodule: an exported module refuses .train()/.eval(), which predict() calls
        object.__setattr__(self, "gm", program.module())
        self.meta = {"source": source}

    def forward(self, x):
        return run_exported(self.gm, x.float())[0]


def load_exported(path: str | Path) -> ExportedModule:
    """A .pt2 file as a float network; nothing in the file runs (``maxdnn.frontends.pt2_safe``)."""
    from maxdnn.frontends.pt2_safe import UnsafeProgram, load_program

    path = Path(path)
    try:
        ep = load_program(path)
    except UnsafeProgram as e:
        raise ModelError(f"{path}: refused: loading it could run code ({e})") from None
    except ValueError as e:
        raise ModelError(f"{path}: {e}") from None
    return ExportedModule(ep, str(path))


# ---------------------------------------------------------------- lowering


# ---------------------------------------------------------------- float execution


class _Capture(torch.fx.Interpreter):
    """Runs the exported graph (any batch size) and keeps the named values."""

    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep, self.got = set(keep), {}

    def run_node(self, n):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            return None  # shape guards of a static-batch export: the front end runs any batch size
        r = super().run_node(n)
        if n.name in self.keep:
            self.got[n.name] = r
        return r


def run_exported(gm, x: torch.Tensor, keep=()) -> tuple[torch.Tensor, dict]:
    """The float output of an exported program's module, and the values of the fx nodes in ``keep``."""
    cap = _Capture(gm, keep)
    out = cap.run(x)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out, cap.got


# ---------------------------------------------------------------- calibration and quantization


def quantize_module(module: nn.Module, calibration_images: np.ndarray, percentile: float = 99.99,
                    batch_size: int = 500) -> QuantizedGraph:
    """Post-training 8-bit quantization of a float CNN into the integer graph, calibrated on the integer
    graph itself (``maxdnn.ir.quantizer``): the result does not depend on the CPU or the thread count.

    ``calibration_images``: uint8 [N, C, H, W] pixels (the network's input convention).
    """
    images = np.asarray(calibration_images)
    if images.ndim != 4:
        raise ModelError(f"calibration images must be [N, C, H, W], got shape {list(images.shape)}")
    if len(images) == 0:
        raise ModelError("no calibration images")
    where = getattr(module, "source", type(module).__name__)
    if isinstance(module, ExportedModule):
        nodes, gm = module.lowered, module.gm
    else:
        ep = export(module, images.shape[1:])
        nodes, gm = lower(ep, where), ep.module()
    shapes = _float_shapes(gm, nodes, images, where)
    graph_nodes = IntegerCalibration(nodes, images, shapes, percentile, batch_size, where).run()
    g = QuantizedGraph(QParams(nodes[0].p["scale"], 0, *U8), tuple(images.shape[1:]), graph_nodes,
                       {"percentile": percentile, "calib_images": len(images), "source": where,
                        "calibration_method": "integer graph"})
    for layer in g.layers.values():
        if layer.in_q.wide:
            raise ModelError(f"{where}: layer {layer.name}: input is not an 8-bit tensor")
    _check_shapes(g, shapes, nodes)
    return g


def _float_shapes(gm, nodes: list[FNode], images: np.ndarray, where: str) -> dict[int, tuple]:
    """Each lowered node's output shape [C, H, W] (or [features]), from one float run on two images
    (shapes only: no float value reaches the integer graph)."""
    keep = {n.p["fx"] for n in nodes if n.p.get("fx")}
    with torch.no_grad():
        try:
            _, got = run_exported(gm, torch.as_tensor(images[:2]).float(), keep)
        except Exception as e:  # noqa: BLE001 - the user's network failing on this input, in one line
            raise ModelError(f"{where}: the network does not run on input of shape {list(images.shape[1:])} "
                             f"({str(e).splitlines()[0][:160]})") from None
    return {i: tuple(got[n.p["fx"]].shape[1:]) if n.p.get("fx") in got else tuple(images.shape[1:])
            for i, n in enumerate(nodes)}


def _check_shapes(g: QuantizedGraph, shapes, nodes) -> None:
    """The integer graph's convolution geometry reproduces the float network's shapes."""
    for i, n in enumerate(nodes[1:], start=1):
        if n.kind == "mul" and n.p["op"] == "conv" and n.p.get("fx") and i in shapes:
            layer = g.layers[n.name]
            if tuple(shapes[i][1:]) != conv_out_hw(layer.in_hw, layer.weight.shape[2:], layer.stride, layer.pads):
                raise ModelError(f"layer {n.name}: output size {list(shapes[i][1:])} does not follow from its geometry")
