"""8-bit post-training quantization of ResNet-8 and its integer engines.

The quantized network is what an accelerator executes:

- batch norm folded into the preceding convolution;
- weights: signed int8, symmetric, per output channel: s_w[f] = max|w_f| / 127;
- activations: unsigned 8-bit, zero point 0 (every activation is post-ReLU);
  the input is the raw 0..255 pixel with scale ``input_scale``; activation
  scales are calibrated on training images (a high percentile of each
  activation, default 99.99%);
- biases: int32 in accumulator units, round(b / (s_in s_w[f]));
- accumulation in (at least) int32: acc[f] = sum x * w + bias[f];
- requantization by an integer fixed-point multiplier and shift per channel:
  requant(acc) = (acc * m0 + 2^(shift-1)) >> shift (round half up), with
  m0 / 2^shift = s_in s_w[f] / s_out, m0 in [2^30, 2^31);
- residual addition: both branches requantized to the block's output scale,
  added, clamped to 0..255 (the ReLU);
- global average pooling: (sum of the 64 values + 32) >> 6;
- logits: the dense accumulators requantized to one common scale (signed).

Two engines run it. ``reference_forward`` is slow, obvious numpy code that calls
a product function for every multiplication of every conv and dense layer; it
is the ground truth. ``QuantizedResNet8.forward_int`` is the fast exact engine:
float convolutions on integer-valued tensors, float32 only where the layer's
worst-case partial sum is below 2^24 (every partial sum is then an exactly
representable integer), float64 otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path
from .data import sample_indices
from .models import MULTIPLYING_LAYERS, ResNet8, SameConv2d

ACT_MAX = 255
FLOAT32_EXACT = 1 << 24
QUANT_FORMAT = "maxdnn-qresnet8-v1"


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
class QLayer:
    """One multiplying layer: int8 weights, int32 bias, geometry."""

    name: str
    weight: np.ndarray  # int64 [F, C, kh, kw]
    bias: np.ndarray  # int64 [F]
    stride: int
    pads: tuple[int, int, int, int]  # (left, right, top, bottom)
    in_scale: float
    w_scale: np.ndarray  # float64 [F]
    in_hw: tuple[int, int]  # input height, width

    @property
    def out_hw(self) -> tuple[int, int]:
        return conv_out_hw(self.in_hw, self.weight.shape[2:], self.stride, self.pads)

    @property
    def acc_scale(self) -> np.ndarray:
        return self.in_scale * self.w_scale

    def requant_bound(self, bits: int = 8) -> int:
        """|accumulator + bias| bound for any multiplier with |product| <= 2^(2 bits - 1)."""
        k = int(np.prod(self.weight.shape[1:]))
        return k * (1 << (2 * bits - 1)) + int(np.abs(self.bias).max())

    @cached_property
    def exact_bound(self) -> int:
        """Worst-case |partial sum| of the exact layer over 0..255 inputs."""
        return layer_bound(self.weight, ACT_MAX)


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


# block structure: (stack, has projection)
STACKS = [("s1", False), ("s2", True), ("s3", True)]


@dataclass
class QuantizedResNet8:
    layers: dict[str, QLayer]
    requant: dict[str, Requant]  # keyed by edge name
    act_scales: dict[str, float]
    logit_scale: float
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------ fast exact engine
    def _torch_params(self, device):
        key = str(device)
        cache = self.__dict__.setdefault("_tp", {})
        if key not in cache:
            cache[key] = {
                "w": {n: torch.as_tensor(l.weight, device=device) for n, l in self.layers.items()},
                "b": {n: torch.as_tensor(l.bias, device=device, dtype=torch.float64).view(1, -1, 1, 1)
                      for n, l in self.layers.items()},
                "rq": {n: (torch.as_tensor(r.m0, device=device, dtype=torch.float64).view(1, -1, 1, 1),
                           torch.as_tensor(2.0 ** (r.shift - 1), device=device).view(1, -1, 1, 1),
                           torch.as_tensor(2.0 ** -r.shift.astype(np.float64), device=device).view(1, -1, 1, 1))
                       for n, r in self.requant.items()},
            }
        return cache[key]

    def exact_conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Exact accumulators (without bias; float tensor of integers) of layer ``name``."""
        layer = self.layers[name]
        w = self._torch_params(x.device)["w"][name]
        return float_conv_exact(x, w, layer.stride, layer.pads, layer.exact_bound)

    @torch.no_grad()
    def forward_int(self, x: torch.Tensor, conv: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    taps: dict | None = None) -> torch.Tensor:
        """Integer logits [N, 10] (int64) for integer pixels x [N, 3, 32, 32].

        ``conv(name, x) -> accumulators`` replaces the exact convolution of
        every multiplying layer (the approximate engine plugs in here); x is a
        float32 tensor of integers 0..255 and the result a float tensor of the
        exact integer accumulators. ``taps``, when given, receives each layer's
        input.

        Every value is an integer held exactly in floating point: activations
        (0..255) and pooled sums in float32; accumulators are exact by the
        conv's own bound; requantization runs in float64, where
        (acc + bias) * m0 + 2^(shift-1) < 2^53 holds by the choice of m0's
        width (``Requant.from_scales``), so floor(... * 2^-shift) equals the
        integer formula (acc * m0 + 2^(shift-1)) >> shift exactly.
        """
        conv = conv or self.exact_conv
        p = self._torch_params(x.device)
        x = x.to(torch.float32)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN convolutions run faster on NHWC

        def layer_rq(name, inp, edge=None):
            if taps is not None:
                taps[name] = inp
            t = conv(name, inp).to(torch.float64).add_(p["b"][name])
            return rq(edge or name, t)

        def rq(edge, t):
            m0, half, inv = p["rq"][edge]
            return t.to(torch.float64).mul_(m0).add_(half).mul_(inv).floor_()

        def relu8(v):
            return v.clamp_(0, ACT_MAX).to(torch.float32)

        a = relu8(layer_rq("conv1", x))
        for s, proj in STACKS:
            y = relu8(layer_rq(f"{s}.conv1", a))
            y = layer_rq(f"{s}.conv2", y)
            sc = layer_rq(f"{s}.proj", a) if proj else rq(f"{s}.identity", a)
            a = relu8(y.add_(sc))
        pooled = torch.floor((a.sum(dim=(2, 3), keepdim=True) + 32) / 64)
        logits = layer_rq("fc", pooled)
        return logits.flatten(1).to(torch.int64)

    def predict(self, images: np.ndarray, batch_size: int = 100, device: str = "cpu", conv=None) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i:i + batch_size], device=device)
            out.append(self.forward_int(x, conv).argmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        arrays = {"format": np.array(QUANT_FORMAT), "logit_scale": np.array(self.logit_scale)}
        for n, l in self.layers.items():
            arrays[f"L/{n}/weight"] = l.weight
            arrays[f"L/{n}/bias"] = l.bias
            arrays[f"L/{n}/w_scale"] = l.w_scale
            arrays[f"L/{n}/geom"] = np.array([l.stride, *l.pads, *l.in_hw], dtype=np.int64)
            arrays[f"L/{n}/in_scale"] = np.array(l.in_scale)
        for n, r in self.requant.items():
            arrays[f"R/{n}/m0"] = r.m0
            arrays[f"R/{n}/shift"] = r.shift
        for n, s in self.act_scales.items():
            arrays[f"A/{n}"] = np.array(s)
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizedResNet8":
        with np.load(path) as z:
            if "format" not in z or str(z["format"]) != QUANT_FORMAT:
                raise ValueError(f"{path}: not a maxdnn quantized ResNet-8")
            layers, requant, acts = {}, {}, {}
            for n in MULTIPLYING_LAYERS:
                g = z[f"L/{n}/geom"]
                layers[n] = QLayer(n, z[f"L/{n}/weight"], z[f"L/{n}/bias"], int(g[0]), tuple(int(v) for v in g[1:5]),
                                   float(z[f"L/{n}/in_scale"]), z[f"L/{n}/w_scale"], (int(g[5]), int(g[6])))
            for k in z.files:
                if k.startswith("R/") and k.endswith("/m0"):
                    n = k[2:-3]
                    requant[n] = Requant(z[k], z[f"R/{n}/shift"])
                elif k.startswith("A/"):
                    acts[k[2:]] = float(z[k])
            return cls(layers, requant, acts, float(z["logit_scale"]), {"source": str(path)})


def layer_bound(weight: np.ndarray, x_max: int) -> int:
    """Worst-case |partial sum| of a layer: max over filters of sum|w| times max|x|."""
    return int(np.abs(weight).reshape(len(weight), -1).sum(1).max()) * int(x_max)


def float_conv_exact(x: torch.Tensor, w: torch.Tensor, stride: int, pads, bound: int) -> torch.Tensor:
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
        f_out, _, kh, kw = wf.shape
        cols = F.unfold(xp, (kh, kw), stride=stride)  # [N, C*kh*kw, L], channel-major
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out = torch.matmul(wf.reshape(f_out, -1), cols)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return out.reshape(xp.shape[0], f_out, *conv_out_hw(xp.shape[2:], (kh, kw), stride, (0, 0, 0, 0)))
    if not symmetric:
        xp = F.pad(xp, pads)
    return F.conv2d(xp, wf, stride=stride, padding=left if symmetric else 0)


# ---------------------------------------------------------------- quantization


def _fold_bn(conv: SameConv2d, bn) -> tuple[np.ndarray, np.ndarray]:
    w = conv.weight.detach().double().numpy()
    b = conv.bias.detach().double().numpy()
    if bn is None:
        return w, b
    g = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
    return w * g[:, None, None, None], (b - bn.running_mean.detach().double().numpy()) * g + bn.bias.detach().double().numpy()


@torch.no_grad()
def calibrate(model: ResNet8, images: np.ndarray, percentile: float = 99.99, batch_size: int = 500) -> dict[str, float]:
    """Activation ranges of the float model on ``images`` (uint8 NCHW)."""
    model = model.eval()
    store: dict[str, list[np.ndarray]] = {}

    def record(name, t):
        store.setdefault(name, []).append(t.flatten().float().numpy())

    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size]).float() * model.input_scale
        a = F.relu(model.bn1(model.conv1(x)))
        record("conv1", a)
        for s, _ in STACKS:
            st = getattr(model, s)
            y = F.relu(st.bn1(st.conv1(a)))
            record(f"{s}.conv1", y)
            a = st(a)
            record(s, a)
    ranges = {}
    for k, v in store.items():
        v = np.concatenate(v)
        r = float(np.percentile(v, percentile)) if percentile < 100 else float(v.max())
        ranges[k] = max(r, 1e-8)
    return ranges


