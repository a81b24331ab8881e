import numpy as np
import pytest
import torch

from conftest import JPEG_ZIP, MLPERF_H5, need
from maxdnn.ir.graph import QuantizedGraph
from maxdnn.ir.quant import float_conv_exact, quantize_multiplier
from maxdnn.engine.reference import exact_prod, reference_conv, reference_forward


def scalar_conv(x, w, stride, pads):
    """Every multiplication written out: the definition of the convolution."""
    left, r, t, b = pads
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    ho, wo = (h + t + b - kh) // stride + 1, (wd + left + r - kw) // stride + 1
    out = np.zeros((n, f, ho, wo), dtype=np.int64)
    for a in range(n):
        for o in range(f):
            for y in range(ho):
                for z in range(wo):
                    s = 0
                    for ci in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                yy, zz = y * stride + i - t, z * stride + j - left
                                if 0 <= yy < h and 0 <= zz < wd:
                                    s += int(x[a, ci, yy, zz]) * int(w[o, ci, i, j])
                    out[a, o, y, z] = s
    return out


@pytest.mark.parametrize("stride,k,pads", [(1, 3, (1, 1, 1, 1)), (2, 3, (0, 1, 0, 1)), (2, 1, (0, 0, 0, 0)), (1, 3, (0, 0, 0, 0))])
def test_reference_conv_is_the_definition(rng, stride, k, pads):
    x = rng.integers(0, 256, (2, 3, 7, 7))
    w = rng.integers(-128, 128, (4, 3, k, k))
    assert np.array_equal(reference_conv(x, w, stride, pads, lambda f, c: exact_prod), scalar_conv(x, w, stride, pads))


def test_quantize_multiplier():
    for m in [0.5, 1e-4, 0.0123456, 3.7, 1 - 1e-12]:
        m0, sh = quantize_multiplier(m)
        assert (1 << 30) <= m0 < (1 << 31)
        assert abs(m0 / 2**sh - m) <= m * 2**-30
    with pytest.raises(ValueError):
        quantize_multiplier(0)


def test_float_conv_exact_both_precisions(rng):
    x = rng.integers(0, 256, (2, 64, 6, 6))
    w = rng.integers(-128, 128, (8, 64, 3, 3))
    ref = scalar_conv(x, w, 1, (1, 1, 1, 1))
    bound = int(np.abs(w).reshape(8, -1).sum(1).max()) * 255
    assert bound < 1 << 24
    out = float_conv_exact(torch.as_tensor(x), torch.as_tensor(w), 1, (1, 1, 1, 1), bound)
    assert np.array_equal(out.numpy(), ref)
    # accumulators past 2^24: 16-bit operands take the float64 path
    x16 = rng.integers(0, 65536, (1, 8, 5, 5))
    w16 = rng.integers(-32768, 32768, (4, 8, 3, 3))
    b16 = int(np.abs(w16).reshape(4, -1).sum(1).max()) * 65535
    assert b16 > 1 << 24
    ref16 = scalar_conv(x16, w16, 2, (0, 1, 0, 1))
    assert np.abs(ref16).max() > 1 << 24
    out16 = float_conv_exact(torch.as_tensor(x16), torch.as_tensor(w16), 2, (0, 1, 0, 1), b16)
    assert np.array_equal(out16.numpy(), ref16)


def test_fast_engine_equals_reference_random_and_real(qnet, lossless_test, rng):
    rand = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    for imgs in [rand, lossless_test.images[:6]]:
        ref = reference_forward(qnet, imgs)
        fast = qnet.forward_int(torch.as_tensor(imgs)).numpy()
        assert np.array_equal(ref, fast)


def test_mlperf_model_int8_equals_reference(lossless_test):
    from maxdnn.data import load_cifar10
    from maxdnn.zoo.models import load_model
    from maxdnn.ir.quant import calibration_images
    from maxdnn.frontends.pytorch import quantize_module as quantize

    from conftest import LOSSLESS_ZIP

    q = quantize(load_model(need(MLPERF_H5)), calibration_images(load_cifar10(LOSSLESS_ZIP, "train").images, 500))
    imgs = lossless_test.images[:4]
    assert np.array_equal(reference_forward(q, imgs), q.forward_int(torch.as_tensor(imgs)).numpy())
    acc = (q.predict(lossless_test.images) == lossless_test.labels).mean()
    assert acc >= 0.87


@pytest.mark.parametrize("name, floor", [("resnet8", 0.82), ("resnet20", 0.86)])
def test_quantization_costs_at_most_one_point_on_jpeg_test_set(name, floor):
    """The committed zoo checkpoints on the 10,000 JPEG test images: float at least ``floor`` (ResNet-20:
    the 86% target), int8 within one point of float."""
    from maxdnn.data import load_cifar10
    from maxdnn.zoo.models import load_model, predict
    from maxdnn.ir.quant import calibration_images
    from maxdnn.frontends.pytorch import quantize_module as quantize

    test = load_cifar10(need(JPEG_ZIP), "test")
    train = load_cifar10(JPEG_ZIP, "train")
    m = load_model(name)
    q = quantize(m, calibration_images(train.images))
    f_acc = (predict(m, test.images).numpy() == test.labels).mean()
    q_acc = (q.predict(test.images) == test.labels).mean()
    assert len(test) == 10000
    assert f_acc >= floor
    assert q_acc >= f_acc - 0.01


