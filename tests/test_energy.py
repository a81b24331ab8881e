import numpy as np

from maxdnn.engine.approx import Assignment, layer_assignment
from maxdnn.energy import multiplication_counts, network_energy, provisional_energy
from maxdnn.engine.reference import reference_conv


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


def test_per_layer_energy_by_hand(qnet, tmp_path):
    """Each layer at its own energy: the network sums them, the exact network too."""
    import json

    import pytest

    from maxdnn.energy import EnergyModelError, energy_table, with_per_layer

    specs = ["exact", "roup-p1r2"]
    per = {n: {"exact": 1.0, "roup-p1r2": 0.5} for n in qnet.layers}
    per["s3.conv2"] = {"exact": 2.0, "roup-p1r2": 0.25}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"per_layer": per}))
    table = with_per_layer(energy_table(specs), str(path), qnet)
    counts = multiplication_counts(qnet)
    mults = {n: counts[n] * int(np.prod(l.weight.shape[:2])) for n, l in qnet.layers.items()}
    e0 = network_energy(qnet, Assignment.uniform(qnet, "exact"), table)
    exact = sum(mults.values()) + mults["s3.conv2"]  # s3.conv2 costs two average multiplications each
    assert e0["energy"] == pytest.approx(exact) and e0["energy_gain"] == pytest.approx(0)
    e1 = network_energy(qnet, layer_assignment(qnet, {"s3.conv2": "roup-p1r2", "fc": "roup-p1r2"}), table)
    expect = exact - 2.0 * mults["s3.conv2"] + 0.25 * mults["s3.conv2"] - 0.5 * mults["fc"]
    assert e1["energy"] == pytest.approx(expect) and e1["energy_gain"] == pytest.approx(1 - expect / exact)
    assert "per layer" in e1["energy_source"]
    # the average table is unchanged by "average", and a table without a layer of the model is refused
    assert with_per_layer(energy_table(specs), "average", qnet).per_layer is None
    del per["fc"]
    path.write_text(json.dumps({"per_layer": per}))
    with pytest.raises(EnergyModelError, match="has no layer fc"):
        with_per_layer(energy_table(specs), str(path), qnet)
    with pytest.raises(EnergyModelError, match="expected average, per-layer"):
        with_per_layer(energy_table(specs), str(tmp_path / "none.json"), qnet)


def test_committed_per_layer_table_covers_the_committed_model(qnet):
    from maxdnn.energy import energy_table, with_per_layer
    from maxdnn.multipliers.models import roup_specs

    table = with_per_layer(energy_table(["exact"] + roup_specs(8)), "per-layer", qnet)
    assert set(table.per_layer) == set(qnet.layers)
    for n, e in table.per_layer.items():  # less approximation never costs more in P, at every R
        for r in range(8):
            assert e["exact"] >= e[f"roup-p1r{r}"] >= e[f"roup-p2r{r}"] >= e[f"roup-p3r{r}"], (n, r)
