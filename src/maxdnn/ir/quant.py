"""8-bit quantization arithmetic shared by the integer graph and its engines.

- weights: signed int8, symmetric, per output channel: s_w[f] = max|w_f| / 127;
- biases: int32 in accumulator units, round(b / (s_in s_w[f]));
- requantization by an integer fixed-point multiplier and shift per channel:
  requant(acc) = (acc * m0 + 2^(shift-1)) >> shift (round half up), with
  m0 / 2^shift = s_in s_w[f] / s_out and m0 as wide as exactness in float64
  allows (at most 31 bits);
- exact integer convolutions through float ones (``float_conv_exact``).

The graph these build is ``maxdnn.ir.graph``; the PyTorch importer that
quantizes a float network into it is ``maxdnn.frontends.pytorch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.data import sample_indices

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


def tflite_quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: (Q0.31 significand, exponent) with m ~= q / 2^31 * 2^exponent."""
    if m == 0:
        return 0, 0
    frac, exp = math.frexp(m)
    q = math.floor(abs(frac) * (1 << 31) + 0.5) * (1 if frac >= 0 else -1)  # std::round: half away from zero
    if q == 1 << 31:
        q //= 2
        exp += 1
    if exp < -31:
        return 0, 0
    return int(q), int(min(exp, 30))


def float32_parts(v: float) -> tuple[int, int]:
    """(m0, shift) with m0 * 2^-shift == v exactly for a positive float32 v (m0 its significand, < 2^24)."""
    v = float(np.float32(v))
    if not v > 0 or not math.isfinite(v):
        raise ValueError(f"requantization scale must be a positive finite float32, got {v}")
    frac, exp = math.frexp(v)
    m0, shift = int(frac * (1 << 24)), 24 - exp
    while m0 % 2 == 0:
        m0, shift = m0 // 2, shift - 1
    return m0, shift


def float32_requant(acc, scale):
    """onnxruntime's MlasRequantizeOutput before the zero point: nearest-even integer of
    float32(float32(acc) * scale) (numpy; acc integers as int64 or float64, scale float32 broadcasting)."""
    return np.rint(np.asarray(acc).astype(np.float32) * np.asarray(scale, dtype=np.float32)).astype(np.int64)


def tflite_single_multiply(x, m0, shift):
    """(x * m0 + 2^(30 - shift)) >> (31 - shift) (numpy or torch int64; shift may broadcast)."""
    total = 31 - shift
    if isinstance(x, torch.Tensor):
        return torch.bitwise_right_shift(x * m0 + torch.bitwise_left_shift(torch.ones_like(total), total - 1), total)
    total = np.asarray(total, dtype=np.int64)
    return (np.asarray(x, dtype=np.int64) * m0 + (np.int64(1) << (total - 1))) >> total


def tflite_multiply(x: np.ndarray, m0, shift) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier on int64 arrays holding int32 values (numpy, element-wise)."""
    x = np.asarray(x, dtype=np.int64)
    m0 = np.asarray(m0, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    x = x * (np.int64(1) << np.maximum(shift, 0))
    ab = x * m0
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = _trunc_div(ab + nudge, 1 << 31)  # C++ integer division truncates toward zero
    right = np.maximum(-shift, 0)
    mask = (np.int64(1) << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + (remainder > threshold)


def tflite_multiply_torch(x: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``tflite_multiply`` on int64 torch tensors (m0, shift broadcast against x)."""
    x = x * torch.bitwise_left_shift(torch.ones_like(shift), shift.clamp(min=0))
    ab = x * m0
    nudge = torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    right = (-shift).clamp(min=0)
    mask = torch.bitwise_left_shift(torch.ones_like(right), right) - 1
    threshold = torch.bitwise_right_shift(mask, 1) + (high < 0).to(torch.int64)
    return torch.bitwise_right_shift(high, right) + (torch.bitwise_and(high, mask) > threshold).to(torch.int64)


def _trunc_div(a: np.ndarray, b: int) -> np.ndarray:
    q = np.abs(a) // b
    return np.where(a < 0, -q, q)


def same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_out_hw(in_hw, k_hw, stride: int, pads) -> tuple[int, int]:
    """Output height and width of a convolution with (left, right, top, bottom) padding."""
    left, r, t, b = pads
    return ((in_hw[0] + t + b - k_hw[0]) // stride + 1, (in_hw[1] + left + r - k_hw[1]) // stride + 1)


@dataclass
class Requant:
    """Per-channel fixed-point requantization to an output scale.

    ``mode`` "half_up" (maxdnn's own graphs): (acc * m0 + 2^(shift-1)) >> shift.
    ``mode`` "tflite" (imported TFLite models): TFLite's MultiplyByQuantizedMultiplier with a
    Q0.31 multiplier m0 and a signed shift (positive: left), i.e.
    RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc * 2^max(shift, 0), m0), max(-shift, 0)).
    ``mode`` "tflite-single": the single-rounding form (acc * m0 + 2^(30 - shift)) >> (31 - shift), which
    LiteRT's reference FULLY_CONNECTED kernel computes (measured against ai-edge-litert).
    ``mode`` "float32" (imported ONNX models, onnxruntime's MlasRequantizeOutput): the accumulator rounded to
    float32, times the float32 scale m0 * 2^-shift (held exactly: m0 < 2^24), rounded to float32, then to the
    nearest integer, ties to even.
    """

    m0: np.ndarray  # int64 [F]
    shift: np.ndarray  # int64 [F]
    mode: str = "half_up"

    @classmethod
    def tflite(cls, real_multipliers, mode: str = "tflite") -> "Requant":
        """TFLite's QuantizeMultiplier of each real multiplier (double precision, round half away from zero)."""
        pairs = [tflite_quantize_multiplier(float(m)) for m in np.atleast_1d(real_multipliers)]
        return cls(np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64),
                   mode)

    @classmethod
    def float32(cls, scales) -> "Requant":
        """Float32 scales held exactly as m0 * 2^-shift (m0 the 24-bit significand)."""
        pairs = [float32_parts(float(v)) for v in np.atleast_1d(np.asarray(scales, dtype=np.float32))]
        return cls(np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64),
                   "float32")

    def float32_scales(self) -> np.ndarray:
        """The float32 scales of a "float32" requantization (exact)."""
        return (self.m0.astype(np.float64) * np.exp2(-self.shift.astype(np.float64))).astype(np.float32)

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


