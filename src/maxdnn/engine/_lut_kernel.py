"""Compiled lookup-table convolutions (numba): the gather kernel (parallel over images x filters) and the
scatter kernels (parallel over images; a table row per input value, added contiguously; rows that are all
zero, such as the products of a zero activation with most multipliers, are skipped; the table is int16
where every product fits, halving what each row costs to read)."""

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


@njit(parallel=True, cache=True)
def lut_table(w, kmap, luts, w_min, t):  # pragma: no cover - compiled
    """Fills the scatter kernels' table ``t`` [C, X, K * F] (int32): for input channel c and operand index u,
    every filter's products with its taps' weights, tap-major: t[c, u, tap * F + f]."""
    f_out, c_in, kh, kw = w.shape
    nx = luts.shape[1]
    for c in prange(c_in):
        for f in range(f_out):
            lut = luts[kmap[f, c]]
            for i in range(kh):
                for j in range(kw):
                    col = w[f, c, i, j] - w_min
                    tap = i * kw + j
                    at = tap * f_out + f
                    for u in range(nx):
                        t[c, u, at] = lut[u, col]


@njit(parallel=True, cache=True)
def lut_scatter_conv(x, table, nz, x_min, kh, kw, pad_top, pad_left, ho, wo, chunks):  # pragma: no cover - compiled
    """Stride 1, x [N, H, W, C] (integer values, any numeric dtype): every input value adds its table row (all
    taps x filters, tap-major, contiguous) to its position's partial sums z[q] (unless ``nz[c, u]`` says the row
    is all zero), then each output adds its taps' filter vectors (a col2im, contiguous over the filters). Same
    sums as ``lut_conv``, as [N, Ho, Wo, F] int32 (the caller checks that every sum fits)."""
    n, h, wd, c_in = x.shape
    f_out = table.shape[2] // (kh * kw)
    out = np.zeros((n, ho, wo, f_out), dtype=np.int32)
    for chunk in prange(chunks):  # one partial-sum buffer per chunk of images, allocated once
        z = np.empty((h * wd, table.shape[2]), dtype=np.int32)  # |sum over c| < 2^31: checked by the caller
        for b in range(chunk * n // chunks, (chunk + 1) * n // chunks):
            z[:] = 0
            _scatter_stride1(x, b, table, nz, x_min, z)
            _col2im_stride1(z, out[b], kh, kw, pad_top, pad_left, h, wd, f_out)
    return out


@njit(inline="always")
def _scatter_stride1(x, b, table, nz, x_min, z):  # pragma: no cover - compiled
    _, h, wd, c_in = x.shape
    fk = table.shape[2]
    for qh in range(h):  # one row of positions at a time: its partial sums stay in the L1 cache over the channels
        for c in range(c_in):
            tc = table[c]
            nzc = nz[c]
            for qw in range(wd):
                u = np.int64(x[b, qh, qw, c]) - x_min
                if not nzc[u]:
                    continue
                row = tc[u]
                zq = z[qh * wd + qw]
                for t in range(fk):
                    zq[t] += row[t]


@njit(inline="always")
def _col2im_stride1(z, out_b, kh, kw, pad_top, pad_left, h, wd, f_out):  # pragma: no cover - compiled
    ho, wo = out_b.shape[0], out_b.shape[1]
    for oh in range(ho):
        for ow in range(wo):
            o = out_b[oh, ow]
            ih0, iw0 = oh - pad_top, ow - pad_left
            if kh == 3 and kw == 3 and ih0 >= 0 and ih0 + 3 <= h and iw0 >= 0 and iw0 + 3 <= wd:
                # an inner 3x3 window: its nine taps summed in one pass over the filters
                q = ih0 * wd + iw0
                z0, z1, z2 = z[q], z[q + 1], z[q + 2]
                z3, z4, z5 = z[q + wd], z[q + wd + 1], z[q + wd + 2]
                z6, z7, z8 = z[q + 2 * wd], z[q + 2 * wd + 1], z[q + 2 * wd + 2]
                for f in range(f_out):
                    o[f] = (np.int64(z0[f]) + np.int64(z1[f_out + f]) + np.int64(z2[2 * f_out + f])
                            + np.int64(z3[3 * f_out + f]) + np.int64(z4[4 * f_out + f])
                            + np.int64(z5[5 * f_out + f]) + np.int64(z6[6 * f_out + f])
                            + np.int64(z7[7 * f_out + f]) + np.int64(z8[8 * f_out + f]))
                continue
            for i in range(kh):
                ih = oh + i - pad_top
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = ow + j - pad_left
                    if 0 <= iw < wd:
                        zq = z[ih * wd + iw]
                        base = (i * kw + j) * f_out
                        for f in range(f_out):
                            o[f] += zq[base + f]


@njit(parallel=True, cache=True)
def lut_scatter_conv_strided(x, table, nz, x_min, kh, kw, stride, pad_top, pad_left, ho, wo):  # pragma: no cover
    """Any stride: as ``lut_scatter_conv``, but each tap of an input value's row that reaches an output is added
    straight to that output's sums (one image's outputs stay in the cache)."""
    n, h, wd, c_in = x.shape
    out = np.zeros((n, ho, wo, table.shape[2] // (kh * kw)), dtype=np.int32)
    reach_h = _reaches(h, kh, stride, pad_top, ho)  # [q, i]: output row reached from input row q by tap row i, or -1
    reach_w = _reaches(wd, kw, stride, pad_left, wo)
    for b in prange(n):
        _scatter_strided(x, b, table, nz, x_min, kh, kw, reach_h, reach_w, out[b])
    return out


@njit(cache=True)
def _reaches(size, k, stride, pad, out_size):  # pragma: no cover - compiled
    r = np.full((size, k), -1, dtype=np.int64)
    for q in range(size):
        for i in range(k):
            o = q + pad - i
            if o >= 0 and o % stride == 0 and o // stride < out_size:
                r[q, i] = o // stride
    return r


@njit(inline="always")
def _scatter_strided(x, b, table, nz, x_min, kh, kw, reach_h, reach_w, acc):  # pragma: no cover - compiled
    _, h, wd, c_in = x.shape
    f_out = table.shape[2] // (kh * kw)
    for qh in range(h):
        if reach_h[qh].max() < 0:  # this input row feeds no output (stride 2, 1x1: every other row)
            continue
        for c in range(c_in):
            tc = table[c]
            for qw in range(wd):
                if reach_w[qw].max() < 0:
                    continue
                u = np.int64(x[b, qh, qw, c]) - x_min
                if not nz[c, u]:
                    continue
                row = tc[u]
                for i in range(kh):
                    oh = reach_h[qh, i]
                    if oh < 0:
                        continue
                    for j in range(kw):
                        ow = reach_w[qw, j]
                        if ow < 0:
                            continue
                        base = (i * kw + j) * f_out
                        a = acc[oh, ow]
                        for f in range(f_out):
                            a[f] += row[base + f]
