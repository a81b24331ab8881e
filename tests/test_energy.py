import numpy as np

from maxdnn.approx import Assignment, layer_assignment
from maxdnn.energy import multiplication_counts, network_energy, provisional_energy
from maxdnn.reference import reference_conv


def test_counts_match_products_formed(qnet):
    counts = multiplication_counts(qnet)
    for name, layer in qnet.layers.items():
        one = np.ones((1, 1) + layer.in_hw, dtype=np.int64)
        w = np.ones((1, 1) + layer.weight.shape[2:], dtype=np.int64)
        formed = []

        def counting(x, wv):
            formed.append(np.size(x))
            return x * wv

        total = reference_conv(one, w, layer.stride, layer.pads, lambda f, c: counting).sum()
        assert counts[name] == total, name  # every non-padding product of all-ones counts once


def test_energy_gain(qnet):
    e0 = network_energy(qnet, Assignment.uniform(qnet, "exact"))
    assert e0["energy_gain"] == 0 and e0["energy"] == e0["energy_exact"]
    assert e0["multiplications"] > 10_000_000  # ResNet-8 on 32x32: ~12.5M MACs per image
    a = layer_assignment(qnet, {"s3.conv2": "roup-p1r2"})
    e1 = network_energy(qnet, a)
    share = e1["per_layer"]["s3.conv2"]["exact"] / e1["energy_exact"]
    rel = e1["per_layer"]["s3.conv2"]["energy"] / e1["per_layer"]["s3.conv2"]["exact"]
    assert np.isclose(e1["energy_gain"], share * (1 - rel))
    assert 0 < rel < 1


def test_provisional_ordering():
    assert provisional_energy("exact") == 1.0
    assert provisional_energy("roup-p0r0") == 1.0
    assert provisional_energy("roup-p2r0") < provisional_energy("roup-p1r0") < 1
