"""Weight scales fitted to the multipliers' weight grids, the first step of fine-tuning.

The quantizer scales each filter's weights so that its largest one is +-127.
A multiplier that transforms its weight operand sees a coarser grid: ROUP's
perforation multiplies by R_2P(w), so with P = 3 a weight is one of
{-128, -64, 0, 64, 128} and a filter whose weights are mostly small keeps
only zeros and a few outliers. The hardware does not care which scale the
int8 weights have: the scale is folded into the layer's requantization. So,
per output channel, ``fit_weight_scales`` tries the calibrated scale times
64/64, 63/64, ..., 8/64 and keeps the one whose transformed grid is closest to
the channel's weights (squared error; each kernel through its own multiplier's
weight transform), when it at least halves the error of the calibrated scale
(``MIN_ERROR_RATIO``; smaller gains fine-tuning recovers by itself). The bias
is re-expressed in the new accumulator units and the requantization follows
from the new scales, as in the quantizer.

Measured (``benchmarks/weight_scales.py``, docs/compensation.md): roup-p3r0 on
every layer but the stem, fine-tuned 2 epochs on 10,000 images, loses 4.40
points of the 5,000 confirmation images with fitted scales against 7.42 with
the calibrated ones; for P <= 2 no channel's error halves and the scales stay.

The errors are summed with ``math.fsum`` (correctly rounded), so the choice
does not depend on the CPU's vector width or the thread count.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from maxdnn.engine.approx import Assignment
from maxdnn.ir.graph import MulLayer, QuantizedGraph
from maxdnn.ir.quant import Requant

FIT_FACTORS = tuple(k / 64 for k in range(64, 7, -1))  # the calibrated scale times 1 .. 1/8, the calibrated one first
MIN_ERROR_RATIO = 0.5  # a channel's scale moves only when the fitted grid's error is at most this share of the kept one
W_MAX = 127


def _grid_error(wr: np.ndarray, scale: float, transforms: list[tuple[np.ndarray, object]]) -> tuple[float, np.ndarray]:
    """Squared error of one channel's real weights ``wr`` against its transformed int8 grid at ``scale``, and the
    int8 weights."""
    wi = np.clip(np.floor(wr / scale + 0.5), -W_MAX, W_MAX).astype(np.int64)
    wt = np.empty_like(wi)
    for sel, m in transforms:
        wt[sel] = m.w_transform(wi[sel])
    return math.fsum(((wt * scale - wr) ** 2).ravel().tolist()), wi


def fit_layer(layer: MulLayer, mults: list, amap: np.ndarray, min_ratio: float = MIN_ERROR_RATIO) -> tuple[MulLayer, int]:
    """``layer`` with its channels' weight scales fitted (module docstring), and how many channels moved.
    ``mults``: the assignment's multipliers, ``amap`` [F, C] the layer's index array into them."""
    used = np.unique(amap)
    if not all(mults[i].separable for i in used):  # a lookup-table multiplier has no weight grid of its own
        return layer, 0
    ws = np.arange(-W_MAX, W_MAX + 1)
    if all(np.array_equal(mults[i].w_transform(ws), ws) for i in used):
        return layer, 0
    wr = layer.weight * layer.w_scale[:, None, None, None]
    weight, w_scale = layer.weight.copy(), np.array(layer.w_scale, dtype=np.float64)
    moved = 0
    for f in range(len(wr)):
        transforms = [(amap[f] == i, mults[i]) for i in np.unique(amap[f])]
        keep, _ = _grid_error(wr[f], float(layer.w_scale[f]), transforms)
        best = (keep, None, None)
        for k in FIT_FACTORS[1:]:
            s = float(layer.w_scale[f]) * k
            err, wi = _grid_error(wr[f], s, transforms)
            if err < best[0]:
                best = (err, s, wi)
        if best[1] is not None and best[0] <= min_ratio * keep:
            w_scale[f], weight[f] = best[1], best[2]
            moved += 1
    if not moved:
        return layer, 0
    old_acc = layer.acc_scale
    out = dataclasses.replace(layer, weight=weight, w_scale=w_scale)
    out = dataclasses.replace(out, bias=np.floor(layer.bias * (old_acc / out.acc_scale) + 0.5).astype(np.int64))
    out.requant = Requant.from_scales(out.acc_scale, out.out.scale, out.requant_bound())
    return out, moved


def fit_weight_scales(q: QuantizedGraph, assignment: Assignment,
                      min_ratio: float = MIN_ERROR_RATIO) -> tuple[QuantizedGraph, dict[str, int]]:
    """The graph with every multiplying layer's weight scales fitted to ``assignment``'s weight transforms
    (module docstring), and per layer how many output channels moved (layers where none did are left out).
    Only maxdnn's own graphs (half-up requantization) are changed; others come back as they are.

    Example::

        g, moved = fit_weight_scales(graph, maxdnn.layer_assignment(graph, {"s3.conv2": "roup-p3r0"}))
        print(moved)   # per layer, how many of its filters got a smaller scale
    """
    a = assignment.bind(q)
    mults = {s: a.multipliers(x_signed=s) for s in {l.x_signed for l in q.layers.values()}}
    nodes, moved = [], {}
    for n in q.nodes:
        if isinstance(n, MulLayer) and n.requant.mode == "half_up":
            n, k = fit_layer(n, mults[n.x_signed], np.broadcast_to(a.maps[n.name], n.weight.shape[:2]), min_ratio)
            if k:
                moved[n.name] = k
        nodes.append(n)
    if not moved:
        return q, {}
    meta = {**q.meta, "weight_scales": {"fitted": moved, "min_error_ratio": min_ratio}}
    return dataclasses.replace(q, nodes=nodes, meta=meta), moved
