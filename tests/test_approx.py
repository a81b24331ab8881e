import json

import numpy as np
import pytest
import torch

from maxdnn.engine.approx import (
    ApproxNetwork,
    Assignment,
    AssignmentError,
    LayerPlan,
    approx_conv2d,
    approx_linear,
    filter_assignment,
    kernel_assignment,
    layer_assignment,
    lut_conv_numba,
    lut_conv_torch,
    lut_scatter_numba,
)
from maxdnn.multipliers.models import get_multiplier, roup_specs
from maxdnn.engine.reference import reference_conv, reference_forward

SEPARABLE = ["exact", "roup-p1r2", "roup-p3r7", "roup-p0r3", "roup-p2r0", "drum-k4", "ppp-j0k2"]
LUT = SEPARABLE + ["mitchell", "trunc-k6"]
GEOMETRY = [  # stride, kernel, padding as approx_conv2d takes it, same as (left, right, top, bottom)
    (1, 3, 1, (1, 1, 1, 1)),
    (2, 3, (0, 1, 0, 1), (0, 1, 0, 1)),
    (2, 1, 0, (0, 0, 0, 0)),
    (1, 1, 0, (0, 0, 0, 0)),
    (1, 3, 0, (0, 0, 0, 0)),
]


def random_map(rng, gran, f, c, n):
    if gran == "layer":
        return np.full((f, c), rng.integers(n))
    if gran == "filter":
        return np.repeat(rng.integers(0, n, (f, 1)), c, 1)
    return rng.integers(0, n, (f, c))


def reference(x, w, specs, amap, stride, pads, bits=8, signed=False):
    mults = [get_multiplier(s, bits, signed) for s in specs]
    return reference_conv(x, w, stride, pads, lambda f, c: mults[amap[f, c]])


@pytest.mark.parametrize("specs", [SEPARABLE[:4], SEPARABLE, LUT], ids=["roup", "separable", "lut"])
@pytest.mark.parametrize("gran", ["layer", "filter", "kernel"])
@pytest.mark.parametrize("geom", GEOMETRY, ids=lambda g: f"s{g[0]}k{g[1]}p{g[3]}")
def test_approx_conv2d_matches_reference(rng, specs, gran, geom):
    stride, k, padding, pads = geom
    x = rng.integers(0, 256, (3, 5, 9, 9))
    x[0, :, 0, :] = 255  # edge values at the padding border
    x[1, :, :, 0] = 0
    w = rng.integers(-128, 128, (7, 5, k, k))
    w[0, 0] = 127
    w[1, 0] = -128
    amap = random_map(rng, gran, 7, 5, len(specs))
    ref = reference(x, w, specs, amap, stride, pads)
    assert np.array_equal(approx_conv2d(x, w, specs, amap, stride, padding), ref)
    out_t = approx_conv2d(torch.as_tensor(x), torch.as_tensor(w), specs, amap, stride, padding)
    assert isinstance(out_t, torch.Tensor) and np.array_equal(out_t.numpy(), ref)


