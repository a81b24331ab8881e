"""Approximation-aware fine-tuning: the twin computes the engine's accumulators; training helps; export is exact."""

import numpy as np
import pytest
import torch

from conftest import LOSSLESS_ZIP, need
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.data import load_cifar10, validation_split
from maxdnn.compensate.finetune import FakeQuantTwin, FinetuneError, finetune
from maxdnn.ir.graph import QuantizedGraph
from maxdnn.engine.reference import reference_forward


@pytest.mark.parametrize("specs", [["exact", "roup-p1r2", "roup-p2r3", "roup-p0r4"], ["exact", "roup-p1r2", "drum-k4"]])
def test_twin_accumulators_equal_the_engine(qnet, lossless_test, rng, specs):
    """On the operands the integer engine feeds each layer, the twin's accumulators are the engine's, exactly
    (separable kernels through transform groups; lookup-table layers through the table's error)."""
    maps = {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in qnet.layers.items()}
    a = Assignment(specs, maps)
    net = ApproxNetwork(qnet, a)
    taps: dict = {}
    qnet.forward_int(torch.as_tensor(lossless_test.images[:3]), conv=net.conv, taps=taps)
    twin = FakeQuantTwin(qnet, a, dtype=torch.float64)
    for name, xin in taps.items():
        want = net.conv(name, xin).double()
        got = twin.accumulators(name, xin.double())
        assert torch.equal(got.detach(), want), name


def test_twin_tracks_the_integer_engine_and_has_gradients(qnet, lossless_test):
    a = Assignment.uniform(qnet, "roup-p1r3")
    twin = FakeQuantTwin(qnet, a, dtype=torch.float64)
    x = torch.as_tensor(lossless_test.images[:64])
    logits = twin(x)
    engine = ApproxNetwork(qnet, a).logits(x)
    # real-valued requantization against fixed-point: equal except at exact ties, absent on these images
    assert torch.equal(torch.round(logits.detach() / qnet.logit_scale).to(torch.int64), engine)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.parameters())


def test_untrained_export_is_the_original_graph(qnet):
    twin = FakeQuantTwin(qnet, Assignment.uniform(qnet, "roup-p2r2"), dtype=torch.float64)
    g = twin.export()
    for name, layer in qnet.layers.items():
        assert np.array_equal(g.layers[name].weight, layer.weight)
        assert np.array_equal(g.layers[name].bias, layer.bias)
        assert np.array_equal(g.layers[name].requant.m0, layer.requant.m0)


def test_short_finetune_beats_ptq_and_runs_bit_exactly(qnet, lossless_test, tmp_path):
    """An aggressive assignment, one epoch on the lossless subset's training images outside the hold-out:
    validation accuracy (integer engine) rises over PTQ; the saved graph runs identically in both engines."""
    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    tr, val = validation_split(len(train), 5000, seed=0)
    a = Assignment.uniform(qnet, "roup-p2r4")
    xv, yv = train.images[val[:400]], train.labels[val[:400]]
    before = (ApproxNetwork(qnet, a).predict(xv) == yv).mean()
    out = tmp_path / "ft.npz"
    g = finetune(qnet, a, train.images[tr], train.labels[tr], out, epochs=1, batch_size=64, lr=2e-3,
                 log=lambda m: None, progress=False)
    assert out.exists() and not (tmp_path / "ft.npz.state").exists()
    loaded = QuantizedGraph.load(out)
    after = (ApproxNetwork(loaded, a).predict(xv) == yv).mean()
    assert after > before + 0.02, (before, after)
    x = lossless_test.images[:2]
    assert np.array_equal(ApproxNetwork(loaded, a).logits(torch.as_tensor(x)).numpy(),
                          reference_forward(loaded, x, a.reference_products(loaded)))
    assert g.meta["finetune"]["epochs"] == 1


def test_tflite_graphs_are_refused():
    from conftest import SHARED
    from maxdnn.frontends.tflite import load_tflite

    g = load_tflite(need(SHARED / "models" / "mlperf-tiny-resnet8" / "pretrainedResnet_quant.tflite"))
    with pytest.raises(FinetuneError, match="TFLite"):
        FakeQuantTwin(g, Assignment.uniform(g, "exact"))


