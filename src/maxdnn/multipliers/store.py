"""The user library on disk: where imported multipliers live and how an entry is read (no importing here:
``maxdnn.multipliers.library`` writes entries, ``maxdnn.multipliers.models`` builds them by name).

Location: ``$MAXDNN_MULTIPLIERS`` if set (``maxdnn --multiplier-dir DIR`` sets it),
else ``$XDG_DATA_HOME/maxdnn/multipliers``, else ``~/.local/share/maxdnn/multipliers``.
Each multiplier is a folder ``NAME/`` holding

- ``table.npy``: the full product table, ``table[x - x_min, w - w_min]`` (int64,
  2^bits x 2^bits), the same layout as ``Multiplier.lut()``;
- ``meta.json``: operand formats, where it came from, its error metrics and,
  when known, its energy relative to the exact radix-4 Booth design per operand
  stream (``energy_rel``), or a relative energy the user stated (``energy_given``);
- for Verilog imports, the source (``design.v``) and the synthesized netlist
  (``netlist.json``, Yosys JSON).

A folder appears whole or not at all (written beside, then renamed).
Names may not take a built-in form (``exact``, ``mitchell``, ``roup-*``, ...).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from maxdnn.errors import MaxdnnError

FORMAT = "maxdnn-multiplier-v1"
NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
MAX_BITS = 16  # the widest operands any multiplier model takes


class LibraryError(MaxdnnError, ValueError):
    """A problem with an import or a library entry, as one line."""


def library_dir() -> Path:
    if env := os.environ.get("MAXDNN_MULTIPLIERS"):
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "maxdnn" / "multipliers"


def entry_dir(name: str) -> Path:
    return library_dir() / name


def user_names() -> list[str]:
    d = library_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "meta.json").is_file() and NAME_RE.fullmatch(p.name))


def read_meta(name: str) -> dict | None:
    path = entry_dir(name) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise LibraryError(f"{path}: unreadable library entry ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LibraryError(f"{path}: not a maxdnn multiplier entry (format must be '{FORMAT}')")
    bits = meta.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_BITS \
            or not isinstance(meta.get("x_signed"), bool):
        raise LibraryError(f"{path}: a library entry needs 'bits' (2..{MAX_BITS}) and 'x_signed' (true or false)")
    return meta


def readable_entries() -> dict[str, dict]:
    """The entries whose meta.json reads, by name; a damaged entry is left out here (with a warning on
    standard error), so that it blocks only the commands that name it."""
    out = {}
    for name in user_names():
        try:
            out[name] = read_meta(name)
        except LibraryError as e:
            print(f"maxdnn: warning: {e}; skipped", file=sys.stderr)
    return out


def user_energy(stream: str, bits: int) -> dict[str, float]:
    """Relative energy of every imported ``bits``-bit multiplier that has one for ``stream`` (or a stated one)."""
    out = {}
    for name, meta in readable_entries().items():
        if meta.get("bits") != bits:
            continue
        if meta.get("energy_given") is not None:
            out[name] = float(meta["energy_given"])
        elif stream in (meta.get("energy_rel") or {}):
            out[name] = float(meta["energy_rel"][stream])
        elif meta.get("x_signed") and "uniform" in (meta.get("energy_rel") or {}):
            out[name] = float(meta["energy_rel"]["uniform"])  # x-signed designs have the signed uniform stream only
    return out


def energy_status(name: str, stream: str) -> str | None:
    """Why ``name`` has no energy on ``stream`` (None when it has one, or is not an imported multiplier)."""
    meta = read_meta(name)
    if meta is None or meta.get("energy_given") is not None or stream in (meta.get("energy_rel") or {}):
        return None
    if meta.get("x_signed") and "uniform" in (meta.get("energy_rel") or {}):
        return None  # the signed uniform stream stands for every stream (``user_energy``)
    known = sorted(meta.get("energy_rel") or {})
    if known:
        return (f"multiplier '{name}' has energy on the {', '.join(known)} stream(s) only; re-import it with "
                f"--data to measure the {stream} stream the energy table uses")
    return (f"multiplier '{name}' has no energy model: import it from Verilog, or state its energy relative "
            f"to the exact multiplier with --energy")


def load_table_file(path: Path, bits: int) -> np.ndarray:
    """A user's product table (.npy): shape (2^bits, 2^bits), integer dtype; one-line errors."""
    if not 2 <= bits <= MAX_BITS:
        raise LibraryError(f"--bits {bits}: supported widths are 2..{MAX_BITS}")
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise LibraryError(f"{path}: not a NumPy .npy array (no .npy header)")
        table = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise LibraryError(f"{path}: no such file") from None
    except LibraryError:
        raise
    except (ValueError, OSError) as e:
        raise LibraryError(f"{path}: not a NumPy .npy array ({str(e).splitlines()[0][:120]})") from None
    want = (1 << bits, 1 << bits)
    if table.shape != want:
        raise LibraryError(f"{path}: table shape {table.shape}, expected {want} (table[x - x_min, w - w_min] "
                           f"at {bits} bits)")
    if not np.issubdtype(table.dtype, np.integer):
        raise LibraryError(f"{path}: table dtype {table.dtype}, expected an integer dtype (exact products)")
    table = table.astype(np.int64)
    limit = 1 << (2 * bits)  # a product of two bits-wide operands, exact or approximate, fits 2 bits + 1 signed
    if table.size and (table.max() >= limit or table.min() < -limit):
        bad = int(table.max()) if table.max() >= limit else int(table.min())
        raise LibraryError(f"{path}: product {bad} cannot come from {bits}-bit operands (|product| < 2^{2 * bits})")
    return table
