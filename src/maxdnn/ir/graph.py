"""The 8-bit integer graph of a quantized CNN and its fast exact engine.

A ``QuantizedGraph`` is a list of integer nodes in execution order; every node
names the nodes it reads. A stored integer q of a tensor stands for the real
value ``scale * (q - zero_point)`` (``QParams``). 8-bit tensors are unsigned
(0..255, zero point 0: after a ReLU) or signed (-128..127, zero point 0: a
layer input that can be negative, e.g. a normalized image or a linear
bottleneck); a "wide" tensor (no clamp) is a convolution's output requantized
straight into the scale of the addition that consumes it.

Nodes:

- ``MulLayer`` (conv or linear, the multiplying layers): the operand x - zp of
  the input times int8 symmetric per-channel weights, accumulated with an
  int32 bias, requantized per output channel by a fixed-point multiplier
  ((acc * m0 + 2^(shift-1)) >> shift, round half up; imported models keep their
  runtime's requantization, ``Requant``'s other modes), plus the output zero
  point, clamped (the fused ReLU / ReLU6 / clamp) unless wide. Any stride,
  explicit (left, right, top, bottom) zero padding (no product is formed
  there), groups (depthwise included);
- ``Add`` and ``Concat``: each input requantized into the output scale (or
  already in it), summed or concatenated along channels, clamped;
- ``TfliteAdd`` and ``OrtAdd``: the additions of imported TFLite and ONNX
  models, in those runtimes' own arithmetic;
- ``Affine``: per-channel integer rescale with offset (an input normalization
  (x - mean) / std quantized by the importer);
- ``Clamp`` (a ReLU that could not be fused), ``MaxPool``, ``AvgPool`` (global
  or windowed; the mean is rounded half up: floor((sum + n/2) / n)) and
  ``Flatten``.

``QuantizedGraph.forward_int`` is the fast exact engine: every value is an
integer held exactly in floating point (8-bit tensors in float32, wide ones and
requantization in float64, where (acc + bias) * m0 + 2^(shift-1) < 2^53 holds
by the choice of m0's width). ``maxdnn.engine.reference.reference_forward`` is the
slow integer ground truth it is tested against. ``float_forward`` runs the same
graph in real numbers without rounding (dequantized weights; differentiable),
for gradients.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import atomic_path, load_npz
from maxdnn.ir._requant_kernel import add_half_up, requant_half_up, tflite_requant
from maxdnn.ir.quant import Requant, conv_out_hw, float_conv_exact, layer_bound, tflite_multiply_torch, tflite_single_multiply

GRAPH_FORMAT = "maxdnn-qgraph-v1"
GRAPH_BITS = 8  # operand width of every multiplying layer (x and w)
U8 = (0, 255)
S8 = (-128, 127)


class GraphError(MaxdnnError, ValueError):
    """A malformed or unreadable quantized graph, as one line."""


@dataclass
class QParams:
    """real = scale * (q - zero_point); stored q in [lo, hi] (None: wide, unclamped)."""

    scale: float
    zero_point: int = 0
    lo: int | None = 0
    hi: int | None = 255

    @property
    def wide(self) -> bool:
        return self.lo is None

    @property
    def operand_range(self) -> tuple[int, int]:
        """Range of q - zero_point (what a multiplier sees)."""
        return self.lo - self.zero_point, self.hi - self.zero_point

    def to_json(self):
        return [self.scale, self.zero_point, self.lo, self.hi]

    @classmethod
    def from_json(cls, v):
        return cls(float(v[0]), int(v[1]), None if v[2] is None else int(v[2]), None if v[3] is None else int(v[3]))


@dataclass
class Node:
    name: str
    inputs: list[str]
    out: QParams

    kind: ClassVar[str] = "node"
    arrays: ClassVar[tuple[str, ...]] = ()  # array attributes saved beside the JSON description

    def params(self) -> dict:
        return {}


@dataclass
class MulLayer(Node):
    """A multiplying layer: conv2d or linear (a 1x1 conv over [N, C, 1, 1])."""

    op: str = "conv"  # "conv" or "linear"
    weight: np.ndarray = None  # int64 [F, C/groups, kh, kw]
    bias: np.ndarray = None  # int64 [F], accumulator units
    w_scale: np.ndarray = None  # float64 [F]
    requant: Requant = None
    in_q: QParams = None
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # (left, right, top, bottom)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)

    kind = "mul"
    arrays = ("weight", "bias", "w_scale", "m0", "shift")

    @property
    def in_scale(self) -> float:
        return self.in_q.scale

    @property
    def acc_scale(self) -> np.ndarray:
        return self.in_q.scale * self.w_scale

    @property
    def x_signed(self) -> bool:
        return self.in_q.operand_range[0] < 0

    @property
    def out_hw(self) -> tuple[int, int]:
        return conv_out_hw(self.in_hw, self.weight.shape[2:], self.stride, self.pads)

    def requant_bound(self, bits: int = 8) -> int:
        """|accumulator + bias| bound for any multiplier with |product| <= 2^(2 bits - 1)."""
        k = int(np.prod(self.weight.shape[1:]))
        return k * (1 << (2 * bits - 1)) + int(np.abs(self.bias).max())

    def float_requant_exact(self) -> bool:
        """The fast engine's float64 requantization stays exact for every accumulator this layer can form
        (TFLite modes requantize in integers)."""
        if self.requant.mode != "half_up":
            return True
        return self.requant_bound().bit_length() + int(self.requant.m0.max()).bit_length() <= 53

    @cached_property
    def exact_bound(self) -> int:
        lo, hi = self.in_q.operand_range
        return layer_bound(self.weight, max(abs(lo), abs(hi)))

    def params(self):
        return {"op": self.op, "in_q": self.in_q.to_json(), "stride": self.stride, "pads": list(self.pads),
                "groups": self.groups, "in_hw": list(self.in_hw), "rq_mode": self.requant.mode}


@dataclass
class Merge(Node):
    """Add or Concat: input i requantized by ``requants[i]`` (None: already in the output scale)."""

    in_zps: list[int] = field(default_factory=list)
    requants: list[Requant | None] = field(default_factory=list)

    def params(self):
        return {"in_zps": self.in_zps, "requants": [_rq_json(r) for r in self.requants]}


class Add(Merge):
    kind = "add"


class Concat(Merge):
    kind = "concat"


@dataclass
class TfliteAdd(Merge):
    """TFLite's int8 ADD: each input (q - zp) << left_shift rescaled by its own multiplier (TFLite mode),
    summed, rescaled by ``out_requant``, plus the output zero point, clamped."""

    left_shift: int = 20
    out_requant: Requant = None

    kind = "add_tflite"

    def params(self):
        return {**super().params(), "left_shift": self.left_shift, "out_requant": _rq_json(self.out_requant)}


@dataclass
class OrtAdd(Merge):
    """onnxruntime's QLinearAdd (its AVX2 kernel): with float32 ratios r_i = s_i / s_out and
    ``fixed`` = zp_out - (r_0 zp_0 + r_1 zp_1) (float32), y = nearest-even integer of
    fma(q_0, r_0, fma(q_1, r_1, fixed)) in float32, clamped (``in_zps`` are kept for the real-valued twin)."""

    ratios: list[float] = field(default_factory=list)
    fixed: float = 0.0

    kind = "add_ort"

    def params(self):
        return {**super().params(), "ratios": [float(r) for r in self.ratios], "fixed": float(self.fixed)}


def _rq_json(r):
    return None if r is None else [r.m0.tolist(), r.shift.tolist(), r.mode]


def _rq_from_json(v):
    return None if v is None else Requant(np.asarray(v[0], np.int64), np.asarray(v[1], np.int64),
                                          v[2] if len(v) > 2 else "half_up")


@dataclass
class Affine(Node):
    """Per channel c: requant((q - zp_in) + offset[c]) + zp_out, clamped; the real value of
    (q - zp_in) + offset[c] is acc_scale[c] times it."""

    in_zp: int = 0
    in_scale: float = 1.0
    offset: np.ndarray = None  # int64 [C], input units
    acc_scale: np.ndarray = None  # float64 [C]
    requant: Requant = None

    kind = "affine"
    arrays = ("offset", "acc_scale", "m0", "shift")

    def params(self):
        return {"in_zp": self.in_zp, "in_scale": self.in_scale}


@dataclass
class Clamp(Node):
    kind = "clamp"


@dataclass
class Pool(Node):
    """Max or average pooling; ``kernel`` None: global (over the whole map).

    Average rounding "half_up": floor((sum(q - zp) + n/2) / n) + zp with n the window (or the in-bounds
    count without ``count_include_pad``); "tflite": TFLite's int8 AVERAGE_POOL_2D, the raw values'
    in-bounds sum divided by their count, rounded half away from zero, then clamped; "float32" (onnxruntime's
    QLinearGlobalAveragePool): sum(q - in_zp) requantized by the float32 ``scale`` (as ``Requant`` mode "float32"),
    plus the output zero point, clamped."""

    op: str = "max"  # "max" or "avg"
    kernel: tuple[int, int] | None = None
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    count_include_pad: bool = True
    rounding: str = "half_up"
    in_zp: int = 0  # "float32" only
    scale: float = 0.0  # "float32" only: float32 s_in / (s_out * window)

    kind = "pool"

    def params(self):
        extra = {"in_zp": self.in_zp, "scale": float(self.scale)} if self.rounding == "float32" else {}
        return {"op": self.op, "kernel": None if self.kernel is None else list(self.kernel), "stride": self.stride,
                "pads": list(self.pads), "count_include_pad": self.count_include_pad, "rounding": self.rounding,
                **extra}


@dataclass
class Flatten(Node):
    kind = "flatten"


NODE_TYPES = {c.kind: c for c in (MulLayer, Add, Concat, TfliteAdd, OrtAdd, Affine, Clamp, Pool, Flatten)}


def unique_name(base: str, taken: set) -> str:
    """``base``, or ``base#2``, ``base#3``... : the first not in ``taken`` (which it joins)."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}#{k}"
    taken.add(name)
    return name


