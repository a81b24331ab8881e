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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import write_json
from maxdnn.data import cache_dir
from maxdnn.multipliers.models import ROUP, Exact, SpecError, get_multiplier
from maxdnn.hardware.booth_verilog import booth_multiplier_verilog
from maxdnn.hardware.netlist import Netlist
from maxdnn.hardware.synth import synthesize

UNIFORM_PAIRS = 20_000


class NoHardwareError(MaxdnnError, ValueError):
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


def imported_design(spec: str, bits: int = 8) -> dict | None:
    """The library entry (``meta.json``) of a multiplier imported from Verilog under the name ``spec``, or None
    when ``spec`` names no imported entry; an entry that has no design the report can measure (a product
    table, other operand formats) is a one-line ``NoHardwareError``."""
    from maxdnn.multipliers.models import is_builtin_name
    from maxdnn.multipliers.store import LibraryError, entry_dir, read_meta

    if is_builtin_name(spec):
        return None
    try:
        meta = read_meta(spec)
    except LibraryError as e:
        raise NoHardwareError(str(e)) from None
    if meta is None:
        return None
    if meta.get("source") != "verilog" or not (entry_dir(spec) / "design.v").is_file():
        raise NoHardwareError(f"multiplier '{spec}' was imported as a product table: it has no hardware design "
                              "(import its Verilog with 'maxdnn multipliers import FILE.v')")
    if meta["bits"] != bits:
        raise NoHardwareError(f"multiplier '{spec}' takes {meta['bits']}-bit operands: the hardware report "
                              f"measures {bits}-bit designs")
    return meta


def check_design(spec: str, bits: int = 8, pe: bool = False) -> None:
    """A one-line ``NoHardwareError`` unless ``spec`` has a design to measure: exact, roup-p{P}r{R}, or a
    multiplier imported from Verilog (whose processing element, ``pe``, is not modelled)."""
    if imported_design(spec, bits) is None:
        design_params(spec, bits)
    elif pe:
        raise NoHardwareError(f"multiplier '{spec}': the processing element (--pe) is modelled for the built-in "
                              "Booth designs only")


def _imported_netlist(spec: str, meta: dict, liberty) -> Netlist:
    """An imported design synthesized again from its stored Verilog (generic gates, or mapped to ``liberty``),
    its ports renamed x, w and p as at import."""
    from maxdnn.multipliers.store import entry_dir

    v = (entry_dir(spec) / "design.v").read_text()
    top, ports = meta["top"], meta["ports"]
    h = hashlib.sha256(v.encode() + top.encode())
    if liberty is not None:
        h.update(Path(liberty.path).read_bytes())
    path = _hw_cache() / f"netlist-imported-{h.hexdigest()[:20]}.json"
    net = None
    if path.exists():
        try:
            net = Netlist.from_yosys_json(json.loads(path.read_text()), top, liberty=liberty)
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)
    if net is None:
        net, doc = synthesize(v, top, liberty=liberty)
        write_json(path, doc, indent=None)
    return replace(net, inputs={"x": net.inputs[ports["x"]], "w": net.inputs[ports["w"]]},
                   outputs={"p": net.outputs[ports["product"]]})


def verilog_for(spec: str, bits: int = 8, x_signed: bool = False, rounding: str = "folded") -> str:
    p, r = design_params(spec, bits)
    return booth_multiplier_verilog(p, r, bits, x_signed, rounding)


PE_ACC_BITS = 24  # the accumulator of the processing element
PE_DOT_LENGTH = 64  # products summed before the accumulator is cleared (the stream's dot products)
DFF_TOGGLE_NAND2 = 4.522 / 0.798  # NanGate 45 nm DFF_X1 area in NAND2 equivalents: energy per stored-bit toggle


