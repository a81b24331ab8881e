"""Error metrics of an approximate multiplier against the exact product.

With e = approx(x, w) - x * w over operand pairs weighted by p(x, w):

- error_rate = sum p [e != 0]
- bias (mean error) = sum p e
- med (mean error distance) = sum p |e|
- nmed = med / max |x * w|, the largest exact magnitude over the operand ranges
- mred (mean relative error distance) = sum_{xw != 0} p |e| / |x w|  /  sum_{xw != 0} p
- wce (worst-case error) = max |e| over pairs with p > 0

Uniform metrics use p = 1 / (number of pairs), exhaustive over the ranges.
Given operand histograms (``x_hist``, ``w_hist`` as counts over the operand
ranges, assumed independent) or a joint histogram, p is their normalised product.
At widths whose pair count exceeds ``max_pairs`` the uniform metrics are taken
on a seeded random sample of pairs, and ``samples`` says how many.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from maxdnn.multipliers.models import Multiplier

EXHAUSTIVE_MAX_PAIRS = 1 << 20


@dataclass
class ErrorMetrics:
    spec: str
    bits: int
    error_rate: float
    bias: float
    med: float
    nmed: float
    mred: float
    wce: int
    samples: int | None = None  # None: exhaustive or histogram-weighted

    def as_dict(self) -> dict:
        return asdict(self)


def _metrics(mult: Multiplier, x, w, p, samples) -> ErrorMetrics:
    exact = x * w
    e = mult(x, w) - exact
    p = p / p.sum()
    ae = np.abs(e).astype(np.float64)
    nz = exact != 0
    max_exact = max(abs(mult.x_format.min), mult.x_format.max) * max(abs(mult.w_format.min), mult.w_format.max)
    pnz = p[nz].sum()
    return ErrorMetrics(
        spec=mult.spec,
        bits=mult.bits,
        error_rate=float(p[e != 0].sum()),
        bias=float((p * e).sum()),
        med=float((p * ae).sum()),
        nmed=float((p * ae).sum() / max_exact),
        mred=float((p[nz] * ae[nz] / np.abs(exact[nz])).sum() / pnz) if pnz > 0 else 0.0,
        wce=int(ae[p > 0].max()) if (p > 0).any() else 0,
        samples=samples,
    )


def error_metrics(
    mult: Multiplier,
    x_hist: np.ndarray | None = None,
    w_hist: np.ndarray | None = None,
    joint_hist: np.ndarray | None = None,
    max_pairs: int = EXHAUSTIVE_MAX_PAIRS,
    samples: int = 1 << 20,
    seed: int = 0,
) -> ErrorMetrics:
    """Metrics over the operand ranges: uniform, or weighted by histograms."""
    xs, ws = mult.x_format.values(), mult.w_format.values()
    if joint_hist is not None or x_hist is not None or w_hist is not None:
        if joint_hist is None:
            hx = np.ones(len(xs)) if x_hist is None else np.asarray(x_hist, dtype=np.float64)
            hw = np.ones(len(ws)) if w_hist is None else np.asarray(w_hist, dtype=np.float64)
            if hx.shape != (len(xs),) or hw.shape != (len(ws),):
                raise ValueError(f"histograms must have {len(xs)} (x) and {len(ws)} (w) bins")
            joint_hist = hx[:, None] * hw[None, :]
        joint_hist = np.asarray(joint_hist, dtype=np.float64)
        if joint_hist.shape != (len(xs), len(ws)):
            raise ValueError(f"joint histogram must have shape ({len(xs)}, {len(ws)})")
        if joint_hist.sum() <= 0 or (joint_hist < 0).any():
            raise ValueError("histogram must be non-negative with a positive total")
        return _metrics(mult, xs[:, None], ws[None, :], joint_hist, None)
    if len(xs) * len(ws) <= max_pairs:
        return _metrics(mult, xs[:, None], ws[None, :], np.ones((len(xs), len(ws))), None)
    rng = np.random.default_rng(seed)
    x = rng.integers(xs[0], xs[-1] + 1, samples)
    w = rng.integers(ws[0], ws[-1] + 1, samples)
    return _metrics(mult, x, w, np.ones(samples), samples)