def quantize(model: ResNet8, calib_images: np.ndarray, percentile: float = 99.99) -> QuantizedResNet8:
    """Post-training 8-bit quantization (see the module docstring)."""
    ranges = calibrate(model, calib_images, percentile)
    act = {"input": model.input_scale}
    act.update({k: v / ACT_MAX for k, v in ranges.items()})
    layers: dict[str, QLayer] = {}
    requant: dict[str, Requant] = {}

    def add(name, conv, bn, in_scale, in_hw, out_scale):
        """Quantize one layer and its requantization to ``out_scale`` (None: its smallest
        accumulator scale); returns its output size."""
        w, b = _fold_bn(conv, bn)
        absmax = np.abs(w).reshape(len(w), -1).max(1)
        w_scale = np.where(absmax > 0, absmax / 127.0, 1.0)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int64)
        bq = np.round(b / (in_scale * w_scale)).astype(np.int64)
        pads = conv.pads(*in_hw) if isinstance(conv, SameConv2d) else (0, 0, 0, 0)
        layer = QLayer(name, wq, bq, conv.stride[0] if isinstance(conv, SameConv2d) else 1, pads,
                       float(in_scale), w_scale, in_hw)
        layers[name] = layer
        out_scale = float(layer.acc_scale.min()) if out_scale is None else out_scale
        requant[name] = Requant.from_scales(layer.acc_scale, out_scale, layer.requant_bound())
        return layer.out_hw

    hw = add("conv1", model.conv1, model.bn1, act["input"], (32, 32), act["conv1"])
    prev = "conv1"
    for s, proj in STACKS:
        st = getattr(model, s)
        hw_in = hw
        hw = add(f"{s}.conv1", st.conv1, st.bn1, act[prev], hw_in, act[f"{s}.conv1"])
        add(f"{s}.conv2", st.conv2, st.bn2, act[f"{s}.conv1"], hw, act[s])
        if proj:
            add(f"{s}.proj", st.proj, None, act[prev], hw_in, act[s])
        else:
            requant[f"{s}.identity"] = Requant.from_scales([act[prev]], act[s], ACT_MAX)
        prev = s
    # dense layer as a 1x1 convolution over the pooled [N, 64, 1, 1] activations
    fc_w = model.fc.weight.detach().double().numpy()[:, :, None, None]
    fc = torch.nn.Conv2d(fc_w.shape[1], fc_w.shape[0], 1)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(fc_w))
        fc.bias.copy_(model.fc.bias.detach())
    add("fc", fc, None, act[prev], (1, 1), None)  # logits share one scale: the smallest accumulator scale
    logit_scale = float(layers["fc"].acc_scale.min())
    return QuantizedResNet8(layers, requant, act, logit_scale, {"percentile": percentile, "calib_images": len(calib_images)})