def _chan(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


@dataclass
class QuantizedGraph:
    """The 8-bit integer graph (module docstring): nodes in execution order, the fast exact engine, saving.

    Example::

        graph = maxdnn.quantize(maxdnn.load_model("resnet8"), train.images[:1000])
        logits = graph.outputs(test.images)         # int64 [N, 10], the integer engine's
        graph.save("g.npz"); again = maxdnn.QuantizedGraph.load("g.npz")
        assert again.digest() == graph.digest()     # the same arithmetic, byte for byte
    """

    input_q: QParams
    input_shape: tuple[int, int, int]  # C, H, W
    nodes: list[Node]
    meta: dict = field(default_factory=dict)
    pixel_offset: int = 0  # the input's stored integer is pixel + pixel_offset (TFLite int8 input: -128)

    # ------------------------------------------------------------ structure
    @cached_property
    def layers(self) -> dict[str, MulLayer]:
        """The multiplying layers in execution order, by name."""
        return {n.name: n for n in self.nodes if isinstance(n, MulLayer)}

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    @property
    def output_scale(self) -> float:
        return self.output.out.scale

    logit_scale = output_scale

    def describe_layers(self) -> list[dict]:
        counts = multiplication_counts(self)
        return [{"name": n, "kind": "depthwise conv" if l.groups > 1 and l.groups == l.weight.shape[0] and l.weight.shape[1] == 1
                 else ("grouped conv" if l.groups > 1 else l.op),
                 "weight_shape": list(l.weight.shape), "stride": l.stride, "groups": l.groups, "input_hw": list(l.in_hw),
                 "multiplications": counts[n] * int(l.weight.shape[0] * l.weight.shape[1]),
                 "input": "signed" if l.x_signed else "unsigned", "input_range": list(l.in_q.operand_range)}
                for n, l in self.layers.items()]

    # ------------------------------------------------------------ fast exact engine
    def exact_conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Exact accumulators (without bias; a float tensor of integers) of layer ``name`` for operands x."""
        layer = self.layers[name]
        w = graph_torch_params(self, x.device)[name]["w"]
        return float_conv_exact(x, w, layer.stride, layer.pads, layer.exact_bound, layer.groups)

    @torch.no_grad()
    def forward_int(self, x: torch.Tensor, conv: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    taps: dict | None = None) -> torch.Tensor:
        """The graph's integer output (int64) for integer input x [N, C, H, W].

        ``conv(name, operands) -> accumulators`` replaces the exact product of
        every multiplying layer (the approximate engine plugs in here): the
        operands are q - zero_point of the layer's input as a float32 tensor of
        integers ([N, C, H, W]; [N, C, 1, 1] for linear layers), the result a
        float tensor of the exact integer accumulators. ``taps``, when given,
        receives each layer's operands.
        """
        return self.forward_shared(x, [conv or self.exact_conv], None, taps)[0]

    @torch.no_grad()
    def forward_shared(self, x: torch.Tensor, convs: list[Callable[[str, torch.Tensor], torch.Tensor]],
                       keys: list[dict] | None = None, taps: dict | None = None) -> list[torch.Tensor]:
        """``forward_int`` for several products at once, sharing the work they have in common.

        ``keys[i][layer]`` says what ``convs[i]`` computes at a multiplying layer: members with equal keys
        at every layer so far hold equal values, so their common prefix of the graph (for example the
        exact layers before the first approximated one) runs once, and the graph branches where their
        keys first differ. Branches run depth first, each value freed after its last use. Returns
        every member's integer output, in order.
        """
        nodes = self.nodes
        p = graph_torch_params(self, x.device)
        last_use = {}
        for i, n in enumerate(nodes):
            for inp in n.inputs:
                last_use[inp] = i
        last_use[self.output.name] = len(nodes)
        first = x.to(torch.float32) + self.pixel_offset if self.pixel_offset else x.to(torch.float32)
        if x.device.type == "cpu" and x.dim() == 4:
            first = first.contiguous(memory_format=torch.channels_last)  # oneDNN prefers NHWC
        outs: list[torch.Tensor | None] = [None] * len(convs)

        def run(i: int, vals: dict, members: list[int]) -> None:
            while i < len(nodes):
                n = nodes[i]
                if isinstance(n, MulLayer) and keys is not None and len(members) > 1:
                    branches: dict = {}
                    for m in members:
                        branches.setdefault(keys[m][n.name], []).append(m)
                    if len(branches) > 1:
                        for sub in branches.values():
                            mine = dict(vals)
                            _eval_node(n, mine, convs[sub[0]], p, taps)
                            _free(mine, i)
                            run(i + 1, mine, sub)
                        return
                _eval_node(n, vals, convs[members[0]], p, taps)
                _free(vals, i)
                i += 1
            out = vals[self.output.name].to(torch.int64)
            for m in members:
                outs[m] = out

        def _free(vals: dict, i: int) -> None:
            for k in [k for k in vals if last_use.get(k, -1) <= i]:
                del vals[k]

        run(0, {"input": first}, list(range(len(convs))))
        return outs

    def outputs(self, images: np.ndarray, batch_size: int = 100, device: str = "cpu", conv=None) -> np.ndarray:
        """The integer output tensor for every image (int64 [N, ...])."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i:i + batch_size], device=device)
            out.append(self.forward_int(x, conv).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), dtype=np.int64)

    def predict(self, images: np.ndarray, batch_size: int = 100, device: str = "cpu", conv=None) -> np.ndarray:
        out = self.outputs(images, batch_size, device, conv)
        return out.argmax(1) if len(out) else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------ real-valued twin
    def float_forward(self, x: torch.Tensor, outputs: dict | None = None) -> torch.Tensor:
        """The graph in real numbers without rounding (dequantized weights and biases, clamps at the
        real range): differentiable. ``outputs`` receives each multiplying layer's real
        pre-activation output (acc + bias) * acc_scale, with its gradient retained (a backward pass
        leaves d loss / d output in its ``.grad``)."""
        q0 = self.input_q
        vals = {"input": (x.double() + self.pixel_offset - q0.zero_point) * q0.scale}
        if outputs is not None:
            vals["input"].requires_grad_(True)
        for n in self.nodes:
            ins = [vals[i] for i in n.inputs]
            if isinstance(n, MulLayer):
                w = torch.as_tensor(n.weight * n.w_scale[:, None, None, None])
                b = torch.as_tensor(n.bias * n.acc_scale)
                xin = ins[0][:, :, None, None] if n.op == "linear" else F.pad(ins[0], n.pads)
                y = F.conv2d(xin, w, b, stride=n.stride, groups=n.groups)
                if outputs is not None:
                    y.retain_grad()
                    outputs[n.name] = y
                y = y.flatten(1) if n.op == "linear" else y
            elif isinstance(n, Merge):
                y = torch.cat(ins, 1) if isinstance(n, Concat) else sum(ins[1:], ins[0])
            elif isinstance(n, Affine):
                a = torch.as_tensor(n.acc_scale)
                y = ins[0] * _chan(a / n.in_scale, ins[0].dim()) + _chan(a * n.offset, ins[0].dim())
            elif isinstance(n, Clamp):
                y = ins[0]
            elif isinstance(n, Pool):
                y = _pool_real(ins[0], n)
            else:
                y = ins[0].flatten(1)
            if not n.out.wide and not isinstance(n, (Pool, Flatten)):
                s, zp = n.out.scale, n.out.zero_point
                y = y.clamp((n.out.lo - zp) * s, (n.out.hi - zp) * s)
            vals[n.name] = y
        return vals[self.output.name]

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """One .npz: the JSON description under "graph", each node's arrays as "<node>/<array>"."""
        doc, arrays = _graph_to_doc(self)
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, graph=np.array(json.dumps(doc)), **arrays)

    def digest(self) -> str:
        """SHA-256 (hex) of the graph's arithmetic: its description and every array, metadata left out; two
        graphs with the same digest compute the same integers.

        Example::

            tuned = maxdnn.QuantizedGraph.load("ft.npz")
            tuned.digest() != graph.digest()   # fine-tuning moved its weights
        """
        doc, arrays = _graph_to_doc(self)
        doc.pop("meta")
        h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
        for k in sorted(arrays):
            a = np.ascontiguousarray(arrays[k])
            h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizedGraph":
        path = Path(path)
        arrays = load_npz(path, GraphError, "a maxdnn quantized graph")
        try:
            doc = json.loads(str(arrays.pop("graph")))
            if not isinstance(doc, dict) or doc.get("format") != GRAPH_FORMAT:
                raise GraphError(f"{path}: not a maxdnn quantized graph "
                                 f"(format {doc.get('format') if isinstance(doc, dict) else None!r})")
            return _graph_from_doc(doc, arrays)
        except GraphError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as e:
            raise GraphError(f"{path}: not a readable maxdnn quantized graph ({type(e).__name__})") from None


