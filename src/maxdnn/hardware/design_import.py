"""Import a user's multiplier: Verilog through Yosys into an exhaustive product table and energy, or a table.

Verilog: the module has two operand input ports (activation x, weight w; by
default the first and second input in declaration order) and one product
output port (at least 2 x bits wide). The module is the file's only one, or,
in a file with helper modules (EvoApproxLib's PDKGEN* cells), the module named
as the file (``mul8u_1JFF.v``: ``mul8u_1JFF``); ``--top`` names another.

How the circuit serves maxdnn's operands (x: the activation, unsigned or with
``x_signed`` two's complement; w: the weight, always signed) is the
``w_format``, recorded in the library:

- ``signed``: the weight port takes w's two's-complement bits (a signed
  circuit such as EvoApprox's ``mul8s_*``); the product is read as a
  two's-complement number of its width;
- ``sign-magnitude``: the wrapper p = M(x, |w|) for w >= 0 and -M(x, |w|) for
  w < 0 (sign(w) * M(x, |w|), except that an approximate M(x, 0) is kept),
  which lets an unsigned-weight circuit (EvoApprox's ``mul8u_*``) serve signed weights:
  the weight port takes |w| (at most 2^(bits-1), which fits an unsigned
  port), and the product is read unsigned (two's complement with
  ``x_signed``) and negated for negative w. In hardware the sign costs an
  XOR of the two signs and a conditional negation after the circuit (not in
  the energy here: the energy is the circuit's, on |w|).

An unsigned weight port fed w's bits as they are (``unsigned``) is refused:
maxdnn's weights are signed, and that mapping multiplies negative weights by
w + 2^bits. A table whose product has the opposite sign of x * w on more than
``MAX_SIGN_FLIPS`` of the operand pairs is refused as the mark of a wrong
mapping (a weight or activation port of the wrong signedness flips the sign
of a quarter to a half of all products; an approximate circuit, however
inexact, keeps the sign), unless ``force``.

It is synthesized with the same flow as the built-in designs
(``maxdnn.hardware.synth``), simulated on every operand pair into the table,
and its energy per multiplication is simulated (unit delay, glitches counted)
on the uniform stream and, when a model stream is given, on that stream (the
weights as the circuit's port sees them); each energy is divided by the exact
radix-4 Booth design's energy on the same stream. An x-signed import is
measured on the uniform stream with signed x (x uniform in -2^(B-1)..2^(B-1)-1)
against the exact Booth design with a signed multiplicand; the model streams
have unsigned activations, so it has no model-stream energy, and energy
accounting takes its uniform figure on every stream (said in the energy
source). A file's
header may carry published figures (EvoApproxLib: ``// PDK45_PWR = 0.391 mW``,
``// PDK45_AREA = 709.6 um2``, ``// PDK45_DELAY = 1.43 ns``): they are kept
as ``published`` beside maxdnn's own numbers.
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
from maxdnn.hardware.power import Stream, netlist_for, signed_view, stream_energy
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


W_FORMATS = ("signed", "sign-magnitude")
MAX_SIGN_FLIPS = 0.05  # a table whose sign disagrees with x * w on more pairs than this has a wrong operand mapping


def published_figures(text: str) -> dict:
    """The synthesis figures a design file's header publishes (EvoApproxLib's PDK45_PWR / AREA / DELAY)."""
    out = {}
    for key, unit in (("PDK45_PWR", "mW"), ("PDK45_AREA", "um2"), ("PDK45_DELAY", "ns")):
        m = re.search(rf"//\s*{key}\s*=\s*([0-9.eE+-]+)\s*{unit}", text)
        if m:
            out[f"{key.lower()}_{unit.lower()}"] = float(m[1])
    return out


def port_weights(w: np.ndarray, w_format: str) -> np.ndarray:
    """The weight values the circuit's port sees for maxdnn's signed weights ``w``."""
    return np.abs(w) if w_format == "sign-magnitude" else w


def check_w_format(w_format: str) -> str:
    if w_format == "unsigned":
        raise LibraryError("--w-format unsigned: maxdnn's weights are signed, and an unsigned weight port fed their "
                           "bits multiplies a negative w by w + 2^bits; serve signed weights with an unsigned "
                           "circuit through --w-format sign-magnitude (p = sign(w) * M(x, |w|))")
    if w_format not in W_FORMATS:
        raise LibraryError(f"--w-format {w_format}: expected signed or sign-magnitude")
    return w_format


def synthesize_design(path: Path, top: str | None, bits: int = 8, x_port=None, w_port=None,
                      p_port=None) -> tuple[Netlist, dict]:
    """The user's module (``top``; None: the file's only module, or the one named as the file) as a netlist
    with ports renamed x, w and p; one-line errors."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LibraryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LibraryError(f"{path}: cannot read ({e})") from None
    modules = re.findall(r"^\s*module\s+([A-Za-z_][A-Za-z0-9_$]*)", text, flags=re.M)
    if top is None:
        if len(modules) == 1:
            top = modules[0]
        elif path.stem in modules:  # a design with helper cells (EvoApproxLib): the module the file is named after
            top = path.stem
        else:
            raise LibraryError(f"{path}: {len(modules)} modules ({', '.join(modules) or 'none'}), none named as "
                               f"the file; name the multiplier with --top")
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