def calibration_images(train_images: np.ndarray, n: int = 1000, seed: int = 0) -> np.ndarray:
    return train_images[sample_indices(len(train_images), n, seed)]


# ---------------------------------------------------------------- reference engine


Prod = Callable[[np.ndarray, np.ndarray], np.ndarray]


def exact_prod(x, w):
    return np.asarray(x, dtype=np.int64) * np.asarray(w, dtype=np.int64)


def reference_conv(x: np.ndarray, w: np.ndarray, stride: int, pads, prod_for: Callable[[int, int], Prod]) -> np.ndarray:
    """Accumulators (no bias) with ``prod_for(f, c)(x_values, w_value)`` for every multiplication.

    Padding positions contribute nothing (no product is formed for them).
    """
    left, r, t, b = pads
    n, c_in, h, wd = x.shape
    f_out, _, kh, kw = w.shape
    ho = (h + t + b - kh) // stride + 1
    wo = (wd + left + r - kw) // stride + 1
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (t, b), (left, r)))
    valid = np.pad(np.ones((h, wd), dtype=bool), ((t, b), (left, r)))
    acc = np.zeros((n, f_out, ho, wo), dtype=np.int64)
    for f in range(f_out):
        for c in range(c_in):
            prod = prod_for(f, c)
            for i in range(kh):
                for j in range(kw):
                    xs = xp[:, c, i:i + stride * ho:stride, j:j + stride * wo:stride]
                    m = valid[i:i + stride * ho:stride, j:j + stride * wo:stride]
                    acc[:, f] += np.where(m, prod(xs, w[f, c, i, j]), 0)
    return acc