@pytest.mark.parametrize("geom", GEOMETRY[:3], ids=["s1k3", "s2k3", "s2k1"])
def test_lut_paths_numba_and_torch(rng, geom):
    stride, k, _, pads = geom
    specs = LUT
    x = rng.integers(0, 256, (2, 4, 8, 8))
    w = rng.integers(-128, 128, (5, 4, k, k))
    amap = rng.integers(0, len(specs), (5, 4))
    plan = LayerPlan(w, [get_multiplier(s) for s in specs], amap, stride, pads)
    assert not plan.separable
    ref = reference(x, w, specs, amap, stride, pads)
    assert np.array_equal(plan(torch.as_tensor(x)).numpy(), ref)  # numba kernel on CPU
    xg = torch.as_tensor(x, dtype=torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert np.array_equal(plan(xg).numpy(), ref)  # float activations in place, even with a gradient attached
    torch_out = lut_conv_torch(torch.as_tensor(x), plan.w, plan.kmap, plan.luts, plan.x_min, plan.w_min, stride, pads)
    assert np.array_equal(torch_out.numpy(), ref)


@pytest.mark.parametrize("table", ["int32", "int16-zero-rows"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("geom", GEOMETRY, ids=lambda g: f"s{g[0]}k{g[1]}p{g[3]}")
def test_lut_scatter_kernels_match_reference(rng, geom, signed, table):
    """The scatter kernels (stride 1 and strided, padding borders, 1x1, signed operands, products of an
    imported table's full 16-bit range (an int32 table), or within int16 with rows of zeros that the kernels
    skip, one of them with a single non-zero product) against the reference and the gather kernel;
    LayerPlan takes them from SCATTER_MIN_CHANNELS input channels on."""
    from maxdnn.engine.approx import SCATTER_MIN_CHANNELS

    stride, k, _, pads = geom
    c = max(SCATTER_MIN_CHANNELS + 1, 9)
    lo = -128 if signed else 0
    x = rng.integers(lo, lo + 256, (3, c, 9, 9))
    x[0, :, 0, :], x[1, :, :, -1] = lo + 255, lo  # extremes at the padding borders
    w = rng.integers(-128, 128, (6, c, k, k))
    luts = rng.integers(-65025, 65026, (3, 256, 256)).astype(np.int32)
    luts[0, 255, 0] = 65025
    if table == "int16-zero-rows":
        luts = rng.integers(-32768, 32768, (3, 256, 256)).astype(np.int32)
        luts[:, 0:40] = 0  # operands whose products are all zero (as x = 0 for most multipliers)
        luts[1, 7, int(w[0, 0, 0, 0]) + 128] = -32768  # one non-zero product in a row: not skipped
        x[:, :, ::2] = lo + rng.integers(0, 40, x[:, :, ::2].shape)
        x[2, 1, 1, 1] = lo + 7
    kmap = rng.integers(0, 3, (6, c))
    prods = lambda f, ci: (lambda xv, wv: luts[kmap[f, ci]][np.asarray(xv) - lo, int(wv) + 128])  # noqa: E731
    ref = reference_conv(x, w, stride, pads, prods)
    got = lut_scatter_numba(x, w, kmap, luts, lo, -128, stride, pads)
    assert np.array_equal(got, ref)
    assert np.array_equal(lut_conv_numba(x, w, kmap, luts, lo, -128, stride, pads), ref)
    specs = LUT
    amap = rng.integers(0, len(specs), (6, c))
    plan = LayerPlan(w, [get_multiplier(s, 8, signed) for s in specs], amap, stride, pads, x_min=lo, x_max=lo + 255)
    xp = torch.as_tensor(x)
    assert np.array_equal(plan(xp).numpy(), reference(x, w, specs, amap, stride, pads, signed=signed))
    assert 0 in plan.lut_tables  # the scatter kernel ran, and keeps its table for the next batch
    assert np.array_equal(plan(xp).numpy(), reference(x, w, specs, amap, stride, pads, signed=signed))


@pytest.mark.parametrize("table", ["int16", "int32"])
@pytest.mark.parametrize("stride,pads", [(1, (1, 1, 1, 1)), (2, (0, 1, 0, 1))], ids=["s1", "s2"])
def test_lut_scatter_accumulators_past_2_24(rng, stride, pads, table):
    """Products of one sign near the table's range over 64 channels: output sums past 2^24 (int16 and int32
    tables, stride 1 and 2, padding borders), equal to the gather kernel's int64 sums."""
    hi = (1 << 15) - 1 if table == "int16" else 65025
    x = rng.integers(1, 256, (2, 64, 7, 7))
    w = rng.integers(-128, 128, (4, 64, 3, 3))
    luts = rng.integers(hi - 2000, hi + 1, (2, 256, 256)).astype(np.int32)
    kmap = rng.integers(0, 2, (4, 64))
    tables: dict = {}
    got = lut_scatter_numba(x, w, kmap, luts, 0, -128, stride, pads, tables, 0)
    assert tables[0][0].dtype == (np.int16 if table == "int16" else np.int32)
    want = lut_conv_numba(x, w, kmap, luts, 0, -128, stride, pads)
    assert np.array_equal(got, want) and want.max() > 1 << 24


def test_accumulators_past_2_24_take_exact_path(rng):
    specs = ["exact", "roup-p2r3", "roup-p7r15", "drum-k8"]
    x = rng.integers(60000, 65536, (1, 16, 5, 5))
    w = rng.integers(-32768, 32768, (4, 16, 3, 3))
    amap = rng.integers(0, len(specs), (4, 16))
    ref = reference(x, w, specs, amap, 1, (1, 1, 1, 1), bits=16)
    assert np.abs(ref).max() > 1 << 24
    assert np.array_equal(approx_conv2d(x, w, specs, amap, 1, 1, bits=16), ref)


def test_approx_linear(rng):
    x = rng.integers(0, 256, (4, 64))
    w = rng.integers(-128, 128, (10, 64))
    amap = rng.integers(0, 3, (10, 64))
    specs = ["exact", "roup-p1r1", "mitchell"]
    mults = [get_multiplier(s) for s in specs]
    ref = np.array([[sum(int(mults[amap[f, c]](x[n, c], w[f, c])) for c in range(64)) for f in range(10)] for n in range(4)])
    assert np.array_equal(approx_linear(x, w, specs, amap), ref)


def test_operand_range_checked(rng):
    with pytest.raises(ValueError, match="x range"):
        approx_conv2d(np.full((1, 1, 3, 3), 300), np.ones((1, 1, 1, 1), int), ["exact"], 0)


def test_whole_network_bit_exact_each_granularity(qnet, lossless_test, rng):
    imgs = lossless_test.images[:3]
    specs = roup_specs(8) + ["mitchell"]
    assignments = [
        layer_assignment(qnet, {n: str(rng.choice(roup_specs(8))) for n in qnet.layers}),
        filter_assignment(qnet, {n: [str(rng.choice(roup_specs(8))) for _ in range(l.weight.shape[0])] for n, l in qnet.layers.items()}),
        kernel_assignment(specs, {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in qnet.layers.items()}),
    ]
    for a in assignments:
        net = ApproxNetwork(qnet, a)
        mults = a.multipliers()
        ref = reference_forward(qnet, imgs, lambda name: (lambda f, c: mults[a.maps[name][f, c]]))
        assert np.array_equal(net.logits(torch.as_tensor(imgs)).numpy(), ref), a.granularity()


def test_all_exact_assignment_equals_exact_engine(qnet, lossless_test):
    net = ApproxNetwork(qnet, Assignment.uniform(qnet, "roup-p0r0"))
    assert np.array_equal(net.predict(lossless_test.images[:200]), qnet.predict(lossless_test.images[:200]))


def test_assignment_roundtrip_each_granularity(qnet, tmp_path, rng):
    a_layer = layer_assignment(qnet, {"s3.conv2": "roup-p1r2"})
    a_filter = filter_assignment(qnet, {"s2.conv1": ["roup-p2r2"] * 16 + ["exact"] * 16})
    a_kernel = kernel_assignment(["exact", "roup-p1r1"], {"s3.conv2": rng.integers(0, 2, (64, 64))})
    for a, gran in [(a_layer, "layer"), (a_filter, "filter"), (a_kernel, "kernel")]:
        p = tmp_path / f"{gran}.json"
        a.save(p)
        b = Assignment.load(p, qnet)
        assert b.granularity() == gran and b.specs == a.specs
        a.bind(qnet)
        for n in qnet.layers:
            assert np.array_equal(a.maps[n], b.maps[n])
    doc = json.loads((tmp_path / "filter.json").read_text())
    assert isinstance(doc["layers"]["s2.conv1"], list)  # human-editable
    assert json.loads((tmp_path / "kernel.json").read_text())["arrays"] == "kernel.npz"


@pytest.mark.parametrize("layers,specs,message", [
    ({"conv1": 0}, ["roup-p9r9"], "roup-p9r9"),
    ({"conv9": 0}, ["exact"], "unknown layer 'conv9'"),
    ({"s1.conv1": [0, 0]}, ["exact"], "layer s1.conv1: 2 filter entries"),
    ({"s1.conv1": [[0, 0]]}, ["exact"], r"layer s1.conv1: shape \[1, 2\]"),
    ({"fc": 3}, ["exact"], "layer fc: index 3 out of range"),
    ({"fc": "x"}, ["exact"], "layer fc: expected"),
])
def test_assignment_errors_name_the_layer(qnet, tmp_path, layers, specs, message):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"format": "maxdnn-assignment-v1", "specs": specs, "layers": layers}))
    with pytest.raises(AssignmentError, match=message) as e:
        Assignment.load(p, qnet)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_assignment_not_json(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("{")
    with pytest.raises(AssignmentError, match="not valid JSON"):
        Assignment.load(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_paths_bit_exact(qnet, rng):
    imgs = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    specs = roup_specs(8)
    cases = [
        layer_assignment(qnet, {n: str(rng.choice(specs)) for n in qnet.layers}),
        filter_assignment(qnet, {n: [str(rng.choice(specs)) for _ in range(l.weight.shape[0])] for n, l in qnet.layers.items()}),
        kernel_assignment(specs, {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in qnet.layers.items()}),
        kernel_assignment(LUT, {n: rng.integers(0, len(LUT), l.weight.shape[:2]) for n, l in qnet.layers.items()}),
    ]
    assert np.array_equal(qnet.forward_int(torch.as_tensor(imgs, device="cuda")).cpu().numpy(), reference_forward(qnet, imgs))
    for a in cases:
        mults = a.multipliers()
        ref = reference_forward(qnet, imgs, lambda name: (lambda f, c: mults[a.maps[name][f, c]]))
        got = ApproxNetwork(qnet, a, device="cuda").logits(torch.as_tensor(imgs, device="cuda")).cpu().numpy()
        assert np.array_equal(got, ref), a.granularity()


@pytest.mark.parametrize("stacked", [False, True])
def test_compiled_rounding_equals_round_at(rng, stacked):
    """Every rounding transform R_t (t = 0..7) of unsigned and signed operands, written by the compiled pass
    into separate or interleaved (stacked channel) outputs, equals ``multipliers.round_at``."""
    from maxdnn.engine._round_kernel import round_stack
    from maxdnn.multipliers.models import round_at

    x = rng.integers(-256, 512, size=(300, 5))
    x[:8, 0] = [-256, -129, -128, -1, 0, 1, 255, 511]
    bits = np.arange(8, dtype=np.int64)
    if stacked:
        buf = np.full((300, 8, 5), np.nan, dtype=np.float32)
        out = buf.transpose(1, 0, 2)
    else:
        out = np.full((8, 300, 5), np.nan, dtype=np.float32)
    round_stack(x.astype(np.float32), bits, out)
    for t in bits:
        assert np.array_equal(out[t], round_at(x, int(t)).astype(np.float32)), t


@pytest.mark.parametrize("geom", GEOMETRY + [(1, 5, 2, (2, 2, 2, 2)), (2, 3, 1, (1, 1, 1, 1)), (1, 3, None, (2, 0, 0, 2)),
                                  (1, 3, None, (3, 3, 0, 1))],
                         ids=lambda g: f"s{g[0]}k{g[1]}p{g[3]}")
def test_transform_conv_kernel_matches_integer_loops(rng, geom):
    """The compiled transform convolution, every kernel reading its own transform slot (R_t roundings, the
    identity and arbitrary tables), signed and unsigned operands, for any number of images laid out together,
    against explicit per-kernel, per-tap integer sums."""
    from maxdnn.engine._transform_conv import ROUND_TABLE, chunk_images, transform_conv
    from maxdnn.multipliers.models import round_at

    stride, k, _, pads = geom
    left, right, top, bottom = pads
    for x_min in (0, -128):
        x = rng.integers(x_min, 256 + x_min, (5, 6, 9, 8))
        x[0, :, 0] = 255 + x_min  # extremes on the padding border
        x[1, :, :, -1] = x_min
        w = rng.integers(-128, 128, (7, 6, k, k))
        bits = np.array([0, 3, 7, ROUND_TABLE, 1, ROUND_TABLE], dtype=np.int64)
        tables = rng.integers(-300, 300, (len(bits), 256)).astype(np.float32)
        tables[:, -x_min] = 0  # transforms keep padding zero
        kslot = rng.integers(0, len(bits), (7, 6))

        def transformed(s, v):
            return round_at(v, int(bits[s])) if bits[s] >= 0 else tables[s][v - x_min].astype(np.int64)

        oh, ow = (9 + top + bottom - k) // stride + 1, (8 + left + right - k) // stride + 1
        ref = np.zeros((5, 7, oh, ow), dtype=np.int64)
        for f in range(7):
            for c in range(6):
                xp = np.pad(transformed(kslot[f, c], x[:, c]), ((0, 0), (top, bottom), (left, right)))
                for i in range(oh):
                    for j in range(ow):
                        ref[:, f, i, j] += (xp[:, i * stride:i * stride + k, j * stride:j * stride + k]
                                            * w[f, c]).sum((1, 2))
        xs = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.float32)
        for chunk in sorted({1, 2, 3, chunk_images(oh, ow)}):
            out = np.full((5, oh, ow, 7), np.nan, dtype=np.float32)
            transform_conv(xs, bits, tables, x_min, kslot, w.reshape(7, -1).astype(np.float32), k, k, stride,
                           np.array(pads, dtype=np.int64), chunk, out)
            assert np.array_equal(out.transpose(0, 3, 1, 2), ref), (x_min, chunk)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "onednn"])
