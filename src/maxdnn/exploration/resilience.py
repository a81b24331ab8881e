"""Resilience: how much each layer, filter and kernel of a network minds an approximate multiplier.

Cached in RUN_DIR/resilience.npz (and, with several workers, in the storage):
- direct, per layer and configuration: the change of validation loss and
  accuracy when that layer alone uses the configuration;
- proxy, per filter and per kernel: a first-order Taylor estimate of the loss
  change caused by the product errors,
      S = mean_n | sum_{outputs} dL/dy * (delta accumulator) * s_in * s_w[f] |,
  with dL/dy the gradient of the float model's loss at the layer's
  pre-activation output y and the accumulator change computed exactly from
  the integer operands (R_R(x) R_2P(w) - x w) over the kernel's (or the
  filter's) products; when the exploration compensates, minus the mean of
  that change, which bias correction removes (what is tolerable changes
  once the mean error is gone). Non-separable multipliers (lookup tables) sum the
  gradient times each product's exact error (a compiled gather).
- validation: the proxy against direct measurements (every layer; bins of
  filters and of kernels sorted by proxy, each bin approximated alone) as
  Spearman rank correlations.

The approaches approximate units least sensitive first, in the proxy's order.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.engine._lut_kernel import lut_error_taps
from maxdnn.engine.approx import Assignment
from maxdnn.atomic import atomic_path
from maxdnn.ir.graph import QuantizedGraph
from maxdnn.multipliers.models import get_multiplier


def resilience(explorer) -> dict:
    """The resilience arrays (module docstring): RUN_DIR/resilience.npz; with several workers, computed once
    (measurements shared unit by unit) and kept in the storage, from which every worker writes its copy."""
    path = explorer.run_dir / "resilience.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    mine = measure_resilience(explorer)  # every worker takes part: the measurements are units of their own
    stored = explorer.units.map(["resilience"], lambda _: {k: v.tolist() for k, v in mine.items()})
    res = {k: np.asarray(v, dtype=np.float64) for k, v in stored["resilience"].items()}
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **res)
    return res

def measure_resilience(explorer) -> dict:
    """The resilience arrays, measured: direct per layer and configuration (each measurement a unit), the
    proxy per filter and kernel, and the proxy's validation."""
    t0 = time.time()
    layers = list(explorer.q.layers)
    specs = explorer.library
    res: dict[str, np.ndarray] = {}
    exact = explorer.evaluate(Assignment.uniform(explorer.q, "exact"))
    direct_loss = np.zeros((len(layers), len(specs)))
    direct_acc = np.zeros((len(layers), len(specs)))
    pairs = {f"resilience|{layers[li]}|{specs[si]}": (li, si) for li in range(len(layers)) for si in range(len(specs))}

    def one_layer(key):  # one layer alone with one configuration
        li, si = pairs[key]
        return Assignment(["exact", specs[si]], {n: np.full(explorer.q.layers[n].weight.shape[:2], int(n == layers[li]))
                                                 for n in layers})

    def measure(keys):  # a layer's configurations in one pass: the exact layers before it run once
        return [[r["val_loss"], r["val_accuracy"]] for r in explorer.evaluate_many([one_layer(k) for k in keys])]

    # each measurement is kept in the storage as it completes, and shared with other workers
    with explorer.progress_bar("resilience: layer x configuration", total=len(pairs)) as bar:
        measured = explorer.units.map(list(pairs), measure, bar, batch=len(specs))
    for key, (li, si) in pairs.items():
        direct_loss[li, si] = measured[key][0] - exact["val_loss"]
        direct_acc[li, si] = exact["val_accuracy"] - measured[key][1]
    res["direct_loss"], res["direct_acc"] = direct_loss, direct_acc
    proxy = taylor_proxy(explorer.q, explorer.val.images[: explorer.budget.proxy_images],
                         explorer.val.labels[: explorer.budget.proxy_images], specs,
                         compensated=explorer.bias_correction)
    for name in layers:
        res[f"kernel/{name}"] = proxy[name]["kernel"]  # [S, F, C]
        res[f"filter/{name}"] = proxy[name]["filter"]  # [S, F]
    res["layer_proxy"] = np.array([[proxy[n]["layer"][s] for s in range(len(specs))] for n in layers])
    res["validation"] = validate_proxy(explorer, res, exact)
    res["seconds"] = np.array(time.time() - t0)
    return res

