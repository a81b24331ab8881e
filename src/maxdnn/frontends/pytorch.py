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

import math
import operator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from maxdnn.ir.graph import U8, QParams, QuantizedGraph, unique_name
from maxdnn.errors import ModelError
from maxdnn.ir.quant import conv_out_hw
from maxdnn.ir.quantizer import FNode, IntegerCalibration

aten = torch.ops.aten
ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default,
               aten.clamp.default, aten.clamp_min.default}
IDENTITY = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
            aten.feature_dropout.default, aten._softmax.default, aten.softmax.int, aten.log_softmax.int,
            aten._log_softmax.default}
SOFTMAX = {aten._softmax.default, aten.softmax.int, aten.log_softmax.int, aten._log_softmax.default}
RESHAPES = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class UnsupportedModel(ModelError):
    pass


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


def _const_tensors(ep) -> dict[str, torch.Tensor]:
    sig = ep.graph_signature
    sd = dict(ep.state_dict)
    consts = dict(getattr(ep, "constants", {}) or {})
    out = {}
    for ph, fqn in sig.inputs_to_parameters.items():
        out[ph] = sd[fqn].detach()
    for ph, fqn in sig.inputs_to_buffers.items():
        out[ph] = (sd[fqn] if fqn in sd else consts[fqn]).detach()
    for ph, fqn in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        out[ph] = consts[fqn].detach()
    return out


def _module_path(node, taken: set) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    name = node.name
    if stack:
        path = list(stack.values())[-1][0]
        name = path.split("L['self'].")[-1].replace("L__self___", "") or node.name
    return unique_name(name, taken)


def _positional_args(node) -> tuple:
    """The node's arguments in schema order: keyword arguments (programs loaded from .pt2 files by some torch
    versions pass conv stride/padding/groups as keywords) moved into place, schema defaults filling gaps."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not node.kwargs:
        return node.args
    args = list(node.args)
    rest = schema.arguments[len(args):]
    last = max((i for i, a in enumerate(rest) if a.name in node.kwargs), default=-1)
    for a in rest[:last + 1]:
        if a.name in node.kwargs:
            args.append(node.kwargs[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        else:  # pragma: no cover - a required argument is never missing in a valid program
            break
    return tuple(args)


def _pads2(padding) -> tuple[int, int, int, int]:
    """An aten conv padding argument as (left, right, top, bottom)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        raise UnsupportedModel("padding='same' convolutions: use explicit padding")
    padding = list(padding) if isinstance(padding, (list, tuple)) else [padding, padding]
    if len(padding) == 1:
        padding = padding * 2
    ph, pw = int(padding[0]), int(padding[1])
    return (pw, pw, ph, ph)


