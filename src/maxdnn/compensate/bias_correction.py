"""Bias correction: remove the mean accumulator error an assignment introduces (no retraining, no hardware).

For every multiplying layer and output channel f, the mean over calibration
images and output positions of (approximate accumulator - exact accumulator),
both computed on the operands the approximate network really feeds that
layer, is subtracted, rounded half away from zero, from the layer's integer
bias. The hardware is unchanged: the bias is a constant the accelerator adds
anyway. An all-exact assignment has zero error everywhere and is left as is.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from maxdnn.errors import MaxdnnError
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.data import training_sample
from maxdnn.ir.graph import QuantizedGraph

INT32_MAX = (1 << 31) - 1
CORRECTION_IMAGES = 256


def correction_images(train_images: np.ndarray, n: int = CORRECTION_IMAGES, seed: int = 0) -> np.ndarray:
    """A seeded sample of training images outside the validation hold-out (search data stays unseen)."""
    return train_images[training_sample(len(train_images), n, seed)]


class BiasCorrectionError(MaxdnnError, ValueError):
    pass


def mean_accumulator_error(q: QuantizedGraph, assignment: Assignment, images: np.ndarray,
                           batch_size: int = 100) -> dict[str, np.ndarray]:
    """Per layer, the mean accumulator error per output channel (float64 [F]) on ``images``."""
    net = ApproxNetwork(q, assignment)
    sums = {n: torch.zeros(l.weight.shape[0], dtype=torch.float64) for n, l in q.layers.items()}
    count = dict.fromkeys(q.layers, 0)
    approximate = {n: bool(np.any(np.asarray(assignment.specs)[assignment.maps[n]] != "exact")) for n in q.layers}
    if not any(approximate.values()):  # nothing to measure: no forward pass
        return {n: np.zeros(len(s)) for n, s in sums.items()}

    def conv(name, x):
        acc = net.conv(name, x)
        if approximate[name]:
            d = acc.to(torch.float64) - q.exact_conv(name, x).to(torch.float64)  # [N, F, H, W]
            sums[name] += d.sum((0, 2, 3))
            count[name] += d.shape[0] * d.shape[2] * d.shape[3]
        return acc

    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            q.forward_int(torch.as_tensor(images[i:i + batch_size]), conv)
    return {n: (sums[n] / count[n]).numpy() if count[n] else np.zeros(len(sums[n])) for n in q.layers}


def bias_corrected(q: QuantizedGraph, assignment: Assignment, images: np.ndarray) -> QuantizedGraph:
    """A copy of ``q`` whose biases cancel the assignment's mean accumulator error on ``images``."""
    assignment = assignment.bind(q)
    errors = mean_accumulator_error(q, assignment, images)
    out = dataclasses.replace(q, nodes=[copy.copy(n) for n in q.nodes])  # no cached state of the original
    layers = out.layers
    for name, err in errors.items():
        if not err.any():
            continue
        layer = layers[name]
        step = np.sign(err) * np.floor(np.abs(err) + 0.5)
        bias = layer.bias.astype(np.int64) - step.astype(np.int64)
        if np.abs(bias).max() > INT32_MAX:
            raise BiasCorrectionError(f"layer {name}: the corrected bias leaves the int32 range")
        layer.bias = bias
        if not layer.float_requant_exact():
            raise BiasCorrectionError(f"layer {name}: the corrected bias breaks the exact float64 requantization bound")
    return out
