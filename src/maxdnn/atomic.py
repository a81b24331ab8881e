"""Atomic file writes: a result appears whole under its name, or not at all."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it when the block succeeds, removed otherwise.

    ``suffix`` ends the temporary name, for writers that append one (np.save: ".npy", np.savez: ".npz").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, error: type[Exception], default=None, want: type = dict):
    """A JSON file this package wrote (a run's results, resumed from), or ``default`` when it does not exist.
    A damaged or foreign file raises ``error`` with one line naming the file, not a traceback.

    Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "r.json"
    >>> read_json(p, ValueError, default={})
    {}
    >>> _ = p.write_text("{oops")
    >>> try:
    ...     read_json(p, ValueError)
    ... except ValueError as e:
    ...     print(str(e).endswith("not a readable result file (JSONDecodeError); delete it to measure again"))
    True
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable result file ({type(e).__name__}); delete it to measure again") from None
    if not isinstance(obj, want):
        raise error(f"{path}: not a maxdnn result file (a JSON {type(obj).__name__}, expected a {want.__name__}); "
                    "delete it to measure again")
    return obj


def load_state(path: Path, error: type[Exception], map_location=None) -> dict:
    """A training state written by ``torch.save`` (resume files), loaded with ``weights_only=True``: tensors,
    numbers, strings and containers only, so a planted file cannot run code. Anything else, or a damaged
    file, raises ``error`` with one line naming the file."""
    import torch

    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the file's problem
        raise error(f"{path}: not a resumable state file ({type(e).__name__}); delete it to start afresh") from None
    if not isinstance(st, dict):
        raise error(f"{path}: not a resumable state file (a {type(st).__name__}); delete it to start afresh")
    return st


def load_npz(path: Path, error: type[Exception], what: str) -> dict:
    """Every array of an .npz file (no pickles), read whole; ``error`` with one line naming the file for a
    missing, empty, truncated or corrupt one, or a folder."""
    import zipfile
    import zlib

    import numpy as np

    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a file ({what} is an .npz file)")
    if path.stat().st_size == 0:
        raise error(f"{path}: empty file, not {what}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive")
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        reason = "truncated or corrupt" if isinstance(e, (EOFError, zipfile.BadZipFile, zlib.error)) else "unreadable"
        raise error(f"{path}: {reason}, not {what} ({type(e).__name__})") from None