# ---------------------------------------------------------------- persistence


def _graph_to_doc(g: QuantizedGraph) -> tuple[dict, dict[str, np.ndarray]]:
    arrays = {}
    doc = {"format": GRAPH_FORMAT, "input_q": g.input_q.to_json(), "input_shape": list(g.input_shape),
           "pixel_offset": g.pixel_offset, "meta": g.meta, "nodes": []}
    for n in g.nodes:
        doc["nodes"].append({"kind": n.kind, "name": n.name, "inputs": n.inputs, "out": n.out.to_json(), **n.params()})
        for a in n.arrays:
            arrays[f"{n.name}/{a}"] = getattr(n.requant, a) if a in ("m0", "shift") else getattr(n, a)
    return doc, arrays


def _graph_from_doc(doc, arrays) -> QuantizedGraph:
    nodes = []
    for d in doc["nodes"]:
        name, kind = d["name"], d["kind"]
        common = {"name": name, "inputs": list(d["inputs"]), "out": QParams.from_json(d["out"])}

        def rq():
            return Requant(arrays[f"{name}/m0"], arrays[f"{name}/shift"], d.get("rq_mode", "half_up"))

        if kind == "mul":
            nodes.append(MulLayer(**common, op=d["op"], weight=arrays[f"{name}/weight"], bias=arrays[f"{name}/bias"],
                                  w_scale=arrays[f"{name}/w_scale"], requant=rq(), in_q=QParams.from_json(d["in_q"]),
                                  stride=int(d["stride"]), pads=tuple(d["pads"]), groups=int(d["groups"]),
                                  in_hw=tuple(d["in_hw"])))
        elif kind in ("add", "concat"):
            rqs = [_rq_from_json(r) for r in d["requants"]]
            nodes.append(NODE_TYPES[kind](**common, in_zps=list(d["in_zps"]), requants=rqs))
        elif kind == "add_ort":
            nodes.append(OrtAdd(**common, in_zps=list(d["in_zps"]), requants=[None] * len(d["in_zps"]),
                                ratios=[float(r) for r in d["ratios"]], fixed=float(d["fixed"])))
        elif kind == "add_tflite":
            nodes.append(TfliteAdd(**common, in_zps=list(d["in_zps"]), requants=[_rq_from_json(r) for r in d["requants"]],
                                   left_shift=int(d["left_shift"]), out_requant=_rq_from_json(d["out_requant"])))
        elif kind == "affine":
            nodes.append(Affine(**common, in_zp=int(d["in_zp"]), in_scale=float(d["in_scale"]),
                                offset=arrays[f"{name}/offset"], acc_scale=arrays[f"{name}/acc_scale"], requant=rq()))
        elif kind == "pool":
            nodes.append(Pool(**common, op=d["op"], kernel=None if d["kernel"] is None else tuple(d["kernel"]),
                              stride=int(d["stride"]), pads=tuple(d["pads"]),
                              count_include_pad=bool(d["count_include_pad"]), rounding=d.get("rounding", "half_up"),
                              in_zp=int(d.get("in_zp", 0)), scale=float(d.get("scale", 0.0))))
        elif kind in NODE_TYPES:
            nodes.append(NODE_TYPES[kind](**common))
        else:
            raise GraphError(f"node {name}: unknown kind {kind!r}")
    return QuantizedGraph(QParams.from_json(doc["input_q"]), tuple(doc["input_shape"]), nodes, doc.get("meta", {}),
                          int(doc.get("pixel_offset", 0)))


