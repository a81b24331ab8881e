"""Gate-level netlists: Yosys JSON read-back, area, depth and simulation.

The gate set is Yosys' internal cells after ``abc -g AND,NAND,OR,NOR,XOR,XNOR``
(plus NOT and BUF). Area is counted in NAND2 equivalents with the X1 cell
areas of the NanGate 45 nm Open Cell Library (NAND2_X1 = 0.798 um^2):

    INV 0.532 -> 0.667, NAND2/NOR2 0.798 -> 1.0, AND2/OR2 1.064 -> 1.333,
    XOR2/XNOR2 1.596 -> 2.0, BUF 0.798 -> 1.0

Switching energy per output toggle is taken proportional to the same cell
area (a proxy for the switched capacitance of the cell and its input pins), in
units of one NAND2 output toggle; see ``maxdnn.hardware.power``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from maxdnn.errors import MaxdnnError

AREA_NAND2 = {"NOT": 0.532 / 0.798, "BUF": 1.0, "NAND": 1.0, "NOR": 1.0, "AND": 1.064 / 0.798,
              "OR": 1.064 / 0.798, "XOR": 2.0, "XNOR": 2.0}
TOGGLE_ENERGY = dict(AREA_NAND2)  # relative switching energy per output toggle

_OPS = {
    "NOT": lambda a, b=None: ~a,
    "BUF": lambda a, b=None: a,
    "AND": lambda a, b: a & b,
    "NAND": lambda a, b: ~(a & b),
    "OR": lambda a, b: a | b,
    "NOR": lambda a, b: ~(a | b),
    "XOR": lambda a, b: a ^ b,
    "XNOR": lambda a, b: ~(a ^ b),
}


class NetlistError(MaxdnnError, ValueError):
    pass


@dataclass
class Netlist:
    """Gates in topological order; nets are integers, 0 and 1 are constants.

    A gate drives one net: a generic gate (``_OPS``), or one output pin of a liberty cell (type
    ``cell.pin``, e.g. ``na2_x1.nq``; a cell with two outputs is two gates). ``gate_in`` holds each gate's
    input nets, padded by repeating the first (``arity`` says how many count). A netlist mapped to a
    liberty library also carries each gate's energy per output toggle (fJ, ``gate_energy``), its cells' area
    and leakage."""

    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    gate_type: list[str]
    gate_in: np.ndarray  # [G, K] input nets
    gate_out: np.ndarray  # [G]
    n_nets: int
    arity: list[int] | None = None  # None: every gate two inputs (NOT/BUF repeat theirs)
    ops: dict | None = None  # gate type -> function of its inputs; None: the generic gates
    gate_energy: np.ndarray | None = None  # fJ per output toggle (liberty netlists)
    cell_area: float | None = None  # the cells' area in the library's unit (liberty netlists)
    leakage_nw: float | None = None

    @classmethod
    def from_yosys_json(cls, doc: dict, top: str = "mul", liberty=None) -> "Netlist":
        """Read a Yosys JSON netlist of generic gates, or with ``liberty`` (``maxdnn.hardware.liberty.Liberty``)
        one mapped to that library's cells."""
        try:
            mod = doc["modules"][top]
        except KeyError:
            raise NetlistError(f"no module '{top}' in the Yosys netlist") from None
        remap: dict = {"0": 0, "1": 1, "x": 0}

        def net(b):
            if b not in remap:
                remap[b] = len(remap) - 1  # '0','1','x' take 0,1 (x folded to 0)
            return remap[b]

        inputs, outputs = {}, {}
        for name, port in mod["ports"].items():
            bits = [net(b) for b in port["bits"]]
            (inputs if port["direction"] == "input" else outputs)[name] = bits
        gates = []  # (type, [input nets], output net, (cell, pin) or None)
        load: dict[int, float] = {}  # fF of input pins on each net (liberty)
        area = leak = 0.0
        for cname, c in mod["cells"].items():
            t = c["type"]
            conn = c["connections"]
            if liberty is None:
                if not (t.startswith("$_") and t.endswith("_")) or t[2:-1] not in _OPS:
                    raise NetlistError(f"cell {cname} has type {t} outside the gate set")
                a = net(conn["A"][0])
                gates.append((t[2:-1], [a, net(conn["B"][0]) if "B" in conn else a], net(conn["Y"][0]), None))
                continue
            cell = liberty.cell(t)
            if not cell.outputs:
                raise NetlistError(f"cell {cname} is a {t}, a sequential or function-less cell of "
                                   f"{liberty.path}; only combinational netlists are simulated")
            area += cell.area
            leak += cell.leakage_nw
            ins = [net(conn[p][0]) for p in cell.input_cap]
            for p, n in zip(cell.input_cap, ins):
                load[n] = load.get(n, 0.0) + cell.input_cap[p]
            for pin, out in cell.outputs.items():
                if pin in conn:
                    gates.append((f"{t}.{pin}", ins, net(conn[pin][0]), (cell, out)))
        n_nets = len(remap) - 1
        # topological order (Kahn)
        driver = {g[2]: k for k, g in enumerate(gates)}
        users: dict[int, list[int]] = {}
        pending = []
        for k, g in enumerate(gates):
            deps = {driver[i] for i in g[1] if i in driver}
            pending.append(len(deps))
            for d in deps:
                users.setdefault(d, []).append(k)
        ready = [k for k, c in enumerate(pending) if c == 0]
        order = []
        while ready:
            k = ready.pop()
            order.append(k)
            for u in users.get(k, []):
                pending[u] -= 1
                if pending[u] == 0:
                    ready.append(u)
        if len(order) != len(gates):
            raise NetlistError("the netlist has a combinational loop")
        gates = [gates[k] for k in order]
        width = max([len(g[1]) for g in gates] + [2])
        gate_in = np.array([g[1] + [g[1][0] if g[1] else 0] * (width - len(g[1])) for g in gates],
                           dtype=np.int64).reshape(-1, width)
        net_list = cls(inputs, outputs, [g[0] for g in gates], gate_in, np.array([g[2] for g in gates], dtype=np.int64),
                       n_nets)
        if liberty is not None:
            v2 = liberty.voltage ** 2
            net_list.arity = [len(g[1]) for g in gates]
            net_list.ops = {g[0]: g[3][1].evaluate for g in gates}
            net_list.gate_energy = np.array([g[3][1].energy_at(load.get(g[2], 0.0)) + 0.5 * load.get(g[2], 0.0) * v2
                                             for g in gates], dtype=float)
            net_list.cell_area, net_list.leakage_nw = area, leak
        return net_list

    @classmethod
    def load(cls, path: str | Path) -> "Netlist":
        return cls.from_yosys_json(json.loads(Path(path).read_text()))

    # ---------------------------------------------------------------- metrics
    def cell_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.gate_type:
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))

    def area_nand2(self) -> float:
        return float(sum(AREA_NAND2[t] for t in self.gate_type))

    def levels(self) -> np.ndarray:
        """Logic level of every net (inputs and constants 0; a generic BUF adds none, a cell one)."""
        lvl = np.zeros(self.n_nets, dtype=np.int64)
        for k in range(len(self.gate_type)):
            lvl[self.gate_out[k]] = lvl[self.gate_in[k]].max() + (0 if self.gate_type[k] == "BUF" else 1)
        return lvl

    def toggle_energy(self) -> np.ndarray:
        """Energy per output toggle of every gate: fJ for a liberty netlist, else NAND2-toggle equivalents."""
        if self.gate_energy is not None:
            return self.gate_energy
        return np.array([TOGGLE_ENERGY[t] for t in self.gate_type])

    def _gate_fns(self) -> list:
        """Per gate: a function of the value array and the gate's input nets."""
        ops = self.ops or _OPS
        arity = self.arity or [2] * len(self.gate_type)
        return [(ops[t], self.gate_in[k, :arity[k]]) for k, t in enumerate(self.gate_type)]

    def depth(self) -> int:
        lvl = self.levels()
        return int(max(lvl[b] for bits in self.outputs.values() for b in bits))

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.inputs, self.outputs, self.gate_type]).encode())
        h.update(self.gate_in.tobytes() + self.gate_out.tobytes())
        if self.gate_energy is not None:  # the same cells from another library cost differently
            h.update(self.gate_energy.tobytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- simulation
    def _input_values(self, operands: dict[str, np.ndarray], n: int) -> np.ndarray:
        vals = np.zeros((self.n_nets, n), dtype=bool)
        vals[1] = True
        for name, bits in self.inputs.items():
            v = np.asarray(operands[name], dtype=np.int64)
            for i, netid in enumerate(bits):
                vals[netid] = (v >> i) & 1
        return vals

    def simulate(self, **operands) -> dict[str, np.ndarray]:
        """Zero-delay evaluation for operand vectors; outputs as signed integers."""
        n = len(next(iter(operands.values())))
        vals = self._input_values(operands, n)
        self._evaluate(vals)
        return {name: self._word(vals, bits) for name, bits in self.outputs.items()}

    def _evaluate(self, vals: np.ndarray) -> None:
        for k, (op, ins) in enumerate(self._gate_fns()):
            vals[self.gate_out[k]] = op(*(vals[i] for i in ins))

    @staticmethod
    def _word(vals, bits) -> np.ndarray:
        out = np.zeros(vals.shape[1], dtype=np.int64)
        for i, netid in enumerate(bits):
            out |= vals[netid].astype(np.int64) << i
        sign = 1 << (len(bits) - 1)
        return np.where(out & sign, out - (sign << 1), out)

    def toggles(self, unit_delay: bool = True, **operands) -> tuple[np.ndarray, np.ndarray]:
        """Per-gate output toggles over a stream of operand vectors (consecutive pairs).

        Zero-delay: one toggle where the settled value changes. Unit-delay
        (every gate one time unit): all gates update together from the
        previous step's values until the network settles; every change counts,
        glitches included. Returns (toggles per gate, zero-delay toggles per gate).
        """
        n = len(next(iter(operands.values())))
        vals = self._input_values(operands, n)
        self._evaluate(vals)
        settled = vals
        zero = (settled[self.gate_out, 1:] != settled[self.gate_out, :-1]).sum(1)
        if not unit_delay:
            return zero, zero
        # state before each transition t -> t+1: settled values of vector t, inputs switched to t+1
        cur = settled[:, :-1].copy()
        gate_nets = self.gate_out
        input_nets = [b for bits in self.inputs.values() for b in bits]
        cur[input_nets] = settled[input_nets, 1:]
        counts = np.zeros(len(self.gate_type), dtype=np.int64)
        fns = self._gate_fns()
        for _step in range(len(self.gate_type) + 1):
            new = np.empty((len(fns), cur.shape[1]), dtype=bool)
            for k, (op, ins) in enumerate(fns):
                new[k] = op(*(cur[i] for i in ins))
            changed = new != cur[gate_nets]
            c = changed.sum(1)
            if not c.any():
                break
            counts += c
            cur[gate_nets] = new
        return counts, zero