def test_cli_finetune_then_evaluate_the_saved_graph(tmp_path):
    import json

    from typer.testing import CliRunner

    from maxdnn.cli import app

    runner = CliRunner()
    data = str(need(LOSSLESS_ZIP))
    assign = tmp_path / "a.json"
    from maxdnn.workload import Workload

    q = Workload.open(None, data).quantized()
    Assignment.uniform(q, "roup-p1r2").save(assign)
    out = tmp_path / "ft.npz"
    r = runner.invoke(app, ["finetune", "--assign", str(assign), "--data", data, "--out", str(out), "--epochs", "1",
                            "--images", "128"])
    assert r.exit_code == 0, r.output
    assert out.exists() and "fine-tuning on 128 training images" in r.output
    r = runner.invoke(app, ["evaluate", "--model", str(out), "--assign", str(assign), "--data", data, "--limit", "50",
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 50 and res["energy_gain"] > 0
    bad = runner.invoke(app, ["finetune", "--assign", str(assign), "--data", data, "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "written as .npz" in bad.output


def test_distillation_keeps_the_exact_model_and_is_part_of_the_state(qnet, tmp_path):
    """Learning the exact model's own logits leaves the exact model where it is (learning the labels on a small
    sample moves it); a state saved with one setting is refused with the other."""
    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    tr, _ = validation_split(len(train), 5000, seed=0)
    x, y = train.images[tr[:256]], train.labels[tr[:256]]
    exact = Assignment.uniform(qnet, "exact")
    moved = {}
    for distill in (True, False):
        g = finetune(qnet, exact, x, y, tmp_path / f"{distill}.npz", epochs=1, batch_size=32, lr=1e-3,
                     log=lambda m: None, progress=False, distill=distill)
        assert g.meta["finetune"]["distill"] is distill
        moved[distill] = sum(int((l.weight != qnet.layers[n].weight).sum()) for n, l in g.layers.items())
    assert moved[False] > 100 * max(moved[True], 1), moved
    state = tmp_path / "s.npz.state"
    torch.save({"epochs": 1, "seed": 0, "images": 256, "fit_scales": True, "distill": False}, state)
    with pytest.raises(FinetuneError, match="distill=False"):
        finetune(qnet, exact, x, y, tmp_path / "s.npz", epochs=1, log=lambda m: None, progress=False)


def test_an_interrupted_fine_tuning_resumes_only_its_own_run(qnet, tmp_path):
    """Killed after its first epoch, a fine-tuning resumes to the graph of an uninterrupted run, byte for byte;
    the same output path with another start graph, teacher or assignment is refused, naming what differs."""
    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    tr, _ = validation_split(len(train), 5000, seed=0)
    x, y = train.images[tr[:64]], train.labels[tr[:64]]
    a = Assignment.uniform(qnet, "roup-p2r0")
    kw = dict(epochs=2, batch_size=32, progress=False)
    whole = finetune(qnet, a, x, y, tmp_path / "whole.npz", log=lambda m: None, **kw)

    def killed_in_epoch_2(out):
        def log(m):
            if m.startswith("epoch 2/2"):  # before epoch 2's state is saved
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            finetune(qnet, a, x, y, out, log=log, **kw)
        assert out.with_name(out.name + ".state").exists() and not out.exists()

    out = tmp_path / "ft.npz"
    killed_in_epoch_2(out)
    logs = []
    resumed = finetune(qnet, a, x, y, out, log=logs.append, **kw)
    assert any("resuming" in m and "after epoch 1/2" in m for m in logs), logs
    assert resumed.digest() == whole.digest() and qnet.digest() != whole.digest()
    assert QuantizedGraph.load(tmp_path / "whole.npz").digest() == whole.digest()  # saved and read back, meta aside
    for other, what in ((dict(q=whole, assignment=a), "start="), (dict(q=qnet, assignment=a, teacher=whole), "teacher="),
                        (dict(q=qnet, assignment=Assignment.uniform(qnet, "roup-p3r0")), "assignment=")):
        stale = tmp_path / f"{what[:-1]}.npz"
        killed_in_epoch_2(stale)
        q = other.pop("q")
        with pytest.raises(FinetuneError, match=what) as e:
            finetune(q, other.pop("assignment"), x, y, stale, log=lambda m: None, **other, **kw)
        assert "delete it" in str(e.value) and "epochs=" not in str(e.value)
