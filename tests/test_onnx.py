"""The int8 ONNX import against onnxruntime's CPU execution provider (the outside referee)."""

import sys

import numpy as np
import pytest
import torch
from conftest import JPEG_ZIP, LOSSLESS_ZIP, MLPERF_H5, REPO, need, one_line_error
from typer.testing import CliRunner

from maxdnn.cli import app
from maxdnn.engine.approx import ApproxNetwork, kernel_assignment
from maxdnn.engine.reference import reference_forward
from maxdnn.frontends.onnx_int8 import load_onnx, load_onnx_model
from maxdnn.multipliers.models import roup_specs
from maxdnn.zoo.models import ModelError

sys.path.insert(0, str(REPO / "benchmarks"))
from onnx_referee import export_float, onnxruntime_outputs, quantize


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """MLPerf Tiny's ResNet-8 quantized by onnxruntime (200 lossless training images): name -> path."""
    from maxdnn.data import load_cifar10

    d = tmp_path_factory.mktemp("onnx")
    cal = load_cifar10(need(LOSSLESS_ZIP), "train").images[:200]
    f32 = export_float(need(MLPERF_H5), d / "float.onnx")
    out = {"float": f32}
    for name, fmt, act, pc in (("qop", "QOperator", "int8", True), ("qdq", "QDQ", "int8", True),
                               ("qop-u8", "QOperator", "uint8", True), ("qop-pt", "QOperator", "int8", False)):
        # uint8 activations with 7-bit weights: onnxruntime's AVX2 u8 x s8 kernel saturates full-range weights
        out[name] = quantize(f32, d / f"{name}.onnx", cal, fmt, act, pc, reduce_range=act == "uint8")
    return out


def test_qoperator_byte_identical_to_onnxruntime_on_11000_test_images(models, lossless_test):
    from maxdnn.data import load_cifar10

    images = np.concatenate([load_cifar10(need(JPEG_ZIP), "test").images, lossless_test.images])
    g = load_onnx(models["qop"])
    ours, theirs = g.outputs(images), onnxruntime_outputs(models["qop"], images)
    assert ours.shape == theirs.shape == (11000, 10)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["qop-u8", "qop-pt"])
def test_uint8_activations_and_per_tensor_weights_match_onnxruntime(models, lossless_test, name):
    x = lossless_test.images[:500]
    g = load_onnx(models[name])
    assert np.array_equal(g.outputs(x), onnxruntime_outputs(models[name], x))
    lo = {"qop-u8": 0, "qop-pt": -128}[name]
    assert g.output.out.lo == lo


def test_qdq_reads_as_the_integer_operators_onnxruntime_fuses_it_into(models, lossless_test):
    """The QDQ model's graph is the QOperator model's (same calibration), layer for layer and byte for byte.
    onnxruntime itself fuses only part of the QDQ groups and runs the others in float, so its own QDQ output
    differs from the integer one in a few bytes (docs/onnx.md)."""
    a, b = load_onnx(models["qop"]), load_onnx(models["qdq"])
    assert list(a.layers) == list(b.layers)
    for la, lb in zip(a.layers.values(), b.layers.values()):
        assert np.array_equal(la.weight, lb.weight) and np.array_equal(la.bias, lb.bias)
        assert np.array_equal(la.requant.m0, lb.requant.m0) and np.array_equal(la.requant.shift, lb.requant.shift)
        assert (la.in_q, la.out, la.pads, la.stride) == (lb.in_q, lb.out, lb.pads, lb.stride)
    x = lossless_test.images
    ours = b.outputs(x)
    assert np.array_equal(ours, a.outputs(x))
    theirs = onnxruntime_outputs(models["qdq"], x)
    assert (ours != theirs).mean() < 0.01


