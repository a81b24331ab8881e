"""Approximate inference: per-layer, per-filter and per-kernel multiplier assignment.

An assignment gives each multiplying layer an integer array of shape
[filters, input channels] that indexes a list of multiplier specs. Layer-level
assignments are constant arrays, filter-level ones have constant rows, and
kernel-level ones are arbitrary.

``approx_conv2d`` computes the exact int64 accumulators in which every product
x * w of kernel (f, c) is the assigned multiplier's product. Two paths:

- operand-separable multipliers (product = f(x) * g(w), e.g. ROUP:
  R_R(x) * R_2P(w)): kernels are grouped by their activation transform. On the
  CPU, a layer with three groups or more runs one compiled convolution that
  writes each group's transformed copy of a few images at a time and computes
  every filter from its kernels' copies (``_transform_conv``); otherwise (one
  or two groups, or on CUDA), per group, one float convolution of the
  transformed activations with the transformed weights of the group's kernels
  (zero elsewhere), over only the filters the group touches. float32 is used
  only where the worst-case |partial sum| is provably below 2^24, float64
  otherwise;
- any lookup-table multiplier: a compiled numba kernel (CPU, parallel) or a
  torch gather (any device).

Padding positions form no product (and are not counted as multiplications).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import atomic_path, load_npz, write_json
from maxdnn.multipliers.models import Multiplier, SpecError, get_multiplier, round_at
from maxdnn.ir.graph import GRAPH_BITS, QuantizedGraph, pixel_rows
from maxdnn.engine._round_kernel import round_stack, scatter_channels
from maxdnn.engine._transform_conv import ROUND_TABLE, TransformConv
from maxdnn.ir.quant import ACT_MAX, FLOAT32_EXACT, conv_out_hw, float_conv_exact, layer_bound

ASSIGNMENT_FORMAT = "maxdnn-assignment-v1"


class AssignmentError(MaxdnnError, ValueError):
    """A problem with an assignment, as one line naming the file and layer."""


# ---------------------------------------------------------------- assignments


@dataclass
class Assignment:
    """Multiplier specs and, per layer, an index array [filters, input channels] into them (saved as JSON,
    with an .npz beside it for kernel-level layers).

    Example::

        a = maxdnn.layer_assignment(graph, {"s1.conv1": "roup-p1r2"})
        a.save("a.json")
        b = maxdnn.Assignment.load("a.json", graph)   # checked against the graph's layers
        b.granularity()                               # 'layer'
    """

    specs: list[str]
    maps: dict[str, np.ndarray]
    bits: int = 8
    meta: dict = field(default_factory=dict)

    def granularity(self) -> str:
        """'layer', 'filter' or 'kernel': the finest level the maps use."""
        level = "layer"
        for m in self.maps.values():
            if (m != m[:, :1]).any():
                return "kernel"
            if (m != m.flat[0]).any():
                level = "filter"
        return level

    def multipliers(self, x_signed: bool = False) -> list[Multiplier]:
        return [get_multiplier(s, self.bits, x_signed) for s in self.specs]

    def reference_products(self, qnet: QuantizedGraph):
        """``prod_for_layer`` for ``maxdnn.engine.reference.reference_forward``: layer -> (f, c) -> product function
        (multipliers take each layer's operand signedness)."""
        self.bind(qnet)
        mults = {s: self.multipliers(x_signed=s) for s in (False, True)}
        return lambda name: (lambda f, c: mults[qnet.layers[name].x_signed][self.maps[name][f, c]])

    @classmethod
    def uniform(cls, qnet: QuantizedGraph, spec: str = "exact", bits: int = 8) -> "Assignment":
        return cls([spec], {n: np.zeros(l.weight.shape[:2], dtype=np.int64) for n, l in qnet.layers.items()}, bits)

    # ---- JSON (+ npz for kernel-level layers)
    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        layers: dict = {}
        arrays: dict[str, np.ndarray] = {}
        for name, m in self.maps.items():
            if (m == m.flat[0]).all():
                layers[name] = int(m.flat[0])
            elif (m == m[:, :1]).all():
                layers[name] = [int(v) for v in m[:, 0]]
            else:
                layers[name] = "npz"
                arrays[name] = m.astype(np.int16)
        doc = {"format": ASSIGNMENT_FORMAT, "bits": self.bits, "specs": self.specs, "layers": layers}
        if self.meta:
            doc["meta"] = self.meta
        if arrays:
            npz = path.with_suffix(".npz")
            doc["arrays"] = npz.name
            with atomic_path(npz, ".npz") as tmp:
                np.savez_compressed(tmp, **arrays)
        write_json(path, doc)

    @classmethod
    def load(cls, path: str | os.PathLike, qnet: QuantizedGraph | None = None) -> "Assignment":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise AssignmentError(f"{path}: no such assignment file") from None
        except IsADirectoryError:
            raise AssignmentError(f"{path}: a folder, not an assignment file (JSON)") from None
        except OSError as e:
            raise AssignmentError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AssignmentError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != ASSIGNMENT_FORMAT:
            raise AssignmentError(f"{path}: not a maxdnn assignment (format must be '{ASSIGNMENT_FORMAT}')")
        bits = doc.get("bits", 8)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise AssignmentError(f"{path}: 'bits' must be an operand width from 2 to 16, got {bits!r}")
        specs = doc.get("specs")
        if not isinstance(specs, list) or not specs:
            raise AssignmentError(f"{path}: 'specs' must be a non-empty list of multiplier specs")
        for s in specs:
            try:
                get_multiplier(str(s), bits)
            except SpecError as e:
                raise AssignmentError(f"{path}: {e}") from None
        arrays = {}
        if "arrays" in doc:
            name = doc["arrays"]
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise AssignmentError(f"{path}: 'arrays' must name an .npz file beside it, got {name!r}")
            arrays = load_npz(path.parent / name, AssignmentError, "the assignment's kernel-level arrays")
        layers = doc.get("layers")
        if not isinstance(layers, dict):
            raise AssignmentError(f"{path}: 'layers' must be an object mapping layer names to assignments")
        maps = {}
        for name, v in layers.items():
            if v == "npz":
                if name not in arrays:
                    raise AssignmentError(f"{path}: layer {name}: no array '{name}' in {doc.get('arrays')}")
                raw = arrays[name]
                if raw.dtype.kind not in "iu":
                    raise AssignmentError(f"{path}: layer {name}: the array in {doc.get('arrays')} holds {raw.dtype}, "
                                          "not integer indices")
                maps[name] = np.asarray(raw, dtype=np.int64)
            else:
                try:
                    raw = np.asarray(v)
                    bad = raw[raw != np.floor(raw.astype(float))] if raw.dtype.kind == "f" else None
                except (ValueError, TypeError):
                    raise AssignmentError(f"{path}: layer {name}: expected an index, a list per filter, or a [filters][channels] list") from None
                if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                    raise AssignmentError(f"{path}: layer {name}: {raw[~np.isfinite(raw)].flat[0]} is not an index")
                if raw.dtype.kind not in "iuf" or raw.size == 0:
                    raise AssignmentError(f"{path}: layer {name}: expected an index, a list per filter, or a [filters][channels] list")
                if bad is not None and bad.size:
                    raise AssignmentError(f"{path}: layer {name}: index {bad.flat[0]:g} is not an integer")
                maps[name] = raw.astype(np.int64)
        a = cls([str(s) for s in specs], maps, bits, doc.get("meta", {}))
        if qnet is not None:
            a.bind(qnet, where=str(path))
        return a

    def bind(self, qnet: QuantizedGraph, where: str = "assignment") -> "Assignment":
        """Validate against a network and expand to full [F, C] arrays (missing layers: exact)."""
        full = {}
        if self.bits != GRAPH_BITS:
            raise AssignmentError(f"{where}: {self.bits}-bit multipliers, but the network's multiplying layers take "
                                  f"{GRAPH_BITS}-bit operands (\"bits\" must be {GRAPH_BITS})")
        for name in self.maps:
            if name not in qnet.layers:
                raise AssignmentError(f"{where}: unknown layer '{name}' (layers: {', '.join(qnet.layers)})")
        for name, layer in qnet.layers.items():
            shape = layer.weight.shape[:2]
            if name not in self.maps:
                if "exact" not in self.specs:
                    self.specs.append("exact")
                full[name] = np.full(shape, self.specs.index("exact"), dtype=np.int64)
                continue
            m = self.maps[name]
            if m.ndim == 0:
                m = np.full(shape, int(m), dtype=np.int64)
            elif m.ndim == 1:
                if m.shape[0] != shape[0]:
                    raise AssignmentError(f"{where}: layer {name}: {m.shape[0]} filter entries, the layer has {shape[0]} filters")
                m = np.repeat(m[:, None], shape[1], axis=1)
            elif m.shape != shape:
                raise AssignmentError(f"{where}: layer {name}: shape {list(m.shape)}, expected [filters, channels] = {list(shape)}")
            if m.min() < 0 or m.max() >= len(self.specs):
                bad = int(m.min()) if m.min() < 0 else int(m.max())
                raise AssignmentError(f"{where}: layer {name}: index {bad} out of range (0..{len(self.specs) - 1})")
            full[name] = m
        self.maps = full
        return self


def assignment_key(a: Assignment) -> str:
    """A digest of what an assignment computes (its specs and every layer's map)."""
    h = hashlib.sha256(json.dumps(a.specs).encode())
    for name in sorted(a.maps):
        h.update(name.encode())
        h.update(np.ascontiguousarray(a.maps[name], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def layer_assignment(qnet, per_layer: dict[str, str], bits: int = 8) -> Assignment:
    """One multiplier per layer (layers not named are exact)."""
    check_layer_names(qnet, per_layer)
    specs = sorted(set(per_layer.values()) | {"exact"})
    maps = {n: np.full(l.weight.shape[:2], specs.index(per_layer.get(n, "exact")), dtype=np.int64)
            for n, l in qnet.layers.items()}
    return Assignment(specs, maps, bits)


def filter_assignment(qnet, per_filter: dict[str, Sequence[str]], bits: int = 8) -> Assignment:
    """A multiplier per output channel (constant rows)."""
    check_layer_names(qnet, per_filter)
    specs = sorted({s for v in per_filter.values() for s in v} | {"exact"})
    maps = {}
    for n, l in qnet.layers.items():
        f, c = l.weight.shape[:2]
        row = [specs.index(s) for s in per_filter.get(n, ["exact"] * f)]
        if len(row) != f:
            raise AssignmentError(f"layer {n}: {len(row)} filter entries, the layer has {f} filters")
        maps[n] = np.repeat(np.asarray(row, dtype=np.int64)[:, None], c, axis=1)
    return Assignment(specs, maps, bits)


def check_layer_names(qnet, names) -> None:
    """``AssignmentError`` naming the first of ``names`` that is not a multiplying layer of ``qnet``."""
    unknown = [n for n in names if n not in qnet.layers]
    if unknown:
        raise AssignmentError(f"unknown layer '{unknown[0]}' (layers: {', '.join(qnet.layers)})")


def kernel_assignment(specs: list[str], maps: dict[str, np.ndarray], bits: int = 8) -> Assignment:
    """Arbitrary [filters, channels] index arrays."""
    return Assignment(list(specs), {k: np.asarray(v, dtype=np.int64) for k, v in maps.items()}, bits)


# ---------------------------------------------------------------- emulation


def _as_multipliers(specs, bits, x_signed=False) -> list[Multiplier]:
    return [s if isinstance(s, Multiplier) else get_multiplier(s, bits, x_signed) for s in specs]


def _pads(padding, kh, kw):
    if isinstance(padding, int):
        return (padding, padding, padding, padding)
    if len(padding) == 2:
        return (padding[1], padding[1], padding[0], padding[0])
    return tuple(padding)  # (left, right, top, bottom)


def transform_groups(mults: list[Multiplier], used, xs: np.ndarray) -> list[tuple[np.ndarray, list[int]]]:
    """The separable multipliers ``mults[i]`` (i in ``used``) grouped by activation transform over the operand
    values ``xs``: (the transform's table over xs, member indices) per group, in order of first use."""
    by_key: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for i in used:
        t = mults[i].x_transform(xs)
        by_key.setdefault(t.tobytes(), (t, []))[1].append(int(i))
    return list(by_key.values())


@dataclass
class _Group:
    """Kernels that share one activation transform."""

    round_bit: int | None  # the transform is R_t(x) with this t (0: identity) ...
    x_table: torch.Tensor | None  # ... else a table over the x range
    x_max: int  # max |transformed x|
    filters: np.ndarray  # filter indices the group touches
    weight: np.ndarray  # transformed weights of the group's kernels, zero elsewhere [F, C, kh, kw]


class LayerPlan:
    """Precomputed emulation of one layer under one assignment.

    Separable multipliers: kernels are grouped by activation transform. On
    the CPU, a layer with at least ``FUSED_MIN_GROUPS`` groups runs the
    compiled transform convolution (``_transform_conv``): it writes each
    group's transformed copy of a few images at a time and computes every
    filter from its kernels' copies, at about twice one exact convolution's
    time whatever the groups. (With two groups oneDNN's convolutions cost
    about the same in total: faster on layers of many channels and few
    pixels, slower on strided ones, so they stay.) Otherwise, when the
    groups touch disjoint sets of filters (layer- and filter-level
    assignments), each group is one oneDNN convolution over its own filters;
    when they do not, the transformed activations of all groups are stacked
    along the channel axis and convolved once with the stacked transformed
    weights (cost: one convolution per distinct activation transform).
    ``fused`` forces the choice (True/False); None chooses by the group
    count.
    """

    FUSED_MIN_GROUPS = 3

    def __init__(self, w: np.ndarray, mults: list[Multiplier], amap: np.ndarray, stride: int, pads,
                 device="cpu", x_min: int = 0, x_max: int = ACT_MAX, groups: int = 1, fused: bool | None = None):
        self.stride, self.pads, self.conv_groups = stride, tuple(pads), groups
        self.fused = fused
        amap = np.broadcast_to(np.asarray(amap, dtype=np.int64), w.shape[:2])
        used = np.unique(amap)
        self.separable = all(mults[i].separable for i in used)
        self.device = torch.device(device)
        self.x_min = x_min
        if self.separable:
            if groups > 1 and len({mults[i].x_transform(np.arange(x_min, x_max + 1)).tobytes() for i in used}) > 1:
                # several activation transforms in a grouped conv: run it as the equivalent dense conv
                # (zero weights outside each filter's group form no product)
                w, amap, mask = _dense(w, amap, groups)
                self.conv_groups = 1
                self._plan_separable(w, mults, amap, used, x_min, x_max, mask)
            else:
                self._plan_separable(w, mults, amap, used, x_min, x_max)
        else:
            self._plan_lut(w, mults, amap, used)

    def _plan_separable(self, w, mults, amap, used, x_min, x_max, mask=None):
        xs = np.arange(x_min, x_max + 1, dtype=np.int64)
        groups, group_of = [], {}
        for t, members in transform_groups(mults, used, xs):
            group_of.update((i, len(groups)) for i in members)
            wt = np.zeros(w.shape, dtype=np.int64)
            for i in members:
                sel = amap == i
                wt[sel] = mults[i].w_transform(w[sel])
            if mask is not None:
                wt[~mask] = 0
            filters = np.nonzero(np.isin(amap, members).any(1))[0]
            rb = next((r for r in range(16) if np.array_equal(t, round_at(xs, r))), None)
            groups.append(_Group(rb, None if rb is not None else torch.as_tensor(t, device=self.device),
                                 int(np.abs(t).max()), filters, wt))
        self.groups = groups
        self.round_bits = (np.array([g.round_bit for g in groups], dtype=np.int64)
                           if all(g.round_bit is not None for g in groups) else None)
        owner = np.concatenate([g.filters for g in groups])
        self.disjoint = len(owner) == len(np.unique(owner))
        dev = self.device
        f_out, c_in = w.shape[:2]
        # transforms are applied after padding when every transform maps 0 to 0 (pad once, C channels)
        zero_safe = all(g.round_bit is not None or int(g.x_table[-x_min]) == 0 for g in groups)
        left, r, t, b = self.pads
        self.prepad = zero_safe and not (left == r == t == b) and len(groups) > 1
        per_f = sum(np.abs(g.weight).reshape(f_out, -1).sum(1) * g.x_max for g in groups)  # |partial sum| bound
        if self._use_fused(zero_safe, int(per_f.max())):
            self.fused_conv = TransformConv(
                [ROUND_TABLE if g.round_bit is None else g.round_bit for g in groups],
                np.stack([np.zeros(len(xs)) if g.x_table is None else g.x_table.cpu().numpy() for g in groups]),
                np.vectorize(group_of.__getitem__, otypes=[np.int64])(amap),
                sum(g.weight for g in groups),  # one group per kernel
                x_min, self.stride, self.pads)
            self.mode = "fused"
            return
        if len(groups) == 1:
            g = groups[0]
            self.mode, self.conv_args = "single", (torch.as_tensor(g.weight, device=dev), layer_bound(g.weight, g.x_max))
            if mask is not None:
                raise AssertionError("dense expansion is only used with several transforms")
        elif self.disjoint:
            # one convolution per group over its own filters (together one exact convolution's arithmetic, but
            # each one reads its own rounded copy of the input: a convolution over 1-8 filters costs nearly as
            # much as over 16), the outputs written to their filters' places
            self.sub = []  # (filter indices, weights, accumulator bound) per group
            for g in groups:
                wg = g.weight[g.filters]
                self.sub.append((torch.as_tensor(g.filters, device=dev), torch.as_tensor(wg, device=dev),
                                 layer_bound(wg, g.x_max)))
            self.mode = "per-group"
        else:
            # stacked: [F, G*C, kh, kw] over the stacked transformed activations
            wcat = np.concatenate([g.weight for g in groups], axis=1)
            self.mode, self.conv_args = "stacked", (torch.as_tensor(wcat, device=dev), int(per_f.max()))

    def _use_fused(self, zero_safe: bool, bound: int) -> bool:
        """The compiled transform convolution: on the CPU, for transforms that keep padding zero and
        partial sums exact in float32; by default from FUSED_MIN_GROUPS groups on."""
        possible = self.device.type == "cpu" and zero_safe and bound < FLOAT32_EXACT and self.conv_groups == 1
        if self.fused is None:
            return possible and len(self.groups) >= self.FUSED_MIN_GROUPS
        if self.fused and not possible:
            raise ValueError("the transform convolution needs the CPU, transforms that map 0 to 0, "
                             "partial sums below 2^24 and no grouped convolution")
        return self.fused

    def _plan_lut(self, w, mults, amap, used):
        if any(m.bits > 8 for m in mults):
            raise ValueError("lookup-table emulation supports widths up to 8 bits")
        remap = {int(i): k for k, i in enumerate(used)}
        self.luts = np.stack([mults[i].lut() for i in used]).astype(np.int32)
        self.kmap = np.vectorize(remap.__getitem__)(amap).astype(np.int64)
        self.w = w.astype(np.int64)
        self.w_min = mults[used[0]].w_format.min
        self.luts_max = int(np.abs(self.luts).max())  # decides, with the layer's shape, which CPU kernel serves it
        self.lut_tables = {}  # group -> the scatter kernel's table, built on first use

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Exact accumulators for integer-valued x (any dtype); a float or int64 tensor of integers."""
        if self.separable:
            return self.fused_conv(x) if self.mode == "fused" else self._separable(x)
        xi = x.detach() if x.device.type == "cpu" else x.to(torch.int64)  # the CPU kernels read any integer-valued dtype
        outs = []
        fg, cg = self.w.shape[0] // self.conv_groups, self.w.shape[1]
        for g in range(self.conv_groups):  # a grouped conv is one conv per group
            xg, wg, kg = xi[:, g * cg:(g + 1) * cg], self.w[g * fg:(g + 1) * fg], self.kmap[g * fg:(g + 1) * fg]
            if x.device.type == "cpu":
                outs.append(torch.from_numpy(lut_conv_cpu(xg.numpy(), wg, kg, self.luts, self.x_min, self.w_min,
                                                          self.stride, self.pads, self.lut_tables, g, self.luts_max)))
            else:
                outs.append(lut_conv_torch(xg, wg, kg, self.luts, self.x_min, self.w_min, self.stride, self.pads))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _transform_into(self, g: _Group, x: torch.Tensor, xf: torch.Tensor, out: torch.Tensor) -> None:
        if g.round_bit is None:
            out.copy_(g.x_table[x.to(torch.int64) - self.x_min])
        elif g.round_bit == 0:
            out.copy_(xf)
        else:
            # R_t(x) = 2^t floor((x + 2^(t-1)) / 2^t): exact in float for |x| < 2^24
            step = float(1 << g.round_bit)
            torch.add(xf, step / 2, out=out)
            out.mul_(1.0 / step).floor_().mul_(step)

    def _transformed(self, x: torch.Tensor, xf: torch.Tensor, stacked: bool):
        """Every group's transformed activations: a list of [N, C, H, W] tensors, or (``stacked``) one
        [N, G*C, H, W] tensor. On the CPU, rounding transforms are written in one compiled pass over x."""
        n, c = xf.shape[:2]
        rest = tuple(xf.shape[2:])
        k = len(self.groups)
        if xf.device.type == "cpu" and xf.dim() == 4 and self.round_bits is not None:
            src = pixel_rows(xf).numpy()
            if stacked:  # [N, H, W, G, C]: channels_last [N, G*C, H, W]
                buf = torch.empty((n,) + rest + (k, c), dtype=torch.float32)
                round_stack(src, self.round_bits, buf.view(-1, k, c).permute(1, 0, 2).numpy())
                return buf.reshape((n,) + rest + (k * c,)).permute(0, 3, 1, 2)
            rounded = np.nonzero(self.round_bits)[0]  # the identity group (t = 0) takes x as it is
            buf = torch.empty((len(rounded), n) + rest + (c,), dtype=torch.float32)
            round_stack(src, self.round_bits[rounded], buf.view(len(rounded), -1, c).numpy())
            views = dict(zip(rounded.tolist(), (buf[i].permute(0, 3, 1, 2) for i in range(len(rounded)))))
            return [views.get(i, xf) for i in range(k)]
        fmt = torch.channels_last if xf.is_contiguous(memory_format=torch.channels_last) and xf.dim() == 4 else torch.contiguous_format
        if stacked:
            buf = torch.empty((n, c * k) + rest, dtype=torch.float32, device=xf.device, memory_format=fmt)
            for i, g in enumerate(self.groups):
                self._transform_into(g, x, xf, buf[:, i * c:(i + 1) * c])
            return buf
        outs = []
        for g in self.groups:
            if g.round_bit == 0:
                outs.append(xf)
                continue
            xt = torch.empty_like(xf)
            self._transform_into(g, x, xf, xt)
            outs.append(xt)
        return outs

    def _separable(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.to(torch.float32)
        pads = self.pads
        if self.prepad:
            xf = F.pad(xf, pads)
            x = F.pad(x, pads)
            pads = (0, 0, 0, 0)
        if self.mode == "single":
            xt = xf if self.groups[0].round_bit == 0 else self._transformed(x, xf, stacked=False)[0]
            weight, bound = self.conv_args
            return float_conv_exact(xt, weight, self.stride, pads, bound, self.conv_groups)
        if self.mode == "per-group":
            outs = [float_conv_exact(xt, wg, self.stride, pads, gb)
                    for xt, (_, wg, gb) in zip(self._transformed(x, xf, stacked=False), self.sub)]
            dtype = torch.float64 if any(o.dtype == torch.float64 for o in outs) else torch.float32
            fmt = torch.channels_last if outs[0].dim() == 4 and outs[0].is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            acc = torch.empty((outs[0].shape[0], sum(len(idx) for idx, _, _ in self.sub)) + tuple(outs[0].shape[2:]),
                              dtype=dtype, device=outs[0].device, memory_format=fmt)
            rows = pixel_rows(acc, writable=True) if acc.device.type == "cpu" else None
            for (idx, _, _), o in zip(self.sub, outs):  # each group's filters into their places
                o = o.to(dtype)
                if rows is not None:
                    scatter_channels(pixel_rows(o).numpy(), idx.numpy(), rows.numpy())
                else:
                    acc.index_copy_(1, idx, o)
            return acc
        weight, bound = self.conv_args
        return float_conv_exact(self._transformed(x, xf, stacked=True), weight, self.stride, pads, bound)


def _dense(w: np.ndarray, amap: np.ndarray, groups: int):
    """A grouped conv's weights [F, C/g, kh, kw] as dense [F, C, kh, kw] (zeros outside each filter's group),
    its assignment spread the same way, and the mask of real kernels."""
    f, cg = w.shape[:2]
    fg = f // groups
    dense = np.zeros((f, cg * groups) + w.shape[2:], dtype=w.dtype)
    dmap = np.zeros((f, cg * groups), dtype=np.int64)
    mask = np.zeros((f, cg * groups) + w.shape[2:], dtype=bool)
    dmap[:] = amap[:, :1]
    for g in range(groups):
        rows, cols = slice(g * fg, (g + 1) * fg), slice(g * cg, (g + 1) * cg)
        dense[rows, cols] = w[rows]
        dmap[rows, cols] = amap[rows]
        mask[rows, cols] = True
    return dense, dmap, mask


def _to_torch(a, device=None):
    if isinstance(a, torch.Tensor):
        return a.to(torch.int64) if device is None else a.to(device=device, dtype=torch.int64)
    return torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)


def approx_conv2d(x, w, specs, assignment, stride: int = 1, padding=0, bits: int = 8, x_signed: bool = False,
                  device=None, groups: int = 1):
    """Exact int64 accumulators of a conv where kernel (f, c) uses multiplier ``specs[assignment[f, c]]``.

    x: integer [N, C, H, W]; w: integer [F, C, kh, kw]; specs: spec strings or
    Multiplier objects; assignment: an int (layer-level), [F] (filter-level)
    or [F, C] (kernel-level) index array; padding: int, (ph, pw) or
    (left, right, top, bottom). Returns a torch tensor for torch input (on its
    device, or ``device``), else a numpy array.
    """
    is_torch = isinstance(x, torch.Tensor)
    mults = _as_multipliers(specs, bits, x_signed)
    w_np = w.cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    w_np = w_np.astype(np.int64)
    amap = np.asarray(assignment, dtype=np.int64)
    if amap.ndim == 1:
        amap = np.repeat(amap[:, None], w_np.shape[1], axis=1)
    amap = np.broadcast_to(amap, w_np.shape[:2])
    xt = _to_torch(x, device)
    xmin, xmax = mults[0].x_format.min, mults[0].x_format.max
    if xt.numel():
        lo, hi = int(xt.min()), int(xt.max())
        if lo < xmin or hi > xmax:
            raise ValueError(f"activations outside the multiplier's x range [{xmin}, {xmax}]")
    plan = LayerPlan(w_np, mults, amap, stride, _pads(padding, *w_np.shape[2:]), device=xt.device, x_min=xmin, x_max=xmax,
                     groups=groups)
    out = plan(xt).to(torch.int64)  # integers held exactly: the cast loses nothing
    return out if is_torch else out.cpu().numpy()


def approx_linear(x, w, specs, assignment, bits: int = 8, x_signed: bool = False, device=None):
    """Dense layer: x [N, C], w [F, C]; assignment int, [F] or [F, C]. Returns [N, F] int64."""
    is_torch = isinstance(x, torch.Tensor)
    xt = _to_torch(x, device)[:, :, None, None]
    wt = w[:, :, None, None]
    out = approx_conv2d(xt, wt, specs, assignment, 1, 0, bits, x_signed)
    out = out[:, :, 0, 0]
    return out if is_torch else np.asarray(out)


# ---------------------------------------------------------------- lookup-table paths


def lut_conv_numba(x, w, kmap, luts, x_min, w_min, stride, pads):
    from maxdnn.engine._lut_kernel import lut_conv

    left, _, t, _ = pads
    ho, wo = conv_out_hw(x.shape[2:], w.shape[2:], stride, pads)
    return lut_conv(np.ascontiguousarray(x, dtype=np.int64), np.ascontiguousarray(w), np.ascontiguousarray(kmap),
                    np.ascontiguousarray(luts), x_min, w_min, stride, t, left, ho, wo)


SCATTER_MIN_CHANNELS = 1  # the gather kernel serves layers below this many input channels (and huge tables)
SCATTER_TABLE_BYTES = 64 << 20  # a larger table stays with the gather kernel


def lut_conv_cpu(x, w, kmap, luts, x_min, w_min, stride, pads, tables: dict | None = None, key=0,
                 luts_max: int | None = None):
    """The LUT convolution on the CPU: the scatter kernels where they apply (enough input channels, a table of
    at most SCATTER_TABLE_BYTES, every output's sum within int32), the gather kernel otherwise.
    ``tables`` keeps each ``key``'s table for the next batch; ``luts_max``: max |luts|, when known."""
    f, c, kh, kw = w.shape
    luts_max = int(np.abs(luts).max()) if luts_max is None else luts_max
    if (c < SCATTER_MIN_CHANNELS or c * luts.shape[1] * f * kh * kw * 4 > SCATTER_TABLE_BYTES
            or c * kh * kw * luts_max >= 1 << 31):  # every output's sum fits int32
        return lut_conv_numba(x, w, kmap, luts, x_min, w_min, stride, pads)
    return lut_scatter_numba(x, w, kmap, luts, x_min, w_min, stride, pads, tables, key)


def lut_scatter_numba(x, w, kmap, luts, x_min, w_min, stride, pads, tables: dict | None = None, key=0):
    """The scatter kernels (``maxdnn.engine._lut_kernel``): the same sums as ``lut_conv_numba``."""
    import numba

    from maxdnn.engine._lut_kernel import lut_scatter_conv, lut_scatter_conv_strided, lut_table

    left, _, t, _ = pads
    ho, wo = conv_out_hw(x.shape[2:], w.shape[2:], stride, pads)
    built = None if tables is None else tables.get(key)
    if built is None:
        kh, kw = w.shape[2:]
        table = np.empty((w.shape[1], luts.shape[1], w.shape[0] * kh * kw), dtype=np.int32)
        lut_table(np.ascontiguousarray(w, dtype=np.int64), np.ascontiguousarray(kmap, dtype=np.int64),
                  np.ascontiguousarray(luts, dtype=np.int32), int(w_min), table)
        if int(table.min()) >= -(1 << 15) and int(table.max()) < 1 << 15:  # the layer's products fit int16
            table = table.astype(np.int16)
        built = (table, (table != 0).any(axis=2))  # rows that are all zero are skipped
        if tables is not None:
            tables[key] = built
    table, nz = built
    xi = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NHWC: a view of channels_last activations, no copy
    kh, kw = w.shape[2:]
    chunks = max(min(len(xi), numba.get_num_threads()), 1)
    if stride == 1:
        out = lut_scatter_conv(xi, table, nz, int(x_min), kh, kw, t, left, ho, wo, chunks)
    else:
        out = lut_scatter_conv_strided(xi, table, nz, int(x_min), kh, kw, stride, t, left, ho, wo)
    return out.transpose(0, 3, 1, 2)  # [N, F, Ho, Wo], channels_last in memory


def lut_conv_torch(x, w, kmap, luts, x_min, w_min, stride, pads, filter_chunk: int = 8):
    """Gather-based LUT convolution in torch (any device); padding forms no product."""
    dev = x.device
    left, r, t, b = pads
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    nx, nw = luts.shape[1:]
    lut = torch.as_tensor(luts, device=dev).reshape(-1).to(torch.int64)
    # pad with an out-of-range marker, then unfold
    xi = (x.to(torch.int64) - x_min)
    xp = F.pad(xi.double(), (left, r, t, b), value=-1.0)
    cols = F.unfold(xp, (kh, kw), stride=stride).to(torch.int64)  # [N, C*kh*kw, L]
    valid = cols >= 0
    cols = cols.clamp(min=0)
    wi = torch.as_tensor(w.reshape(f, -1) - w_min, device=dev)  # [F, K]
    km = torch.as_tensor(np.repeat(kmap, kh * kw, axis=1), device=dev)  # [F, K]
    out = torch.zeros((n, f, cols.shape[2]), dtype=torch.int64, device=dev)
    for f0 in range(0, f, filter_chunk):
        f1 = min(f, f0 + filter_chunk)
        base = km[f0:f1] * (nx * nw) + wi[f0:f1]  # [Fc, K]
        idx = base[None, :, :, None] + cols[:, None, :, :] * nw  # [N, Fc, K, L]
        prod = lut[idx] * valid[:, None, :, :]
        out[:, f0:f1] = prod.sum(2)
    return out.view(n, f, *conv_out_hw((h, wd), (kh, kw), stride, pads))


# ---------------------------------------------------------------- network runner


class ApproxNetwork:
    """A quantized network with an assignment: bit-exact approximate inference."""

    def __init__(self, qnet: QuantizedGraph, assignment: Assignment, device="cpu"):
        self.qnet = qnet
        self.assignment = assignment.bind(qnet)
        mults = {s: assignment.multipliers(x_signed=s) for s in {l.x_signed for l in qnet.layers.values()}}
        self.plans = {}
        for name, l in qnet.layers.items():
            x_min, x_max = l.in_q.operand_range
            fmt = mults[l.x_signed][0].x_format
            if x_min < fmt.min or x_max > fmt.max:
                raise AssignmentError(f"layer {name}: operands x - zero_point span {x_min}..{x_max} (input zero point "
                                      f"{l.in_q.zero_point}), wider than the {fmt} multipliers take; approximate "
                                      f"multipliers need an operand that fits {assignment.bits} bits")
            self.plans[name] = LayerPlan(l.weight, mults[l.x_signed], assignment.maps[name], l.stride, l.pads,
                                         device=device, x_min=x_min, x_max=x_max, groups=l.groups)
        self.device = device

    def conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.plans[name](x)

    @cached_property
    def layer_keys(self) -> dict[str, str]:
        """Per layer, what its products are: equal keys give equal accumulators ("exact" for exact
        products, whatever the spelling)."""
        a = self.assignment
        keys = {}
        for name, m in a.maps.items():
            m = np.broadcast_to(np.asarray(m), self.qnet.layers[name].weight.shape[:2])
            used = np.unique(m)
            names = [str(a.specs[i]) for i in used]
            if all(_exact_spec(nm, a.bits) for nm in names):
                keys[name] = "exact"
                continue
            remap = np.searchsorted(used, m)
            keys[name] = hashlib.sha256(json.dumps(names).encode() + remap.astype(np.int64).tobytes()).hexdigest()
        return keys

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.qnet.forward_int(x, self.conv)

    def predict(self, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
        return self.qnet.predict(images, batch_size=batch_size, device=self.device, conv=self.conv)

    def outputs(self, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
        return self.qnet.outputs(images, batch_size=batch_size, device=self.device, conv=self.conv)


@lru_cache(maxsize=None)
def _exact_spec(spec: str, bits: int) -> bool:
    """The multiplier forms every product exactly (``exact``, or a separable form with identity transforms)."""
    if spec == "exact":
        return True
    m = get_multiplier(spec, bits)
    if not m.separable:
        return False
    xs = np.arange(m.x_format.min, m.x_format.max + 1)
    ws = np.arange(m.w_format.min, m.w_format.max + 1)
    return bool(np.array_equal(m.x_transform(xs), xs) and np.array_equal(m.w_transform(ws), ws))


def logits_shared(nets: list[ApproxNetwork], x: torch.Tensor) -> list[torch.Tensor]:
    """Every network's integer output for the same input batch, in one pass per graph: networks on one
    graph share the layers where their products agree (``QuantizedGraph.forward_shared``), above all the
    exact prefix before the first approximated layer."""
    outs: list[torch.Tensor | None] = [None] * len(nets)
    by_graph: dict[int, list[int]] = {}
    for i, net in enumerate(nets):
        by_graph.setdefault(id(net.qnet), []).append(i)
    for members in by_graph.values():
        q = nets[members[0]].qnet
        got = q.forward_shared(x, [nets[i].conv for i in members], [nets[i].layer_keys for i in members])
        for i, o in zip(members, got):
            outs[i] = o
    return outs