def test_save_load_roundtrip(qnet, tmp_path, rng):
    qnet.save(tmp_path / "q.npz")
    q2 = QuantizedGraph.load(tmp_path / "q.npz")
    x = torch.as_tensor(rng.integers(0, 256, (3, 3, 32, 32)))
    assert torch.equal(qnet.forward_int(x), q2.forward_int(x))
    for n, l in qnet.layers.items():
        assert np.array_equal(l.weight, q2.layers[n].weight) and l.pads == q2.layers[n].pads


def test_integer_model_properties(qnet):
    for name, layer in qnet.layers.items():
        assert layer.weight.min() >= -127 and layer.weight.max() <= 127, name
        assert np.abs(layer.bias).max() < 2**31
    assert qnet.layers["s2.conv1"].pads == (0, 1, 0, 1)


def test_extreme_layers_past_2_24_bit_exact(qnet, rng):
    """Weights at +-127 and saturated inputs push accumulators past 2^24 (float64 paths), exactly."""
    import copy

    from maxdnn.engine.approx import ApproxNetwork, kernel_assignment

    q = copy.deepcopy(qnet)
    q.__dict__.pop("_tp", None)
    for name, layer in q.layers.items():
        layer.weight = np.where(rng.random(layer.weight.shape) < 0.9, 127, -127).astype(np.int64)
        layer.bias = rng.integers(-2**20, 2**20, layer.weight.shape[0])
        layer.__dict__.pop("exact_bound", None)
    for name, layer in q.layers.items():
        r = layer.requant
        # every requantization stays exact in float64
        assert ((layer.requant_bound() * r.m0 + 2.0 ** (r.shift - 1)) < 2**53).all(), name
    assert max(l.exact_bound for l in q.layers.values()) > 1 << 24
    imgs = np.full((2, 3, 32, 32), 255, dtype=np.uint8)
    imgs[1] = rng.integers(200, 256, (3, 32, 32))
    assert np.array_equal(reference_forward(q, imgs), q.forward_int(torch.as_tensor(imgs)).numpy())
    specs = ["exact", "roup-p1r1", "mitchell"]
    a = kernel_assignment(specs, {n: rng.integers(0, 3, l.weight.shape[:2]) for n, l in q.layers.items()})
    from maxdnn.multipliers.models import get_multiplier

    mults = [get_multiplier(s) for s in specs]
    ref = reference_forward(q, imgs, lambda name: (lambda f, c: mults[a.maps[name][f, c]]))
    assert np.array_equal(ApproxNetwork(q, a).logits(torch.as_tensor(imgs)).numpy(), ref)


def _srdhm(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul, int32 operands, written from its definition."""
    if a == b == -(1 << 31):
        return (1 << 31) - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    q = abs(ab + nudge) // (1 << 31)  # C++ division truncates toward zero
    return q if ab + nudge >= 0 else -q


def _rounding_divide_by_pot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def _multiply_by_quantized_multiplier(x: int, m0: int, shift: int) -> int:
    return _rounding_divide_by_pot(_srdhm(x * (1 << max(shift, 0)), m0), max(-shift, 0))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_tflite_requantization_three_forms_equal_the_definition(rng, per_tensor):
    """numpy, torch and the compiled kernel against a scalar transcription of TFLite's kernel code."""
    from maxdnn.ir._requant_kernel import tflite_requant
    from maxdnn.ir.quant import tflite_multiply, tflite_multiply_torch, tflite_single_multiply

    c = 1 if per_tensor else 6
    acc = rng.integers(-(1 << 22), 1 << 22, (3, 6, 4, 5))
    acc[0, 0, 0, :5] = [0, 1, -1, (1 << 22) - 1, -(1 << 22)]
    m0 = rng.integers(1 << 30, 1 << 31, c)
    m0[0] = (1 << 31) - 1
    shift = rng.integers(-14, 4, c)
    shift[0] = -1
    ch = (lambda v: v[0]) if per_tensor else (lambda v: v)
    want = np.array([[[[_multiply_by_quantized_multiplier(int(acc[n, k, i, j]), int(m0[0 if per_tensor else k]),
                                                          int(shift[0 if per_tensor else k]))
                        for j in range(5)] for i in range(4)] for k in range(6)] for n in range(3)])
    bm0, bsh = (v[None, :, None, None] if not per_tensor else ch(v) for v in (m0, shift))
    assert np.array_equal(tflite_multiply(acc, bm0, bsh), want)
    assert np.array_equal(tflite_multiply_torch(torch.as_tensor(acc), torch.as_tensor(bm0), torch.as_tensor(bsh)).numpy(),
                          want)
    assert np.array_equal(tflite_requant(acc.astype(np.float64), m0, shift, False), want)
    # the single-rounding form (LiteRT's reference FULLY_CONNECTED): one rounding of x * m0 / 2^(31 - shift)
    neg = -np.abs(shift) - 1
    single = np.array([[[[(int(acc[n, k, i, j]) * int(m0[0 if per_tensor else k])
                           + (1 << (30 - int(neg[0 if per_tensor else k])))) >> (31 - int(neg[0 if per_tensor else k]))
                          for j in range(5)] for i in range(4)] for k in range(6)] for n in range(3)])
    bneg = neg[None, :, None, None] if not per_tensor else neg[0]
    assert np.array_equal(tflite_single_multiply(acc, bm0, bneg), single)
    assert np.array_equal(tflite_requant(acc.astype(np.float64), m0, neg, True), single)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "float64-wide"])
