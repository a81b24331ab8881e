"""The user library: multipliers imported from Verilog or from a product table, usable by name.

Importing writes an entry (its folder, table and metadata: the layout is ``maxdnn.multipliers.store``'s);
a folder appears whole or not at all (written beside, then renamed). Names may not take a built-in form
(``exact``, ``mitchell``, ``roup-*``, ...). The reading side is re-exported here from the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from maxdnn.multipliers.store import (FORMAT, MAX_BITS, NAME_RE, LibraryError, energy_status, entry_dir,  # noqa: F401 - re-exported
                               library_dir, load_table_file, read_meta, readable_entries, user_energy, user_names)
from maxdnn.multipliers.models import is_builtin_name

def check_name(name: str) -> str:
    if is_builtin_name(name):
        raise LibraryError(f"--name {name}: the name belongs to a built-in multiplier form; choose another")
    if not NAME_RE.fullmatch(name):
        raise LibraryError(f"--name {name}: use lower-case letters, digits, '_', '-' or '.', starting with a letter")
    return name


def ensure_writable() -> Path:
    """The library folder, created if needed and checked to take files (one line otherwise)."""
    import tempfile

    d = library_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise LibraryError(f"{d}: cannot write the multiplier library ({e.strerror})") from None
    return d


def register(name: str, table: np.ndarray, meta: dict, files: dict[str, str] | None = None,
             replace: bool = False) -> Path:
    """Write the entry ``name`` whole (or not at all); an existing one needs ``replace``."""
    check_name(name)
    final = entry_dir(name)
    if final.exists() and not replace:
        raise LibraryError(f"{final}: a multiplier named '{name}' is already imported (--replace to overwrite)")
    ensure_writable()
    tmp = final.with_name(f".{name}.{os.getpid()}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        np.save(tmp / "table.npy", np.asarray(table, dtype=np.int64))
        for fname, text in (files or {}).items():
            (tmp / fname).write_text(text)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "name": name, **meta}, indent=1) + "\n")
        if final.exists():
            old = final.with_name(f".{name}.{os.getpid()}.old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
