"""Loading a ``torch.export`` .pt2 file without running anything it carries.

``torch.export.load`` unpickles parts of the archive with ``weights_only=False`` (pickled weights and
constants, the sample inputs on a fallback), loads TorchScript and opaque objects, and would load a
compiled AOTInductor library. ``load_program`` accepts what a float CNN exported with
``torch.export.save`` holds (the program as JSON, tensors as raw bytes or as ``weights_only`` pickles)
and refuses the rest in one line:

- archives with AOTInductor code, custom (TorchScript) or opaque object constants are refused before
  anything is read;
- every ``torch.load`` the loader makes is forced to ``weights_only=True`` (tensors, numbers,
  strings and containers only), and plain ``pickle.loads`` is refused, while it runs;
- sizes are checked first: at most ``MAX_PT2_BYTES`` on disk and in the archive's members together.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import zipfile
import zlib
from pathlib import Path
from maxdnn.errors import MaxdnnError

MAX_PT2_BYTES = 2 << 30  # 2 GiB: far above any CNN this tool emulates
_LOCK = threading.Lock()


class UnsafeProgram(MaxdnnError):
    """A .pt2 archive holding something that could run code."""


def _refuse_pickle(*args, **kwargs):
    raise UnsafeProgram("a pickled object that is not a tensor")


@contextlib.contextmanager
def _weights_only():
    """While it lasts, torch.load loads only tensors and plain data, and pickles of objects are refused."""
    import torch
    from torch.export.pt2_archive import _package

    real_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    class NoPickle:
        loads = staticmethod(_refuse_pickle)
        load = staticmethod(_refuse_pickle)

    saved = (torch.load, torch._C._pickle_load_obj, _package.pickle)
    with _LOCK:
        torch.load, torch._C._pickle_load_obj, _package.pickle = load, _refuse_pickle, NoPickle
        try:
            yield
        finally:
            torch.load, torch._C._pickle_load_obj, _package.pickle = saved


def _check_archive(path: Path) -> None:
    from torch.export.pt2_archive.constants import (AOTINDUCTOR_DIR, CONSTANTS_DIR, CUSTOM_OBJ_FILENAME_PREFIX,
                                                    OPAQUE_OBJ_FILENAME_PREFIX)

    if not path.exists():
        raise ValueError("no such model file")
    if not path.is_file():
        raise ValueError("not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file")
    if size > MAX_PT2_BYTES:
        raise ValueError(f"{size:,} bytes, more than the {MAX_PT2_BYTES:,} accepted")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if sum(i.file_size for i in infos) > MAX_PT2_BYTES:  # before any member is decompressed
                raise ValueError(f"its members unpack to more than {MAX_PT2_BYTES:,} bytes")
            bad = zf.testzip()  # every member's CRC (torch's own reader does not check them)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"not a readable torch.export program (not a zip archive: {e})") from None
    if bad is not None:
        raise ValueError(f"corrupt archive member {bad}")
    for i in infos:
        inner = i.filename.split("/", 1)[-1]
        if inner.startswith(AOTINDUCTOR_DIR):
            raise UnsafeProgram("it holds AOTInductor compiled code")
        if inner.startswith(CONSTANTS_DIR) and Path(inner).name.startswith(
                (CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
            raise UnsafeProgram("it holds a TorchScript or opaque object constant")


def load_program(path: str | Path):
    """The ``ExportedProgram`` in a .pt2 file; ``ValueError`` (one line, without the path) if it is not one,
    ``UnsafeProgram`` if loading it could run code."""
    import torch

    path = Path(path)
    _check_archive(path)
    logger = logging.getLogger("torch.export")
    was = logger.disabled
    logger.disabled = True  # torch logs a traceback for archives it cannot read; the caller says it in one line
    try:
        with warnings.catch_warnings(), _weights_only():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except UnsafeProgram:
        raise
    except Exception as e:  # noqa: BLE001 - torch's own reasons, in one line
        if "weights_only" in str(e) or "Unpickler" in str(e):
            raise UnsafeProgram("a pickled object that is not a tensor") from None
        raise ValueError(f"not a readable torch.export program ({type(e).__name__})") from None
    finally:
        logger.disabled = was