def validate_proxy(explorer, res: dict, exact: dict) -> np.ndarray:
    """Spearman rho of proxy vs direct loss change: [layers, filter bins, kernel bins].

    Layers: proxy and direct change of every layer for the library's middle
    configuration. Filters (of the hidden layer with the most
    multiplications, besides the kernel layer) and kernels (of the hidden layer with the most kernels): the
    units are sorted by proxy and cut into ``validation_sample`` equal bins;
    each bin alone is approximated and its direct loss change measured
    (single units change the loss by less than the measurement's noise).
    """
    layers = list(explorer.q.layers)
    specs = explorer.library
    mid = len(specs) // 2
    rho_layer = _spearman(res["layer_proxy"][:, mid], res["direct_loss"][:, mid])
    k = explorer.budget.validation_sample
    fl, kl = proxy_validation_layers(explorer.q)
    jobs = []
    for kind, name in (("filter", fl), ("kernel", kl)):
        proxy = res[f"{kind}/{name}"][mid].reshape(-1)
        order = np.argsort(proxy, kind="stable")
        for b in np.array_split(order, min(k, len(order))):
            jobs.append((kind, name, b, float(proxy[b].sum())))
    direct = {"filter": [], "kernel": []}
    proxies = {"filter": [], "kernel": []}
    by_key = {f"bin|{kind}|{name}|{specs[mid]}|"
              f"{hashlib.sha256(','.join(map(str, units)).encode()).hexdigest()[:16]}": (kind, name, units)
              for kind, name, units, _ in jobs}

    def one_bin(key):  # one bin of units alone with the middle configuration
        kind, name, units = by_key[key]
        m = np.zeros(explorer.q.layers[name].weight.shape[:2], dtype=np.int64)
        if kind == "filter":
            m[units] = 1
        else:
            m.flat[units] = 1
        return Assignment(["exact", specs[mid]], {name: m})

    def measure(keys):
        return [r["val_loss"] for r in explorer.evaluate_many([one_bin(k) for k in keys])]

    with explorer.progress_bar("resilience: proxy validation", total=len(by_key)) as bar:
        measured = explorer.units.map(list(by_key), measure, bar, batch=explorer.eval_batch)
    for key, (kind, _, _), (_, _, _, psum) in zip(by_key, by_key.values(), jobs):
        direct[kind].append(measured[key] - exact["val_loss"])
        proxies[kind].append(psum)
    rho_f = _spearman(proxies["filter"], direct["filter"])
    rho_k = _spearman(proxies["kernel"], direct["kernel"])
    explorer.log(f"proxy vs direct (Spearman, {specs[mid]}): {len(layers)} layers {rho_layer:.2f}, "
             f"{len(direct['filter'])} filter bins of {fl} {rho_f:.2f}, {len(direct['kernel'])} kernel bins of {kl} {rho_k:.2f}")
    return np.array([rho_layer, rho_f, rho_k])


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def proxy_validation_layers(q: QuantizedGraph) -> tuple[str, str]:
    """(filter layer, kernel layer) whose bins validate the proxy: the hidden layer with the most
    kernels, and the hidden layer with the most multiplications besides it."""
    from maxdnn.ir.graph import multiplication_counts

    counts = multiplication_counts(q)
    hidden = [n for n in q.layers if n != q.output.name] or list(q.layers)
    kl = max(hidden, key=lambda n: (int(np.prod(q.layers[n].weight.shape[:2])), -hidden.index(n)))
    rest = [n for n in hidden if n != kl] or hidden
    fl = max(rest, key=lambda n: (counts[n] * int(np.prod(q.layers[n].weight.shape[:2])), -rest.index(n)))
    return fl, kl


