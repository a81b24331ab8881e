import numpy as np
import pytest
import torch

from conftest import MLPERF_H5, need
from maxdnn.zoo.models import ModelError, ResNet8, load_model, predict, same_padding, save_checkpoint


def test_resnet8_shape():
    m = ResNet8()
    n = sum(p.numel() for p in m.parameters())
    assert 77_000 < n < 80_000
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_tf_same_padding():
    assert same_padding(32, 3, 2) == (0, 1)  # TF pads the extra row at the bottom
    assert same_padding(32, 3, 1) == (1, 1)
    assert same_padding(32, 1, 2) == (0, 0)


def test_keras_import_accuracy(lossless_test):
    m = load_model(need(MLPERF_H5))
    acc = (predict(m, lossless_test.images).numpy() == lossless_test.labels).mean()
    assert acc >= 0.87  # MLPerf reports ~88% on official pixels; 1,000 lossless test images


def test_committed_checkpoint(lossless_test):
    m = load_model()
    assert m.meta["epochs"] == 100 and "command" in m.meta
    acc = (predict(m, lossless_test.images).numpy() == lossless_test.labels).mean()
    assert acc >= 0.80


def test_model_file_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "x.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a readable maxdnn checkpoint \\(UnpicklingError\\)$"):
        load_model(bad)
    verilog = tmp_path / "mult.v"  # a file of no model format: the message lists the formats
    verilog.write_text("module m; endmodule")
    with pytest.raises(ModelError, match="mult.v: not a readable maxdnn checkpoint .*; models are a zoo name, .pt,"):
        load_model(verilog)
    h5 = tmp_path / "bad.h5"
    h5.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a readable HDF5"):
        load_model(h5)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(ModelError, match="not a maxdnn checkpoint"):
        load_model(other)


def test_checkpoint_roundtrip(tmp_path):
    m = ResNet8()
    save_checkpoint(m, tmp_path / "m.pt", {"k": 1})
    m2 = load_model(tmp_path / "m.pt")
    x = torch.rand(2, 3, 32, 32) * 255
    assert torch.equal(m.eval()(x), m2(x))


def test_training_resumes_exactly(tmp_path):
    from maxdnn.zoo.train import train

    r = np.random.default_rng(0)
    imgs = r.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    labels = r.integers(0, 10, 64)
    full = train(imgs, labels, tmp_path / "full.pt", epochs=2, batch_size=32, seed=3)

    class Stop(Exception):
        pass

    def stop_at_2(model):
        if stop_at_2.calls == 1:
            raise Stop
        stop_at_2.calls += 1
        return {}

    stop_at_2.calls = 0
    with pytest.raises(Stop):
        train(imgs, labels, tmp_path / "cut.pt", epochs=2, batch_size=32, seed=3, eval_fn=stop_at_2)
    assert (tmp_path / "cut.pt.state").exists() and not (tmp_path / "cut.pt").exists()
    resumed = train(imgs, labels, tmp_path / "cut.pt", epochs=2, batch_size=32, seed=3)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / "cut.pt.state").exists()


def test_augment_is_per_sample_crop_and_flip():
    from maxdnn.zoo.train import augment

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, pad=1)
    assert out.shape == x.shape
    # every output row is a (possibly flipped) window of the zero-padded input
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for n in range(2):
        found = any(torch.equal(out[n, 0], w) or torch.equal(out[n, 0], w.flip(1))
                    for dy in range(3) for dx in range(3) for w in [xp[n, 0, dy:dy + 4, dx:dx + 4]])
        assert found


def test_cli_train_resume_mismatch_one_line(tmp_path):
    import zipfile

    from typer.testing import CliRunner
    from PIL import Image
    import io

    from maxdnn.cli import app
    from maxdnn.data import CLASSES

    z = tmp_path / "d.zip"
    r = np.random.default_rng(0)
    with zipfile.ZipFile(z, "w") as zf:
        for c in CLASSES:
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(r.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                zf.writestr(f"train/{c}/{i}.png", buf.getvalue())
    out = tmp_path / "m.pt"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--data", str(z), "--out", str(out), "--epochs", "1", "--holdout", "0", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    assert load_model(out).meta["train_images"] == 30
    torch.save({"epochs": 5, "seed": 0}, tmp_path / "m.pt.state")
    res = runner.invoke(app, ["train", "--data", str(z), "--out", str(out), "--epochs", "1", "--holdout", "0"])
    assert res.exit_code == 2 and "saved run has arch=resnet8 epochs=5" in res.output


def test_resnet20_in_the_zoo():
    m = load_model("resnet20")
    assert sum(p.numel() for p in m.parameters()) == 272474
    assert m.meta["command"].startswith("maxdnn train --arch resnet20") and "--init" in m.meta["command"]