def test_engines_agree_and_approximate_kernels_run(models, lossless_test):
    g = load_onnx(models["qop"])
    x = lossless_test.images[:2]
    assert np.array_equal(g.forward_int(torch.as_tensor(x)).numpy(), reference_forward(g, x))
    assert all(layer.in_q.operand_range == (0, 255) for layer in g.layers.values())  # unsigned MAC operands
    assert [n.kind for n in g.nodes].count("add_ort") == 3
    rng = np.random.default_rng(0)
    specs = roup_specs(8)
    a = kernel_assignment(specs, {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in g.layers.items()})
    got = ApproxNetwork(g, a).logits(torch.as_tensor(x)).numpy()
    assert np.array_equal(got, reference_forward(g, x, a.reference_products(g)))
    assert not np.array_equal(got, g.outputs(x))


def test_save_and_load_keep_the_graph(models, lossless_test, tmp_path):
    from maxdnn.ir.graph import QuantizedGraph

    g = load_onnx(models["qop"])
    g.save(tmp_path / "g.npz")
    again = QuantizedGraph.load(tmp_path / "g.npz")
    x = lossless_test.images[:50]
    assert np.array_equal(again.outputs(x), g.outputs(x))


def test_evaluate_and_explore_cli_on_an_onnx_model(models, tmp_path):
    """The ONNX model's layers carry the network's own names, so the example assignments apply as they are."""
    import json

    r = CliRunner().invoke(app, ["evaluate", "--model", str(models["qop"]), "--data", str(need(LOSSLESS_ZIP)),
                                 "--assign", str(REPO / "examples" / "resnet8-layer-level.json"), "--limit", "200",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["energy_gain"] > 0 and 0 < out["accuracy"] <= 1
    r = CliRunner().invoke(app, ["explore", "--out", str(tmp_path / "run"), "--data", str(need(LOSSLESS_ZIP)),
                                 "--budget", "tiny", "--model", str(models["qop"]), "--approach", "kernel",
                                 "--compensation", "none"])
    assert r.exit_code == 0, r.output
    assert "kernel" in (tmp_path / "run" / "report.md").read_text()


def test_bad_onnx_models_are_one_line(models, tmp_path):
    import onnx

    with pytest.raises(ModelError, match="a float ONNX model, not an int8 one"):
        load_onnx(models["float"])
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    for i, junk in enumerate((b"", b"xx")):  # parsed by protobuf as an empty model
        (tmp_path / f"junk{i}.onnx").write_bytes(junk)
        with pytest.raises(ModelError, match=f"junk{i}.onnx: not a readable ONNX model \\(no graph"):
            load_onnx_model(tmp_path / f"junk{i}.onnx")
    m = onnx.load(str(models["qop"]))
    for t in m.graph.initializer:  # a weight zero point that is not 0
        if t.name.endswith("weight_zero_point") or t.name.endswith("_zero_point") and t.data_type == 3 and t.dims:
            arr = onnx.numpy_helper.to_array(t).copy()
            arr.reshape(-1)[0] = 1
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
            break
    onnx.save(m, str(tmp_path / "zp.onnx"))
    with pytest.raises(ModelError, match="non-zero weight zero point"):
        load_onnx(tmp_path / "zp.onnx")
    m = onnx.load(str(models["qop"]))
    m.graph.node.append(onnx.helper.make_node("Sin", [m.graph.output[0].name], ["sin_out"], name="the_sin"))
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info("sin_out", onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(tmp_path / "sin.onnx"))
    with pytest.raises(ModelError, match="node the_sin \\(Sin\\): unsupported operator"):
        load_onnx(tmp_path / "sin.onnx")
    m = onnx.load(str(models["qop"]))
    w = next(t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4)
    w.data_location = onnx.TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../etc/passwd")
    w.ClearField("raw_data")
    (tmp_path / "ext.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="external file"):
        load_onnx(tmp_path / "ext.onnx")
    r = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "zp.onnx"), "--data", str(need(LOSSLESS_ZIP))])
    one_line_error(r, "zp.onnx", "weight zero point")