def taylor_proxy(q: QuantizedGraph, images: np.ndarray, labels: np.ndarray, specs: list[str],
                 compensated: bool = False) -> dict:
    """First-order Taylor sensitivity of every layer, filter and kernel to each spec (see module docstring).

    The gradient is that of the loss of the graph's real-valued twin (``QuantizedGraph.float_forward``)
    at each multiplying layer's real pre-activation output. ``compensated``: the error a unit leaves once
    bias correction has removed its mean (over the images and output positions), i.e. each kernel's
    accumulator change minus its mean, for operand-separable multipliers (lookup tables keep the plain
    error)."""
    outs: dict = {}
    x = torch.as_tensor(images)
    logits = q.float_forward(x, outputs=outs)
    loss = F.cross_entropy(logits, torch.as_tensor(labels), reduction="sum")
    loss.backward()
    grads = {n: o.grad.detach().double() for n, o in outs.items()}
    taps: dict = {}
    q.forward_int(x, taps=taps)
    result = {}
    for name, layer in q.layers.items():
        mults = [get_multiplier(s, x_signed=layer.x_signed) for s in specs]
        g = grads[name]
        n, f = g.shape[:2]
        groups = layer.groups
        g = g.reshape(n, groups, f // groups, -1)  # [N, G, F/G, L]
        xin = taps[name].double()
        cg, kh, kw = layer.weight.shape[1:]
        w = torch.as_tensor(layer.weight, dtype=torch.float64).reshape(f, -1)  # [F, C/G*K]
        scale = torch.as_tensor(layer.acc_scale)[None, :, None]  # [1, F, 1]

        per_group = f // groups
        g_sum = g.reshape(n, f, -1).sum(2)  # [N, F]: the gradient summed over output positions

        def a_for(xt):
            cols = F.unfold(F.pad(xt, layer.pads), (kh, kw), stride=layer.stride)  # [N, C*K, L]
            cols = cols.reshape(n, groups, cg * kh * kw, -1)
            mean = cols.mean((0, 3)).repeat_interleave(per_group, 0)  # [F, C/G*K]: each filter's group
            return torch.einsum("ngfl,ngkl->ngfk", g, cols).reshape(n, f, -1), mean  # [N, F, C/G*K]

        a0, mean0 = a_for(xin)
        a0 = a0 * w[None]
        by_r = {}
        kern, filt, lay = [], [], []
        lut_cols = None
        for m in mults:
            if not m.separable:  # lookup table: the gradient times each product's exact error, gathered
                if lut_cols is None:
                    idx = F.pad(xin - m.x_format.min + 1, layer.pads)  # row 0 of the error table: padding
                    lut_cols = F.unfold(idx, (kh, kw), stride=layer.stride).round().to(torch.int32)
                    lut_cols = lut_cols.reshape(n, groups, cg * kh * kw, -1).numpy()
                    lut_g = np.ascontiguousarray(g.reshape(n, f, -1).numpy())
                    widx = (layer.weight.reshape(f, -1) - m.w_format.min).astype(np.int64)
                xs, ws = m.x_format.values(), m.w_format.values()
                err = np.zeros((len(xs) + 1, len(ws)))
                err[1:] = m.lut() - xs[:, None] * ws[None, :]
                d = torch.from_numpy(lut_error_taps(lut_g, lut_cols, widx, err)) * scale
            else:
                key = m.x_transform(np.arange(-128, 256)).tobytes()
                if key not in by_r:
                    by_r[key] = a_for(torch.as_tensor(m.x_transform(xin.long().numpy()), dtype=torch.float64))
                wt = torch.as_tensor(m.w_transform(layer.weight).reshape(f, -1), dtype=torch.float64)
                a_r, mean_r = by_r[key]
                d = a_r * wt[None] - a0  # [N, F, C/G*K]
                if compensated:  # minus the mean error of each product position, which the bias takes
                    d = d - (wt * mean_r - w * mean0)[None] * g_sum[:, :, None]
                d = d * scale
            dk = d.reshape(n, f, cg, kh * kw).sum(3)  # [N, F, C/G]
            kern.append(dk.abs().mean(0).numpy())
            filt.append(dk.sum(2).abs().mean(0).numpy())
            lay.append(float(dk.sum((1, 2)).abs().mean()))
        result[name] = {"kernel": np.stack(kern), "filter": np.stack(filt), "layer": lay}
    return result