def multiplication_counts(qnet) -> dict[str, int]:
    """Multiplications per kernel (f, c) per image, per layer (padding excluded)."""
    counts = {}
    for name, layer in qnet.layers.items():
        kh, kw = layer.weight.shape[2:]
        h, w = layer.in_hw
        left, r, t, b = layer.pads
        ho, wo = layer.out_hw
        rows = sum(1 for oh in range(ho) for i in range(kh) if 0 <= oh * layer.stride + i - t < h)
        cols = sum(1 for ow in range(wo) for j in range(kw) if 0 <= ow * layer.stride + j - left < w)
        counts[name] = rows * cols
    return counts


# ---------------------------------------------------------------- the fast engine's nodes


def graph_torch_params(graph: "QuantizedGraph", device) -> dict:
    """Each node's weights, biases and requantization constants as tensors on ``device`` (cached on the
    graph, per device), in the forms ``_eval_node`` takes."""
    key = str(device)
    cache = graph.__dict__.setdefault("_tp", {})
    if key not in cache:
        def rq(r):
            if r.mode == "float32":
                return ("float32", torch.as_tensor(r.float32_scales(), device=device))
            if r.mode.startswith("tflite"):
                return (r.mode, torch.as_tensor(r.m0, device=device), torch.as_tensor(r.shift, device=device))
            return (torch.as_tensor(r.m0, device=device, dtype=torch.float64),
                    torch.as_tensor(2.0 ** (r.shift - 1), device=device),
                    torch.as_tensor(2.0 ** -r.shift.astype(np.float64), device=device))

        p = {}
        for n in graph.nodes:
            if isinstance(n, MulLayer):
                p[n.name] = {"w": torch.as_tensor(n.weight, device=device),
                             "b": torch.as_tensor(n.bias, device=device, dtype=torch.float64), "rq": rq(n.requant)}
            elif isinstance(n, OrtAdd):
                p[n.name] = {"rq": [None, None]}
            elif isinstance(n, Merge):
                p[n.name] = {"rq": [None if r is None else rq(r) for r in n.requants]}
                if isinstance(n, TfliteAdd):
                    p[n.name]["out"] = rq(n.out_requant)
            elif isinstance(n, Affine):
                p[n.name] = {"off": torch.as_tensor(n.offset, device=device, dtype=torch.float64), "rq": rq(n.requant)}
        cache[key] = p
    return cache[key]