def netlist_table(net: Netlist, bits: int, x_signed: bool, w_format: str = "signed") -> np.ndarray:
    """Exhaustive product table of a netlist with ports x, w, p (``table[x - x_min, w - w_min]``, w signed),
    the circuit serving the weights as ``w_format`` says (module docstring)."""
    xs = OperandFormat(bits, x_signed).values()
    ws = OperandFormat(bits, True).values()
    x, w = np.meshgrid(xs, ws, indexing="ij")
    x, w = x.reshape(-1), w.reshape(-1)
    p = net.simulate(x=x, w=port_weights(w, w_format))["p"]
    if w_format == "sign-magnitude":
        if not x_signed:  # an unsigned circuit's product is unsigned
            width = len(net.outputs["p"])
            p = np.where(p < 0, p + (1 << width), p)
        p = np.where(w < 0, -p, p)
    return p.reshape(len(xs), len(ws))


def design_energy(net: Netlist, streams: list[Stream], bits: int = 8,
                  w_format: str = "signed", x_signed: bool = False) -> tuple[dict, dict]:
    """(energy per multiplication, energy relative to the exact Booth design) per stream name, the circuit's
    weight port fed as ``w_format`` says; ``x_signed``: on the signed views of the streams (the uniform one)
    against the exact Booth design with signed x (module docstring)."""
    exact = netlist_for("exact", bits, x_signed=x_signed)
    energy, rel = {}, {}
    if x_signed:
        streams = [v for v in (signed_view(s, bits) for s in streams) if v is not None]
    for s in streams:
        e = stream_energy(net, Stream(s.name, s.x, port_weights(s.w, w_format)))["energy"]
        energy[s.name] = round(e, 3)
        rel[s.name] = round(e / stream_energy(exact, s)["energy"], 4)
    return energy, rel


def import_verilog(path: Path, top: str | None, name: str, bits: int = 8, x_signed: bool = False, streams=(),
                   x_port=None, w_port=None, p_port=None, replace_existing: bool = False, w_format: str = "signed",
                   force: bool = False) -> dict:
    """Synthesize, tabulate, measure and register a Verilog multiplier; returns its metadata."""
    check_name(name)
    check_w_format(w_format)
    path = Path(path)
    net, info = synthesize_design(path, top, bits, x_port, w_port, p_port)
    table = netlist_table(net, bits, x_signed, w_format)
    mult = TableMultiplier(name, bits, x_signed, table)
    metrics = error_metrics(mult)
    xs, ws = OperandFormat(bits, x_signed).values(), OperandFormat(bits, True).values()
    flips = float(np.mean(table * (xs[:, None] * ws[None, :]) < 0))
    if flips > MAX_SIGN_FLIPS and not force:
        raise LibraryError(f"{path}: with x {'s' if x_signed else 'u'}{bits} and --w-format {w_format}, module "
                           f"'{info['top']}' gives the wrong sign on {100 * flips:.1f}% of the operand pairs (NMED "
                           f"{metrics.nmed:.3f}): check --x-signed, --w-format and the ports (an unsigned circuit "
                           "such as EvoApprox's mul8u_*: --w-format sign-magnitude; a signed one, mul8s_*: "
                           "--x-signed); --force imports it anyway")
    meta = {"bits": bits, "x_signed": x_signed, "w_format": w_format, "source": "verilog",
            "source_file": str(path.resolve()), "top": info["top"],
            "ports": {k: info[k] for k in ("x", "w", "product")},
            "metrics": metrics.as_dict(), "gates": len(net.gate_type), "area_nand2": round(net.area_nand2(), 2),
            "depth": net.depth(), "cells": net.cell_counts(), "energy_given": None,
            "published": published_figures(path.read_text())}
    meta["energy"], meta["energy_rel"] = design_energy(net, list(streams), bits, w_format, x_signed)
    if x_signed:
        meta["energy_note"] = ("uniform stream with signed x, relative to the exact Booth design with signed x "
                               "(the model streams have unsigned activations)")
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