def reference_forward(q: QuantizedResNet8, images: np.ndarray,
                      prod_for_layer: Callable[[str], Callable[[int, int], Prod]] | None = None) -> np.ndarray:
    """Integer logits [N, 10] by the slow reference engine (numpy, int64)."""
    prod_for_layer = prod_for_layer or (lambda name: (lambda f, c: exact_prod))

    def layer(name, inp):
        L = q.layers[name]
        return reference_conv(inp, L.weight, L.stride, L.pads, prod_for_layer(name)) + L.bias[None, :, None, None]

    def rq(edge, acc):
        r = q.requant[edge]
        m0 = r.m0[None, :, None, None]
        sh = r.shift[None, :, None, None]
        out = np.empty_like(acc)
        # one channel at a time, written out in full: (acc * m0 + 2^(shift-1)) >> shift
        for f in range(acc.shape[1]):
            k = f if r.m0.shape[0] > 1 else 0
            out[:, f] = (acc[:, f] * int(m0[0, k, 0, 0]) + (1 << (int(sh[0, k, 0, 0]) - 1))) >> int(sh[0, k, 0, 0])
        return out

    a = np.clip(rq("conv1", layer("conv1", images.astype(np.int64))), 0, ACT_MAX)
    for s, proj in STACKS:
        y = np.clip(rq(f"{s}.conv1", layer(f"{s}.conv1", a)), 0, ACT_MAX)
        y = rq(f"{s}.conv2", layer(f"{s}.conv2", y))
        sc = rq(f"{s}.proj", layer(f"{s}.proj", a)) if proj else rq(f"{s}.identity", a)
        a = np.clip(y + sc, 0, ACT_MAX)
    pooled = (a.sum(axis=(2, 3), keepdims=True) + 32) // 64
    return rq("fc", layer("fc", pooled))[:, :, 0, 0]
