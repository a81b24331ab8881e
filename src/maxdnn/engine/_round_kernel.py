"""Compiled passes of the separable emulation (numba): the activation rounding, and the accumulators of
per-group convolutions put in place.

Rounding: every rounding transform a layer needs, in one pass over its input.

R_t(x) = 2^t floor(x / 2^t + 1/2) for each t in ``bits`` (0: x itself), read once and written once per
transform; the torch form takes four passes per transform. The arithmetic is float32 and exact: x holds
integers far below 2^24, and 2^t, 2^-t and 2^(t-1) are powers of two.
"""

import numpy as np
from numba import njit, prange


@njit(inline="always", cache=True)
def round_half_up(v, t):  # pragma: no cover - compiled
    """R_t(v) = 2^t floor(v / 2^t + 1/2) of a float32 integer v, exactly (inlined: in a loop over v the
    constants of t are computed once)."""
    step = np.float32(1 << t)
    return np.floor((v + np.float32(0.5) * step) * (np.float32(1.0) / step)) * step


@njit(parallel=True, cache=True)
def round_stack(x, bits, out):  # pragma: no cover - compiled
    """x: [M, C] float32 of integers (pixels x channels, any strides); bits: int64 [G]; out: [G, M, C]
    float32 (any strides), out[g] = R_bits[g](x). Each row's channels are one contiguous inner loop."""
    m_n, c_n = x.shape
    g_n = bits.shape[0]
    for r in prange(m_n):
        for g in range(g_n):
            t = bits[g]
            if t == 0:
                for c in range(c_n):
                    out[g, r, c] = x[r, c]
                continue
            for c in range(c_n):
                out[g, r, c] = round_half_up(x[r, c], t)


@njit(parallel=True, cache=True)
def scatter_channels(src, cols, dst):  # pragma: no cover - compiled
    """dst[:, cols[j]] = src[:, j]: one group's accumulators [M, K] (pixels x its filters) written into the
    layer's [M, F] in place (torch's index_copy_ along channels_last channels is several times slower)."""
    m_n, k_n = src.shape
    for r in prange(m_n):
        for j in range(k_n):
            dst[r, cols[j]] = src[r, j]
