"""Weight scales fitted to the multipliers' weight grids: the chosen scale is the best candidate by a plain
recomputation, the real-valued layer is kept, the graph stays exact in both engines, and fine-tuning uses it."""

import numpy as np
import pytest
import torch

from maxdnn.compensate.finetune import FinetuneError, finetune
from maxdnn.compensate.weight_scales import FIT_FACTORS, MIN_ERROR_RATIO, fit_weight_scales
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.engine.reference import reference_forward
from maxdnn.multipliers.models import get_multiplier


def _grid_error(wr, scale, specs_row):
    """Plain recomputation: each weight rounded half up to the int8 grid of ``scale``, clamped, through its own
    kernel's multiplier's weight transform, squared error summed."""
    total = 0.0
    for c in range(wr.shape[0]):
        m = get_multiplier(specs_row[c])
        for v in wr[c].ravel():
            wi = min(max(int(np.floor(v / scale + 0.5)), -127), 127)
            total += (int(m.w_transform(np.array([wi]))[0]) * scale - v) ** 2
    return total


def _kernel_mix(q, rng, specs):
    return Assignment(specs, {n: rng.integers(0, len(specs), l.weight.shape[:2]) for n, l in q.layers.items()})


def test_fitted_scales_are_the_best_candidates_and_keep_the_layer(qnet, rng):
    specs = ["exact", "roup-p3r0", "roup-p3r5", "roup-p2r1"]
    a = _kernel_mix(qnet, rng, specs)
    g, moved = fit_weight_scales(qnet, a)
    assert moved and sum(moved.values()) > 0
    assert g.meta["weight_scales"]["fitted"] == moved
    name = max(moved, key=moved.get)
    old, new = qnet.layers[name], g.layers[name]
    wr = old.weight * old.w_scale[:, None, None, None]
    amap = a.bind(qnet).maps[name]
    checked = 0
    for f in range(0, len(wr), max(len(wr) // 6, 1)):  # a few filters, recomputed the slow way
        row = [specs[i] for i in amap[f]]
        keep = _grid_error(wr[f], old.w_scale[f], row)
        errs = {k: _grid_error(wr[f], old.w_scale[f] * k, row) for k in FIT_FACTORS}
        best = min(errs.values())
        if new.w_scale[f] != old.w_scale[f]:
            assert best <= MIN_ERROR_RATIO * keep
            assert _grid_error(wr[f], new.w_scale[f], row) == pytest.approx(best, rel=1e-9)
            checked += 1
        else:
            assert best > MIN_ERROR_RATIO * keep or best == keep
    assert checked
    # the real-valued layer is the same: bias within half a new accumulator unit, the output scale kept
    assert np.all(np.abs(new.bias * new.acc_scale - old.bias * old.acc_scale) <= new.acc_scale / 2 + 1e-12)
    assert new.out == old.out and new.float_requant_exact()
    x = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    assert np.array_equal(ApproxNetwork(g, a).logits(torch.as_tensor(x)).numpy(),
                          reference_forward(g, x, a.reference_products(g)))


@pytest.mark.parametrize("specs", [["exact"], ["roup-p1r3", "roup-p0r7"], ["mitchell", "roup-p3r0"]])
def test_nothing_moves_without_a_coarse_weight_grid(qnet, rng, specs):
    """Exact and mildly perforated weights keep their scales; a layer with a lookup-table multiplier too."""
    a = _kernel_mix(qnet, rng, specs)
    g, moved = fit_weight_scales(qnet, a)
    assert moved == {} and g is qnet  # with mitchell every layer mixes in a table multiplier


def test_coarse_grid_moves_scales_and_brings_the_weights_closer(qnet):
    """roup-p3r0 everywhere: many filters get a smaller scale, and each moved layer's transformed weights are
    closer to its real weights."""
    a = Assignment.uniform(qnet, "roup-p3r0")
    g, moved = fit_weight_scales(qnet, a)
    filters = sum(l.weight.shape[0] for l in qnet.layers.values())
    assert sum(moved.values()) > filters // 3
    m = get_multiplier("roup-p3r0")
    for name in moved:
        old, new = qnet.layers[name], g.layers[name]
        wr = old.weight * old.w_scale[:, None, None, None]
        e_old = ((m.w_transform(old.weight) * old.w_scale[:, None, None, None] - wr) ** 2).sum()
        e_new = ((m.w_transform(new.weight) * new.w_scale[:, None, None, None] - wr) ** 2).sum()
        assert e_new < e_old


def test_finetune_fits_scales_and_refuses_a_state_made_without(qnet, lossless_test, tmp_path):
    from conftest import LOSSLESS_ZIP, need
    from maxdnn.data import load_cifar10, validation_split

    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    tr, _ = validation_split(len(train), 5000, seed=0)
    a = Assignment.uniform(qnet, "roup-p3r0")
    out = tmp_path / "ft.npz"
    logs = []
    g = finetune(qnet, a, train.images[tr[:64]], train.labels[tr[:64]], out, epochs=1, log=logs.append,
                 progress=False)
    assert any("weight scales fitted" in m for m in logs)
    fitted, _ = fit_weight_scales(qnet, a)
    assert all(np.array_equal(g.layers[n].w_scale, fitted.layers[n].w_scale) for n in qnet.layers)
    assert g.meta["finetune"]["fit_scales"] is True
    # an interrupted run resumes only with the same setting
    out2 = tmp_path / "ft2.npz"
    torch.save({"twin": {}, "opt": {}, "sched": {}, "gen": None, "epoch": 1, "epochs": 2, "seed": 0, "images": 64,
                "fit_scales": False}, tmp_path / "ft2.npz.state")
    with pytest.raises(FinetuneError, match="fit_scales=False"):
        finetune(qnet, a, train.images[tr[:64]], train.labels[tr[:64]], out2, epochs=2, log=lambda m: None,
                 progress=False)
    kept = finetune(qnet, a, train.images[tr[:64]], train.labels[tr[:64]], tmp_path / "ft3.npz", epochs=1,
                    log=lambda m: None, progress=False, fit_scales=False)
    assert all(np.array_equal(kept.layers[n].w_scale, qnet.layers[n].w_scale) for n in qnet.layers)
