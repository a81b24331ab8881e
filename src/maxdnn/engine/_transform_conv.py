"""A compiled convolution that applies each kernel's activation transform as it lays out its input (numba).

Separable multipliers compute ``tx(x) * tw(w)``. When the kernels of one layer use several activation
transforms (random ROUP per filter, or per kernel), convolving each transform group on its own through
oneDNN costs one full convolution per group: small groups leave most vector lanes empty and each group
reads its own transformed copy of the input. This kernel lays out a few images at a time, writes every
transform's copy of them once (small enough to stay in the cache) and computes each filter from its kernels'
copies, so a layer costs about the same whatever the number of groups or who uses which.

Layout, per chunk of images and per input channel: the zero-padded images stacked into one tall plane
(``stride`` x ``stride`` phase planes for strided convolutions), flattened row by row; at stride 1 the
padding after a row or an image doubles as the padding before the next. Each filter's output
is then, for every (channel, tap) term, one long vector loop ``acc[p] += plane[p + offset] * weight``; nine
terms are summed per pass to keep the accumulator's loads and stores few. Outputs that fall on padding
columns or between images are computed and dropped.

The arithmetic is float32 and exact while every partial sum stays below 2^24 in magnitude, whatever the
summation order (the caller checks the bound); the transforms map 0 to 0, so padding is transformed padding.
"""

import numpy as np
import torch
from numba import njit, prange

from maxdnn.engine._round_kernel import round_half_up
from maxdnn.ir.quant import conv_out_hw

ROUND_TABLE = -1  # slot_bits entry of a slot whose transform is its row of ``slot_tables``


class TransformConv:
    """One layer's transform convolution, planned: exact accumulators [N, F, OH, OW] (float32, channels_last)
    of integer activations [N, C, H, W] on the CPU.

    slot_bits, slot_tables: the transform slots as ``transform_conv`` takes them; kslot: [F, C] slot of each
    kernel; weight: [F, C, kh, kw] transformed weights (each kernel's by its own slot's multiplier).
    """

    def __init__(self, slot_bits, slot_tables, kslot, weight: np.ndarray, x_min: int, stride: int, pads):
        self.slot_bits = np.asarray(slot_bits, dtype=np.int64)
        self.slot_tables = np.asarray(slot_tables, dtype=np.float32)
        self.kslot = np.asarray(kslot, dtype=np.int64)
        self.kernel_hw = weight.shape[2:]
        self.w = weight.reshape(len(weight), -1).astype(np.float32)
        self.x_min, self.stride = x_min, stride
        self.pads = np.asarray(pads, dtype=np.int64)  # (left, right, top, bottom)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, wd = x.shape
        oh, ow = conv_out_hw((h, wd), self.kernel_hw, self.stride, self.pads)
        xf = x if x.dtype == torch.float32 else x.to(torch.float32)
        out = torch.empty((n, oh, ow, len(self.w)), dtype=torch.float32)
        transform_conv(xf.permute(0, 2, 3, 1).numpy(), self.slot_bits, self.slot_tables, self.x_min, self.kslot,
                       self.w, *self.kernel_hw, self.stride, self.pads, chunk_images(oh, ow), out.numpy())
        return out.permute(0, 3, 1, 2)


