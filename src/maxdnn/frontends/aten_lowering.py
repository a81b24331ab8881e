"""Lowering of an exported program's ATen graph into float nodes: one handler per operation family,
registered by the ATen targets it takes (``handles``), as hls4ml and torch.fx-based tools do."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from maxdnn.errors import ModelError
from maxdnn.ir.graph import unique_name
from maxdnn.ir.quantizer import FNode

aten = torch.ops.aten
ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default,
               aten.clamp.default, aten.clamp_min.default}
IDENTITY = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
            aten.feature_dropout.default, aten._softmax.default, aten.softmax.int, aten.log_softmax.int,
            aten._log_softmax.default}
SOFTMAX = {aten._softmax.default, aten.softmax.int, aten.log_softmax.int, aten._log_softmax.default}
RESHAPES = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
HANDLERS: dict = {}  # ATen target -> handler(lowering, node, target, args)


class UnsupportedModel(ModelError):
    pass


def handles(*targets):
    """Register the decorated handler for these ATen targets (sets or single targets)."""
    flat = []
    for t in targets:
        flat += list(t) if isinstance(t, (set, frozenset, tuple, list)) else [t]

    def register(fn):
        for t in flat:
            HANDLERS[t] = fn
        return fn

    return register


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


class Lowering:
    """The state of one lowering: the float nodes made so far and what each fx value has become."""

    def __init__(self, ep, where: str):
        self.ep, self.where = ep, where
        self.consts = _const_tensors(ep)
        user_inputs = list(ep.graph_signature.user_inputs)
        if len(user_inputs) != 1:
            raise UnsupportedModel(f"{where}: the network must take one input tensor (it takes {len(user_inputs)})")
        self.nodes: list[FNode] = [FNode("input", "input", [])]
        # fx node name -> ("t", index) | ("const", tensor) | ("pad", index, pads) | ("affine", a, b) | None
        self.val: dict[str, object] = {
            user_inputs[0]: ("affine", torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))}
        self.fx_users = {n.name: len(n.users) for n in ep.graph.nodes}
        self.owner_fx: dict[int, str] = {0: user_inputs[0]}
        self.taken: set = set()
        self.materialized: dict[int, int] = {}
        self.out_ref = None

    def run(self) -> list[FNode]:
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.consts:
                    self.val[node.name] = ("const", self.consts[node.name])
                continue
            if node.op == "output":
                outs = node.args[0]
                if len(outs) != 1:
                    raise UnsupportedModel(f"{self.where}: the network must return one tensor (it returns {len(outs)})")
                self.out_ref = outs[0]
                continue
            if node.op != "call_function":
                raise self.err(node, f"unsupported node type {node.op}")
            handler = HANDLERS.get(node.target)
            if handler is None:
                raise self.err(node, "unsupported operation")
            handler(self, node, node.target, _positional_args(node))
        out = self.val.get(self.out_ref.name) if isinstance(self.out_ref, torch.fx.Node) else None
        if out is None or out[0] != "t" or out[1] != len(self.nodes) - 1:
            raise UnsupportedModel(f"{self.where}: the network output must be its last operation")
        self.nodes[0].p.setdefault("scale", 1.0)
        for i, n in enumerate(self.nodes):
            n.p["fx"] = self.owner_fx.get(i)  # the fx value holding this node's output (after fusions)
        return self.nodes

    # ------------------------------------------------------------ helpers of the handlers
    def err(self, node, what):
        return UnsupportedModel(f"{self.where}: node '{node.name}' ({node.target}): {what}")

    def tensor_of(self, node, a):
        return self.val.get(a.name) if isinstance(a, torch.fx.Node) else ("const", a)

    def materialize(self, node, v):
        """A value as a node index (an input affine chain becomes the input or an Affine node)."""
        if v[0] == "t":
            return v[1]
        if v[0] != "affine":
            raise self.err(node, "zero padding feeds something other than a convolution")
        if id(v) not in self.materialized:
            a, b = v[1].flatten(), v[2].flatten()
            if bool((b == 0).all()) and bool((a == a[0]).all()) and float(a[0]) > 0:
                self.nodes[0].p["scale"] = float(a[0])  # a scalar input scale: folded exactly
                self.materialized[id(v)] = 0
            else:
                self.nodes[0].p["scale"] = 1.0
                self.nodes.append(FNode("affine", f"{node.name}.input_normalization", [0], p={"a": a, "b": b}))
                self.nodes[0].users += 1
                self.materialized[id(v)] = len(self.nodes) - 1
        if len(set(self.materialized.values())) > 1:
            raise self.err(node, "the network input is used with two different normalizations")
        return self.materialized[id(v)]

    def new(self, kind, node, inputs, **p):
        self.nodes.append(FNode(kind, node.name, inputs, p=p))
        self.owner_fx[len(self.nodes) - 1] = node.name
        for i in inputs:
            self.nodes[i].users += 1
        return ("t", len(self.nodes) - 1)

    def fusable(self, idx, node_arg):
        """The producer of a value can take a fused op if the fx value has no other user."""
        return self.fx_users.get(node_arg.name, 0) == 1 and self.owner_fx.get(idx) == node_arg.name


# ---------------------------------------------------------------- one handler per operation family


@handles(operator.getitem)
def _getitem(low: Lowering, node, t, args) -> None:
    src = low.val[args[0].name]
    if src[0] == "bn-tuple" and args[1] != 0 and not node.users:
        return  # an unused extra output of batch norm or max pool (kept in loaded .pt2 programs)
    if src[0] != "bn-tuple" or args[1] != 0:
        raise low.err(node, "unsupported tuple output")
    low.val[node.name] = src[1]
    if low.owner_fx.get(src[1][1]) == args[0].name:
        low.owner_fx[src[1][1]] = node.name

@handles(IDENTITY)
def _identity(low: Lowering, node, t, args) -> None:
    if t in SOFTMAX and any(u.op != "output" for u in node.users):
        raise low.err(node, "softmax is only supported as the last operation")
    low.val[node.name] = low.val[args[0].name]

@handles(aten.conv2d.default, aten.conv2d.padding, aten.convolution.default, aten.linear.default)
def _mul_layer(low: Lowering, node, t, args) -> None:
    x = low.val[args[0].name]
    w = low.tensor_of(node, args[1])
    b = low.tensor_of(node, args[2]) if len(args) > 2 and args[2] is not None else None
    if w is None or w[0] != "const" or (b is not None and b[0] != "const"):
        raise low.err(node, "weights must be constants")
    w = w[1].double()
    bias = b[1].double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    extra_pads = (0, 0, 0, 0)
    if x[0] == "pad":
        extra_pads = x[2]
        x = x[1]
    xi = low.materialize(node, x)
    if t == aten.linear.default:
        low.new("mul", node, [xi], op="linear", w=w[:, :, None, None], b=bias, stride=1, pads=(0, 0, 0, 0), groups=1)
    else:
        if t == aten.convolution.default:
            _, _, _, stride, padding, dilation, transposed, _, groups = args[:9]
            if transposed:
                raise low.err(node, "transposed convolution is not supported")
        else:
            stride = args[3] if len(args) > 3 else [1, 1]
            padding = args[4] if len(args) > 4 else [0, 0]
            dilation = args[5] if len(args) > 5 else [1, 1]
            groups = args[6] if len(args) > 6 else 1
        stride = list(stride) if isinstance(stride, (list, tuple)) else [stride, stride]
        if len(stride) == 1:
            stride = stride * 2
        if stride[0] != stride[1]:
            raise low.err(node, f"stride {stride}: only equal strides are supported")
        if any(d != 1 for d in (dilation if isinstance(dilation, (list, tuple)) else [dilation])):
            raise low.err(node, "dilation is not supported")
        try:
            pads = _pads2(padding)
        except UnsupportedModel as e:
            raise low.err(node, str(e)) from None
        pads = tuple(p + e for p, e in zip(pads, extra_pads))
        low.new("mul", node, [xi], op="conv", w=w, b=bias, stride=int(stride[0]), pads=pads, groups=int(groups))
    low.nodes[-1].name = _module_path(node, low.taken)
    low.val[node.name] = ("t", len(low.nodes) - 1)

@handles(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def _batch_norm(low: Lowering, node, t, args) -> None:
    x = low.val[args[0].name]
    if x[0] != "t" or low.nodes[x[1]].kind != "mul" or not low.fusable(x[1], args[0]) or low.nodes[x[1]].p.get("bn"):
        raise low.err(node, "batch norm must follow a convolution or linear layer with no other consumer")
    if t == aten.batch_norm.default:
        gamma, beta, mean, var = (low.tensor_of(node, a) for a in args[1:5])
        training, eps = args[5], args[7]
    else:
        gamma, beta, mean, var = (low.tensor_of(node, a) for a in args[1:5])
        training, eps = False, args[6]
    if training:
        raise low.err(node, "batch norm in training mode (call model.eval() before export)")
    # folded in float64 by numpy element-wise operations (each correctly rounded, never fused)
    mean, var = mean[1].double().numpy(), var[1].double().numpy()
    gamma = gamma[1].double().numpy() if gamma is not None else np.ones_like(mean)
    beta = beta[1].double().numpy() if beta is not None else np.zeros_like(mean)
    fn = low.nodes[x[1]]
    g = np.divide(gamma, np.sqrt(np.add(var, float(eps))))
    fn.p["w"] = torch.from_numpy(np.multiply(fn.p["w"].numpy(), g[:, None, None, None]))
    fn.p["b"] = torch.from_numpy(np.add(np.multiply(np.subtract(fn.p["b"].numpy(), mean), g), beta))
    fn.p["bn"] = True
    low.owner_fx[x[1]] = node.name
    low.val[node.name] = ("bn-tuple", x) if t != aten.batch_norm.default else x
    if t != aten.batch_norm.default:
        low.fx_users[node.name] = 1

@handles(ACTIVATIONS)
def _activation(low: Lowering, node, t, args) -> None:
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
    x = low.val[args[0].name]
    if x[0] != "t":
        raise low.err(node, "activation on the network input")
    src = low.nodes[x[1]]
    if src.kind in ("mul", "add") and src.act is None and low.fusable(x[1], args[0]):
        src.act = (lo, hi)
        low.owner_fx[x[1]] = node.name
        low.val[node.name] = x
    else:
        low.val[node.name] = low.new("clamp", node, [x[1]], lo=lo, hi=hi)

@handles(aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)
def _arithmetic(low: Lowering, node, t, args) -> None:
    a = low.val.get(args[0].name) if isinstance(args[0], torch.fx.Node) else ("const", torch.tensor(float(args[0])))
    b = low.val.get(args[1].name) if isinstance(args[1], torch.fx.Node) else ("const", torch.tensor(float(args[1])))
    alpha = node.kwargs.get("alpha", 1)
    if a[0] == "t" and b[0] == "t":
        if t not in (aten.add.Tensor, aten.add_.Tensor) or alpha != 1:
            raise low.err(node, "only additions of two activations are supported")
        low.val[node.name] = low.new("add", node, [a[1], b[1]])
        return
    if a[0] == "affine" and b[0] == "const" or a[0] == "const" and b[0] == "affine":
        aff, c = (a, b[1]) if a[0] == "affine" else (b, a[1])
        c = c.double().reshape(-1) if c.numel() > 1 else c.double().reshape(1)
        sa, sb = aff[1], aff[2]
        if t in (aten.add.Tensor, aten.add_.Tensor):
            low.val[node.name] = ("affine", sa, sb + c * alpha)
        elif t == aten.sub.Tensor:
            if a[0] != "affine":
                raise low.err(node, "constant minus input is not supported")
            low.val[node.name] = ("affine", sa, sb - c * alpha)
        elif t == aten.mul.Tensor:
            low.val[node.name] = ("affine", sa * c, sb * c)
        else:
            if a[0] != "affine":
                raise low.err(node, "constant divided by input is not supported")
            low.val[node.name] = ("affine", sa / c, sb / c)
        return
    raise low.err(node, "arithmetic with constants is only supported on the network input (normalization)")

@handles(aten.pad.default, aten.constant_pad_nd.default)
def _pad(low: Lowering, node, t, args) -> None:
    x = low.val[args[0].name]
    pad = list(args[1])
    mode = args[2] if t == aten.pad.default and len(args) > 2 else "constant"
    value = (args[3] if t == aten.pad.default and len(args) > 3 else (args[2] if t == aten.constant_pad_nd.default and len(args) > 2 else 0)) or 0
    if mode != "constant" or value != 0 or len(pad) != 4 or any(p < 0 for p in pad):
        raise low.err(node, "only zero padding of height and width is supported")
    if x[0] == "pad":
        raise low.err(node, "padding of padding is not supported")
    if not all(u.target in (aten.conv2d.default, aten.convolution.default) for u in node.users):
        raise low.err(node, "zero padding must feed convolutions only")
    low.val[node.name] = ("pad", x, tuple(int(p) for p in pad))

@handles(aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.avg_pool2d.default)
def _pool(low: Lowering, node, t, args) -> None:
    x = low.val[args[0].name]
    if x[0] != "t":
        raise low.err(node, "pooling of the network input")
    k = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]] * 2
    k = k * 2 if len(k) == 1 else k
    s = list(args[2]) if len(args) > 2 and args[2] else k
    s = s * 2 if len(s) == 1 else s
    pad = list(args[3]) if len(args) > 3 else [0, 0]
    pad = pad * 2 if len(pad) == 1 else pad
    ceil = args[5] if t != aten.avg_pool2d.default and len(args) > 5 else (args[4] if t == aten.avg_pool2d.default and len(args) > 4 else False)
    if t != aten.avg_pool2d.default and len(args) > 4 and any(d != 1 for d in args[4]):
        raise low.err(node, "pool dilation is not supported")
    if ceil or s[0] != s[1]:
        raise low.err(node, "ceil_mode and unequal strides are not supported")
    cip = args[5] if t == aten.avg_pool2d.default and len(args) > 5 else True
    if t == aten.avg_pool2d.default and len(args) > 6 and args[6] is not None:
        raise low.err(node, "divisor_override is not supported")
    low.val[node.name] = low.new("pool", node, [x[1]], op="max" if t != aten.avg_pool2d.default else "avg",
                         kernel=(int(k[0]), int(k[1])), stride=int(s[0]), pads=(pad[1], pad[1], pad[0], pad[0]),
                         count_include_pad=bool(cip))
    if t == aten.max_pool2d_with_indices.default:
        low.val[node.name] = ("bn-tuple", low.val[node.name])

@handles(aten.adaptive_avg_pool2d.default, aten.mean.dim)
def _global_pool(low: Lowering, node, t, args) -> None:
    x = low.val[args[0].name]
    if t == aten.adaptive_avg_pool2d.default:
        if list(args[1]) not in ([1, 1], [1]):
            raise low.err(node, "adaptive average pooling only to 1x1")
        keep = True
    else:
        dims = sorted(d % 4 for d in args[1])
        if dims != [2, 3]:
            raise low.err(node, "mean only over height and width")
        keep = bool(args[2]) if len(args) > 2 else False
    low.val[node.name] = low.new("pool", node, [x[1]], op="avg", kernel=None, stride=1, pads=(0, 0, 0, 0),
                         count_include_pad=True)
    if not keep:
        low.val[node.name] = low.new("flatten", node, [low.val[node.name][1]])

@handles(aten.sym_size.int)  # a shape query (older torch.export: view(x, [x.size(0), -1]))
def _sym_size(low: Lowering, node, t, args) -> None:
    low.val[node.name] = ("size", None)

@handles(RESHAPES)
def _reshape(low: Lowering, node, t, args) -> None:
    x = low.val[args[0].name]
    if t == aten.flatten.using_ints:
        ok = (args[1] if len(args) > 1 else 0) == 1 and (args[2] if len(args) > 2 else -1) in (-1, 3)
    else:
        shape = list(args[1])
        ok = len(shape) == 2
    if not ok:
        raise low.err(node, "only flattening to [batch, features] is supported")
    low.val[node.name] = low.new("flatten", node, [x[1]])

@handles(aten.cat.default)
def _concat(low: Lowering, node, t, args) -> None:
    dim = args[1] if len(args) > 1 else 0
    if dim not in (1, -3):
        raise low.err(node, "concatenation only along channels")
    ins = [low.val[a.name] for a in args[0]]
    if any(v[0] != "t" for v in ins):
        raise low.err(node, "concatenation of the network input")
    low.val[node.name] = low.new("concat", node, [v[1] for v in ins])


def lower(ep, where: str) -> list[FNode]:
    """The exported program as float nodes (see ``maxdnn.frontends.pytorch``); node 0 is the input."""
    return Lowering(ep, where).run()
