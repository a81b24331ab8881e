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

import numpy as np

from .approx import Assignment
from .multipliers import ROUP, Exact, get_multiplier

HARDWARE_TABLE = "energy-8bit.json"


def multiplication_counts(qnet) -> dict[str, int]:
    """Multiplications per kernel (f, c) per image, per layer (padding excluded)."""
    counts = {}
    for name, layer in qnet.layers.items():
        kh, kw = layer.weight.shape[2:]
        h, w = layer.in_hw
        left, r, t, b = layer.pads
        ho, wo = layer.out_hw
        rows = sum(1 for oh in range(ho) for i in range(kh) if 0 <= oh * layer.stride + i - t < h)
        cols = sum(1 for ow in range(wo) for j in range(kw) if 0 <= ow * layer.stride + j - left < w)
        counts[name] = rows * cols
    return counts


def provisional_energy(spec: str, bits: int = 8) -> float:
    m = get_multiplier(spec, bits)
    if isinstance(m, Exact):
        return 1.0
    if isinstance(m, ROUP):
        half = bits // 2
        return ((half - m.p) / half) * ((bits + 1 - m.r) / (bits + 1))
    raise KeyError(f"no energy model for multiplier '{spec}' (energy is modelled for exact and ROUP)")


def hardware_table(bits: int = 8, stream: str = "resnet8") -> dict[str, float] | None:
    """Relative energies from the committed hardware report, if present."""
    if bits != 8:
        return None
    try:
        doc = json.loads((resources.files("maxdnn") / "data_files" / HARDWARE_TABLE).read_text())
    except (FileNotFoundError, OSError):
        return None
    table = {row["spec"]: row["energy_rel"][stream] for row in doc["designs"] if stream in row.get("energy_rel", {})}
    if "exact" in table:
        table.setdefault("roup-p0r0", table["exact"])  # the same design
    return table


@dataclass
class EnergyTable:
    rel: dict[str, float]
    source: str  # "hardware (...)" or "PROVISIONAL ..."

    def __getitem__(self, spec: str) -> float:
        return self.rel[spec]


class EnergyModelError(ValueError):
    """A multiplier without an energy model, as one line."""


def energy_table(specs, bits: int = 8, stream: str = "resnet8") -> EnergyTable:
    """Relative energies of ``specs``: the hardware table, imported multipliers' own (``maxdnn.multiplier_library``),
    else the provisional model (ROUP only)."""
    from .multiplier_library import energy_status, user_energy

    hw = hardware_table(bits, stream)
    user = user_energy(stream, bits)
    imported = [s for s in specs if s in user]
    known = {**(hw or {}), **user}
    if hw is not None and all(s in known for s in specs):
        source = f"hardware: unit-delay gate-level simulation of Yosys netlists, {stream} operand stream"
        if imported:
            source += f"; imported: {', '.join(imported)} (own netlist or stated energy)"
        return EnergyTable({s: known[s] for s in specs}, source)
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
    e_spec = np.array([table[s] for s in a.specs])
    per_layer = {}
    total = exact = 0.0
    for name, amap in a.maps.items():
        e = float(e_spec[amap].sum() * counts[name])
        ex = float(amap.size * counts[name])
        per_layer[name] = {"energy": e, "exact": ex, "multiplications": int(amap.size * counts[name])}
        total += e
        exact += ex
    return {"energy": total, "energy_exact": exact, "energy_gain": 1.0 - total / exact,
            "multiplications": int(sum(v["multiplications"] for v in per_layer.values())),
            "energy_unit": "exact 8-bit multiplications per image", "energy_source": table.source,
            "per_layer": per_layer}
