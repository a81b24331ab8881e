"""Bias correction: the mean accumulator error of an assignment, removed through the integer bias."""

import numpy as np
import torch
from typer.testing import CliRunner

from conftest import LOSSLESS_ZIP, need
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.compensate.bias_correction import bias_corrected, correction_images, mean_accumulator_error
from maxdnn.cli import app
from maxdnn.data import load_cifar10, validation_split
from maxdnn.engine.reference import reference_forward


def test_all_exact_network_is_never_changed(qnet, lossless_test):
    q2 = bias_corrected(qnet, Assignment.uniform(qnet, "exact"), lossless_test.images[:8])
    for name, layer in qnet.layers.items():
        assert np.array_equal(q2.layers[name].bias, layer.bias)
    # roup-p0r0 is the exact product under another name: also nothing to correct
    q3 = bias_corrected(qnet, Assignment.uniform(qnet, "roup-p0r0"), lossless_test.images[:8])
    assert all(np.array_equal(q3.layers[n].bias, l.bias) for n, l in qnet.layers.items())


def test_first_layer_error_cancelled_and_original_untouched(qnet, lossless_test):
    imgs = lossless_test.images[:16]
    a = Assignment.uniform(qnet, "trunc-k8")  # always rounds magnitudes down: a strong mean error
    before = mean_accumulator_error(qnet, a, imgs)
    first = next(iter(qnet.layers))
    assert np.abs(before[first]).max() > 10
    biases = {n: l.bias.copy() for n, l in qnet.layers.items()}
    q2 = bias_corrected(qnet, a, imgs)
    delta = q2.layers[first].bias - qnet.layers[first].bias
    # the first layer's operands do not depend on any correction: its mean error, bias included, is rounded away
    assert np.abs(before[first] + delta).max() <= 0.5
    after = mean_accumulator_error(q2, a, imgs)  # accumulators (bias excluded) on the same operands are unchanged
    np.testing.assert_allclose(after[first], before[first])
    assert all(np.array_equal(qnet.layers[n].bias, b) for n, b in biases.items())


def test_corrected_graph_engines_agree_bit_exactly(qnet, lossless_test, rng):
    specs = ["exact", "roup-p2r3", "drum-k4"]
    maps = {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in qnet.layers.items()}
    a = Assignment(specs, maps)
    q2 = bias_corrected(qnet, a, lossless_test.images[:8])
    assert any(not np.array_equal(q2.layers[n].bias, l.bias) for n, l in qnet.layers.items())
    x = lossless_test.images[8:10]
    got = ApproxNetwork(q2, a).logits(torch.as_tensor(x)).numpy()
    assert np.array_equal(got, reference_forward(q2, x, a.reference_products(q2)))


def test_correction_recovers_accuracy_of_a_biased_assignment(qnet, lossless_test):
    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    a = Assignment.uniform(qnet, "roup-p2r4")  # every layer: perforation and rounding bias add up
    test = lossless_test.images[:300], lossless_test.labels[:300]
    plain = (ApproxNetwork(qnet, a).predict(test[0]) == test[1]).mean()
    fixed = (ApproxNetwork(bias_corrected(qnet, a, correction_images(train.images)), a).predict(test[0]) == test[1]).mean()
    exact = (qnet.predict(test[0]) == test[1]).mean()
    assert fixed > plain + 0.03 and fixed <= exact + 0.02, (plain, fixed, exact)


def test_correction_images_avoid_the_validation_holdout():
    train = np.arange(4000)[:, None]
    picked = correction_images(train, 256)[:, 0]
    _, val = validation_split(4000, 5000, seed=0)
    assert len(picked) == 256 and not set(picked) & set(val)


def test_cli_bias_correction_needs_an_assignment():
    r = CliRunner().invoke(app, ["evaluate", "--data", str(need(LOSSLESS_ZIP)), "--bias-correction", "--limit", "2"])
    assert r.exit_code == 2 and "--bias-correction needs --assign" in r.output
