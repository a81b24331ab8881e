import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from maxdnn.data import CLASSES, DataError, download_cifar10, load_cifar10, md5sum, resolve_data, validation_split


def _batch(n, seed):
    r = np.random.default_rng(seed)
    return {b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(r.integers(0, 10, n))}


def make_official(tmp_path, n=3):
    """A tiny archive in the official cifar-10-python.tar.gz format."""
    root = tmp_path / "src" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    batches = {f"data_batch_{i}": _batch(n, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(n, 99)
    for name, b in batches.items():
        (root / name).write_bytes(pickle.dumps(b))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    return tar, root, batches


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_image_zip(tmp_path, classes=CLASSES, per_class=2, corrupt=None, name="imgs.zip"):
    r = np.random.default_rng(0)
    z = tmp_path / name
    expected = []
    with zipfile.ZipFile(z, "w") as zf:
        for label, c in enumerate(classes):
            for i in (10, 2)[:per_class]:  # numeric order, not insertion order, must win
                a = r.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                member = f"test/{c}/{i:04d}.png"
                zf.writestr(member, b"not an image" if member == corrupt else _png(a))
                expected.append((label, i, a))
    expected.sort(key=lambda t: (t[0], t[1]))
    return z, expected


def test_official_archive_and_folder(tmp_path):
    tar, root, batches = make_official(tmp_path)
    tr = load_cifar10(tar, "train")
    assert tr.images.shape == (15, 3, 32, 32) and tr.images.dtype == np.uint8
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(tr.images[0], first)
    assert list(tr.labels[:3]) == list(batches["data_batch_1"][b"labels"])
    te = load_cifar10(root, "test")
    assert np.array_equal(te.images, batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    # the folder holding cifar-10-batches-py works too
    assert len(load_cifar10(root.parent, "test")) == 3


def test_image_zip_order_and_tree(tmp_path):
    z, expected = make_image_zip(tmp_path)
    ds = load_cifar10(z, "test")
    assert ds.images.shape == (20, 3, 32, 32)
    assert list(ds.labels) == [e[0] for e in expected]
    assert np.array_equal(ds.images[0], expected[0][2].transpose(2, 0, 1))
    tree = tmp_path / "tree"
    zipfile.ZipFile(z).extractall(tree)
    assert np.array_equal(load_cifar10(tree, "test").images, ds.images)


def test_cache_second_load_fast(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("MAXDNN_CACHE", str(tmp_path / "cache"))
    z, _ = make_image_zip(tmp_path)
    a = load_cifar10(z, "test")
    assert list((tmp_path / "cache").glob("cifar10-*-test-*.npz"))
    t = time.time()
    b = load_cifar10(z, "test")
    assert time.time() - t < 1.0
    assert np.array_equal(a.images, b.images)


def test_errors_are_one_line(tmp_path):
    cases = []
    with pytest.raises(DataError, match="no such file"):
        load_cifar10(tmp_path / "missing.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="unknown data layout"):
        load_cifar10(tmp_path / "empty")
    z, _ = make_image_zip(tmp_path, classes=CLASSES[:9] + ["lorry"], name="wrong.zip")
    with pytest.raises(DataError, match=r"unknown: \['lorry'\].*missing: \['truck'\]") as e:
        load_cifar10(z, "test")
    cases.append(e)
    z, _ = make_image_zip(tmp_path, corrupt="test/cat/0002.png", name="bad.zip")
    with pytest.raises(DataError, match="unreadable image test/cat/0002.png") as e:
        load_cifar10(z, "test")
    cases.append(e)
    tar, _, _ = make_official(tmp_path)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        load_cifar10(cut, "train")
    cases.append(e)
    zcut = tmp_path / "cut.zip"
    good, _ = make_image_zip(tmp_path, name="good.zip")
    zcut.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(DataError, match="corrupt") as e:
        load_cifar10(zcut, "test")
    cases.append(e)
    with pytest.raises(DataError, match="unknown split"):
        load_cifar10(good, "valid")
    for e in cases:
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_download_verifies_md5_without_network(tmp_path):
    tar, _, _ = make_official(tmp_path)
    url = tar.as_uri()
    with pytest.raises(DataError, match="checksum mismatch"):
        download_cifar10(tmp_path / "dl", url=url, md5="0" * 32)
    assert not (tmp_path / "dl").exists()  # nothing half-written, no empty folder left behind
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="cannot create the folder"):
        download_cifar10(tmp_path / "file.txt" / "sub", url=url, md5="0" * 32)
    got = download_cifar10(tmp_path / "dl", url=url, md5=md5sum(tar))
    assert got.name == "cifar-10-python.tar.gz" and md5sum(got) == md5sum(tar)
    with pytest.raises(DataError, match="download failed"):
        download_cifar10(tmp_path / "dl2", url=(tmp_path / "nope").as_uri())
    assert not (tmp_path / "dl2").exists()


def test_resolve_data_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MAXDNN_DATA", raising=False)
    monkeypatch.setenv("MAXDNN_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="download-data"):
        resolve_data(None)
    monkeypatch.setenv("MAXDNN_DATA", "/x/y")
    assert str(resolve_data(None)) == "/x/y"


def test_validation_split_disjoint_and_fixed():
    tr, va = validation_split(50000, 5000)
    assert len(va) == 5000 and len(tr) == 45000 and not set(tr) & set(va)
    assert np.array_equal(va, validation_split(50000, 5000)[1])
