"""CIFAR-10 loading: the official python archive or an image-folder tree/zip.

Supported sources (``load_cifar10(path, split)``):

- the official ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py``
  folder (or a folder that contains it);
- an image-folder tree ``{train,test}/<class>/*.{png,jpg,jpeg}`` or a zip of it.
  Within a class, files are ordered by the number in their name.

Images come back as uint8 arrays [N, 3, 32, 32] (raw 0..255 pixels, NCHW) with
int64 labels in CIFAR-10 order. Decoded arrays are cached under
``$MAXDNN_CACHE`` (default ``~/.cache/maxdnn``), keyed by the source's checksum
(SHA-256 of an archive; of the listing, sizes and mtimes of a folder).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import atomic_path
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLITS = ("train", "test")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
CACHE_VERSION = "1"


class DataError(MaxdnnError):
    """A problem with a data source, as one line naming the file."""


@dataclass
class Dataset:
    """One split of CIFAR-10: ``images`` uint8 [N, 3, 32, 32], ``labels`` int64 [N], where they came from.

    Example::

        test = maxdnn.load_cifar10("cifar10-jpeg.zip", "test")
        sample = test.sample(1000)       # a fixed seeded random sample
    """

    images: np.ndarray  # uint8 [N, 3, 32, 32]
    labels: np.ndarray  # int64 [N]
    source: str
    split: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "Dataset":
        return Dataset(self.images[idx], self.labels[idx], self.source, self.split)

    def sample(self, n: int | None, seed: int = 0) -> "Dataset":
        """A fixed seeded random subset of n images (all when n is None or >= len).

        Image-folder sources are ordered class by class, so a prefix would hold
        only the first classes; a random subset keeps the class mix.
        """
        if n is None or n >= len(self):
            return self
        return self.subset(sample_indices(len(self), n, seed))


def sample_indices(total: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed seeded random sample of min(n, total) of ``total`` items."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


def cache_dir() -> Path:
    return Path(os.environ.get("MAXDNN_CACHE", Path.home() / ".cache" / "maxdnn"))


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return _file_digest(path, "sha256")


def _folder_key(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def md5sum(path: Path) -> str:
    return _file_digest(path, "md5")


# ---------------------------------------------------------------- official archive


def _batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


# sizes past which a member is refused before it is read or decoded (the official batches are 30.7 MB,
# batches.meta 158 bytes, a CIFAR-10 PNG or JPEG a few kB)
MAX_BATCH_BYTES = 64 << 20
MAX_META_BYTES = 1 << 20
MAX_IMAGE_BYTES = 1 << 20


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what the official batches hold and nothing else: dicts, lists, bytes, str, int and plain
    numpy arrays and scalars (no other callable can be named, so a crafted file cannot run code)."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def safe_unpickle(raw: bytes):
    """``pickle.loads(raw, encoding="bytes")`` restricted to the types of the official CIFAR-10 batches."""
    return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()


def _check_size(size: int, limit: int, what: str, where: str) -> None:
    if size > limit:
        raise DataError(f"{where}: {what} is {size:,} bytes, more than the {limit:,} a CIFAR-10 file can hold")


def _unpickle_batch(raw: bytes, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = safe_unpickle(raw)
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad file
        raise DataError(f"{where}: {name} is not a CIFAR-10 batch ({type(e).__name__})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{where}: {name} has shape {data.shape}, expected [N, 3072] with N labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{where}: {name} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _check_meta(raw: bytes, where: str) -> None:
    try:
        names = [n.decode() for n in safe_unpickle(raw)[b"label_names"]]
    except Exception:  # noqa: BLE001
        raise DataError(f"{where}: batches.meta is unreadable") from None
    if names != CLASSES:
        raise DataError(f"{where}: batches.meta lists classes {names}, expected the 10 CIFAR-10 classes {CLASSES}")


def _load_official_tar(path: Path, split: str):
    try:
        with tarfile.open(path, "r:gz") as tf:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
            if "batches.meta" not in members:
                raise DataError(f"{path}: not a CIFAR-10 python archive (no batches.meta)")
            _check_size(members["batches.meta"].size, MAX_META_BYTES, "batches.meta", str(path))
            _check_meta(tf.extractfile(members["batches.meta"]).read(), str(path))
            parts = []
            for name in _batch_names(split):
                if name not in members:
                    raise DataError(f"{path}: missing {name}")
                _check_size(members[name].size, MAX_BATCH_BYTES, name, str(path))
                parts.append(_unpickle_batch(tf.extractfile(members[name]).read(), name, str(path)))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt archive ({e})") from None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_official_folder(path: Path, split: str):
    if not (path / "batches.meta").exists():
        raise DataError(f"{path}: no batches.meta in the CIFAR-10 batches folder")
    _check_size((path / "batches.meta").stat().st_size, MAX_META_BYTES, "batches.meta", str(path))
    _check_meta((path / "batches.meta").read_bytes(), str(path))
    parts = []
    for name in _batch_names(split):
        f = path / name
        if not f.is_file():
            raise DataError(f"{f}: missing CIFAR-10 batch")
        _check_size(f.stat().st_size, MAX_BATCH_BYTES, name, str(path))
        parts.append(_unpickle_batch(f.read_bytes(), name, str(f)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------- image folders


def _index_of(name: str) -> int:
    m = re.search(r"(\d+)", Path(name).stem)
    return int(m[1]) if m else -1


def _plan_image_folder(names: list[str], split: str, where: str) -> list[tuple[str, int]]:
    """(member name, label) in class order, then file number order."""
    by_class: dict[str, list[str]] = {}
    for n in names:
        parts = n.strip("/").split("/")
        if len(parts) < 3 or parts[-3] != split or not n.lower().endswith(IMAGE_EXTS):
            continue
        by_class.setdefault(parts[-2], []).append(n)
    if not by_class:
        raise DataError(f"{where}: no {split}/<class>/*.png|jpg images (unknown layout)")
    found = sorted(by_class)
    if sorted(found) != sorted(CLASSES):
        extra = sorted(set(found) - set(CLASSES))
        missing = sorted(set(CLASSES) - set(found))
        raise DataError(
            f"{where}: {split}/ has class folders {found}; expected the 10 CIFAR-10 classes"
            + (f" (unknown: {extra})" if extra else "")
            + (f" (missing: {missing})" if missing else "")
        )
    plan = []
    for label, c in enumerate(CLASSES):
        for n in sorted(by_class[c], key=lambda s: (_index_of(s), s)):
            plan.append((n, label))
    return plan


def _decode(raw: bytes, name: str, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only: the size is checked before decoding
            if im.size != (32, 32):
                raise DataError(f"{where}: image {name} is {im.size[0]}x{im.size[1]}, expected 32x32")
            a = np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except Exception:  # noqa: BLE001
        raise DataError(f"{where}: unreadable image {name}") from None
    return a


def _decode_all(read, plan, where: str):
    def one(item):
        name, _ = item
        return _decode(read(name), name, where)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        imgs = list(ex.map(one, plan, chunksize=256))
    images = np.stack(imgs).transpose(0, 3, 1, 2).copy()
    labels = np.array([lab for _, lab in plan], dtype=np.int64)
    return images, labels


def _load_image_zip(path: Path, split: str):
    try:
        with zipfile.ZipFile(path) as zf:
            plan = _plan_image_folder(zf.namelist(), split, str(path))

            def read(name):
                _check_size(zf.getinfo(name).file_size, MAX_IMAGE_BYTES, f"image {name}", str(path))
                try:
                    return zf.read(name)
                except (zipfile.BadZipFile, OSError, zlib.error) as e:
                    raise DataError(f"{path}: truncated or corrupt archive at {name} ({e})") from None

            # ZipFile reads are not thread-safe on one handle: read first, decode in parallel
            raws = {n: read(n) for n, _ in plan}
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: truncated or corrupt zip archive ({e})") from None
    return _decode_all(raws.__getitem__, plan, str(path))


def _load_image_tree(path: Path, split: str):
    names = [str(p.relative_to(path)).replace(os.sep, "/") for p in (path / split).rglob("*") if p.is_file()]
    plan = _plan_image_folder(names, split, str(path))
    def read(name):
        f = path / name
        _check_size(f.stat().st_size, MAX_IMAGE_BYTES, f"image {name}", str(path))
        return f.read_bytes()

    return _decode_all(read, plan, str(path))


# ---------------------------------------------------------------- public API


def _detect(path: Path) -> tuple[str, Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        if tarfile.is_tarfile(path) or path.name.endswith((".tar.gz", ".tgz")):
            return "official-tar", path
        if zipfile.is_zipfile(path) or path.suffix == ".zip":
            return "image-zip", path
        raise DataError(f"{path}: unknown data format (expected cifar-10-python.tar.gz or a zip of train/ and test/ image folders)")
    if (path / "batches.meta").exists() or (path / "data_batch_1").exists():
        return "official-folder", path
    if (path / "cifar-10-batches-py").is_dir():
        return "official-folder", path / "cifar-10-batches-py"
    if (path / ARCHIVE_NAME).is_file():
        return "official-tar", path / ARCHIVE_NAME
    if (path / "train").is_dir() or (path / "test").is_dir():
        return "image-tree", path
    raise DataError(f"{path}: unknown data layout (expected cifar-10-batches-py, {ARCHIVE_NAME}, or train/ and test/ image folders)")


_LOADERS = {
    "official-tar": _load_official_tar,
    "official-folder": _load_official_folder,
    "image-zip": _load_image_zip,
    "image-tree": _load_image_tree,
}


def load_cifar10(path: str | os.PathLike, split: str = "test", use_cache: bool = True) -> Dataset:
    """Load one split of CIFAR-10 from any supported source (cached)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected one of {SPLITS})")
    path = Path(path).expanduser()
    kind, real = _detect(path)
    key = None
    if use_cache:
        key = (_sha256(real) if real.is_file() else _folder_key(real))[:32]
        cached = cache_dir() / f"cifar10-{key}-{split}-v{CACHE_VERSION}.npz"
        if cached.exists():
            try:
                with np.load(cached) as z:
                    return Dataset(z["images"], z["labels"], str(path), split)
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
                cached.unlink(missing_ok=True)
    images, labels = _LOADERS[kind](real, split)
    if use_cache:
        with atomic_path(cached, ".npz") as tmp:
            np.savez(tmp, images=images, labels=labels)
    return Dataset(images, labels, str(path), split)


