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