def mac_verilog(spec: str, bits: int = 8, rounding: str = "folded") -> str:
    """The processing element's datapath: the multiplier of ``spec`` and a PE_ACC_BITS-bit adder,
    s = acc + x * w (the product sign-extended)."""
    out_w = 2 * bits + 1
    return verilog_for(spec, bits, rounding=rounding) + "\n".join([
        f"module mac(input [{bits - 1}:0] x, input [{bits - 1}:0] w, input [{PE_ACC_BITS - 1}:0] acc, "
        f"output [{PE_ACC_BITS - 1}:0] s);",
        f"  wire [{out_w - 1}:0] p;",
        "  mul m (.x(x), .w(w), .p(p));",
        f"  assign s = acc + {{{{{PE_ACC_BITS - out_w}{{p[{out_w - 1}]}}}}, p}};",
        "endmodule", ""])


def accumulator_inputs(spec: str, stream: "Stream", bits: int = 8) -> np.ndarray:
    """The accumulator value entering each operation: the running sum of the stream's products (the design's
    own), cleared every PE_DOT_LENGTH products."""
    return _running_sums(_products(spec, stream, bits))


def _products(spec: str, stream: "Stream", bits: int) -> np.ndarray:
    return np.asarray(get_multiplier(spec, bits)(stream.x, stream.w), dtype=np.int64)


def _running_sums(prod: np.ndarray) -> np.ndarray:
    acc = np.zeros_like(prod)
    for start in range(0, len(prod), PE_DOT_LENGTH):
        chunk = prod[start:start + PE_DOT_LENGTH]
        acc[start:start + len(chunk)] = np.concatenate([[0], np.cumsum(chunk)[:-1]])
    return acc


def _hw_cache() -> Path:
    d = cache_dir() / "hardware"
    d.mkdir(parents=True, exist_ok=True)
    return d


def netlist_for(spec: str, bits: int = 8, rounding: str = "folded", liberty=None, unit: str = "mul",
                x_signed: bool = False) -> Netlist:
    """The synthesized netlist of ``spec`` (cached by Verilog hash), generic gates or mapped to ``liberty``;
    ``unit`` "mul": the multiplier, "mac": the processing element's datapath (``mac_verilog``). An imported
    Verilog multiplier (``imported_design``) is synthesized from its stored source; its PE is not modelled.
    ``x_signed``: the built-in design with a two's-complement multiplicand (the reference of x-signed
    imports; the PE is modelled for unsigned x)."""
    meta = imported_design(spec, bits)
    if meta is not None:
        if unit != "mul":
            raise NoHardwareError(f"multiplier '{spec}': the processing element (--pe) is modelled for the built-in "
                                  "Booth designs only")
        return _imported_netlist(spec, meta, liberty)
    v = verilog_for(spec, bits, x_signed, rounding) if unit == "mul" else mac_verilog(spec, bits, rounding)
    h = hashlib.sha256(v.encode())
    if liberty is not None:
        h.update(Path(liberty.path).read_bytes())
    path = _hw_cache() / f"netlist-{h.hexdigest()[:20]}.json"
    if path.exists():
        try:
            return Netlist.from_yosys_json(json.loads(path.read_text()), unit, liberty=liberty)
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)
    net, doc = synthesize(v, unit, liberty=liberty)
    write_json(path, doc, indent=None)
    return net


@dataclass
class Stream:
    name: str
    x: np.ndarray
    w: np.ndarray

    def digest(self) -> str:
        return hashlib.sha256(self.x.astype(np.int64).tobytes() + self.w.astype(np.int64).tobytes()).hexdigest()[:20]


def uniform_stream(n: int = UNIFORM_PAIRS, seed: int = 0, bits: int = 8, x_signed: bool = False) -> Stream:
    """``n`` seeded uniform (x, w) pairs: x unsigned (or, ``x_signed``, two's complement), w signed. The signed
    stream is the unsigned one's x shifted by -2^(bits-1) (the same draws, so the same w)."""
    r = np.random.default_rng(seed)
    x = r.integers(0, 1 << bits, n)
    w = r.integers(-(1 << (bits - 1)), 1 << (bits - 1), n)
    return Stream("uniform", x - (1 << (bits - 1)) if x_signed else x, w)


def signed_view(stream: Stream, bits: int = 8) -> Stream | None:
    """What an x-signed design is measured on in place of ``stream``: the signed uniform stream for the
    uniform one; None for a model stream (the models' streams feed layers with unsigned inputs)."""
    if stream.name != "uniform":
        return None
    return uniform_stream(len(stream.x), bits=bits, x_signed=True)


