"""Compiled activation rounding (numba): every rounding transform a layer needs, in one pass over its input.

R_t(x) = 2^t floor(x / 2^t + 1/2) for each t in ``bits`` (0: x itself), read once and written once per
transform; the torch form takes four passes per transform.
"""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def round_stack(x, bits, out):  # pragma: no cover - compiled
    """x: [N, H, W, C] float32 of integers (any strides); bits: int64 [G]; out: [G, N, H, W, C] float32
    (any strides), out[g] = R_bits[g](x)."""
    n, h, w, c_n = x.shape
    g_n = bits.shape[0]
    for ny in prange(n * h):
        b = ny // h
        y = ny % h
        for j in range(w):
            for c in range(c_n):
                v = x[b, y, j, c]
                iv = np.int64(v)
                for g in range(g_n):
                    t = bits[g]
                    if t == 0:
                        out[g, b, y, j, c] = v
                    else:
                        out[g, b, y, j, c] = np.float32(((iv + (np.int64(1) << (t - 1))) >> t) << t)
