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
def add_half_up(a, b, pa, pb, zp, lo, hi, wide, out):  # pragma: no cover - compiled
    """A two-input Add in one pass, with the torch form's float64 operations in its order: each input minus its
    zero point, requantized to the output scale (floor((v * m0 + half) * inv)), summed, plus the output zero
    point, clamped unless ``wide``. An input the torch form does not requantize has m0 = inv = 1, half = 0:
    v is an integer, so floor((v * 1 + 0) * 1) is v exactly.

    a, b: [M, C] (pixels x channels, any strides); pa, pb: float64 [4, C], rows zero point, m0, half, inv per
    channel; out: [M, C]. Branch-free rows of per-channel tables: the inner loop vectorizes."""
    m_n, c_n = a.shape
    for r in prange(m_n):
        for c in range(c_n):
            va = np.floor(((np.float64(a[r, c]) - pa[0, c]) * pa[1, c] + pa[2, c]) * pa[3, c])
            vb = np.floor(((np.float64(b[r, c]) - pb[0, c]) * pb[1, c] + pb[2, c]) * pb[3, c])
            out[r, c] = _to_code(va + vb, zp, lo, hi, wide)
