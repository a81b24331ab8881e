"""A liberty cell library: cell functions, pin capacitances, internal energy, leakage and area.

Read with the ``liberty-parser`` package (``pip install maxdnn[liberty]``).
What the energy model takes from a library (``maxdnn.hardware.power``):

- each cell output pin's logic ``function`` (to simulate the mapped netlist);
- each input pin's ``capacitance``;
- each output pin's ``internal_power`` tables: the energy of one output
  transition, looked up at the library's nominal input slew (the middle of the
  table's slew index) and at the load the pin really drives (the capacitance
  of the input pins on its net, clamped to the table), rise and fall averaged,
  and averaged over the related input pins;
- ``cell_leakage_power`` and ``area``, reported separately.

Units: capacitance in fF, energy in fJ (internal-power tables are in
capacitance unit x voltage unit squared), leakage in nW, area in the
library's area unit (um^2 by convention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from maxdnn.errors import MaxdnnError

CAP_TO_FF = {"ff": 1.0, "pf": 1e3, "nf": 1e6}
POWER_TO_NW = {"pw": 1e-3, "nw": 1.0, "uw": 1e3, "mw": 1e6, "w": 1e9}
VOLT_TO_V = {"v": 1.0, "mv": 1e-3}
SLEW_VARS = ("input_net_transition", "input_transition_time")
LOAD_VAR = "total_output_net_capacitance"


class LibertyError(MaxdnnError, ValueError):
    pass


@dataclass
class OutputPin:
    expr: str  # the liberty function, as written
    inputs: list[str]  # the cell's input pins, in the order the evaluator takes them
    evaluate: object  # callable(*bool arrays) -> bool array
    slew: float  # nominal input slew of the energy table (library time unit)
    loads: np.ndarray  # the energy table's load index (fF)
    energy: np.ndarray  # energy per output transition at the nominal slew, per load (fJ)

    def energy_at(self, load_ff: float) -> float:
        if len(self.loads) == 0:
            return 0.0
        return float(np.interp(load_ff, self.loads, self.energy))  # clamped at the table's ends


@dataclass
class Cell:
    name: str
    area: float
    leakage_nw: float
    input_cap: dict[str, float]  # fF
    outputs: dict[str, OutputPin] = field(default_factory=dict)


@dataclass
class FlopEnergy:
    """A D flip-flop's internal energies (fJ): per clock cycle (a rise and a fall of its clock pin), per toggle
    of its data input, per toggle of its output (at the output table's smallest load)."""
    cell: str
    clock: float
    data: float
    q: float


@dataclass
class Liberty:
    path: str
    name: str
    voltage: float  # V
    cells: dict[str, Cell]
    flops: dict[str, FlopEnergy] = field(default_factory=dict)  # plain D flip-flops (one data pin, one clock)

    def flop(self) -> FlopEnergy:
        """The library's plain D flip-flop with the least clock energy (one line if it has none)."""
        if not self.flops:
            raise LibertyError(f"{self.path}: no plain D flip-flop (one data input, one clock) for the accumulator")
        return min(self.flops.values(), key=lambda f: (f.clock, f.cell))

    def cell(self, name: str) -> Cell:
        try:
            return self.cells[name]
        except KeyError:
            raise LibertyError(f"{self.path}: the netlist uses cell '{name}', which the library does not define") from None


def _unit(value, table: dict, what: str, path) -> float:
    """Scale of a liberty unit such as "1uW", (1, ff) or "1V"."""
    if isinstance(value, (list, tuple)):
        num, unit = float(value[0]), str(value[1])
    else:
        m = re.fullmatch(r"\s*([\d.eE+-]*)\s*([A-Za-z]+)\s*", str(value).strip('"'))
        if not m:
            raise LibertyError(f"{path}: cannot read {what} {value!r}")
        num, unit = float(m.group(1) or 1), m.group(2)
    if unit.lower() not in table:
        raise LibertyError(f"{path}: unsupported {what} {value!r}")
    return num * table[unit.lower()]


def _lambdify(expr: str, pins: list[str]):
    import sympy
    from liberty.boolean_functions import parse_boolean_function

    f = parse_boolean_function(expr)
    symbols = [sympy.Symbol(p) for p in pins]
    fn = sympy.lambdify(symbols, f, modules="numpy")
    return lambda *ins: np.broadcast_to(np.asarray(fn(*ins), dtype=bool), ins[0].shape if ins else ())


def _energy_curve(pin, cap_scale: float, energy_scale: float, templates: dict):
    """(nominal slew, loads [fF], energy per transition [fJ]) of an output pin's internal_power groups."""
    curves, slew, loads = [], 0.0, np.zeros(0)
    for ip in pin.get_groups("internal_power"):
        per_edge = []
        for edge in ("rise_power", "fall_power"):
            g = ip.get_groups(edge)
            if not g:
                continue
            g = g[0]
            values = np.atleast_2d(np.asarray(g.get_array("values"), dtype=float))
            tmpl = templates.get(g.args[0] if g.args else None, {})
            idx1 = np.asarray(g.get_array("index_1")[0] if "index_1" in g else tmpl.get("index_1", []), float).ravel()
            idx2 = np.asarray(g.get_array("index_2")[0] if "index_2" in g else tmpl.get("index_2", []), float).ravel()
            var1, var2 = str(tmpl.get("variable_1", SLEW_VARS[0])), str(tmpl.get("variable_2", ""))
            if var1 == LOAD_VAR and var2:  # (load, slew) tables: put slew first
                values, idx1, idx2 = values.T, idx2, idx1
            elif var1 == LOAD_VAR:  # load only
                values, idx1, idx2 = values.reshape(1, -1), np.zeros(1), idx1
            elif not var2:  # slew only: one load point
                values, idx2 = values.reshape(-1, 1), np.zeros(1)
            i = len(idx1) // 2 if len(idx1) else 0
            slew = float(idx1[i]) if len(idx1) else 0.0
            loads = idx2 * cap_scale if len(idx2) else np.zeros(1)
            per_edge.append(values[min(i, values.shape[0] - 1)] * energy_scale)
        if per_edge:
            curves.append(np.mean(per_edge, axis=0))
    if not curves:
        return 0.0, np.zeros(0), np.zeros(0)
    return slew, loads, np.mean(curves, axis=0)


def read_liberty(path: str | Path) -> Liberty:
    """Parse a liberty file (one line, LibertyError, on any problem)."""
    path = Path(path)
    try:
        from liberty.parser import parse_liberty
    except ModuleNotFoundError:
        raise LibertyError(f"{path}: reading liberty files needs the liberty-parser package "
                           "(pip install maxdnn[liberty])") from None
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise LibertyError(f"{path}: cannot read ({e.strerror})") from None
    try:
        lib = parse_liberty(text)
    except Exception as e:  # noqa: BLE001 - the parser's own errors, in one line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LibertyError(f"{path}: not a liberty file ({first})") from None
    if getattr(lib, "group_name", None) != "library":
        raise LibertyError(f"{path}: not a liberty file (no library group)")
    cap_scale = _unit(lib["capacitive_load_unit"] or (1, "pf"), CAP_TO_FF, "capacitive_load_unit", path)
    volt_scale = _unit(lib["voltage_unit"] or "1V", VOLT_TO_V, "voltage_unit", path)
    leak_scale = _unit(lib["leakage_power_unit"] or "1nW", POWER_TO_NW, "leakage_power_unit", path)
    voltage = float(lib["nom_voltage"] or 0) * volt_scale
    if voltage <= 0:
        raise LibertyError(f"{path}: no nom_voltage")
    energy_scale = cap_scale * volt_scale ** 2  # internal energy in capacitance x voltage^2 units -> fJ
    templates = {}
    for kind in ("power_lut_template", "lu_table_template"):
        for t in lib.get_groups(kind):
            templates[t.args[0]] = {k: t[k] for k in ("variable_1", "variable_2")} | {
                k: np.asarray(t.get_array(k), float).ravel() for k in ("index_1", "index_2") if k in t}
    cells, flops = {}, {}
    for c in lib.get_groups("cell"):
        name = str(c.args[0]).strip('"')
        pins = c.get_groups("pin")
        ins = {str(p.args[0]).strip('"'): float(p["capacitance"] or 0) * cap_scale
               for p in pins if p["direction"] == "input"}
        cell = Cell(name, float(c["area"] or 0), float(c["cell_leakage_power"] or 0) * leak_scale, ins)
        if c.get_groups("ff") or c.get_groups("latch"):  # sequential: no combinational function to simulate
            cells[name] = cell
            if flop := _plain_flop(name, c, pins, cap_scale, energy_scale, templates):
                flops[name] = flop
            continue
        for p in pins:
            func = p["function"]
            if p["direction"] != "output" or func is None:
                continue
            expr = str(func).strip('"')
            try:
                evaluate = _lambdify(expr, list(ins))
            except Exception:  # noqa: BLE001
                raise LibertyError(f"{path}: cell {name} pin {p.args[0]}: cannot read function {expr!r}") from None
            slew, loads, energy = _energy_curve(p, cap_scale, energy_scale, templates)
            cell.outputs[str(p.args[0]).strip('"')] = OutputPin(expr, list(ins), evaluate, slew, loads, energy)
        cells[name] = cell
    if not any(c.outputs for c in cells.values()):
        raise LibertyError(f"{path}: no cell with a logic function")
    return Liberty(str(path), str(lib.args[0]).strip('"') if lib.args else path.stem, voltage, cells, flops)


def _plain_flop(name, c, pins, cap_scale, energy_scale, templates) -> FlopEnergy | None:
    """A D flip-flop's energies, if the cell is one: an ff group, one clock and one data input, one output."""
    ff = c.get_groups("ff")
    if not ff or c.get_groups("latch"):
        return None
    clocked_on = str(ff[0]["clocked_on"] or "").strip('"')
    ins = [p for p in pins if p["direction"] == "input"]
    outs = [p for p in pins if p["direction"] == "output"]
    clock = [p for p in ins if str(p.args[0]) == clocked_on]
    data = [p for p in ins if str(p.args[0]) != clocked_on]
    if len(clock) != 1 or len(data) != 1 or not outs or ff[0]["clear"] or ff[0]["preset"]:
        return None

    def per_transition(pin) -> float:
        _, _, e = _energy_curve(pin, cap_scale, energy_scale, templates)
        return float(e[0]) if len(e) else 0.0

    return FlopEnergy(name, 2 * per_transition(clock[0]), per_transition(data[0]), per_transition(outs[0]))