def _eval_node(n: Node, vals: dict, conv, p: dict, taps: dict | None) -> None:
    """Compute node ``n`` of the fast exact engine into ``vals`` from its inputs there."""
    def requant(t, r):
        if r[0] == "float32":  # onnxruntime: float32 product, nearest even (torch.round)
            return torch.round(t.to(torch.float32) * _chan(r[1], t.dim())).to(torch.float64)
        if isinstance(r[0], str):  # TFLite: integer arithmetic (the products exceed float64's exact range)
            if t.device.type == "cpu":  # one compiled pass instead of ~20 int64 tensor passes
                t4 = t.reshape(t.shape[:2] + (1,) * (4 - t.dim())) if t.dim() < 4 else t
                out = tflite_requant(t4.to(torch.float64).numpy(), r[1].numpy(), r[2].numpy(), r[0] != "tflite")
                return torch.from_numpy(out).reshape(t.shape)
            m0, shift = (_chan(v, t.dim()) for v in r[1:])
            f = tflite_multiply_torch if r[0] == "tflite" else tflite_single_multiply
            return f(t.to(torch.int64), m0, shift).to(torch.float64)
        m0, half, inv = (_chan(v, t.dim()) for v in r)
        return t.to(torch.float64).mul_(m0).add_(half).mul_(inv).floor_()

    def finish(t, q: QParams):
        if q.zero_point:
            t = t.add_(q.zero_point)
        if q.wide:
            return t.to(torch.float64)
        return t.clamp_(q.lo, q.hi).to(torch.float32)

    ins = [vals[i] for i in n.inputs]
    if isinstance(n, MulLayer):
        xin = ins[0]
        if n.in_q.zero_point:
            xin = xin - n.in_q.zero_point
        if n.op == "linear":
            xin = xin[:, :, None, None]
        if taps is not None:
            taps[n.name] = xin
        acc = conv(n.name, xin)
        r = p[n.name]["rq"]
        if acc.device.type == "cpu" and not isinstance(r[0], str):
            y = _requant_cpu(acc, p[n.name]["b"], r, n.out)  # one compiled pass
        else:
            y = finish(requant(acc.to(torch.float64).add_(_chan(p[n.name]["b"], 4)), r), n.out)
        vals[n.name] = y.flatten(1) if n.op == "linear" else y
    elif isinstance(n, OrtAdd):
        vals[n.name] = finish(ort_add(ins[0], ins[1], n), QParams(n.out.scale, 0, n.out.lo, n.out.hi))  # zp in fixed
    elif isinstance(n, TfliteAdd):
        parts = [requant((v.to(torch.float64) - zp) * float(1 << n.left_shift), r)
                 for v, zp, r in zip(ins, n.in_zps, p[n.name]["rq"])]
        vals[n.name] = finish(requant(parts[0] + parts[1], p[n.name]["out"]), n.out)
    elif (isinstance(n, Add) and len(ins) == 2 and ins[0].device.type == "cpu" and ins[0].dim() == 4
          and ins[0].shape == ins[1].shape and not any(r is not None and isinstance(r[0], str) for r in p[n.name]["rq"])):
        vals[n.name] = _add_cpu(ins, n, p[n.name]["rq"])  # one compiled pass
    elif isinstance(n, Merge):
        parts = []
        for v, zp, r in zip(ins, n.in_zps, p[n.name]["rq"]):
            v = v.to(torch.float64) - zp if zp else v.to(torch.float64)
            parts.append(v if r is None else requant(v, r))
        t = torch.cat(parts, 1) if isinstance(n, Concat) else sum(parts[1:], parts[0].clone())
        vals[n.name] = finish(t, n.out)
    elif isinstance(n, Affine):
        t = ins[0].to(torch.float64) - n.in_zp + _chan(p[n.name]["off"], ins[0].dim())
        vals[n.name] = finish(requant(t, p[n.name]["rq"]), n.out)
    elif isinstance(n, Clamp):
        vals[n.name] = ins[0].clamp(n.out.lo, n.out.hi)
    elif isinstance(n, Pool):
        vals[n.name] = _pool_float(ins[0], n)
    elif isinstance(n, Flatten):
        vals[n.name] = ins[0].flatten(1)
    else:  # pragma: no cover - every node type is handled above
        raise GraphError(f"node {n.name}: unknown kind {n.kind}")


