"""Per-image correctness and paired accuracy comparisons of an exploration.

A measurement keeps which images a network classified correctly (packed bits,
base64), so that any two networks measured on the same images can be
compared image by image. The paired loss of a candidate against a reference
is ``100 * mean(ref_correct - cand_correct)`` (accuracy points) and its
standard error ``100 * std(d) / sqrt(n)``: far tighter than the difference of
two independent accuracies, since the two networks agree on most images.

Example::

    e = pack(np.array([True, False, True]))
    paired_loss(e, pack(np.array([True, False, False])))  # (33.3..., 33.3...)
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from maxdnn.engine.approx import logits_shared


def pack(correct: np.ndarray) -> dict:
    """A measurement entry: {"images", "accuracy", "bits"} of a boolean vector of correct classifications."""
    correct = np.asarray(correct, dtype=bool)
    return {"images": int(len(correct)), "accuracy": float(correct.mean()) if len(correct) else 0.0,
            "bits": base64.b64encode(np.packbits(correct).tobytes()).decode()}


def unpack(entry: dict) -> np.ndarray:
    """The boolean vector of ``pack``."""
    raw = np.frombuffer(base64.b64decode(entry["bits"]), dtype=np.uint8)
    return np.unpackbits(raw)[: entry["images"]].astype(bool)


def paired_loss(reference: dict, candidate: dict) -> tuple[float, float]:
    """(loss, standard error) in accuracy points of ``candidate`` against ``reference`` on the same images."""
    r, c = unpack(reference), unpack(candidate)
    if len(r) != len(c):
        raise ValueError(f"paired comparison of {len(r)} and {len(c)} images")
    d = r.astype(np.float64) - c.astype(np.float64)
    return 100 * float(d.mean()), 100 * float(d.std() / np.sqrt(len(d)))


def correctness(nets: list, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> list[dict]:
    """``pack``ed correctness of each network (``ApproxNetwork``) on the images, in one pass (networks on one
    graph share their common layers)."""
    out = [np.zeros(len(images), dtype=bool) for _ in nets]
    for i in range(0, len(images) if nets else 0, batch):
        y = torch.as_tensor(labels[i:i + batch])
        for k, logits in enumerate(logits_shared(nets, torch.as_tensor(images[i:i + batch]))):
            out[k][i:i + batch] = (logits.argmax(1) == y).numpy()
    return [pack(c) for c in out]
