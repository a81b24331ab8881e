"""The int8 TFLite import against the LiteRT interpreter's reference kernels."""

import json

import numpy as np
import pytest
import torch

from conftest import JPEG_ZIP, LOSSLESS_ZIP, SHARED, need
from maxdnn.engine.approx import ApproxNetwork, kernel_assignment
from maxdnn.zoo.models import ModelError
from maxdnn.multipliers.models import roup_specs
from maxdnn.engine.reference import reference_forward
from maxdnn.frontends.tflite import load_tflite

TFLITE = SHARED / "models" / "mlperf-tiny-resnet8" / "pretrainedResnet_quant.tflite"


def litert_logits(path, images: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(int8 input of the softmax, softmax output) by LiteRT's reference kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    softmax_in = next(d["index"] for d in it.get_tensor_details() if d["name"].startswith("model/dense/MatMul;"))
    logits, probs = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        it.resize_tensor_input(it.get_input_details()[0]["index"], [len(x), 32, 32, 3])
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], (x.transpose(0, 2, 3, 1).astype(np.int16) - 128).astype(np.int8))
        it.invoke()
        logits.append(it.get_tensor(softmax_in).copy())
        probs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    return np.concatenate(logits), np.concatenate(probs)


@pytest.fixture(scope="module")
def graph():
    return load_tflite(need(TFLITE))


def test_graph_engines_agree_and_layers_unsigned(graph, lossless_test):
    x = lossless_test.images[:3]
    assert np.array_equal(graph.forward_int(torch.as_tensor(x)).numpy(), reference_forward(graph, x))
    assert len(graph.layers) == 10
    # every conv input is a post-ReLU tensor with zero point -128: unsigned 0..255 operands
    assert all(layer.in_q.operand_range == (0, 255) for layer in graph.layers.values())
    rng = np.random.default_rng(0)
    specs = roup_specs(8)
    a = kernel_assignment(specs, {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in graph.layers.items()})
    got = ApproxNetwork(graph, a).logits(torch.as_tensor(x)).numpy()
    assert np.array_equal(got, reference_forward(graph, x, a.reference_products(graph)))


def test_byte_identical_to_litert_lossless_test_split(graph, lossless_test):
    ours = graph.outputs(lossless_test.images)
    theirs, probs = litert_logits(TFLITE, lossless_test.images)
    assert ours.shape == theirs.shape == (1000, 10)
    assert np.array_equal(ours, theirs)
    assert (ours.argmax(1) == lossless_test.labels).mean() == 0.88


@pytest.mark.slow
def test_byte_identical_to_litert_jpeg_test_split(graph):
    from maxdnn.data import load_cifar10

    test = load_cifar10(need(JPEG_ZIP), "test")
    ours = graph.outputs(test.images)
    theirs, probs = litert_logits(TFLITE, test.images)
    assert len(ours) == 10000 and np.array_equal(ours, theirs)
    acc_ours = (ours.argmax(1) == test.labels).mean()
    assert acc_ours == (theirs.argmax(1) == test.labels).mean()
    assert abs(acc_ours - 0.7555) < 0.002  # LiteRT's published figure on this split


def test_cli_evaluate_and_save_outputs(tmp_path, lossless_test):
    from typer.testing import CliRunner

    from maxdnn.cli import app

    out = tmp_path / "out.npy"
    r = CliRunner().invoke(app, ["evaluate", "--model", str(need(TFLITE)), "--data", str(LOSSLESS_ZIP), "--precision",
                                 "int8", "--limit", "50", "--save-outputs", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    saved = np.load(out)
    sub = lossless_test.sample(50)
    theirs, _ = litert_logits(TFLITE, sub.images)
    assert np.array_equal(saved, theirs) and res["images"] == 50
    r = CliRunner().invoke(app, ["evaluate", "--model", str(TFLITE), "--data", str(LOSSLESS_ZIP), "--precision", "float"])
    assert r.exit_code == 2 and "no float version" in r.output
    r = CliRunner().invoke(app, ["layers", "--model", str(TFLITE), "--data", str(LOSSLESS_ZIP), "--json"])
    assert r.exit_code == 0 and len(json.loads(r.output)) == 10


def _patched(tmp_path, code_from: int, code_to: int):
    """The model with every operator code ``code_from`` rewritten to ``code_to`` in place."""
    import tflite

    buf = bytearray(TFLITE.read_bytes())
    m = tflite.Model.GetRootAsModel(bytes(buf), 0)
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        if max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()) == code_from:
            for slot, size in ((4, 1), (10, 4)):  # deprecated_builtin_code (int8), builtin_code (int32)
                off = oc._tab.Offset(slot)
                if off:
                    buf[oc._tab.Pos + off:oc._tab.Pos + off + size] = code_to.to_bytes(size, "little", signed=True)
    p = tmp_path / "patched.tflite"
    p.write_bytes(bytes(buf))
    return p


def test_bad_tflite_files_one_line(tmp_path):
    need(TFLITE)
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="junk.tflite"):
        load_tflite(tmp_path / "junk.tflite")
    with pytest.raises(ModelError, match="no such model file"):
        load_tflite(tmp_path / "missing.tflite")
    with pytest.raises(ModelError, match=r"operator TANH \(#12\): unsupported operator"):
        load_tflite(_patched(tmp_path, 1, 28))  # AVERAGE_POOL_2D -> TANH


def test_nine_bit_operand_refused_for_approximation(graph):
    """A layer whose input zero point is not -128 takes a 9-bit operand: the approximate path refuses it
    in one line."""
    import copy

    from maxdnn.engine.approx import AssignmentError, layer_assignment

    g = copy.deepcopy(graph)
    g.__dict__.pop("_tp", None)
    layer = g.layers["dense"]
    layer.in_q.zero_point = 4  # what a layer fed by a non-ReLU tensor has
    assert layer.in_q.operand_range == (-132, 123)
    with pytest.raises(AssignmentError, match="dense: operands x - zero_point span -132..123"):
        ApproxNetwork(g, layer_assignment(g, {"dense": "roup-p1r2"}))


@pytest.mark.slow
def test_tiny_exploration_on_the_tflite_model(tmp_path):
    """Assignments, energy accounting and the exploration run on the imported model as on any graph."""
    from maxdnn.exploration.explorer import BUDGETS, Explorer, run_exploration
    from maxdnn.exploration.report import read_points, write_report
    from maxdnn.workload import Workload

    ex = Explorer(tmp_path / "run", Workload.open(str(need(TFLITE)), need(LOSSLESS_ZIP)), BUDGETS["tiny"],
                  progress=False, log=lambda m: None)
    assert ex.info["baseline"]["test_accuracy"] == 0.88  # the model's own quantization, LiteRT's accuracy
    run_exploration(ex)
    write_report(tmp_path / "run", ex.store)
    rows = read_points(tmp_path / "run" / "points.csv")
    assert {r["approach"] for r in rows} == {"layer", "filter", "kernel", "alwann"}
    assert max(r["energy_gain"] for r in rows if r["on_front"]) > 0