def lower(ep, where: str) -> list[FNode]:
    """The exported program as float nodes (see the module docstring); node 0 is the input."""
    consts = _const_tensors(ep)
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise UnsupportedModel(f"{where}: the network must take one input tensor (it takes {len(user_inputs)})")
    nodes: list[FNode] = [FNode("input", "input", [])]
    val: dict[str, object] = {}  # fx node name -> ("t", index) | ("const", tensor) | ("pad", index, pads) | ("affine", a, b) | None
    val[user_inputs[0]] = ("affine", torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    fx_users = {n.name: len(n.users) for n in ep.graph.nodes}
    owner_fx: dict[int, str] = {0: user_inputs[0]}
    taken: set = set()
    out_ref = None

    def err(node, what):
        return UnsupportedModel(f"{where}: node '{node.name}' ({node.target}): {what}")

    def tensor_of(node, a):
        v = val.get(a.name) if isinstance(a, torch.fx.Node) else ("const", a)
        return v

    materialized: dict[int, int] = {}

    def materialize(node, v):
        """A value as a node index (an input affine chain becomes the input or an Affine node)."""
        if v[0] == "t":
            return v[1]
        if v[0] != "affine":
            raise err(node, "zero padding feeds something other than a convolution")
        if id(v) not in materialized:
            a, b = v[1].flatten(), v[2].flatten()
            if bool((b == 0).all()) and bool((a == a[0]).all()) and float(a[0]) > 0:
                nodes[0].p["scale"] = float(a[0])  # a scalar input scale: folded exactly
                materialized[id(v)] = 0
            else:
                nodes[0].p["scale"] = 1.0
                nodes.append(FNode("affine", f"{node.name}.input_normalization", [0], p={"a": a, "b": b}))
                nodes[0].users += 1
                materialized[id(v)] = len(nodes) - 1
        if len({i for i in materialized.values()}) > 1:
            raise err(node, "the network input is used with two different normalizations")
        return materialized[id(v)]

    def new(kind, node, inputs, **p):
        nodes.append(FNode(kind, node.name, inputs, p=p))
        owner_fx[len(nodes) - 1] = node.name
        for i in inputs:
            nodes[i].users += 1
        return ("t", len(nodes) - 1)

    def fusable(idx, node_arg):
        """The producer of a value can take a fused op if the fx value has no other user."""
        return fx_users.get(node_arg.name, 0) == 1 and owner_fx.get(idx) == node_arg.name

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in consts:
                val[node.name] = ("const", consts[node.name])
            continue
        if node.op == "output":
            outs = node.args[0]
            if len(outs) != 1:
                raise UnsupportedModel(f"{where}: the network must return one tensor (it returns {len(outs)})")
            out_ref = outs[0]
            continue
        if node.op != "call_function":
            raise err(node, f"unsupported node type {node.op}")
        t = node.target
        args = _positional_args(node)
        if t is operator.getitem:
            src = val[args[0].name]
            if src[0] == "bn-tuple" and args[1] != 0 and not node.users:
                continue  # an unused extra output of batch norm or max pool (kept in loaded .pt2 programs)
            if src[0] != "bn-tuple" or args[1] != 0:
                raise err(node, "unsupported tuple output")
            val[node.name] = src[1]
            if owner_fx.get(src[1][1]) == args[0].name:
                owner_fx[src[1][1]] = node.name
            continue
        if t in IDENTITY:
            if t in SOFTMAX and any(u.op != "output" for u in node.users):
                raise err(node, "softmax is only supported as the last operation")
            val[node.name] = val[args[0].name]
            continue
        if t in (aten.conv2d.default, aten.conv2d.padding, aten.convolution.default, aten.linear.default):
            x = val[args[0].name]
            w = tensor_of(node, args[1])
            b = tensor_of(node, args[2]) if len(args) > 2 and args[2] is not None else None
            if w is None or w[0] != "const" or (b is not None and b[0] != "const"):
                raise err(node, "weights must be constants")
            w = w[1].double()
            bias = b[1].double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            extra_pads = (0, 0, 0, 0)
            if x[0] == "pad":
                extra_pads = x[2]
                x = x[1]
            xi = materialize(node, x)
            if t == aten.linear.default:
                new("mul", node, [xi], op="linear", w=w[:, :, None, None], b=bias, stride=1, pads=(0, 0, 0, 0), groups=1)
            else:
                if t == aten.convolution.default:
                    _, _, _, stride, padding, dilation, transposed, _, groups = args[:9]
                    if transposed:
                        raise err(node, "transposed convolution is not supported")
                else:
                    stride = args[3] if len(args) > 3 else [1, 1]
                    padding = args[4] if len(args) > 4 else [0, 0]
                    dilation = args[5] if len(args) > 5 else [1, 1]
                    groups = args[6] if len(args) > 6 else 1
                stride = list(stride) if isinstance(stride, (list, tuple)) else [stride, stride]
                if len(stride) == 1:
                    stride = stride * 2
                if stride[0] != stride[1]:
                    raise err(node, f"stride {stride}: only equal strides are supported")
                if any(d != 1 for d in (dilation if isinstance(dilation, (list, tuple)) else [dilation])):
                    raise err(node, "dilation is not supported")
                try:
                    pads = _pads2(padding)
                except UnsupportedModel as e:
                    raise err(node, str(e)) from None
                pads = tuple(p + e for p, e in zip(pads, extra_pads))
                new("mul", node, [xi], op="conv", w=w, b=bias, stride=int(stride[0]), pads=pads, groups=int(groups))
            nodes[-1].name = _module_path(node, taken)
            val[node.name] = ("t", len(nodes) - 1)
            continue
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            x = val[args[0].name]
            if x[0] != "t" or nodes[x[1]].kind != "mul" or not fusable(x[1], args[0]) or nodes[x[1]].p.get("bn"):
                raise err(node, "batch norm must follow a convolution or linear layer with no other consumer")
            if t == aten.batch_norm.default:
                gamma, beta, mean, var = (tensor_of(node, a) for a in args[1:5])
                training, eps = args[5], args[7]
            else:
                gamma, beta, mean, var = (tensor_of(node, a) for a in args[1:5])
                training, eps = False, args[6]
            if training:
                raise err(node, "batch norm in training mode (call model.eval() before export)")
            # folded in float64 by numpy element-wise operations (each correctly rounded, never fused)
            mean, var = mean[1].double().numpy(), var[1].double().numpy()
            gamma = gamma[1].double().numpy() if gamma is not None else np.ones_like(mean)
            beta = beta[1].double().numpy() if beta is not None else np.zeros_like(mean)
            fn = nodes[x[1]]
            g = np.divide(gamma, np.sqrt(np.add(var, float(eps))))
            fn.p["w"] = torch.from_numpy(np.multiply(fn.p["w"].numpy(), g[:, None, None, None]))
            fn.p["b"] = torch.from_numpy(np.add(np.multiply(np.subtract(fn.p["b"].numpy(), mean), g), beta))
            fn.p["bn"] = True
            owner_fx[x[1]] = node.name
            val[node.name] = ("bn-tuple", x) if t != aten.batch_norm.default else x
            if t != aten.batch_norm.default:
                fx_users[node.name] = 1
            continue
        if t in ACTIVATIONS:
            lo, hi = 0.0, math.inf
            if t in (aten.hardtanh.default, aten.hardtanh_.default):
                lo, hi = float(args[1]) if len(args) > 1 else -1.0, float(args[2]) if len(args) > 2 else 1.0
            elif t in (aten.relu6.default,):
                lo, hi = 0.0, 6.0
            elif t == aten.clamp.default:
                lo = -math.inf if len(args) < 2 or args[1] is None else float(args[1])
                hi = math.inf if len(args) < 3 or args[2] is None else float(args[2])
            elif t == aten.clamp_min.default:
                lo = float(args[1])
            x = val[args[0].name]
            if x[0] != "t":
                raise err(node, "activation on the network input")
            src = nodes[x[1]]
            if src.kind in ("mul", "add") and src.act is None and fusable(x[1], args[0]):
                src.act = (lo, hi)
                owner_fx[x[1]] = node.name
                val[node.name] = x
            else:
                val[node.name] = new("clamp", node, [x[1]], lo=lo, hi=hi)
            continue
        if t in (aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
            a = val.get(args[0].name) if isinstance(args[0], torch.fx.Node) else ("const", torch.tensor(float(args[0])))
            b = val.get(args[1].name) if isinstance(args[1], torch.fx.Node) else ("const", torch.tensor(float(args[1])))
            alpha = node.kwargs.get("alpha", 1)
            if a[0] == "t" and b[0] == "t":
                if t not in (aten.add.Tensor, aten.add_.Tensor) or alpha != 1:
                    raise err(node, "only additions of two activations are supported")
                val[node.name] = new("add", node, [a[1], b[1]])
                continue
            if a[0] == "affine" and b[0] == "const" or a[0] == "const" and b[0] == "affine":
                aff, c = (a, b[1]) if a[0] == "affine" else (b, a[1])
                c = c.double().reshape(-1) if c.numel() > 1 else c.double().reshape(1)
                sa, sb = aff[1], aff[2]
                if t in (aten.add.Tensor, aten.add_.Tensor):
                    val[node.name] = ("affine", sa, sb + c * alpha)
                elif t == aten.sub.Tensor:
                    if a[0] != "affine":
                        raise err(node, "constant minus input is not supported")
                    val[node.name] = ("affine", sa, sb - c * alpha)
                elif t == aten.mul.Tensor:
                    val[node.name] = ("affine", sa * c, sb * c)
                else:
                    if a[0] != "affine":
                        raise err(node, "constant divided by input is not supported")
                    val[node.name] = ("affine", sa / c, sb / c)
                continue
            raise err(node, "arithmetic with constants is only supported on the network input (normalization)")
        if t in (aten.pad.default, aten.constant_pad_nd.default):
            x = val[args[0].name]
            pad = list(args[1])
            mode = args[2] if t == aten.pad.default and len(args) > 2 else "constant"
            value = (args[3] if t == aten.pad.default and len(args) > 3 else (args[2] if t == aten.constant_pad_nd.default and len(args) > 2 else 0)) or 0
            if mode != "constant" or value != 0 or len(pad) != 4 or any(p < 0 for p in pad):
                raise err(node, "only zero padding of height and width is supported")
            if x[0] == "pad":
                raise err(node, "padding of padding is not supported")
            if not all(u.target in (aten.conv2d.default, aten.convolution.default) for u in node.users):
                raise err(node, "zero padding must feed convolutions only")
            val[node.name] = ("pad", x, tuple(int(p) for p in pad))
            continue
        if t in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.avg_pool2d.default):
            x = val[args[0].name]
            if x[0] != "t":
                raise err(node, "pooling of the network input")
            k = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]] * 2
            k = k * 2 if len(k) == 1 else k
            s = list(args[2]) if len(args) > 2 and args[2] else k
            s = s * 2 if len(s) == 1 else s
            pad = list(args[3]) if len(args) > 3 else [0, 0]
            pad = pad * 2 if len(pad) == 1 else pad
            ceil = args[5] if t != aten.avg_pool2d.default and len(args) > 5 else (args[4] if t == aten.avg_pool2d.default and len(args) > 4 else False)
            if t != aten.avg_pool2d.default and len(args) > 4 and any(d != 1 for d in args[4]):
                raise err(node, "pool dilation is not supported")
            if ceil or s[0] != s[1]:
                raise err(node, "ceil_mode and unequal strides are not supported")
            cip = args[5] if t == aten.avg_pool2d.default and len(args) > 5 else True
            if t == aten.avg_pool2d.default and len(args) > 6 and args[6] is not None:
                raise err(node, "divisor_override is not supported")
            val[node.name] = new("pool", node, [x[1]], op="max" if t != aten.avg_pool2d.default else "avg",
                                 kernel=(int(k[0]), int(k[1])), stride=int(s[0]), pads=(pad[1], pad[1], pad[0], pad[0]),
                                 count_include_pad=bool(cip))
            if t == aten.max_pool2d_with_indices.default:
                val[node.name] = ("bn-tuple", val[node.name])
            continue
        if t in (aten.adaptive_avg_pool2d.default, aten.mean.dim):
            x = val[args[0].name]
            if t == aten.adaptive_avg_pool2d.default:
                if list(args[1]) not in ([1, 1], [1]):
                    raise err(node, "adaptive average pooling only to 1x1")
                keep = True
            else:
                dims = sorted(d % 4 for d in args[1])
                if dims != [2, 3]:
                    raise err(node, "mean only over height and width")
                keep = bool(args[2]) if len(args) > 2 else False
            val[node.name] = new("pool", node, [x[1]], op="avg", kernel=None, stride=1, pads=(0, 0, 0, 0),
                                 count_include_pad=True)
            if not keep:
                val[node.name] = new("flatten", node, [val[node.name][1]])
            continue
        if t == aten.sym_size.int:  # a shape query (older torch.export: view(x, [x.size(0), -1]))
            val[node.name] = ("size", None)
            continue
        if t in RESHAPES:
            x = val[args[0].name]
            if t == aten.flatten.using_ints:
                ok = (args[1] if len(args) > 1 else 0) == 1 and (args[2] if len(args) > 2 else -1) in (-1, 3)
            else:
                shape = list(args[1])
                ok = len(shape) == 2
            if not ok:
                raise err(node, "only flattening to [batch, features] is supported")
            val[node.name] = new("flatten", node, [x[1]])
            continue
        if t == aten.cat.default:
            dim = args[1] if len(args) > 1 else 0
            if dim not in (1, -3):
                raise err(node, "concatenation only along channels")
            ins = [val[a.name] for a in args[0]]
            if any(v[0] != "t" for v in ins):
                raise err(node, "concatenation of the network input")
            val[node.name] = new("concat", node, [v[1] for v in ins])
            continue
        raise err(node, "unsupported operation")
    out = val.get(out_ref.name) if isinstance(out_ref, torch.fx.Node) else None
    if out is None or out[0] != "t" or out[1] != len(nodes) - 1:
        raise UnsupportedModel(f"{where}: the network output must be its last operation")
    nodes[0].p.setdefault("scale", 1.0)
    for i, n in enumerate(nodes):
        n.p["fx"] = owner_fx.get(i)  # the fx value holding this node's output (after fusions)
    return nodes


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
