"""8-bit quantization arithmetic shared by the integer graph and its engines.

- weights: signed int8, symmetric, per output channel: s_w[f] = max|w_f| / 127;
- biases: int32 in accumulator units, round(b / (s_in s_w[f]));
- requantization by an integer fixed-point multiplier and shift per channel:
  requant(acc) = (acc * m0 + 2^(shift-1)) >> shift (round half up), with
  m0 / 2^shift = s_in s_w[f] / s_out and m0 as wide as exactness in float64
  allows (at most 31 bits);
- exact integer convolutions through float ones (``float_conv_exact``).

The graph these build is ``maxdnn.graph``; the PyTorch importer that
quantizes a float network into it is ``maxdnn.torch_frontend``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import sample_indices

ACT_MAX = 255
FLOAT32_EXACT = 1 << 24


def quantize_multiplier(m: float, bits: int = 31) -> tuple[int, int]:
    """(m0, shift) with m0 in [2^(bits-1), 2^bits) and m0 / 2^shift ~= m (m > 0)."""
    if m <= 0:
        raise ValueError(f"requantization multiplier must be positive, got {m}")
    frac, exp = math.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    m0 = int(round(frac * (1 << bits)))
    if m0 == 1 << bits:
        m0 //= 2
        exp += 1
    shift = bits - exp
    if shift < 1 or shift > 62:
        raise ValueError(f"requantization multiplier {m} out of range")
    return m0, shift


def conv_out_hw(in_hw, k_hw, stride: int, pads) -> tuple[int, int]:
    """Output height and width of a convolution with (left, right, top, bottom) padding."""
    left, r, t, b = pads
    return ((in_hw[0] + t + b - k_hw[0]) // stride + 1, (in_hw[1] + left + r - k_hw[1]) // stride + 1)


@dataclass
class Requant:
    """Per-channel fixed-point requantization to an output scale."""

    m0: np.ndarray  # int64 [F]
    shift: np.ndarray  # int64 [F]

    @classmethod
    def from_scales(cls, acc_scale, out_scale, acc_bound: int) -> "Requant":
        """m0 gets at most 31 bits, fewer where needed so that |acc| * m0 + 2^(shift-1) < 2^53
        for every |acc| <= acc_bound: the fast engine then requantizes exactly in float64."""
        bits = min(31, 52 - int(acc_bound).bit_length())
        pairs = [quantize_multiplier(float(a) / out_scale, bits) for a in np.atleast_1d(acc_scale)]
        return cls(np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64))


def layer_bound(weight: np.ndarray, x_max: int) -> int:
    """Worst-case |partial sum| of a layer: max over filters of sum|w| times max|x|."""
    return int(np.abs(weight).reshape(len(weight), -1).sum(1).max()) * int(x_max)


def float_conv_exact(x: torch.Tensor, w: torch.Tensor, stride: int, pads, bound: int, groups: int = 1) -> torch.Tensor:
    """Exact integer convolution through a float one (returns the float result; its values are integers).

    ``bound`` must bound every |partial sum| (e.g. max_f sum|w_f| * max|x|):
    below 2^24 float32 represents every partial sum exactly, whatever the
    summation order; otherwise float64 (exact below 2^53) is used. On CUDA
    the product runs as im2col + matmul with TF32 disabled, since cuDNN may pick
    inexact (Winograd, FFT) algorithms.
    """
    if bound >= 1 << 53:
        raise ValueError("accumulator bound exceeds 2^53: no exact float path")
    dtype = torch.float32 if bound < FLOAT32_EXACT else torch.float64
    left, r, t, b = pads
    symmetric = left == r == t == b
    xp = x if x.dtype == dtype else x.to(dtype)
    wf = w if w.dtype == dtype else w.to(dtype)
    if x.device.type == "cuda":
        if left or r or t or b:
            xp = F.pad(xp, pads)
        f_out, cg, kh, kw = wf.shape
        cols = F.unfold(xp, (kh, kw), stride=stride)  # [N, C*kh*kw, L], channel-major
        n, _, L = cols.shape
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:  # per group: [F/g, cg*k] x [N, cg*k, L]
            out = torch.matmul(wf.reshape(groups, f_out // groups, -1)[None],
                               cols.reshape(n, groups, cg * kh * kw, L)).reshape(n, f_out, L)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return out.reshape(xp.shape[0], f_out, *conv_out_hw(xp.shape[2:], (kh, kw), stride, (0, 0, 0, 0)))
    if not symmetric:
        xp = F.pad(xp, pads)
    return F.conv2d(xp, wf, stride=stride, padding=left if symmetric else 0, groups=groups)


def calibration_images(train_images: np.ndarray, n: int = 1000, seed: int = 0) -> np.ndarray:
    return train_images[sample_indices(len(train_images), n, seed)]