def ort_add(a: torch.Tensor, b: torch.Tensor, n: "OrtAdd") -> torch.Tensor:
    """QLinearAdd before the clamp: each fused multiply-add is exact in float64 (the importer checks the
    operands' exponents) and rounded once to float32, as the hardware FMA rounds it."""
    r0, r1 = (float(np.float32(r)) for r in n.ratios)
    t = (b.to(torch.float64) * r1 + float(np.float32(n.fixed))).to(torch.float32).to(torch.float64)
    return torch.round((a.to(torch.float64) * r0 + t).to(torch.float32)).to(torch.float64)


def pixel_rows(t: torch.Tensor, writable: bool = False) -> torch.Tensor | None:
    """A [N, C, H, W] tensor as [N*H*W, C]: a view when its memory is channels_last. Otherwise a copy, which
    serves reading only; with ``writable`` the answer is then None, since writes into a copy would be lost."""
    rows = t.permute(0, 2, 3, 1)
    try:
        return rows.view(-1, t.shape[1])
    except RuntimeError:
        return None if writable else rows.reshape(-1, t.shape[1])


def _requant_cpu(acc: torch.Tensor, bias: torch.Tensor, rq, q: QParams) -> torch.Tensor:
    """A layer's accumulators [N, F, H, W] (float, integer values) to its output codes, in the layout of ``acc``:
    bias, half-up requantization, zero point and clamp in one compiled pass (``requant_half_up``)."""
    fmt = torch.channels_last if acc.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty(acc.shape, dtype=torch.float64 if q.wide else torch.float32, memory_format=fmt)
    m0, half, inv = rq
    requant_half_up(acc.permute(0, 2, 3, 1).numpy(), bias.numpy(), m0.numpy(), half.numpy(), inv.numpy(),
                    float(q.zero_point), float(q.lo or 0), float(q.hi or 0), q.wide, out.permute(0, 2, 3, 1).numpy())
    return out


