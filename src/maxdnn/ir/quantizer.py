"""Post-training 8-bit quantization of lowered float nodes into the integer graph, calibrated on the
integer graph itself: the same graph on every CPU, thread count and BLAS.

The front end (``maxdnn.frontends.pytorch``) lowers a float network into ``FNode`` s (batch norm folded,
activations and padding fused). This module quantizes them node by node, in execution order:

- weights: signed int8, symmetric per output channel, from the float64 weights with numpy element-wise
  operations (``maxdnn.ir.quant``'s rules), biases in accumulator units;
- calibration: each node's output range is a high percentile of its real values, and those values are
  computed from the already-quantized integer outputs of the nodes before it. A multiplying layer's
  accumulators are exact integers (the fast exact engine's convolution, exact by its bound), its real
  output (acc + bias) * s_in * s_w[f] one correctly rounded float64 product per value, its fused
  activation a clamp in real units; an addition's real output is the float64 sum of its inputs' real
  values. No float convolution or matrix product of the float network feeds a number of the graph, so
  nothing depends on the order in which a CPU's kernels sum;
- the percentile is the linear interpolation between two order statistics (numpy's default rule),
  found exactly from the largest values of each batch (memory bounded by the tail, not the data), and
  interpolated in Python floats;
- requantization multipliers and shifts follow from the scales (``Requant.from_scales``).

The float network runs once, on two images, for its tensor shapes (a check of the lowering) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from maxdnn.ir.graph import S8, U8, Add, Affine, Clamp, Concat, Flatten, MulLayer, Node, Pool, QParams, QuantizedGraph, \
    _eval_node, graph_torch_params
from maxdnn.errors import ModelError
from maxdnn.ir.quant import Requant, float_conv_exact


@dataclass
class FNode:
    """A float node of the lowered network."""

    kind: str  # input, mul, add, concat, affine, clamp, pool, flatten
    name: str
    inputs: list[int]
    act: tuple[float, float] | None = None  # fused output clamp (real units)
    p: dict = field(default_factory=dict)
    users: int = 0


def wide_into(nodes: list[FNode]) -> dict[int, int]:
    """mul nodes requantized straight into the scale of the add that is their only consumer."""
    out = {}
    for i, n in enumerate(nodes):
        if n.kind == "add":
            for j in n.inputs:
                src = nodes[j]
                if src.kind == "mul" and src.act is None and src.users == 1:
                    out[j] = i
    return out


def is_signed(nodes: list[FNode], i: int) -> bool:
    """Whether node i's output can be negative (its 8-bit tensor is then signed)."""
    n = nodes[i]
    if n.act is not None:
        return n.act[0] < 0
    if n.kind in ("pool", "flatten"):
        return is_signed(nodes, n.inputs[0])
    if n.kind == "clamp":
        return n.p["lo"] < 0
    if n.kind == "concat":
        return any(is_signed(nodes, j) for j in n.inputs)
    return n.kind != "input"


class TailPercentile:
    """The ``percentile`` (numpy's linear rule) of ``total`` values seen in batches, exactly: only the values
    that can be among the two order statistics it interpolates are kept."""

    def __init__(self, total: int, percentile: float):
        self.total, self.percentile = int(total), float(percentile)
        self.index = (self.total - 1) * self.percentile / 100.0
        self.lo = min(int(math.floor(self.index)), self.total - 1)
        self.keep = self.total - self.lo  # the largest values from ascending rank lo on
        self.top = torch.zeros(0, dtype=torch.float64)

    def add(self, values: torch.Tensor) -> None:
        v = values.reshape(-1).to(torch.float64)
        if self.top.numel() == self.keep:  # only values above the smallest kept one can enter the tail
            v = v[v > self.top.min()]
        v = torch.cat([self.top, v])
        self.top = torch.topk(v, min(self.keep, v.numel()), sorted=False).values if v.numel() > self.keep else v

    def value(self) -> float:
        if self.top.numel() != self.keep:  # pragma: no cover - the caller passes every value
            raise RuntimeError(f"percentile over {self.total} values saw {self.top.numel()} of its tail")
        desc = torch.sort(self.top, descending=True).values
        a = float(desc[self.keep - 1])  # ascending rank lo
        if self.lo + 1 >= self.total:
            return a
        b = float(desc[self.keep - 2])  # ascending rank lo + 1
        t = self.index - self.lo
        return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)