def chunk_images(out_h: int, out_w: int, pixels: int = 512) -> int:
    """Images laid out together: enough for a long vector loop (about ``pixels`` outputs), at least one."""
    return max(1, pixels // max(1, out_h * out_w))


@njit(parallel=True, fastmath={"contract"}, cache=True)
def transform_conv(x, slot_bits, slot_tables, x_min, kslot, w,  # pragma: no cover - compiled
                   kh, kw, stride, pads, chunk, out):
    """out[n, i, j, f] = sum over c, di, dj of T_kslot[f,c](xpad[n, c, i*stride + di, j*stride + dj]) * w[f, k].

    x: [N, H, W, C] float32 of integers (any strides); slot_bits: int64 [S], per transform slot t >= 0 for
    R_t (0: x itself) or ROUND_TABLE for a table; slot_tables: float32 [S, X], the table over x_min..;
    kslot: int64 [F, C], the slot of each kernel; w: float32 [F, C*kh*kw], transformed weights in (c, di, dj)
    order; pads: int64 (left, right, top, bottom); out: [N, OH, OW, F] float32 (any strides).
    """
    n_n, h_n, w_n, c_n = x.shape
    f_n = w.shape[0]
    s_n = slot_bits.shape[0]
    oh_n, ow_n = out.shape[1], out.shape[2]
    st = stride
    pl, pr, pt, pb = pads[0], pads[1], pads[2], pads[3]
    if st == 1:
        # padding shared between neighbours: the zeros after a row (an image) are the left (top) padding of
        # the next, wherever the outputs of a row (an image) still fit in it
        ro = h_n + (max(pt, pb) if min(pt, pb) <= kh - 1 else pt + pb)  # plane rows per image
        wq = w_n + (max(pl, pr) if min(pl, pr) <= kw - 1 else pl + pr)  # plane row length
    else:
        ro = (pt + h_n + pb + st - 1) // st
        wq = (pl + w_n + pr + st - 1) // st
    t_n = c_n * kh * kw
    n_chunks = (n_n + chunk - 1) // chunk
    for ch in prange(n_chunks):
        n0 = ch * chunk
        b_n = min(chunk, n_n - n0)
        plane = (b_n * ro + (pt + pb + kh) // st + 2) * wq  # rows the taps reach, and a row of slack
        cs = st * st * plane  # one channel's phase planes
        ss = c_n * cs  # one slot
        raw = np.zeros(ss, dtype=np.float32)
        for b in range(b_n):
            for i in range(h_n):
                tr = b * ro * st + pt + i
                rbase = (tr % st) * st * plane + (tr // st) * wq
                for j in range(w_n):
                    tc = pl + j
                    pos = rbase + (tc % st) * plane + tc // st
                    for c in range(c_n):
                        raw[c * cs + pos] = x[n0 + b, i, j, c]
        xs = np.empty(s_n * ss, dtype=np.float32)
        for s in range(s_n):
            dst = xs[s * ss:(s + 1) * ss]
            t = slot_bits[s]
            if t == 0:
                dst[:] = raw
            elif t > 0:
                for q in range(ss):
                    dst[q] = round_half_up(raw[q], t)
            else:
                tab = slot_tables[s]
                for q in range(ss):
                    dst[q] = tab[np.int64(raw[q]) - x_min]
        length = ((b_n - 1) * ro + oh_n) * wq
        acc = np.zeros((f_n, length), dtype=np.float32)
        offs = np.empty(t_n, dtype=np.int64)
        for f in range(f_n):
            k = 0
            for c in range(c_n):
                base = kslot[f, c] * ss + c * cs
                for di in range(kh):
                    for dj in range(kw):
                        offs[k] = base + ((di % st) * st + dj % st) * plane + (di // st) * wq + dj // st
                        k += 1
            a = acc[f]
            wf = w[f]
            k = 0
            while k + 9 <= t_n:
                s0 = xs[offs[k]:]; s1 = xs[offs[k + 1]:]; s2 = xs[offs[k + 2]:]
                s3 = xs[offs[k + 3]:]; s4 = xs[offs[k + 4]:]; s5 = xs[offs[k + 5]:]
                s6 = xs[offs[k + 6]:]; s7 = xs[offs[k + 7]:]; s8 = xs[offs[k + 8]:]
                w0 = wf[k]; w1 = wf[k + 1]; w2 = wf[k + 2]; w3 = wf[k + 3]; w4 = wf[k + 4]
                w5 = wf[k + 5]; w6 = wf[k + 6]; w7 = wf[k + 7]; w8 = wf[k + 8]
                for p in range(length):  # three short chains: the sum is exact in any order
                    a[p] += (((s0[p] * w0 + s1[p] * w1 + s2[p] * w2) + (s3[p] * w3 + s4[p] * w4 + s5[p] * w5))
                             + (s6[p] * w6 + s7[p] * w7 + s8[p] * w8))
                k += 9
            while k + 3 <= t_n:
                s0 = xs[offs[k]:]; s1 = xs[offs[k + 1]:]; s2 = xs[offs[k + 2]:]
                w0 = wf[k]; w1 = wf[k + 1]; w2 = wf[k + 2]
                for p in range(length):
                    a[p] += s0[p] * w0 + s1[p] * w1 + s2[p] * w2
                k += 3
            while k < t_n:
                s0 = xs[offs[k]:]
                w0 = wf[k]
                for p in range(length):
                    a[p] += s0[p] * w0
                k += 1
        for b in range(b_n):
            for i in range(oh_n):
                p0 = (b * ro + i) * wq
                for j in range(ow_n):
                    for f in range(f_n):
                        out[n0 + b, i, j, f] = acc[f, p0 + j]