def test_onnxruntime_arithmetic_fast_engine_equals_reference_past_2_24(rng):
    """float32 requantization (accumulators past 2^24 round to float32 first, as cvtepi32_ps does), stride 2,
    asymmetric padding, 1x1, QLinearAdd's fused multiply-adds and the float32 global average pool: the fast
    engine against the slow reference on random and extreme images."""
    from maxdnn.ir.graph import Flatten, MulLayer, OrtAdd, Pool, QParams, QuantizedGraph
    from maxdnn.ir.quant import Requant

    c, f = 96, 8
    x_q = QParams(1.0, 0, 0, 255)
    w3 = rng.choice([127, 126, 125, -5], size=(f, c, 3, 3)).astype(np.int64)
    w1 = rng.integers(-127, 128, size=(f, c, 1, 1)).astype(np.int64)
    y_q = QParams(0.37, 3, -128, 127)
    conv = MulLayer("big", ["input"], y_q, weight=w3, bias=rng.integers(-2**20, 2**20, f), w_scale=np.ones(f),
                    requant=Requant.float32(np.full(f, 2.0 ** -17, np.float32) * rng.uniform(0.5, 2, f)), in_q=x_q,
                    stride=2, pads=(0, 1, 0, 1), in_hw=(8, 8))
    proj = MulLayer("proj", ["input"], QParams(0.21, -7, -128, 127), weight=w1, bias=np.zeros(f, np.int64),
                    w_scale=np.ones(f), requant=Requant.float32(rng.uniform(1e-5, 1e-4, f)), in_q=x_q, stride=2,
                    in_hw=(8, 8))
    r0, r1 = np.float32(0.37) / np.float32(0.5), np.float32(0.21) / np.float32(0.5)
    fixed = np.float32(-128) - (np.float32(r0 * np.float32(3)) + np.float32(r1 * np.float32(-7)))
    add = OrtAdd("add", ["big", "proj"], QParams(0.5, -128, -128, 127), in_zps=[3, -7], requants=[None, None],
                 ratios=[float(r0), float(r1)], fixed=float(fixed))
    pool = Pool("pool", ["add"], QParams(0.11, 5, -128, 127), op="avg", kernel=None, rounding="float32", in_zp=-128,
                scale=float(np.float32(0.5) / (np.float32(0.11) * np.float32(16))))
    # filter 0: no products, a bias of 2^24 + 1 and a scale where float32(acc) decides the rounding
    # (float32(2^24 + 1) * s rounds to 100, (2^24 + 1) * s exactly to 101)
    conv.weight[0] = 0
    conv.bias[0] = 2 ** 24 + 1
    scales = conv.requant.float32_scales()
    scales[0] = np.float32(100.5) / np.float32(2 ** 24 + 1)
    conv.requant = Requant.float32(scales)
    conv.out = QParams(0.37, -100, -128, 127)
    g = QuantizedGraph(x_q, (c, 8, 8), [conv, proj, add, pool, Flatten("flat", ["pool"], pool.out)])
    images = np.concatenate([rng.integers(0, 256, (3, c, 8, 8)), np.full((1, c, 8, 8), 255), np.zeros((1, c, 8, 8)),
                             rng.choice([0, 255], (2, c, 8, 8))]).astype(np.uint8)
    taps = {}
    g.forward_int(torch.as_tensor(images), taps=taps)
    assert float(g.exact_conv("big", taps["big"]).abs().max()) > 2 ** 24  # past float32's exact range
    assert np.array_equal(g.forward_int(torch.as_tensor(images)).numpy(), reference_forward(g, images))
    for name in ("big", "add"):  # and every intermediate tensor
        sub = QuantizedGraph(x_q, (c, 8, 8), g.nodes[:[n.name for n in g.nodes].index(name) + 1])
        assert np.array_equal(sub.outputs(images), reference_forward(sub, images))
    first = QuantizedGraph(x_q, (c, 8, 8), [conv]).outputs(images[:1])
    assert (first[0, 0] == 100 - 100).all()  # the accumulator went through float32 first


OUTPUTS = """
import hashlib, sys
from maxdnn.data import load_cifar10
from maxdnn.frontends.onnx_int8 import load_onnx
x = load_cifar10(sys.argv[1], "test").images[:500]
print(hashlib.sha256(load_onnx(sys.argv[2]).outputs(x).tobytes()).hexdigest())
"""


