"""Energy per multiplication from gate-level toggle simulation, and the hardware report.

Energy model: unit-delay simulation of the synthesized netlist (every gate one
time unit, so glitches are counted) over a stream of operand pairs; each
output toggle of a gate costs its relative switching energy
(``netlist.TOGGLE_ENERGY``: NanGate 45 nm X1 cell area in NAND2 equivalents, a
proxy for switched capacitance). Unit: one NAND2 output toggle ("NAND2-toggle
equivalents") per multiplication. Zero-delay (glitch-free) energy is reported
beside it.

Streams:
- ``uniform``: 20,000 seeded uniform random (x, w) pairs;
- ``model`` (named ``resnet8`` in the committed table, which was measured on
  the committed ResNet-8): the (activation, weight) pairs a quantized network
  feeds its multipliers (layers with unsigned 8-bit inputs, which the designs
  take), in weight-stationary order: a processing element holds one
  weight w[f, c, i, j] and sees, image after image, the activations under that
  tap for every output position in raster order (padding positions skipped).
  Taps are drawn at random in proportion to each layer's multiplication count;
  activations come from training images of the given data source.

Results are cached per (netlist, stream) under ``$MAXDNN_CACHE/hardware``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_json
from ..data import cache_dir
from ..multipliers import ROUP, Exact, SpecError, get_multiplier
from .booth_verilog import booth_multiplier_verilog
from .netlist import TOGGLE_ENERGY, Netlist
from .synth import synthesize

UNIFORM_PAIRS = 20_000


class NoHardwareError(ValueError):
    pass


def design_params(spec: str, bits: int = 8) -> tuple[int, int]:
    """(P, R) of the Booth design implementing ``spec``."""
    try:
        m = get_multiplier(spec, bits)
    except SpecError:
        raise NoHardwareError(f"unknown multiplier '{spec}': hardware designs exist for exact and "
                              f"roup-p{{P}}r{{R}} (0 <= P < {bits // 2}, 0 <= R < {bits})") from None
    if isinstance(m, Exact):
        return 0, 0
    if isinstance(m, ROUP):
        return m.p, m.r
    raise NoHardwareError(f"multiplier '{spec}' has no hardware design (designs exist for exact and roup-p{{P}}r{{R}})")


def verilog_for(spec: str, bits: int = 8, x_signed: bool = False, rounding: str = "folded") -> str:
    p, r = design_params(spec, bits)
    return booth_multiplier_verilog(p, r, bits, x_signed, rounding)


def _hw_cache() -> Path:
    d = cache_dir() / "hardware"
    d.mkdir(parents=True, exist_ok=True)
    return d


def netlist_for(spec: str, bits: int = 8, rounding: str = "folded") -> Netlist:
    """The synthesized netlist of ``spec`` (cached by Verilog hash)."""
    v = verilog_for(spec, bits, rounding=rounding)
    key = hashlib.sha256(v.encode()).hexdigest()[:20]
    path = _hw_cache() / f"netlist-{key}.json"
    if path.exists():
        try:
            return Netlist.from_yosys_json(json.loads(path.read_text()))
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)
    net, doc = synthesize(v)
    write_json(path, doc, indent=None)
    return net


@dataclass
class Stream:
    name: str
    x: np.ndarray
    w: np.ndarray

    def digest(self) -> str:
        return hashlib.sha256(self.x.astype(np.int64).tobytes() + self.w.astype(np.int64).tobytes()).hexdigest()[:20]


def uniform_stream(n: int = UNIFORM_PAIRS, seed: int = 0, bits: int = 8) -> Stream:
    r = np.random.default_rng(seed)
    return Stream("uniform", r.integers(0, 1 << bits, n), r.integers(-(1 << (bits - 1)), 1 << (bits - 1), n))


def model_stream(qnet, images: np.ndarray, n_taps: int = 40, max_pairs: int = 40_000, seed: int = 0,
                 name: str = "model") -> Stream:
    """Weight-stationary (activation, weight) pairs of a quantized graph (see module docstring)."""
    import torch

    from ..energy import multiplication_counts

    taps: dict = {}
    qnet.forward_int(torch.as_tensor(images), taps=taps)
    counts = multiplication_counts(qnet)
    names = [n for n, l in qnet.layers.items() if not l.x_signed]
    if not names:
        raise ValueError("the model has no layer with unsigned 8-bit inputs for the unsigned-x designs")
    per_layer = np.array([counts[n] * qnet.layers[n].weight.shape[0] * qnet.layers[n].weight.shape[1] for n in names], float)
    rng = np.random.default_rng(seed)
    xs, ws = [], []
    for li in rng.choice(len(names), size=n_taps, p=per_layer / per_layer.sum()):
        layer = qnet.layers[names[li]]
        f, c, kh, kw = layer.weight.shape
        fi, ci, i, j = rng.integers(f), rng.integers(c), rng.integers(kh), rng.integers(kw)
        xc = (fi // (f // layer.groups)) * c + ci  # the input channel kernel (fi, ci) reads
        inp = taps[names[li]].numpy()
        left, _, t, _ = layer.pads
        ho, wo = layer.out_hw
        h, wd = layer.in_hw
        for n in range(inp.shape[0]):
            for oh in range(ho):
                for ow in range(wo):
                    yy, zz = oh * layer.stride + i - t, ow * layer.stride + j - left
                    if 0 <= yy < h and 0 <= zz < wd:
                        xs.append(inp[n, xc, yy, zz])
                        ws.append(layer.weight[fi, ci, i, j])
    x = np.asarray(xs[:max_pairs], dtype=np.int64)
    w = np.asarray(ws[:max_pairs], dtype=np.int64)
    return Stream(name, x, w)


def stream_energy(net: Netlist, stream: Stream) -> dict:
    """Energy per multiplication (unit-delay and zero-delay), cached per (netlist, stream)."""
    path = _hw_cache() / f"energy-{net.digest()}-{stream.digest()}.json"
    if path.exists():
        return json.loads(path.read_text())
    toggles, zero = net.toggles(x=stream.x, w=stream.w)
    weights = np.array([TOGGLE_ENERGY[t] for t in net.gate_type])
    n = max(len(stream.x) - 1, 1)
    res = {"energy": float((toggles * weights).sum() / n), "energy_zero_delay": float((zero * weights).sum() / n),
           "toggles": float(toggles.sum() / n), "pairs": int(len(stream.x))}
    write_json(path, res, indent=None)
    return res


def hardware_report(specs: list[str], streams: list[Stream], bits: int = 8, progress=None,
                    rounding: str = "folded") -> list[dict]:
    """Area, depth and energy (absolute and relative to the exact Booth design) per spec."""
    exact_net = netlist_for("exact", bits)
    exact_e = {s.name: stream_energy(exact_net, s) for s in streams}
    rows = []
    for spec in specs:
        net = netlist_for(spec, bits, rounding)
        row = {"spec": spec, "area_nand2": round(net.area_nand2(), 2), "depth": net.depth(), "cells": net.cell_counts(),
               "gates": len(net.gate_type), "energy": {}, "energy_rel": {}, "energy_zero_delay": {}}
        for s in streams:
            e = stream_energy(net, s)
            row["energy"][s.name] = round(e["energy"], 3)
            row["energy_zero_delay"][s.name] = round(e["energy_zero_delay"], 3)
            row["energy_rel"][s.name] = round(e["energy"] / exact_e[s.name]["energy"], 4)
        rows.append(row)
        if progress:
            progress(spec)
    return rows