def _unsigned_layers(qnet) -> list[str]:
    names = [n for n, l in qnet.layers.items() if not l.x_signed]
    if not names:
        raise ValueError("the model has no layer with unsigned 8-bit inputs for the unsigned-x designs")
    return names


def _tap_pairs(layer, inp: np.ndarray, rng, xs: list, ws: list) -> None:
    """Append the weight-stationary pairs of one random tap w[f, c, i, j] of ``layer`` (input taps ``inp``)."""
    f, c, kh, kw = layer.weight.shape
    fi, ci, i, j = rng.integers(f), rng.integers(c), rng.integers(kh), rng.integers(kw)
    xc = (fi // (f // layer.groups)) * c + ci  # the input channel kernel (fi, ci) reads
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


def _layer_taps(qnet, images: np.ndarray) -> dict:
    import torch

    taps: dict = {}
    qnet.forward_int(torch.as_tensor(images), taps=taps)
    return {n: t.numpy() for n, t in taps.items()}


def model_stream(qnet, images: np.ndarray, n_taps: int = 40, max_pairs: int = 40_000, seed: int = 0,
                 name: str = "model") -> Stream:
    """Weight-stationary (activation, weight) pairs of a quantized graph (see module docstring)."""
    from maxdnn.ir.graph import multiplication_counts

    taps = _layer_taps(qnet, images)
    counts = multiplication_counts(qnet)
    names = _unsigned_layers(qnet)
    per_layer = np.array([counts[n] * qnet.layers[n].weight.shape[0] * qnet.layers[n].weight.shape[1] for n in names], float)
    rng = np.random.default_rng(seed)
    xs, ws = [], []
    for li in rng.choice(len(names), size=n_taps, p=per_layer / per_layer.sum()):
        _tap_pairs(qnet.layers[names[li]], taps[names[li]], rng, xs, ws)
    x = np.asarray(xs[:max_pairs], dtype=np.int64)
    w = np.asarray(ws[:max_pairs], dtype=np.int64)
    return Stream(name, x, w)


def layer_streams(qnet, images: np.ndarray, pairs: int = 8_000, max_taps: int = 4_000, seed: int = 0) -> dict[str, Stream]:
    """Each unsigned-input layer's own weight-stationary stream: random taps of that layer only, until
    ``pairs`` pairs (or ``max_taps`` taps) are collected; a layer with few positions gets more taps."""
    taps = _layer_taps(qnet, images)
    out = {}
    for k, name in enumerate(_unsigned_layers(qnet)):
        rng = np.random.default_rng([seed, k])
        xs, ws = [], []
        for _ in range(max_taps):
            _tap_pairs(qnet.layers[name], taps[name], rng, xs, ws)
            if len(xs) >= pairs:
                break
        out[name] = Stream(f"layer:{name}", np.asarray(xs[:pairs], dtype=np.int64), np.asarray(ws[:pairs], dtype=np.int64))
    return out


def stream_energy(net: Netlist, stream: Stream) -> dict:
    """Energy per multiplication (unit-delay and zero-delay), cached per (netlist, stream)."""
    path = _hw_cache() / f"energy-{net.digest()}-{stream.digest()}.json"
    if path.exists():
        return json.loads(path.read_text())
    toggles, zero = net.toggles(x=stream.x, w=stream.w)
    weights = net.toggle_energy()
    n = max(len(stream.x) - 1, 1)
    res = {"energy": float((toggles * weights).sum() / n), "energy_zero_delay": float((zero * weights).sum() / n),
           "toggles": float(toggles.sum() / n), "pairs": int(len(stream.x))}
    write_json(path, res, indent=None)
    return res


def pe_energy(spec: str, stream: Stream, bits: int = 8, rounding: str = "folded", liberty=None) -> dict:
    """Energy per operation of the processing element: the datapath (multiplier + accumulator adder,
    unit-delay) on the stream with its running sums, plus the accumulator register: per stored-bit toggle
    its data and output energy, per cycle the clock energy of every bit (from the liberty's D flip-flop;
    without a liberty, DFF_TOGGLE_NAND2 per stored-bit toggle and no clock). Cached per (netlist, stream)."""
    net = netlist_for(spec, bits, rounding, liberty, unit="mac")
    flop = liberty.flop() if liberty is not None else None
    key = hashlib.sha256(f"{net.digest()}-{stream.digest()}-{flop}-{PE_DOT_LENGTH}".encode()).hexdigest()[:20]
    path = _hw_cache() / f"pe-energy-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    prod = _products(spec, stream, bits)
    acc = _running_sums(prod)
    toggles, _ = net.toggles(x=stream.x, w=stream.w, acc=acc)
    n = max(len(stream.x) - 1, 1)
    datapath = float((toggles * net.toggle_energy()).sum() / n)
    stored = acc + prod
    mask = (1 << PE_ACC_BITS) - 1
    flips = np.array([bin(int(v)).count("1") for v in ((stored[1:] ^ stored[:-1]) & mask)])
    bit_toggles = float(flips.sum() / n)
    if flop is None:
        register = bit_toggles * DFF_TOGGLE_NAND2
    else:
        register = bit_toggles * (flop.data + flop.q) + PE_ACC_BITS * flop.clock
    res = {"energy": datapath + register, "datapath": datapath, "register": register,
           "register_bit_toggles": bit_toggles, "flop": flop.cell if flop else None}
    write_json(path, res, indent=None)
    return res


def hardware_report(specs: list[str], streams: list[Stream], bits: int = 8, progress=None,
                    rounding: str = "folded", liberty=None, pe: bool = False) -> list[dict]:
    """Area, depth and energy (absolute and relative to the exact Booth design) per spec.

    Without ``liberty``: generic gates, energy in NAND2-toggle equivalents. With a
    ``maxdnn.hardware.liberty.Liberty``: the design mapped to its cells, energy in fJ per multiplication,
    depth in cells, leakage (nW) and the library's area (``area_lib``; None when its cells have no area),
    beside the NAND2-equivalent area of the generic-gate netlist. With ``pe``, also the processing element's
    energy per operation (``pe_energy``), absolute and relative to the exact PE's."""
    exact_net = netlist_for("exact", bits, liberty=liberty)
    exact_e = {s.name: stream_energy(exact_net, s) for s in streams}
    signed_ref = None  # the x-signed exact Booth design on the signed streams, when an x-signed import is measured
    exact_pe = {s.name: pe_energy("exact", s, bits, rounding, liberty)["energy"] for s in streams} if pe else {}
    rows = []
    for spec in specs:
        net = netlist_for(spec, bits, rounding, liberty=liberty)
        generic = net if liberty is None else netlist_for(spec, bits, rounding)
        row = {"spec": spec, "area_nand2": round(generic.area_nand2(), 2), "depth": net.depth(),
               "cells": net.cell_counts(), "gates": len(net.gate_type), "energy": {}, "energy_rel": {},
               "energy_zero_delay": {}}
        imported = imported_design(spec, bits)
        w_format = (imported or {}).get("w_format", "signed")
        if imported is not None:
            row["w_format"] = w_format
            if imported.get("published"):  # the figures the design's own file publishes, beside maxdnn's
                row["published"] = imported["published"]
        if liberty is not None:
            row["area_lib"] = round(net.cell_area, 3) if net.cell_area else None
            row["leakage_nw"] = round(net.leakage_nw, 2)
        x_signed = bool((imported or {}).get("x_signed"))
        if x_signed:
            row["x_signed"] = True
            row["reference"] = "exact radix-4 Booth design with signed x, on signed-x streams"
            if signed_ref is None:
                signed_ref = netlist_for("exact", bits, liberty=liberty, x_signed=True)
        for s in streams:
            ref = exact_e[s.name]["energy"]
            if x_signed:
                s = signed_view(s, bits)
                if s is None:  # no signed model stream: the row has the uniform stream only
                    continue
                ref = stream_energy(signed_ref, s)["energy"]
            seen = s if w_format == "signed" else Stream(s.name, s.x, np.abs(s.w))  # what the weight port sees
            e = stream_energy(net, seen)
            row["energy"][s.name] = round(e["energy"], 3)
            row["energy_zero_delay"][s.name] = round(e["energy_zero_delay"], 3)
            row["energy_rel"][s.name] = round(e["energy"] / ref, 4)
            if pe:
                e_pe = pe_energy(spec, s, bits, rounding, liberty)["energy"]
                row.setdefault("pe_energy", {})[s.name] = round(e_pe, 3)
                row.setdefault("pe_energy_rel", {})[s.name] = round(e_pe / exact_pe[s.name], 4)
        rows.append(row)
        if progress:
            progress(spec)
    return rows


def per_layer_relative(rows: list[dict], qnet) -> dict[str, dict[str, float]]:
    """Per layer and spec: energy on the layer's own stream (``layer_streams``) divided by the exact design's
    energy averaged over the layers, weighted by their multiplications: in units of one average exact
    multiplication, so that layers whose operands toggle less cost less even when exact."""
    from maxdnn.ir.graph import multiplication_counts

    counts = multiplication_counts(qnet)
    exact = next(r for r in rows if r["spec"] == "exact")["energy"]
    layers = [n for n in qnet.layers if f"layer:{n}" in exact]
    mults = np.array([counts[n] * np.prod(qnet.layers[n].weight.shape[:2]) for n in layers], float)
    e_avg = float(np.dot(mults, [exact[f"layer:{n}"] for n in layers]) / mults.sum())
    return {n: {r["spec"]: round(r["energy"][f"layer:{n}"] / e_avg, 5) for r in rows if f"layer:{n}" in r["energy"]}
            for n in layers}  # x-signed designs have no layer streams


AREA_NAND2_UNIT = "NAND2 equivalents (NanGate 45nm X1 areas)"


def energy_unit(lib=None) -> str:
    """The unit (and model) of the energies of ``hardware_report``, with a liberty ``lib`` or without."""
    if lib is not None:
        return (f"fJ per multiplication ({lib.name} cells at {lib.voltage:g} V, internal energy + 1/2 C V^2 of the "
                "driven pins, unit-delay, glitches counted)")
    return "NAND2-toggle equivalents per multiplication (unit-delay, glitches counted)"


def units_of(lib=None, pe: bool = False) -> dict:
    """The unit fields ``hardware report --json`` gives every row."""
    out = {"energy_unit": energy_unit(lib), "energy_zero_delay_unit": energy_unit(lib).replace(
        "unit-delay, glitches counted", "zero-delay, no glitches"), "area_nand2_unit": AREA_NAND2_UNIT}
    if pe:
        out["pe_energy_unit"] = energy_unit(lib).replace("per multiplication", "per multiply-accumulate")
    if lib is not None:
        out.update(leakage_unit="nW", area_lib_unit="the library's area unit (um^2)")
    return out


def energy_table_doc(rows: list[dict], streams, rounding: str, lib, liberty_path, pe: bool, layer_q, model) -> dict:
    """The table ``hardware report --save-table`` writes (and energy accounting reads): every design's row with
    the units, streams, rounding and, where measured, the PE and per-layer figures."""
    doc = {"unit": energy_unit(lib), "rounding": rounding, "area_unit": AREA_NAND2_UNIT,
           "streams": {s.name: len(s.x) for s in streams}, "designs": rows}
    if lib:
        doc.update({"liberty": str(liberty_path), "leakage_unit": "nW", "area_lib_unit": "library area unit (um^2)"})
    if pe:
        doc["pe"] = (f"processing element: the multiplier, a {PE_ACC_BITS}-bit accumulator adder and register "
                     f"(dot products of {PE_DOT_LENGTH}); register clock "
                     + (f"from {lib.flop().cell}" if lib else "not modelled (no liberty)"))
    if layer_q is not None:
        doc["per_layer"] = per_layer_relative(rows, layer_q)
        doc["per_layer_unit"] = ("energy on the layer's own stream / the exact design's energy averaged over "
                                 "the layers (weighted by multiplications)")
        doc["model"] = model or "resnet8"
    return doc