def test_onnx_graph_outputs_are_the_same_on_every_isa(models):
    """The float32 steps of onnxruntime's arithmetic are element-wise IEEE operations: no ISA moves a byte."""
    import subprocess

    from test_same_on_every_cpu import NARROWED, _env

    digests = {}
    for name, extra in NARROWED.items():
        r = subprocess.run([sys.executable, "-c", OUTPUTS, str(need(LOSSLESS_ZIP)), str(models["qop-u8"])],
                           env=_env(extra, 2), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        digests[name] = r.stdout.strip()
    assert len(set(digests.values())) == 1, digests


def test_float_onnx_is_quantized_by_maxdnn_like_the_network_it_came_from(models, lossless_test):
    """A float .onnx loads as a float network (PyTorch modules named after the ONNX nodes) and quantizes like
    the Keras model it was exported from: the same layers and the same accuracy (the exporter folded the batch
    norms in float32, maxdnn folds them in float64, so a few bytes differ)."""
    import maxdnn
    from maxdnn.data import load_cifar10

    m, h = maxdnn.load_model(str(models["float"])), maxdnn.load_model(str(need(MLPERF_H5)))
    x = lossless_test.images
    with torch.no_grad():
        assert torch.allclose(m(torch.as_tensor(x[:100]).float()), h(torch.as_tensor(x[:100]).float()), atol=1e-3)
    cal = load_cifar10(need(LOSSLESS_ZIP), "train").images[:500]
    g, gh = maxdnn.quantize(m, cal), maxdnn.quantize(h, cal)
    assert list(g.layers) == list(gh.layers)
    acc, acc_h = (g.predict(x) == lossless_test.labels).mean(), (gh.predict(x) == lossless_test.labels).mean()
    assert abs(acc - acc_h) <= 0.005 and acc > 0.85


def test_float_onnx_with_unsupported_operators_is_one_line(models, tmp_path):
    import onnx

    m = onnx.load(str(models["float"]))
    node = next(n for n in m.graph.node if n.op_type == "Relu")
    node.op_type, node.name = "Elu", "the_elu"
    onnx.save(m, str(tmp_path / "elu.onnx"))
    r = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "elu.onnx"), "--data", str(need(LOSSLESS_ZIP)),
                                 "--limit", "5"])
    one_line_error(r, "elu.onnx", "node the_elu (Elu)", "unsupported operator")


def test_depthwise_maxpool_network_matches_onnxruntime(tmp_path):
    """A small network with a strided stem, a depthwise convolution, max pooling, a pointwise convolution and a
    linear head, random weights and images, quantized by onnxruntime three ways: 0 differing bytes. (With int8
    activations and full-range weights onnxruntime's fused QDQ kernels saturate on CPUs without VNNI, hence
    reduce_range for QDQ; docs/any-cnn.md.)"""
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.dw = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1, groups=16)
            self.pw, self.fc = nn.Conv2d(16, 24, 1), nn.Linear(24 * 4 * 4, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.dw(F.relu(self.c1(x)))), 2)
            return self.fc(F.max_pool2d(F.relu(self.pw(x)), 2).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.c1.weight.mul_(0.02)
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(tmp_path / "small.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits"], opset_version=13,
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    rng = np.random.default_rng(0)
    cal = rng.integers(0, 256, (100, 3, 32, 32)).astype(np.uint8)
    cal[0], cal[1] = 0, 255
    x = rng.integers(0, 256, (300, 3, 32, 32)).astype(np.uint8)
    for fmt, act, rr in (("QOperator", "int8", False), ("QDQ", "int8", True), ("QOperator", "uint8", True)):
        q = quantize(tmp_path / "small.onnx", tmp_path / f"{fmt}-{act}.onnx", cal, fmt, act, True, reduce_range=rr)
        g = load_onnx(q)
        assert [n.kind for n in g.nodes] == ["mul", "mul", "pool", "mul", "pool", "flatten", "mul"]
        assert g.layers["dw"].groups == 16
        assert np.array_equal(g.outputs(x), onnxruntime_outputs(q, x)), (fmt, act)