def download_cifar10(dest_dir: str | os.PathLike | None = None, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download the official archive into ``dest_dir`` (default: the cache) and verify its MD5.

    An existing file with the right checksum is reused; a partial or corrupt
    download never takes the final name.
    """
    dest_dir = Path(dest_dir) if dest_dir else cache_dir()
    created = not dest_dir.exists()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest_dir}: cannot create the folder ({e.strerror})") from None
    dest = dest_dir / ARCHIVE_NAME
    if dest.exists() and md5sum(dest) == md5:
        return dest
    try:
        with atomic_path(dest) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
            except OSError as e:
                raise DataError(f"{url}: download failed ({e})") from None
            got = md5sum(tmp)
            if got != md5:
                raise DataError(f"{url}: checksum mismatch (MD5 {got}, expected {md5})")
    except DataError:
        if created:  # no empty folder left behind
            shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return dest


def resolve_data(path: str | os.PathLike | None) -> Path:
    """The data source: ``path``, else $MAXDNN_DATA, else a downloaded archive in the cache."""
    if path:
        return Path(path)
    if env := os.environ.get("MAXDNN_DATA"):
        return Path(env)
    cached = cache_dir() / ARCHIVE_NAME
    if cached.exists():
        return cached
    raise DataError(
        "no CIFAR-10 data given: pass --data PATH (cifar-10-python.tar.gz, its folder, or a train/test image-folder tree or zip), "
        "set MAXDNN_DATA, or run 'maxdnn download-data' to fetch the official archive"
    )


def training_sample(n_train: int, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of training images outside the validation hold-out (``validation_split``, 5000, seed 0):
    all of them, or a seeded random sample of ``n``. Bias correction and fine-tuning read only these."""
    train_idx, _ = validation_split(n_train, 5000, seed=0)
    if n is None:
        return train_idx
    return np.sort(np.random.default_rng(seed).permutation(train_idx)[:n])


def validation_split(n_train: int, n_val: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a fixed seeded split of the training images.

    The validation indices come in random order (a prefix of them is itself a
    random sample); the training indices are sorted.
    """
    perm = np.random.default_rng(seed).permutation(n_train)
    n_val = min(n_val, n_train // 5) if n_train < 5 * n_val else n_val
    return np.sort(perm[n_val:]), perm[:n_val]
