"""The float-to-integer path gives byte-identical graphs, and an exploration identical points, whatever
instruction set the CPU kernels may use and however many threads they run on."""

import hashlib
import os
import subprocess
import sys

import pytest

from conftest import LOSSLESS_ZIP, need

NARROWED = {
    "default ISA": {},
    "AVX2 forced": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "SSE4.1 forced": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}

QUANTIZE = """
import sys, torch
from maxdnn.data import load_cifar10
from maxdnn.zoo.models import load_model
from maxdnn.ir.quant import calibration_images
from maxdnn.frontends.pytorch import quantize_module
torch.set_num_threads(int(sys.argv[3]))
train = load_cifar10(sys.argv[1], "train")
quantize_module(load_model(sys.argv[4]), calibration_images(train.images, 300)).save(sys.argv[2])
"""


def _env(extra: dict, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    return {**env, **extra, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet8", "resnet20"])
def test_quantized_graph_is_byte_identical_on_every_isa_and_thread_count(tmp_path, model):
    runs = [(name, env, 2) for name, env in NARROWED.items()] + [("default ISA", {}, 1)]
    digests = {}
    for name, extra, threads in runs:
        out = tmp_path / f"{name.replace(' ', '_')}-{threads}.npz"
        r = subprocess.run([sys.executable, "-c", QUANTIZE, str(need(LOSSLESS_ZIP)), str(out), str(threads), model],
                           env=_env(extra, threads), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        digests[f"{name}, {threads} thread(s)"] = _digest(out)
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
def test_exploration_points_are_identical_on_every_isa(tmp_path):
    digests = {}
    for name, extra in NARROWED.items():
        out = tmp_path / name.replace(" ", "_")
        r = subprocess.run([sys.executable, "-m", "maxdnn", "explore", "--data", str(need(LOSSLESS_ZIP)), "--budget",
                            "tiny", "--approach", "layer", "--out", str(out)], env=_env(extra, 2),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        digests[name] = _digest(out / "points.csv")
    assert len(set(digests.values())) == 1, digests


@pytest.mark.slow
def test_finetuned_graph_is_byte_identical_on_every_isa_and_thread_count(tmp_path):
    """Fine-tuning is float training, but its forward pass is exact integer arithmetic and its rounding back to
    integers happens once: the fine-tuned graph is the same on every ISA and thread count, the weight scales
    fitted to roup-p3r0's grid included."""
    from maxdnn.engine.approx import Assignment
    from maxdnn.frontends.pytorch import quantize_module
    from maxdnn.data import load_cifar10
    from maxdnn.ir.quant import calibration_images
    from maxdnn.zoo.models import load_model

    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    q = quantize_module(load_model("resnet8"), calibration_images(train.images, 100))
    q.save(tmp_path / "q.npz")
    names = list(q.layers)
    Assignment(["exact", "roup-p2r4", "roup-p3r0"], {n: (q.layers[n].weight[:, :, 0, 0] * 0 + (i % 3)).astype(int)
                                                     for i, n in enumerate(names)}).save(tmp_path / "a.json")
    digests = {}
    for name, extra, threads in [(n, e, 2) for n, e in NARROWED.items()] + [("default ISA", {}, 1)]:
        out = tmp_path / f"{name.replace(' ', '_')}-{threads}.npz"
        r = subprocess.run([sys.executable, "-m", "maxdnn", "finetune", "--model", str(tmp_path / "q.npz"), "--assign",
                            str(tmp_path / "a.json"), "--data", str(need(LOSSLESS_ZIP)), "--epochs", "1", "--images",
                            "640", "--out", str(out)], env=_env(extra, threads), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "weight scales fitted" in r.stderr
        digests[f"{name}, {threads} thread(s)"] = _digest(out)
    assert len(set(digests.values())) == 1, digests
