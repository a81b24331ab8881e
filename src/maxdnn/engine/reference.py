"""The integer reference engine: slow, obvious numpy int64 code for any quantized graph.

Every multiplication of every multiplying layer goes through a product
function ``prod_for_layer(name)(f, c)(x_values, w_value)``; requantization,
additions, pooling and clamps are written out with Python integers' semantics
(floor shifts and divisions). It is the ground truth the fast engines are
tested against.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from maxdnn.ir.graph import (Affine, Clamp, Concat, Flatten, Merge, MulLayer, OrtAdd, Pool, QParams, QuantizedGraph,
                             TfliteAdd, pool_window)
from maxdnn.ir.quant import Requant, float32_requant, tflite_multiply, tflite_single_multiply

Prod = Callable[[np.ndarray, np.ndarray], np.ndarray]


def exact_prod(x, w):
    return np.asarray(x, dtype=np.int64) * np.asarray(w, dtype=np.int64)


def reference_conv(x: np.ndarray, w: np.ndarray, stride: int, pads, prod_for: Callable[[int, int], Prod],
                   groups: int = 1) -> np.ndarray:
    """Accumulators (no bias) with ``prod_for(f, c)(x_values, w_value)`` for every multiplication;
    c indexes the filter's own input channels (0 .. C/groups - 1).

    Padding positions contribute nothing (no product is formed for them).
    """
    left, r, t, b = pads
    n, c_in, h, wd = x.shape
    f_out, cg, kh, kw = w.shape
    ho = (h + t + b - kh) // stride + 1
    wo = (wd + left + r - kw) // stride + 1
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (t, b), (left, r)))
    valid = np.pad(np.ones((h, wd), dtype=bool), ((t, b), (left, r)))
    acc = np.zeros((n, f_out, ho, wo), dtype=np.int64)
    per_group = f_out // groups
    for f in range(f_out):
        for c in range(cg):
            prod = prod_for(f, c)
            ci = (f // per_group) * cg + c
            for i in range(kh):
                for j in range(kw):
                    xs = xp[:, ci, i:i + stride * ho:stride, j:j + stride * wo:stride]
                    m = valid[i:i + stride * ho:stride, j:j + stride * wo:stride]
                    acc[:, f] += np.where(m, prod(xs, w[f, c, i, j]), 0)
    return acc


def requantize(acc: np.ndarray, r: Requant) -> np.ndarray:
    """(acc * m0 + 2^(shift-1)) >> shift (or TFLite's MultiplyByQuantizedMultiplier), one channel (axis 1)
    at a time."""
    out = np.empty_like(acc)
    if r.mode == "float32":
        scales = r.float32_scales()
    for f in range(acc.shape[1]):
        k = f if r.m0.shape[0] > 1 else 0
        m0, sh = int(r.m0[k]), int(r.shift[k])
        if r.mode == "float32":
            out[:, f] = float32_requant(acc[:, f], scales[k])
        elif r.mode == "tflite":
            out[:, f] = tflite_multiply(acc[:, f], m0, sh)
        elif r.mode == "tflite-single":
            out[:, f] = tflite_single_multiply(acc[:, f], m0, sh)
        else:
            out[:, f] = (acc[:, f] * m0 + (1 << (sh - 1))) >> sh
    return out


def _finish(v: np.ndarray, q: QParams) -> np.ndarray:
    v = v + q.zero_point
    return v if q.wide else np.clip(v, q.lo, q.hi)


def _pool(x: np.ndarray, n: Pool) -> np.ndarray:
    (kh, kw), s, (left, r, t, b) = pool_window(n, x.shape[2:])
    h, wd = x.shape[2:]
    ho, wo = (h + t + b - kh) // s + 1, (wd + left + r - kw) // s + 1
    zp = n.out.zero_point
    out = np.zeros(x.shape[:2] + (ho, wo), dtype=np.int64)
    for oh in range(ho):
        for ow in range(wo):
            rows = [oh * s + i - t for i in range(kh) if 0 <= oh * s + i - t < h]
            cols = [ow * s + j - left for j in range(kw) if 0 <= ow * s + j - left < wd]
            win = x[:, :, rows][:, :, :, cols]
            if n.op == "max":
                out[:, :, oh, ow] = win.max(axis=(2, 3))
            elif n.rounding == "float32":  # onnxruntime: integer sum, float32 requantization
                total = (win - n.in_zp).sum(axis=(2, 3))
                out[:, :, oh, ow] = float32_requant(total, np.float32(n.scale)) + zp
            elif n.rounding == "tflite":  # raw values, in-bounds count, half away from zero (C division)
                cnt = len(rows) * len(cols)
                total = win.sum(axis=(2, 3))
                q = (np.abs(total) + cnt // 2) // cnt
                out[:, :, oh, ow] = np.where(total > 0, q, -q)
            else:
                cnt = kh * kw if n.count_include_pad else len(rows) * len(cols)
                total = (win - zp).sum(axis=(2, 3))
                out[:, :, oh, ow] = (2 * total + cnt) // (2 * cnt) + zp  # round half up
    if n.rounding in ("tflite", "float32") or n.op == "max":
        out = np.clip(out, n.out.lo, n.out.hi)
    return out


def _round_f32(v) -> float:
    """The float32 nearest a rational v (ties to even; normal range)."""
    from fractions import Fraction

    if v == 0:
        return 0.0
    mag = abs(v)
    e = mag.numerator.bit_length() - mag.denominator.bit_length() - 24
    while mag / Fraction(2) ** e >= 1 << 24:
        e += 1
    while mag / Fraction(2) ** e < 1 << 23:
        e -= 1
    q = mag / Fraction(2) ** e
    m = q.numerator // q.denominator
    rest = q - m
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and m % 2):
        m += 1
    return float(m * Fraction(2) ** e) * (1 if v > 0 else -1)


def _fma32(a: np.ndarray, b: float, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add a * b + c with one rounding: exact rational arithmetic (``fractions``)."""
    from fractions import Fraction

    fb = Fraction(float(np.float32(b)))
    flat = [_round_f32(Fraction(int(x)) * fb + Fraction(float(y)))
            for x, y in zip(np.ravel(a), np.ravel(np.broadcast_to(c, np.shape(a))))]
    return np.array(flat, dtype=np.float32).reshape(np.shape(a))


def _ort_add(a: np.ndarray, b: np.ndarray, n: OrtAdd) -> np.ndarray:
    """QLinearAdd with exact fused multiply-adds (``fractions``), before the clamp; the zero point is in
    ``n.fixed``."""
    t = _fma32(b, n.ratios[1], np.full(np.shape(b), np.float32(n.fixed)))
    return np.rint(_fma32(a, n.ratios[0], t)).astype(np.int64)


def reference_forward(g: QuantizedGraph, images: np.ndarray,
                      prod_for_layer: Callable[[str], Callable[[int, int], Prod]] | None = None) -> np.ndarray:
    """The graph's integer output by the slow reference engine (numpy, int64)."""
    prod_for_layer = prod_for_layer or (lambda name: (lambda f, c: exact_prod))
    vals = {"input": np.asarray(images).astype(np.int64) + g.pixel_offset}
    for n in g.nodes:
        ins = [vals[i] for i in n.inputs]
        if isinstance(n, MulLayer):
            x = ins[0] - n.in_q.zero_point
            if n.op == "linear":
                x = x[:, :, None, None]
            acc = reference_conv(x, n.weight, n.stride, n.pads, prod_for_layer(n.name), n.groups)
            y = _finish(requantize(acc + n.bias[None, :, None, None], n.requant), n.out)
            vals[n.name] = y[:, :, 0, 0] if n.op == "linear" else y
        elif isinstance(n, OrtAdd):
            vals[n.name] = _finish(_ort_add(ins[0], ins[1], n), QParams(n.out.scale, 0, n.out.lo, n.out.hi))
        elif isinstance(n, TfliteAdd):
            parts = [requantize((v - zp) << n.left_shift, r) for v, zp, r in zip(ins, n.in_zps, n.requants)]
            vals[n.name] = _finish(requantize(parts[0] + parts[1], n.out_requant), n.out)
        elif isinstance(n, Merge):
            parts = [v - zp if r is None else requantize(v - zp, r) for v, zp, r in zip(ins, n.in_zps, n.requants)]
            total = np.concatenate(parts, axis=1) if isinstance(n, Concat) else sum(parts[1:], parts[0])
            vals[n.name] = _finish(total, n.out)
        elif isinstance(n, Affine):
            off = n.offset.reshape((1, -1) + (1,) * (ins[0].ndim - 2))
            vals[n.name] = _finish(requantize(ins[0] - n.in_zp + off, n.requant), n.out)
        elif isinstance(n, Clamp):
            vals[n.name] = np.clip(ins[0], n.out.lo, n.out.hi)
        elif isinstance(n, Pool):
            vals[n.name] = _pool(ins[0], n)
        elif isinstance(n, Flatten):
            vals[n.name] = ins[0].reshape(len(ins[0]), -1)
    return vals[g.output.name]
