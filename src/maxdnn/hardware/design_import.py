"""Import a user's multiplier: Verilog through Yosys into an exhaustive product table and energy, or a table.

Verilog: the module has two operand input ports (activation x, weight w; by
default the first and second input in declaration order) and one product
output port, read as a two's-complement number of its width (at least
2 x bits). It is synthesized with the same flow as the built-in designs
(``maxdnn.hardware.synth``), simulated on every operand pair into the table,
and its energy per multiplication is simulated (unit delay, glitches counted)
on the uniform stream and, when a model stream is given, on that stream; each
energy is divided by the exact radix-4 Booth design's energy on the same
stream. The energy streams and the reference design take unsigned x, so
x-signed imports get no energy.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from maxdnn.multipliers.metrics import error_metrics
from maxdnn.multipliers.library import LibraryError, check_name, load_table_file, register
from maxdnn.multipliers.models import OperandFormat, TableMultiplier
from maxdnn.hardware.netlist import Netlist, NetlistError
from maxdnn.hardware.power import Stream, netlist_for, stream_energy
from maxdnn.hardware.synth import SynthesisError, synthesize


def _ports(net: Netlist, path: Path, top: str, bits: int, x_port, w_port, p_port) -> tuple[str, str, str]:
    ins, outs = list(net.inputs), list(net.outputs)
    if x_port is None or w_port is None:
        if len(ins) != 2:
            raise LibraryError(f"{path}: module '{top}' has {len(ins)} input ports ({', '.join(ins) or 'none'}); "
                               f"a multiplier has two (name them with --x-port and --w-port)")
        x_port, w_port = x_port or ins[0], w_port or ins[1]
    if p_port is None:
        if len(outs) != 1:
            raise LibraryError(f"{path}: module '{top}' has {len(outs)} output ports ({', '.join(outs) or 'none'}); "
                               f"name the product with --product-port")
        p_port = outs[0]
    for port, where in ((x_port, ins), (w_port, ins), (p_port, outs)):
        if port not in where:
            kind = "input" if where is ins else "output"
            raise LibraryError(f"{path}: module '{top}' has no {kind} port '{port}' ({kind}s: {', '.join(where) or 'none'})")
    if x_port == w_port:
        raise LibraryError(f"{path}: --x-port and --w-port are both '{x_port}'")
    for port in (x_port, w_port):
        if len(net.inputs[port]) != bits:
            raise LibraryError(f"{path}: port '{port}' is {len(net.inputs[port])} bits wide; --bits is {bits}")
    if len(net.outputs[p_port]) < 2 * bits:
        raise LibraryError(f"{path}: product port '{p_port}' is {len(net.outputs[p_port])} bits wide; "
                           f"a {bits}x{bits}-bit product needs at least {2 * bits}")
    return x_port, w_port, p_port


def synthesize_design(path: Path, top: str | None, bits: int = 8, x_port=None, w_port=None,
                      p_port=None) -> tuple[Netlist, dict]:
    """The user's module (``top``; None: the file's only module) as a netlist with ports renamed x, w and p;
    one-line errors."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LibraryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LibraryError(f"{path}: cannot read ({e})") from None
    modules = re.findall(r"^\s*module\s+([A-Za-z_][A-Za-z0-9_$]*)", text, flags=re.M)
    if top is None:
        if len(modules) != 1:
            raise LibraryError(f"{path}: {len(modules)} modules ({', '.join(modules) or 'none'}); "
                               f"name the multiplier with --top")
        top = modules[0]
    if top not in modules:
        raise LibraryError(f"{path}: no module '{top}' (modules: {', '.join(modules) or 'none'})")
    try:
        net, doc = synthesize(text, top)
    except NetlistError as e:
        raise LibraryError(f"{path}: module '{top}': {e}") from None
    except SynthesisError as e:
        raise LibraryError(f"{path}: {e}") from None
    x_port, w_port, p_port = _ports(net, path, top, bits, x_port, w_port, p_port)
    net = replace(net, inputs={"x": net.inputs[x_port], "w": net.inputs[w_port]}, outputs={"p": net.outputs[p_port]})
    return net, {"top": top, "x": x_port, "w": w_port, "product": p_port, "modules": doc}


def netlist_table(net: Netlist, bits: int, x_signed: bool) -> np.ndarray:
    """Exhaustive product table of a netlist with ports x, w, p (``table[x - x_min, w - w_min]``)."""
    xs = OperandFormat(bits, x_signed).values()
    ws = OperandFormat(bits, True).values()
    x, w = np.meshgrid(xs, ws, indexing="ij")
    return net.simulate(x=x.reshape(-1), w=w.reshape(-1))["p"].reshape(len(xs), len(ws))


def design_energy(net: Netlist, streams: list[Stream], bits: int = 8) -> tuple[dict, dict]:
    """(energy per multiplication, energy relative to the exact Booth design) per stream name."""
    exact = netlist_for("exact", bits)
    energy, rel = {}, {}
    for s in streams:
        e = stream_energy(net, s)["energy"]
        energy[s.name] = round(e, 3)
        rel[s.name] = round(e / stream_energy(exact, s)["energy"], 4)
    return energy, rel


def import_verilog(path: Path, top: str | None, name: str, bits: int = 8, x_signed: bool = False, streams=(),
                   x_port=None, w_port=None, p_port=None, replace_existing: bool = False) -> dict:
    """Synthesize, tabulate, measure and register a Verilog multiplier; returns its metadata."""
    check_name(name)
    path = Path(path)
    net, info = synthesize_design(path, top, bits, x_port, w_port, p_port)
    table = netlist_table(net, bits, x_signed)
    mult = TableMultiplier(name, bits, x_signed, table)
    meta = {"bits": bits, "x_signed": x_signed, "source": "verilog", "source_file": str(path.resolve()), "top": info["top"],
            "ports": {k: info[k] for k in ("x", "w", "product")},
            "metrics": error_metrics(mult).as_dict(), "gates": len(net.gate_type), "area_nand2": round(net.area_nand2(), 2),
            "depth": net.depth(), "cells": net.cell_counts(), "energy_given": None}
    if x_signed:
        meta["energy"], meta["energy_rel"] = {}, {}
        meta["energy_note"] = "none: the energy streams and the reference Booth design take unsigned x"
    else:
        meta["energy"], meta["energy_rel"] = design_energy(net, list(streams), bits)
    register(name, table, meta, {"design.v": path.read_text(), "netlist.json": json.dumps(info["modules"])},
             replace=replace_existing)
    return meta


def import_table(path: Path, name: str, bits: int = 8, x_signed: bool = False, energy: float | None = None,
                 replace_existing: bool = False) -> dict:
    """Register a product table (.npy) with its error metrics and, if stated, its relative energy."""
    check_name(name)
    path = Path(path)
    if energy is not None and not (0.0 < energy < 10.0):
        raise LibraryError(f"--energy {energy}: a relative energy (exact multiplier = 1.0) is positive and small")
    table = load_table_file(path, bits)
    mult = TableMultiplier(name, bits, x_signed, table)
    meta = {"bits": bits, "x_signed": x_signed, "source": "table", "source_file": str(path.resolve()),
            "metrics": error_metrics(mult).as_dict(), "energy": {}, "energy_rel": {}, "energy_given": energy}
    register(name, table, meta, replace=replace_existing)
    return meta