def output_qparams(n: FNode, signed: bool, images: int, percentile: float, real_batches) -> QParams:
    """An 8-bit tensor's QParams from its node's real values (float64 batches of all ``images``): the range is the
    ``percentile`` of the values (of |values| when signed) after the node's fused clamp, which also bounds the
    codes."""
    stat = None
    for v in real_batches:
        if n.act is not None:
            v = v.clamp(min=n.act[0] if n.act[0] > -math.inf else None, max=n.act[1] if n.act[1] < math.inf else None)
        v = v.abs() if signed else v
        if stat is None:
            stat = TailPercentile(images * v[0].numel(), percentile)
        stat.add(v)
    scale = max(stat.value(), 1e-8) / (127.0 if signed else 255.0)
    lo, hi = S8 if signed else U8
    if n.act is not None:
        if n.act[0] > -math.inf:
            lo = max(lo, int(math.floor(n.act[0] / scale + 0.5)))
        if n.act[1] < math.inf:
            hi = min(hi, int(math.floor(n.act[1] / scale + 0.5)))
    return QParams(scale, 0, lo, hi)


def _chan(a: np.ndarray, ndim: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64)).view((1, -1) + (1,) * (ndim - 2))


class IntegerCalibration:
    """Quantizes lowered nodes one by one; each node's statistic comes from the integer codes computed so
    far for every calibration image (held compactly, each freed after its last consumer)."""

    def __init__(self, nodes: list[FNode], images: np.ndarray, shapes: dict, percentile: float, batch_size: int,
                 where: str):
        self.nodes, self.images, self.shapes = nodes, images, shapes
        self.percentile, self.batch, self.where = percentile, batch_size, where
        self.wide = wide_into(nodes)
        self.last = len(nodes) - 1
        self.qp: dict[int, QParams] = {0: QParams(nodes[0].p["scale"], 0, *U8)}
        self.built: dict[int, Node] = {}
        self.codes: dict[int, torch.Tensor] = {0: torch.as_tensor(images)}
        self.last_use = self._last_use()

    def _last_use(self) -> dict[int, int]:
        """The index after which a node's codes are no longer read (a wide layer is computed at its add)."""
        out = {}
        for i, n in enumerate(self.nodes):
            at = self.wide.get(i, i)
            for j in n.inputs:
                out[j] = max(out.get(j, 0), at)
        return out

    # ------------------------------------------------------------ batches of integer values
    def _batches(self):
        for s in range(0, len(self.images), self.batch):
            yield s, min(s + self.batch, len(self.images))

    def _engine_value(self, j: int, s: int, e: int) -> torch.Tensor:
        """Node j's codes for images s:e as the fast engine holds them (float32, float64 if wide)."""
        t = self.codes[j][s:e]
        return t.to(torch.float64 if self.qp[j].wide else torch.float32)

    def _real(self, j: int, s: int, e: int) -> torch.Tensor:
        """The real values node j's integer codes stand for, images s:e (float64, one product each)."""
        q = self.qp[j]
        t = self.codes[j][s:e].to(torch.float64)
        return (t - q.zero_point) * q.scale if q.zero_point else t * q.scale

    def _evaluate(self, i: int) -> None:
        """Node i's codes for every calibration image, by the fast exact engine."""
        node = self.built[i]
        tmp = QuantizedGraph(self.qp[0], tuple(self.images.shape[1:]), [node])
        p = graph_torch_params(tmp, "cpu")
        conv = (lambda name, x: tmp.exact_conv(name, x)) if isinstance(node, MulLayer) else None
        names = {j: self.built[j].name if j else "input" for j in self.nodes[i].inputs}
        parts = []
        for s, e in self._batches():
            vals = {names[j]: self._engine_value(j, s, e) for j in self.nodes[i].inputs}
            _eval_node(node, vals, conv, p, None)
            parts.append(vals[node.name].to(torch.int64 if self.qp[i].wide else torch.int16))
        self.codes[i] = torch.cat(parts)

    def _free(self, i: int) -> None:
        for j in [j for j in self.codes if self.last_use.get(j, -1) <= i]:
            del self.codes[j]

    # ------------------------------------------------------------ statistics
    def _out_q(self, i: int, real_batches) -> QParams:
        """The output QParams of node i from its real values (an iterable of float64 batches)."""
        return output_qparams(self.nodes[i], is_signed(self.nodes, i), len(self.images), self.percentile, real_batches)

    def _layer_real(self, i: int, layer: MulLayer):
        """Batches of a multiplying layer's real output (acc + bias) * acc_scale, before its clamp."""
        w = torch.as_tensor(layer.weight)
        acc_scale = _chan(layer.acc_scale, 4)
        bias = _chan(layer.bias, 4)
        j = self.nodes[i].inputs[0]
        for s, e in self._batches():
            x = self._engine_value(j, s, e)
            if layer.in_q.zero_point:
                x = x - layer.in_q.zero_point
            if layer.op == "linear":
                x = x[:, :, None, None]
            acc = float_conv_exact(x, w, layer.stride, layer.pads, layer.exact_bound, layer.groups).to(torch.float64)
            yield (acc + bias) * acc_scale

    # ------------------------------------------------------------ nodes
    def run(self) -> list[Node]:
        for i, n in enumerate(self.nodes[1:], start=1):
            getattr(self, "_" + n.kind)(i, n)
            if i not in self.wide:
                self._free(i)
        return [self.built[i] for i in range(1, len(self.nodes))]

    def _mul(self, i: int, n: FNode) -> None:
        in_q = self.qp[n.inputs[0]]
        if in_q.wide:
            raise ModelError(f"{self.where}: layer {n.name}: its input is not an 8-bit tensor")
        w = n.p["w"].numpy()
        absmax = np.abs(w).reshape(len(w), -1).max(1)
        w_scale = np.where(absmax > 0, absmax / 127.0, 1.0)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int64)
        bq = np.round(n.p["b"].numpy() / (in_q.scale * w_scale)).astype(np.int64)
        in_shape = self.shapes[n.inputs[0]]
        if n.p["op"] == "linear" and n.p["w"].shape[1] != int(np.prod(in_shape)):
            raise ModelError(f"{self.where}: layer {n.name}: expects {n.p['w'].shape[1]} inputs, gets {list(in_shape)}")
        in_hw = (1, 1) if n.p["op"] == "linear" else tuple(in_shape[1:3])
        layer = MulLayer(n.name, [self._name(j) for j in n.inputs], None, op=n.p["op"], weight=wq, bias=bq,
                         w_scale=w_scale, requant=None, in_q=in_q, stride=n.p["stride"],
                         pads=tuple(int(v) for v in n.p["pads"]), groups=n.p["groups"], in_hw=in_hw)
        self.built[i] = layer
        if i in self.wide:
            return  # quantized into its add's scale once that is known (``_finish_wide``)
        if i == self.last:
            q = QParams(float(layer.acc_scale.min()), 0, None, None)
        else:
            q = self._out_q(i, self._layer_real(i, layer))
        self._finish_layer(i, layer, q)

    def _finish_layer(self, i: int, layer: MulLayer, q: QParams) -> None:
        layer.out = q
        layer.requant = Requant.from_scales(layer.acc_scale, q.scale, layer.requant_bound())
        self.qp[i] = q
        if i != self.last:
            self._evaluate(i)

    def _merge_real(self, i: int, n: FNode):
        """Batches of an add's (sum) or concat's real output from its inputs' real values."""
        layers = {j: self._layer_real(j, self.built[j]) for j in n.inputs if j in self.wide}
        for s, e in self._batches():
            parts = [next(layers[j]) if j in layers else self._real(j, s, e) for j in n.inputs]
            yield torch.cat(parts, 1) if n.kind == "concat" else sum(parts[1:], parts[0])

    def _add(self, i: int, n: FNode) -> None:
        q = self._out_q(i, self._merge_real(i, n))
        for j in n.inputs:
            if j in self.wide:
                self._finish_layer(j, self.built[j], QParams(q.scale, 0, None, None))
        rqs, zps = [], []
        for j in n.inputs:
            src = self.qp[j]
            zps.append(src.zero_point)
            if src.wide or src.scale == q.scale:
                rqs.append(None)
            else:
                bound = max(abs(src.lo - src.zero_point), abs(src.hi - src.zero_point))
                rqs.append(Requant.from_scales([src.scale], q.scale, bound))
        cls = Add if n.kind == "add" else Concat
        self.built[i] = cls(n.name, [self._name(j) for j in n.inputs], q, in_zps=zps, requants=rqs)
        self.qp[i] = q
        self._evaluate(i)

    _concat = _add

    def _affine(self, i: int, n: FNode) -> None:
        channels = self.shapes[0][0]
        a = n.p["a"].numpy() * np.ones(channels)
        b = n.p["b"].numpy() * np.ones(channels)
        if (a <= 0).any():
            raise ModelError(f"{self.where}: input normalization with a non-positive scale")

        def real():
            for s, e in self._batches():
                x = self.codes[0][s:e].to(torch.float64)
                yield x * _chan(a, 4) + _chan(b, 4)

        q = self._out_q(i, real())
        offset = np.round(b / a).astype(np.int64)
        rq = Requant.from_scales(a, q.scale, 255 + int(np.abs(offset).max()))
        self.built[i] = Affine(n.name, [self._name(j) for j in n.inputs], q, in_zp=0, in_scale=1.0, offset=offset,
                               acc_scale=a, requant=rq)
        self.qp[i] = q
        self._evaluate(i)

    def _clamp(self, i: int, n: FNode) -> None:
        src = self.qp[n.inputs[0]]
        if src.wide:
            raise ModelError(f"{self.where}: node {n.name}: clamp of a wide tensor")
        lo = src.lo if n.p["lo"] == -math.inf else max(src.lo, int(math.floor(n.p["lo"] / src.scale + 0.5)) + src.zero_point)
        hi = src.hi if n.p["hi"] == math.inf else min(src.hi, int(math.floor(n.p["hi"] / src.scale + 0.5)) + src.zero_point)
        self._passthrough(i, Clamp(n.name, [self._name(j) for j in n.inputs], QParams(src.scale, src.zero_point, lo, hi)))

    def _pool(self, i: int, n: FNode) -> None:
        self._passthrough(i, Pool(n.name, [self._name(j) for j in n.inputs], self.qp[n.inputs[0]], op=n.p["op"],
                                  kernel=n.p["kernel"], stride=n.p["stride"], pads=tuple(int(v) for v in n.p["pads"]),
                                  count_include_pad=n.p["count_include_pad"]))

    def _flatten(self, i: int, n: FNode) -> None:
        self._passthrough(i, Flatten(n.name, [self._name(j) for j in n.inputs], self.qp[n.inputs[0]]))

    def _passthrough(self, i: int, node: Node) -> None:
        self.built[i] = node
        self.qp[i] = node.out
        self._evaluate(i)

    def _name(self, j: int) -> str:
        return "input" if j == 0 else self.built[j].name
