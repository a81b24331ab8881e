"""Compiled lookup-table convolution (numba, parallel over images x filters)."""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def lut_conv(x, w, kmap, luts, x_min, w_min, stride, pad_top, pad_left, ho, wo):  # pragma: no cover - compiled
    n, c_in, h, wd = x.shape
    f_out, _, kh, kw = w.shape
    out = np.zeros((n, f_out, ho, wo), dtype=np.int64)
    for nf in prange(n * f_out):
        b = nf // f_out
        f = nf % f_out
        for c in range(c_in):
            lut = luts[kmap[f, c]]
            for i in range(kh):
                for j in range(kw):
                    wv = w[f, c, i, j] - w_min
                    for oh in range(ho):
                        ih = oh * stride + i - pad_top
                        if ih < 0 or ih >= h:
                            continue
                        for ow in range(wo):
                            iw = ow * stride + j - pad_left
                            if iw < 0 or iw >= wd:
                                continue
                            out[b, f, oh, ow] += lut[x[b, c, ih, iw] - x_min, wv]
    return out


@njit(parallel=True, cache=True)
def lut_error_taps(g, cols, widx, err):  # pragma: no cover - compiled
    """out[n, f, k] = sum_l g[n, f, l] * err[cols[n, group(f), k, l], widx[f, k]].

    g: float64 [N, F, L] (loss gradient at each output); cols: int32 [N, G, K, L] (row of err for the
    operand under tap k at output l; row 0 is zero, for padding); widx: int64 [F, K] (column of the
    kernel's weight); err: float64 [X + 1, W] (product error of each operand pair).
    """
    n, f_out, n_l = g.shape
    groups, k_n = cols.shape[1], cols.shape[2]
    per_group = f_out // groups
    out = np.zeros((n, f_out, k_n))
    for nf in prange(n * f_out):
        b = nf // f_out
        f = nf % f_out
        gi = f // per_group
        for k in range(k_n):
            wi = widx[f, k]
            s = 0.0
            for li in range(n_l):
                s += g[b, f, li] * err[cols[b, gi, k, li], wi]
            out[b, f, k] = s
    return out
