import numpy as np
import pytest

from maxdnn.multipliers.models import (
    SpecError,
    booth_digits,
    default_family,
    get_multiplier,
    roup_specs,
    round_at,
)


def naive_round(v, t):
    # R_t(v) = 2^t floor(v / 2^t + 1/2), with exact rational arithmetic
    from fractions import Fraction
    import math

    return (2**t) * math.floor(Fraction(v, 2**t) + Fraction(1, 2))


def test_round_at_matches_definition():
    for t in range(0, 9):
        for v in range(-300, 300):
            assert int(round_at(v, t)) == naive_round(v, t)
    assert int(round_at(127, 2)) == 128


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_booth_digits_reconstruct(bits):
    w = np.arange(-(1 << (bits - 1)), 1 << (bits - 1)) if bits < 16 else np.random.default_rng(1).integers(-32768, 32768, 5000)
    d = booth_digits(w, bits)
    assert d.min() >= -2 and d.max() <= 2
    assert np.array_equal((d * 4 ** np.arange(bits // 2)).sum(-1), w)


@pytest.mark.parametrize("x_signed", [False, True])
@pytest.mark.parametrize("spec", roup_specs(8))
def test_roup_bit_level_equals_closed_form_exhaustive(spec, x_signed):
    m = get_multiplier(spec, 8, x_signed)
    xs = m.x_format.values()[:, None]
    ws = m.w_format.values()[None, :]
    closed = m(xs, ws)
    bit = m.bit_level(xs, ws)
    assert np.array_equal(closed, bit)
    # the closed form itself, written independently
    assert np.array_equal(closed, round_at(xs, m.r) * round_at(ws, 2 * m.p))


@pytest.mark.parametrize("spec", ["roup-p0r0", "roup-p3r5", "roup-p7r15", "roup-p5r9", "roup-p2r1"])
@pytest.mark.parametrize("x_signed", [False, True])
def test_roup_bit_level_16_bit_random(spec, x_signed):
    m = get_multiplier(spec, 16, x_signed)
    rng = np.random.default_rng(7)
    x = rng.integers(m.x_format.min, m.x_format.max + 1, 200_000)
    w = rng.integers(-32768, 32768, 200_000)
    edges_x = np.array([m.x_format.min, m.x_format.max, 0, 1])
    edges_w = np.array([-32768, 32767, 0, -1])
    x = np.concatenate([x, np.repeat(edges_x, 4)])
    w = np.concatenate([w, np.tile(edges_w, 4)])
    assert np.array_equal(m(x, w), m.bit_level(x, w))


def test_roup_known_values():
    m = get_multiplier("roup-p1r0")
    assert int(m(1, 127)) == 128  # R_2(127) = 128
    assert int(m(3, 2)) == 12  # 2 rounds half up to 4
    assert int(m(3, 1)) == 0
    assert int(get_multiplier("roup-p0r1")(3, 1)) == 4
    assert int(get_multiplier("roup-p0r1")(255, -128)) == 256 * -128
    assert np.array_equal(get_multiplier("roup-p0r0").lut(), get_multiplier("exact").lut())


def test_exact_lut_layout():
    m = get_multiplier("exact")
    t = m.lut()
    assert t.shape == (256, 256)
    assert t[255 - 0, 127 + 128] == 255 * 127
    assert t[3, 0] == 3 * -128


def test_ppp_known_values():
    m = get_multiplier("ppp-j0k2")
    assert int(m(10, 7)) == 10 * 4
    assert int(m(10, -1)) == 10 * -4  # -1 = ...11111111, low two bits cleared: -4
    assert int(get_multiplier("ppp-j2k1")(1, 7)) == 3


def test_truncated_known_values():
    assert int(get_multiplier("trunc-k1")(255, 127)) == 255 * 127 - 1  # the single bit a0 b0
    # 3 * 3: column 0 holds a0b0 (1), column 1 a0b1 + a1b0 (2 + 2), column 2 a1b1 (4)
    assert int(get_multiplier("trunc-k2")(3, 3)) == 4
    assert int(get_multiplier("trunc-k1")(3, -3)) == -8
    assert int(get_multiplier("trunc-k8")(255, 127)) == sum(
        1 << (i + j) for i in range(8) for j in range(7) if i + j >= 8
    )


def test_drum_known_values():
    m = get_multiplier("drum-k4")
    # 255 -> 1111|1111: segment 1111, LSB forced 1 -> 1111 << 4 = 240
    assert int(m(255, 1)) == 240
    # 100 = 1100100: leading one at 6, segment bits 6..3 = 1100 -> 1101 << 3 = 104
    assert int(m(100, 1)) == 104
    assert int(m(100, -100)) == -104 * 104
    assert int(m(7, 5)) == 35  # small operands are exact
    full = get_multiplier("drum-k8")
    xs, ws = full.x_format.values()[:, None], full.w_format.values()[None, :]
    # with 8-bit segments only |w| = 128 and x >= 256 could be cut: x < 256 so only w = -128 (exact anyway: 10000000)
    assert np.array_equal(full(xs, ws), xs * ws)


def test_mitchell_known_values():
    m = get_multiplier("mitchell")
    assert int(m(3, 3)) == 8  # Mitchell's classic 11.1% error case
    assert int(m(2, 8)) == 16  # powers of two are exact
    assert int(m(0, 77)) == 0
    assert int(m(5, -6)) == -28  # 4(1+1/4) * 4(1+1/2): 16 * (1 + 3/4) = 28
    assert int(m(7, 7)) == 2 * (3 * 4 + 3 * 4)  # m1 + m2 = 1.5 >= 1: 2^(2+2+1) * 0.75 = 24
    # Mitchell never overestimates
    lut = m.lut()
    exact = get_multiplier("exact").lut()
    assert (np.abs(lut) <= np.abs(exact)).all()


@pytest.mark.parametrize("spec", default_family(8))
def test_separable_transforms_reproduce_products(spec):
    m = get_multiplier(spec)
    if not m.separable:
        pytest.skip("not separable")
    xs, ws = m.x_format.values()[:, None], m.w_format.values()[None, :]
    assert np.array_equal(m.x_transform(xs) * m.w_transform(ws), m.lut())


@pytest.mark.parametrize("bad", ["roup-p4r0", "roup-p0r8", "roup-1-2", "booth", "ppp-j6k2", "drum-k2", "trunc-k0", ""])
def test_bad_specs(bad):
    with pytest.raises(SpecError, match="valid forms"):
        get_multiplier(bad)


def test_operand_range_checked():
    with pytest.raises(ValueError, match="outside u8"):
        get_multiplier("exact")(256, 1)
    with pytest.raises(ValueError, match="outside s8"):
        get_multiplier("exact")(1, 128)


def test_error_metrics_definitions_by_hand():
    from maxdnn.multipliers.metrics import error_metrics

    m = get_multiplier("roup-p0r1", bits=2)  # x in 0..3, w in -2..1
    xs = np.arange(4)[:, None]
    ws = np.arange(-2, 2)[None, :]
    approx = [[naive_round(x, 1) * w for w in range(-2, 2)] for x in range(4)]
    exact = xs * ws
    e = np.array(approx) - exact
    r = error_metrics(m)
    assert r.error_rate == pytest.approx((e != 0).mean())
    assert r.bias == pytest.approx(e.mean())
    assert r.med == pytest.approx(np.abs(e).mean())
    assert r.nmed == pytest.approx(np.abs(e).mean() / 6)  # max |x w| = 3 * 2
    nz = exact != 0
    assert r.mred == pytest.approx((np.abs(e)[nz] / np.abs(exact[nz])).mean())
    assert r.wce == np.abs(e).max()
    # histogram weighting: all weight on x = 1 (rounds to 2) and w = 1
    hx = np.array([0, 1, 0, 0])
    hw = np.array([0, 0, 0, 5])
    rh = error_metrics(m, x_hist=hx, w_hist=hw)
    assert (rh.error_rate, rh.bias, rh.med, rh.mred, rh.wce) == (1.0, 1.0, 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="bins"):
        error_metrics(m, x_hist=np.ones(3))


def test_error_metrics_sampled_at_16_bits():
    from maxdnn.multipliers.metrics import error_metrics

    r = error_metrics(get_multiplier("roup-p1r1", 16), samples=10_000)
    assert r.samples == 10_000 and 0 < r.error_rate <= 1
    assert error_metrics(get_multiplier("exact", 16), samples=1000).med == 0