@pytest.mark.parametrize("gran", ["layer", "filter", "kernel"])
@pytest.mark.parametrize("geom", GEOMETRY, ids=lambda g: f"s{g[0]}k{g[1]}p{g[3]}")
def test_layer_plan_each_path_matches_reference(rng, geom, gran, fused):
    """Both CPU paths of separable emulation (the transform convolution, and oneDNN convolutions per group or
    over stacked copies), for unsigned and signed operands, against the integer reference engine."""
    stride, k, _, pads = geom
    specs = SEPARABLE
    for signed in (False, True):
        mults = [get_multiplier(s, 8, signed) for s in specs]
        lo = -128 if signed else 0
        x = rng.integers(lo, lo + 256, (3, 5, 9, 9))
        x[0, :, 0, :] = lo + 255
        w = rng.integers(-128, 128, (7, 5, k, k))
        amap = random_map(rng, gran, 7, 5, len(specs))
        plan = LayerPlan(w, mults, amap, stride, pads, x_min=lo, x_max=lo + 255, fused=fused)
        assert (plan.mode == "fused") == fused
        ref = reference_conv(x, w, stride, pads, lambda f, c: mults[amap[f, c]])
        assert np.array_equal(plan(torch.as_tensor(x)).to(torch.int64).numpy(), ref), signed


def test_transform_conv_refuses_what_it_cannot_do_exactly(rng):
    w = rng.integers(-32768, 32768, (4, 16, 3, 3))
    mults = [get_multiplier(s, 16) for s in ("exact", "roup-p2r3")]
    with pytest.raises(ValueError, match="2\\^24"):
        LayerPlan(w, mults, rng.integers(0, 2, (4, 16)), 1, (1, 1, 1, 1), x_max=65535, fused=True)
    plan = LayerPlan(w, mults, rng.integers(0, 2, (4, 16)), 1, (1, 1, 1, 1), x_max=65535)
    assert plan.mode != "fused"  # chosen by default only where float32 is exact
