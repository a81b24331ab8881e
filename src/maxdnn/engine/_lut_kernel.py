"""Compiled lookup-table convolutions (numba): the gather kernel (parallel over images x filters) and the
scatter kernels (parallel over images; a table row per input value, added contiguously)."""

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
def lut_table(w, kmap, luts, w_min, tap_major):  # pragma: no cover - compiled
    """The scatter kernels' table: for input channel c and operand index u, every filter's products with its
    taps' weights, t[c, u, f * K + tap] (``tap_major`` False) or t[c, u, tap * F + f] (True); int32."""
    f_out, c_in, kh, kw = w.shape
    k = kh * kw
    nx = luts.shape[1]
    t = np.empty((c_in, nx, f_out * k), dtype=np.int32)
    for c in prange(c_in):
        for f in range(f_out):
            lut = luts[kmap[f, c]]
            for i in range(kh):
                for j in range(kw):
                    col = w[f, c, i, j] - w_min
                    tap = i * kw + j
                    at = tap * f_out + f if tap_major else f * k + tap
                    for u in range(nx):
                        t[c, u, at] = lut[u, col]
    return t


@njit(parallel=True, cache=True)
def lut_scatter_conv(x, table, x_min, kh, kw, pad_top, pad_left, ho, wo):  # pragma: no cover - compiled
    """Stride 1: every input value adds its table row (all filters x taps, contiguous) to its position's
    partial sums z[q], then each output sums its taps' entries (a col2im). Same sums as ``lut_conv``."""
    n, c_in, h, wd = x.shape
    fk = table.shape[2]
    k = kh * kw
    f_out = fk // k
    out = np.zeros((n, f_out, ho, wo), dtype=np.int64)
    for b in prange(n):
        z = np.zeros((h * wd, fk), dtype=np.int32)  # |sum over c| < 2^31: checked by the caller
        for c in range(c_in):
            tc = table[c]
            for q in range(h * wd):
                row = tc[x[b, c, q // wd, q % wd] - x_min]
                zq = z[q]
                for t in range(fk):
                    zq[t] += row[t]
        for f in range(f_out):
            for oh in range(ho):
                for ow in range(wo):
                    s = 0
                    for i in range(kh):
                        ih = oh + i - pad_top
                        if ih < 0 or ih >= h:
                            continue
                        for j in range(kw):
                            iw = ow + j - pad_left
                            if 0 <= iw < wd:
                                s += z[ih * wd + iw, f * k + i * kw + j]
                    out[b, f, oh, ow] = s
    return out


@njit(parallel=True, cache=True)
def lut_scatter_conv_strided(x, table, x_min, kh, kw, stride, pad_top, pad_left, ho, wo):  # pragma: no cover
    """Any stride: as ``lut_scatter_conv``, adding only the taps that reach an output (table tap-major)."""
    n, c_in, h, wd = x.shape
    f_out = table.shape[2] // (kh * kw)
    out = np.zeros((n, f_out, ho, wo), dtype=np.int64)
    for b in prange(n):
        z = np.zeros((h, wd, kh * kw, f_out), dtype=np.int32)
        for c in range(c_in):
            tc = table[c]
            for qh in range(h):
                for i in range(kh):
                    oh = qh + pad_top - i
                    if oh < 0 or oh % stride != 0 or oh // stride >= ho:
                        continue
                    for qw in range(wd):
                        row = tc[x[b, c, qh, qw] - x_min]
                        for j in range(kw):
                            ow = qw + pad_left - j
                            if ow < 0 or ow % stride != 0 or ow // stride >= wo:
                                continue
                            base = (i * kw + j) * f_out
                            zq = z[qh, qw, i * kw + j]
                            for f in range(f_out):
                                zq[f] += row[base + f]
        for oh in range(ho):
            for ow in range(wo):
                for i in range(kh):
                    ih = oh * stride + i - pad_top
                    if ih < 0 or ih >= h:
                        continue
                    for j in range(kw):
                        iw = ow * stride + j - pad_left
                        if 0 <= iw < wd:
                            zq = z[ih, iw, i * kw + j]
                            for f in range(f_out):
                                out[b, f, oh, ow] += zq[f]
    return out