def _add_cpu(ins: list[torch.Tensor], n: "Add", rqs) -> torch.Tensor:
    """A two-input Add's output codes in one compiled pass (``add_half_up``), in the layout of its first input."""
    a, b = ins
    q = n.out
    c = a.shape[1]
    out = torch.empty(a.shape, dtype=torch.float64 if q.wide else torch.float32, memory_format=torch.channels_last)

    def table(zp, r):  # [4, C]: zero point, m0, half, inv per channel (no requantization: 1, 0, 1)
        rows = [torch.ones(1), torch.zeros(1), torch.ones(1)] if r is None else list(r)
        rows = [torch.full((1,), float(zp))] + rows
        return np.ascontiguousarray(torch.stack([t.reshape(-1).to(torch.float64).expand(c) for t in rows]).numpy())

    add_half_up(pixel_rows(a).numpy(), pixel_rows(b).numpy(), table(n.in_zps[0], rqs[0]), table(n.in_zps[1], rqs[1]),
                float(q.zero_point), float(q.lo or 0), float(q.hi or 0), q.wide, pixel_rows(out, writable=True).numpy())
    return out if a.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


# ---------------------------------------------------------------- pooling


def pool_window(n: Pool, hw) -> tuple[tuple[int, int], int, tuple[int, int, int, int]]:
    """(kernel, stride, pads) of a pool node on an input of size hw (global: the whole map)."""
    if n.kernel is None:
        return tuple(hw), 1, (0, 0, 0, 0)
    return n.kernel, n.stride, n.pads