def test_compiled_half_up_requant_equals_the_torch_form(rng, per_tensor, layout):
    """The one-pass CPU requantization (bias, half-up multiply-shift, zero point, clamp) gives exactly the
    torch form's float64 results, including accumulators where acc * m0 is rounded (past 2^53)."""
    from maxdnn.ir.graph import QParams, _requant_cpu
    from maxdnn.ir.quant import quantize_multiplier

    f = 1 if per_tensor else 7
    acc = rng.integers(-(1 << 23), 1 << 23, size=(5, 7, 6, 4)).astype(np.float64)
    acc.flat[:20] = [0, 1, -1, (1 << 23) - 1, -(1 << 23), 12345, -12345, 1 << 22, 7, -7] * 2
    bias = rng.integers(-5000, 5000, size=7).astype(np.float64)
    m0, shift = zip(*(quantize_multiplier(float(s)) for s in rng.uniform(1e-5, 0.9, size=f)))
    m0 = torch.tensor(m0, dtype=torch.float64)
    shift = np.array(shift, dtype=np.float64)
    rq = (m0, torch.as_tensor(2.0 ** (shift - 1)), torch.as_tensor(2.0 ** -shift))
    wide = layout == "float64-wide"
    q = QParams(0.1, 3, None, None) if wide else QParams(0.1, 3, 0, 255)
    t = torch.as_tensor(acc, dtype=torch.float64 if wide else torch.float32)
    if layout != "contiguous":
        t = t.contiguous(memory_format=torch.channels_last)
    got = _requant_cpu(t, torch.as_tensor(bias), rq, q)

    def chan(v):
        return v.reshape(1, -1, 1, 1)
    want = (t.to(torch.float64) + chan(torch.as_tensor(bias))).mul_(chan(rq[0])).add_(chan(rq[1])).mul_(chan(rq[2]))
    want = want.floor_().add_(3)
    want = want if wide else want.clamp_(0, 255).to(torch.float32)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout != "contiguous")


@pytest.mark.parametrize("which", ["both", "first", "none", "wide"])
def test_compiled_add_equals_the_torch_form(rng, which):
    """The one-pass CPU Add (zero points, per-input requantization, output zero point, clamp) gives exactly
    the torch form's float64 results, inputs in mixed layouts."""
    from maxdnn.ir.graph import Add, QParams, _add_cpu
    from maxdnn.ir.quant import quantize_multiplier

    def rq(f):
        m0, shift = zip(*(quantize_multiplier(float(s)) for s in rng.uniform(0.05, 1.9, size=f)))
        shift = np.array(shift, dtype=np.float64)
        return (torch.tensor(m0, dtype=torch.float64), torch.as_tensor(2.0 ** (shift - 1)), torch.as_tensor(2.0 ** -shift))

    a = torch.as_tensor(rng.integers(-128, 128, size=(3, 5, 4, 6)), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    b = torch.as_tensor(rng.integers(0, 256, size=(3, 5, 4, 6)), dtype=torch.float32)
    rqs = {"both": [rq(5), rq(1)], "first": [rq(5), None], "none": [None, None], "wide": [rq(1), rq(5)]}[which]
    out = QParams(0.1, 0, None, None) if which == "wide" else QParams(0.1, -3, -128, 127)
    n = Add("add", ["a", "b"], out, in_zps=[-5, 7], requants=[None, None])
    got = _add_cpu([a, b], n, rqs)

    def chan(v):
        return v.reshape(1, -1, 1, 1)
    parts = []
    for v, zp, r in zip((a, b), n.in_zps, rqs):
        v = v.to(torch.float64) - zp
        parts.append(v if r is None else v.mul(chan(r[0])).add_(chan(r[1])).mul_(chan(r[2])).floor_())
    want = (parts[0] + parts[1]).add_(out.zero_point)
    want = want if which == "wide" else want.clamp_(-128, 127).to(torch.float32)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)  # the layout of the first input
    got_b = _add_cpu([b, a], Add("add", ["b", "a"], out, in_zps=[7, -5], requants=[None, None]), rqs[::-1])
    assert got_b.is_contiguous() and torch.equal(got_b, want)
