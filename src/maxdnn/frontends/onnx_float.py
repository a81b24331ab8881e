"""Float ONNX models as float ``nn.Module``s, for maxdnn's own quantization (like a ``.pt2``).

The ONNX graph is rebuilt from PyTorch modules and functions, one per node, in the graph's order:
Conv (``nn.Conv2d``, asymmetric padding as a zero Pad before it), Gemm and MatMul with constant weights
(``nn.Linear``), BatchNormalization (``nn.BatchNorm2d`` in eval mode), Relu, Clip, MaxPool, AveragePool,
GlobalAveragePool, Flatten, Reshape to [batch, features], Pad (constant zero), Concat along channels, Add, Sub,
Mul and Div (between activations, or with constants on the input: a normalization), Identity and Dropout; a
final Softmax is dropped (the network's output is then its logits, whose argmax is the same). The modules
carry the ONNX node names (``/s1/conv1/Conv`` becomes ``s1.conv1``), which become the integer graph's layer
names. Constant subgraphs are evaluated with ``onnx.reference`` (``maxdnn.frontends.onnx_int8``). Anything else
stops with one line naming the node. The network takes float pixel values 0..255, NCHW, as every maxdnn model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maxdnn.errors import ModelError


class OnnxFloatModule(nn.Module):
    """A float ONNX graph run by PyTorch (module docstring); ``source`` names the file."""

    def __init__(self, steps: list, source: str, input_name: str, output_name: str):
        super().__init__()
        self.steps = steps  # (kind, module path or None, inputs, output, extra)
        self.source = source
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x):
        vals = {self.input_name: x}
        for kind, path, ins, out, extra in self.steps:
            a = [vals[i] if isinstance(i, str) else i for i in ins]
            if path is not None:
                mod = self.get_submodule(path)
                y = mod(F.pad(a[0], extra) if extra else a[0])
            else:
                y = _FUNCTIONS[kind](a, extra)
            vals[out] = y
        return vals[self.output_name]


def _const(v) -> torch.Tensor:
    return torch.tensor(np.array(v, dtype=np.float32))


_FUNCTIONS = {
    "Relu": lambda a, e: F.relu(a[0]),
    "Clip": lambda a, e: torch.clamp(a[0], e[0], e[1]),
    "Add": lambda a, e: a[0] + a[1],
    "Sub": lambda a, e: a[0] - a[1],
    "Mul": lambda a, e: a[0] * a[1],
    "Div": lambda a, e: a[0] / a[1],
    "MaxPool": lambda a, e: F.max_pool2d(F.pad(a[0], e[2], value=float("-inf")) if any(e[2]) else a[0], e[0], e[1]),
    "AveragePool": lambda a, e: F.avg_pool2d(F.pad(a[0], e[2]) if any(e[2]) and not e[3] else a[0], e[0], e[1],
                                             padding=e[4] if e[3] else 0, count_include_pad=bool(e[3])),
    "GlobalAveragePool": lambda a, e: F.adaptive_avg_pool2d(a[0], 1),
    "Flatten": lambda a, e: a[0].flatten(1),
    "Pad": lambda a, e: F.pad(a[0], e),
    "Concat": lambda a, e: torch.cat(a, 1),
    "Identity": lambda a, e: a[0],
}


def _path(name: str, taken: set, fallback: str) -> str:
    parts = [p for p in (name or "").split("/") if p]
    if len(parts) > 1:
        parts = parts[:-1]
    parts = ["".join(ch if ch.isalnum() or ch == "_" else "_" for ch in p) or "m" for p in parts] or [fallback]
    parts = [p if not p[0].isdigit() else f"m{p}" for p in parts]
    base, k = ".".join(parts), 1
    path = base
    while path in taken:
        k += 1
        path = f"{base}_{k}"
    taken.add(path)
    return path


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    m = root
    for p in parents:
        if not hasattr(m, p) or not isinstance(getattr(m, p), nn.Module):
            m.add_module(p, nn.Module())
        m = getattr(m, p)
    m.add_module(leaf, module)


def load_float_onnx(path: str | Path, model) -> OnnxFloatModule:
    """The float network of a parsed ONNX model (``onnx.ModelProto``) without quantization."""
    from maxdnn.frontends.onnx_int8 import _constant_value, _fold, start_state

    st = start_state(Path(path), model)
    steps, taken, live, shell = [], set(), {st.input_name}, nn.Module()
    output = model.graph.output[0].name
    for n in model.graph.node:
        op = n.op_type
        if op == "Constant":
            st.const[n.output[0]] = _constant_value(n)
            continue
        if n.input and all(i == "" or i in st.const for i in n.input):
            _fold(st, n)
            continue
        if n.input[0] not in live and not (op in ("Add", "Sub", "Mul", "Div") and n.input[1] in live):
            raise st.err(n, "reads a tensor no supported operator produced")
        if op == "Softmax" and n.output[0] == output:
            output = n.input[0]
            continue
        ins: list = [i if i in live else _const(st.const[i]) for i in n.input if i]
        if op in ("Conv", "Gemm", "MatMul", "BatchNormalization"):
            steps.append(_module_step(st, n, shell, taken, len(steps)))
        else:
            steps.append(_function_step(st, n, ins))
        live.add(n.output[0])
    if output not in live:
        raise ModelError(f"{path}: the model's output is not produced by a supported operator")
    m = OnnxFloatModule(steps, str(path), st.input_name, output)
    for name, child in shell.named_children():
        m.add_module(name, child)
    return m.eval()


def _module_step(st, n, shell: nn.Module, taken: set, k: int) -> tuple:
    """A Conv / Gemm / MatMul / BatchNormalization node as a PyTorch module attached under its node's name."""
    from maxdnn.frontends.onnx_int8 import _attrs

    op, a, out = n.op_type, _attrs(n), n.output[0]
    extra = None
    if op == "Conv":
        w = st.const.get(n.input[1])
        if w is None or w.ndim != 4:
            raise st.err(n, "only 2-D convolutions with constant weights are supported")
        strides = [int(v) for v in a.get("strides", [1, 1])]
        if len(set(strides)) != 1 or any(int(d) != 1 for d in a.get("dilations", [1, 1])):
            raise st.err(n, "unequal strides and dilation are not supported")
        left, r, t, b = _explicit_pads(st, n, a)
        sym = left == r == t == b
        groups = int(a.get("group", 1))
        mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), strides[0], left if sym else 0,
                        groups=groups, bias=len(n.input) > 2 and bool(n.input[2]))
        params = [(mod.weight, w)] + ([(mod.bias, st.const[n.input[2]])] if mod.bias is not None else [])
        extra = None if sym else (left, r, t, b)
    elif op in ("Gemm", "MatMul"):
        w = st.const.get(n.input[1])
        if w is None or w.ndim != 2:
            raise st.err(n, "weights must be a 2-D constant")
        if op == "Gemm" and (a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0
                             or float(a.get("beta", 1.0)) != 1.0):
            raise st.err(n, "only Gemm with transA 0, alpha 1 and beta 1 is supported")
        w = w if op == "Gemm" and a.get("transB", 0) else w.T
        bias = st.const.get(n.input[2]) if op == "Gemm" and len(n.input) > 2 and n.input[2] else None
        mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        params = [(mod.weight, w)] + ([(mod.bias, np.asarray(bias).reshape(-1))] if bias is not None else [])
    else:
        scale, bias, mean, var = (st.const.get(i) for i in n.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            raise st.err(n, "batch norm parameters must be constants")
        mod = nn.BatchNorm2d(len(mean), eps=float(a.get("epsilon", 1e-5))).eval()
        params = [(mod.weight, scale), (mod.bias, bias), (mod.running_mean, mean), (mod.running_var, var)]
    with torch.no_grad():
        for t_, v in params:
            t_.copy_(_const(v))
    p = _path(n.name, taken, f"{op.lower()}{k}")
    _attach(shell, p, mod)
    return (op, p, [n.input[0]], out, extra)


def _function_step(st, n, ins: list) -> tuple:
    """Any other supported node as one of ``_FUNCTIONS`` with its constant arguments."""
    from maxdnn.frontends.onnx_int8 import _attrs, _pad_amounts

    op, a, out = n.op_type, _attrs(n), n.output[0]
    if op in ("Relu", "Add", "Sub", "Mul", "Div", "GlobalAveragePool", "Concat", "Identity", "Dropout"):
        if op == "Concat" and int(a.get("axis", 1)) != 1:
            raise st.err(n, "concatenation only along channels")
        return ("Identity" if op == "Dropout" else op, None, ins[:1] if op == "Dropout" else ins, out, None)
    if op == "Clip":
        lo = float(st.const[n.input[1]]) if len(n.input) > 1 and n.input[1] else float(a.get("min", -np.inf))
        hi = float(st.const[n.input[2]]) if len(n.input) > 2 and n.input[2] else float(a.get("max", np.inf))
        return (op, None, ins[:1], out, (lo, hi))
    if op in ("MaxPool", "AveragePool"):
        k = tuple(int(v) for v in a["kernel_shape"])
        s = [int(v) for v in a.get("strides", [1, 1])]
        if len(set(s)) != 1 or a.get("ceil_mode", 0) or any(int(d) != 1 for d in a.get("dilations", [1, 1])):
            raise st.err(n, "unequal strides, dilations and ceil_mode are not supported")
        pads = _explicit_pads(st, n, a)
        include = int(a.get("count_include_pad", 0))
        if op == "AveragePool" and include and not (pads[0] == pads[1] == pads[2] == pads[3]):
            raise st.err(n, "count_include_pad with asymmetric padding is not supported")
        return (op, None, ins[:1], out, (k, s[0], pads, include, pads[0]))
    if op in ("Flatten", "Reshape"):
        if op == "Flatten" and int(a.get("axis", 1)) != 1:
            raise st.err(n, "only Flatten with axis 1 is supported")
        if op == "Reshape":
            shape = [int(v) for v in np.asarray(st.const.get(n.input[1], np.zeros(0))).reshape(-1)]
            if len(shape) != 2:
                raise st.err(n, f"only reshapes to [batch, features] are supported (got {shape})")
        return ("Flatten", None, ins[:1], out, None)
    if op == "Pad":
        return (op, None, ins[:1], out, _pad_amounts(st, n, 0.0))
    raise st.err(n, "unsupported operator in a float ONNX model")


def _explicit_pads(st, n, a) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) from ``pads``; auto_pad SAME is refused (sizes are not tracked here)."""
    from maxdnn.frontends.onnx_int8 import _conv_pads

    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto.startswith("SAME"):
        raise st.err(n, f"auto_pad {auto} is not supported in a float model (export with explicit pads)")
    return _conv_pads(st, n, a, None, None, 1)
