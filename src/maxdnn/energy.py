"""Multiplication counts and network multiplication energy under an assignment.

Counts: per image, every kernel (f, c) of a layer performs one multiplication
per (output position, kernel tap) whose input position is inside the image;
products at zero-padding positions are not formed and not counted. All kernels
of a layer therefore have the same count.

Energy per multiplication comes from an energy table (spec -> energy relative
to the exact multiplier of the same architecture). The table is the hardware
cost model's (``maxdnn.hardware``: unit-delay gate-level simulation of the
synthesized netlists on the ResNet-8 operand stream, committed as
``data_files/energy-8bit.json`` by ``maxdnn hardware report --stream uniform
--stream resnet8 --save-table ...``) when it has an entry for every spec used;
otherwise a provisional model, labelled as such in every output:

    PROVISIONAL: relative energy = (kept Booth rows / all rows) * (multiplicand
    bits after rounding / all multiplicand bits) = ((B/2 - P) / (B/2)) * ((B + 1 - R) / (B + 1))

Network multiplication energy is in units of one exact multiplication, per
image; energy gain = 1 - energy / energy of the all-exact network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from maxdnn.errors import MaxdnnError
from maxdnn.engine.approx import Assignment
from maxdnn.ir.graph import multiplication_counts
from maxdnn.multipliers.models import ROUP, Exact, get_multiplier

HARDWARE_TABLE = "energy-8bit.json"


def provisional_energy(spec: str, bits: int = 8) -> float:
    m = get_multiplier(spec, bits)
    if isinstance(m, Exact):
        return 1.0
    if isinstance(m, ROUP):
        half = bits // 2
        return ((half - m.p) / half) * ((bits + 1 - m.r) / (bits + 1))
    raise KeyError(f"no energy model for multiplier '{spec}' (energy is modelled for exact and ROUP)")


def hardware_table(bits: int = 8, stream: str = "resnet8", key: str = "energy_rel") -> dict[str, float] | None:
    """Relative energies from the committed hardware report, if present (``key`` "pe_energy_rel": those of
    the processing element, multiplier + accumulator)."""
    if bits != 8:
        return None
    try:
        doc = json.loads((resources.files("maxdnn") / "data_files" / HARDWARE_TABLE).read_text())
    except (FileNotFoundError, OSError):
        return None
    table = {row["spec"]: row[key][stream] for row in doc["designs"] if stream in row.get(key, {})}
    if "exact" in table:
        table.setdefault("roup-p0r0", table["exact"])  # the same design
    return table


@dataclass
class EnergyTable:
    rel: dict[str, float]
    source: str  # "hardware (...)" or "PROVISIONAL ..."
    per_layer: dict[str, dict[str, float]] | None = None  # layer -> spec -> energy (see ``with_per_layer``)
    pe: dict[str, float] | None = None  # spec -> processing-element energy relative to the exact PE's

    def __getitem__(self, spec: str) -> float:
        return self.rel[spec]

    def for_layer(self, name: str, spec: str) -> float:
        """A layer's energy per multiplication: its own stream's when the table has the layer, else the average."""
        if self.per_layer is not None and name in self.per_layer:
            return self.per_layer[name][spec]
        return 1.0 if spec == "exact" else self.rel[spec]


class EnergyModelError(MaxdnnError, ValueError):
    """A multiplier without an energy model, as one line."""


PER_LAYER_TABLE = "energy-8bit-resnet8-layers.json"
ENERGY_CHOICES = "average, per-layer (the committed ResNet-8's layer streams) or a table FILE.json"


def with_per_layer(table: EnergyTable, energy: str | None, qnet) -> EnergyTable:
    """``table`` with per-layer energies (``--energy``): None or "average" keeps the single average;
    "per-layer" takes the committed ResNet-8 table; a path takes a table saved by
    ``maxdnn hardware report --stream model --model M --per-layer --save-table FILE``. Every layer of the
    graph with unsigned inputs must be in it, and every spec of ``table`` (one line otherwise)."""
    if energy in (None, "average"):
        return table
    if energy.startswith("accelerator:"):
        raise EnergyModelError(f"--energy {energy}: the accelerator's energy is an objective of explore; elsewhere "
                               f"give --accelerator {energy[len('accelerator:'):]}")
    if energy == "per-layer":
        where = f"the committed per-layer table ({PER_LAYER_TABLE}, the committed ResNet-8's layers)"
        doc = json.loads((resources.files("maxdnn") / "data_files" / PER_LAYER_TABLE).read_text())
    else:
        where = energy
        try:
            doc = json.loads(Path(energy).read_text())
        except FileNotFoundError:
            raise EnergyModelError(f"--energy {energy}: expected {ENERGY_CHOICES}") from None
        except (OSError, ValueError) as e:
            raise EnergyModelError(f"{energy}: cannot read the energy table ({e})") from None
    per = doc.get("per_layer") if isinstance(doc, dict) else None
    if not isinstance(per, dict):
        raise EnergyModelError(f"{where}: no per-layer energies (save one with hardware report --per-layer)")
    missing = [n for n, l in qnet.layers.items() if not l.x_signed and n not in per]
    if missing:
        raise EnergyModelError(f"{where}: has no layer {missing[0]} of this model; make its table with "
                               "maxdnn hardware report --stream model --model M --per-layer --save-table FILE")
    per = {n: {"roup-p0r0": e["exact"], **e} if "exact" in e else e for n, e in per.items()}  # the same design
    for n in qnet.layers:
        if n in per and (lack := [s for s in table.rel if s not in per[n]]):
            raise EnergyModelError(f"{where}: no energy of {lack[0]} for layer {n}")
    return EnergyTable(table.rel, table.source + f"; per layer: each layer's own operand stream ({where})",
                       {n: {s: float(v) for s, v in per[n].items()} for n in qnet.layers if n in per}, table.pe)


def energy_table(specs, bits: int = 8, stream: str = "resnet8") -> EnergyTable:
    """Relative energies of ``specs``: the hardware table, imported multipliers' own (``maxdnn.multipliers.library``),
    else the provisional model (ROUP only)."""
    from maxdnn.multipliers.library import energy_status, user_energy

    hw = hardware_table(bits, stream)
    user = user_energy(stream, bits)
    imported = [s for s in specs if s in user]
    known = {**(hw or {}), **user}
    if hw is not None and all(s in known for s in specs):
        source = f"hardware: unit-delay gate-level simulation of Yosys netlists, {stream} operand stream"
        if imported:
            from maxdnn.multipliers.store import read_meta

            source += f"; imported: {', '.join(imported)} (own netlist or stated energy)"
            if signed := [s for s in imported if (read_meta(s) or {}).get("x_signed")]:
                source += f"; x-signed {', '.join(signed)}: the uniform stream with signed x on every stream"
        pe = hardware_table(bits, stream, "pe_energy_rel") or {}
        pe_rel = {s: pe[s] for s in specs} if all(s in pe for s in specs) else None
        return EnergyTable({s: known[s] for s in specs}, source, pe=pe_rel)
    rel = {}
    for s in specs:
        if why := energy_status(s, stream):
            raise EnergyModelError(why)
        if s in user:
            rel[s] = user[s]
            continue
        try:
            rel[s] = provisional_energy(s, bits)
        except KeyError as e:
            raise EnergyModelError(e.args[0]) from None
    return EnergyTable(rel, "PROVISIONAL (partial-product bit count; hardware table lacks these specs)")


def network_energy(qnet, assignment: Assignment, table: EnergyTable | None = None) -> dict:
    """Energy per image in exact-multiplication units, gain vs all-exact, per-layer breakdown."""
    a = assignment.bind(qnet)
    table = table or energy_table(a.specs, a.bits)
    counts = multiplication_counts(qnet)
    per_layer = {}
    total = exact = 0.0
    for name, amap in a.maps.items():
        e_spec = np.array([table.for_layer(name, s) for s in a.specs])
        e = float(e_spec[amap].sum() * counts[name])
        ex = float(amap.size * counts[name] * table.for_layer(name, "exact"))
        per_layer[name] = {"energy": e, "exact": ex, "multiplications": int(amap.size * counts[name])}
        total += e
        exact += ex
    pe_gain = None
    if table.pe is not None:  # the processing element (multiplier + accumulator), average operand stream
        pe_total = sum(float(np.array([table.pe[s] for s in a.specs])[m].sum() * counts[n]) for n, m in a.maps.items())
        pe_gain = 1.0 - pe_total / sum(float(m.size * counts[n]) for n, m in a.maps.items())
    return {"energy": total, "energy_exact": exact, "energy_gain": 1.0 - total / exact, "pe_energy_gain": pe_gain,
            "multiplications": int(sum(v["multiplications"] for v in per_layer.values())),
            "energy_unit": "exact 8-bit multiplications per image" + (" (average operands)" if table.per_layer else ""),
            "energy_source": table.source,
            "per_layer": per_layer}
