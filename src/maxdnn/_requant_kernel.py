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
