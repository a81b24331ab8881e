"""Compiled TFLite requantization (numba, one pass, parallel over images x channels).

The same integer arithmetic as ``quant.tflite_multiply`` and ``quant.tflite_single_multiply``,
fused into one loop: the torch form takes about twenty passes over int64 tensors.
"""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def tflite_requant(acc, m0, shift, single):  # pragma: no cover - compiled
    """acc: float64 [N, C, H, W] of integers; m0, shift: int64 [C] or [1]; returns float64 [N, C, H, W]."""
    n, c_n, h, w = acc.shape
    out = np.empty((n, c_n, h, w), dtype=np.float64)
    for nc in prange(n * c_n):
        b = nc // c_n
        c = nc % c_n
        k = c if m0.shape[0] > 1 else 0  # per-channel or per-tensor
        m = m0[k]
        s = shift[k]
        if single:
            total = 31 - s
            half = np.int64(1) << (total - 1)
        else:
            left = s if s > 0 else 0
            right = -s if s < 0 else 0
            mask = (np.int64(1) << right) - 1
        for i in range(h):
            for j in range(w):
                x = np.int64(acc[b, c, i, j])
                if single:
                    out[b, c, i, j] = (x * m + half) >> total
                    continue
                ab = (x << left) * m
                if ab >= 0:
                    high = (ab + (np.int64(1) << 30)) >> 31
                else:  # C++ division truncates toward zero
                    high = -((-(ab + 1 - (np.int64(1) << 30))) >> 31)
                threshold = (mask >> 1) + (1 if high < 0 else 0)
                out[b, c, i, j] = (high >> right) + (1 if (high & mask) > threshold else 0)
    return out


@njit(inline="always", cache=True)
def _half_up(v, m0, half, inv):  # pragma: no cover - compiled
    """floor((v * m0 + half) * inv): half-up requantization, the torch form's float64 operations in its order."""
    return np.floor((v * m0 + half) * inv)


@njit(inline="always", cache=True)
def _to_code(v, zp, lo, hi, wide):  # pragma: no cover - compiled
    """v plus the output zero point, clamped to [lo, hi] unless ``wide``."""
    v = v + zp
    return v if wide else min(max(v, lo), hi)


@njit(parallel=True, cache=True)
def requant_half_up(acc, bias, m0, half, inv, zp, lo, hi, wide, out):  # pragma: no cover - compiled
    """A multiplying layer's output in one pass: floor(((acc + bias) * m0 + half) * inv) + zp, clamped to
    [lo, hi] unless ``wide``; the same float64 operations, in the same order, as the torch form.

    acc: [N, H, W, C] (any strides, float32 or float64 holding integers); bias, m0, half, inv: float64 [C] or [1];
    out: [N, H, W, C] (float32, or float64 when wide), written in place."""
    n, h, w, c_n = acc.shape
    per_c = m0.shape[0] > 1
    for ny in prange(n * h):
        b = ny // h
        y = ny % h
        for x in range(w):
            for c in range(c_n):
                k = c if per_c else 0
                v = _half_up(np.float64(acc[b, y, x, c]) + bias[c], m0[k], half[k], inv[k])
                out[b, y, x, c] = _to_code(v, zp, lo, hi, wide)


@njit(parallel=True, cache=True)
def add_half_up(a, b, ra, rb, use_a, use_b, zpa, zpb, zp, lo, hi, wide, out):  # pragma: no cover - compiled
    """A two-input Add in one pass, with the torch form's float64 operations in its order: each input minus its
    zero point, requantized (floor((v * m0 + half) * inv), when ``use_*``) to the output scale, summed, plus the
    output zero point, clamped unless ``wide``.

    a, b: [N, H, W, C] (any strides); ra, rb: float64 [3, C] or [3, 1] rows m0, half, inv; out: [N, H, W, C]."""
    n, h, w, c_n = a.shape
    pa = ra.shape[1] > 1
    pb = rb.shape[1] > 1
    for ny in prange(n * h):
        bb = ny // h
        y = ny % h
        for x in range(w):
            for c in range(c_n):
                va = np.float64(a[bb, y, x, c]) - zpa
                if use_a:
                    k = c if pa else 0
                    va = _half_up(va, ra[0, k], ra[1, k], ra[2, k])
                vb = np.float64(b[bb, y, x, c]) - zpb
                if use_b:
                    k = c if pb else 0
                    vb = _half_up(vb, rb[0, k], rb[1, k], rb[2, k])
                out[bb, y, x, c] = _to_code(va + vb, zp, lo, hi, wide)