def _pool_float(x: torch.Tensor, n: Pool) -> torch.Tensor:
    """Exact integer pooling on a float tensor of integers (zero point 0 after subtracting it)."""
    k, s, pads = pool_window(n, x.shape[2:])
    zp = n.out.zero_point
    if n.op == "max":
        xp = F.pad(x, pads, value=float("-inf")) if any(pads) else x
        return F.max_pool2d(xp, k, s).clamp_(n.out.lo, n.out.hi)
    if n.rounding == "float32":  # integer sums (exact in float64), then onnxruntime's float32 requantization
        sums = F.avg_pool2d(x.to(torch.float64) - n.in_zp, k, s, divisor_override=1)
        q = torch.round(sums.to(torch.float32) * torch.tensor(n.scale, dtype=torch.float32)) + zp
        return q.clamp_(n.out.lo, n.out.hi)
    if n.rounding == "tflite":
        x64 = x.to(torch.float64)
        xp = F.pad(x64, pads) if any(pads) else x64
        sums = F.avg_pool2d(xp, k, s, divisor_override=1)
        ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=torch.float64, device=x.device), pads)
        count = F.avg_pool2d(ones, k, s, divisor_override=1)
        q = torch.floor((sums.abs() + torch.floor(count / 2)) / count)  # exact: a quotient of integers, floored
        return torch.where(sums > 0, q, -q).clamp_(n.out.lo, n.out.hi).to(torch.float32)
    x64 = x.to(torch.float64) - zp if zp else x.to(torch.float64)
    xp = F.pad(x64, pads) if any(pads) else x64
    sums = F.avg_pool2d(xp, k, s, divisor_override=1)  # exact: integer sums in float64
    if n.count_include_pad or not any(pads):
        count = torch.tensor(float(k[0] * k[1]), dtype=torch.float64, device=x.device)
    else:
        ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=torch.float64, device=x.device), pads)
        count = F.avg_pool2d(ones, k, s, divisor_override=1)
    # round half up: floor((sum + n/2) / n); the quotient is a multiple of 1/(2n), so float64 floors it exactly
    out = torch.floor((sums + count / 2) / count)
    if zp:
        out = out + zp
    return out.to(torch.float32)


def _pool_real(x: torch.Tensor, n: Pool) -> torch.Tensor:
    k, s, pads = pool_window(n, x.shape[2:])
    if n.op == "max":
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")) if any(pads) else x, k, s)
    xp = F.pad(x, pads) if any(pads) else x
    sums = F.avg_pool2d(xp, k, s, divisor_override=1)
    if n.count_include_pad or not any(pads):
        return sums / (k[0] * k[1])
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype), pads)
    return sums / F.avg_pool2d(ones, k, s, divisor_override=1)
