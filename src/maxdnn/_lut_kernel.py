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
