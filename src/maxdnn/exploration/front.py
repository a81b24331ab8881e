"""Validation-Pareto fronts of explored points, and the points read from them.

A point is a dict with at least ``approach``, ``genome``, ``val_accuracy`` and
``energy_gain`` (``RunStorage.points``). The report's table reads each front at
``THRESHOLDS``; the test-set stage measures the table's points first, then
points spread evenly in gain.
"""

from __future__ import annotations

import hashlib


APPROACHES = ("layer", "filter", "kernel", "alwann")  # the exploration's approaches, in report order
THRESHOLDS = (0.5, 1.0, 2.0, 4.0)  # validation accuracy losses (points) the report's table is read at


def point_key(p: dict) -> str:
    return hashlib.sha256(f"{p['approach']}|{p['genome']}".encode()).hexdigest()[:16]


def pareto_front(points: list[dict], acc="val_accuracy", gain="energy_gain") -> list[dict]:
    """Points not dominated in (accuracy, energy gain), both maximised; sorted by gain."""
    front = []
    for p in points:
        if not any(q[acc] >= p[acc] and q[gain] >= p[gain] and (q[acc] > p[acc] or q[gain] > p[gain]) for q in points):
            front.append(p)
    uniq = {}
    for p in front:
        uniq.setdefault((p[acc], p[gain]), p)
    return sorted(uniq.values(), key=lambda p: p[gain])


def largest_gain_within(front: list[dict], loss_pts, threshold: float) -> dict | None:
    """The point of ``front`` with the largest energy gain among those whose accuracy loss ``loss_pts(p)``
    (points) is at most ``threshold``; None when there is none."""
    ok = [p for p in front if loss_pts(p) <= threshold + 1e-9]
    return max(ok, key=lambda p: p["energy_gain"]) if ok else None


def test_selection(front: list[dict], base_val_accuracy: float, cap: int) -> list[dict]:
    """The front points measured on the test set: all when ``cap`` is 0 or the front is no larger; else the
    points the report's table cites (largest gain within each of ``THRESHOLDS`` validation points), then
    points spread in gain (``spread_in_gain``), up to ``cap``."""
    if cap <= 0 or len(front) <= cap:
        return list(front)
    cited = []
    for t in THRESHOLDS:
        best = largest_gain_within(front, lambda p: 100 * (base_val_accuracy - p["val_accuracy"]), t)
        if best is not None:
            cited.append(best)
    return spread_in_gain(front, cap, cited)


def spread_in_gain(front: list[dict], k: int, chosen: list[dict] = ()) -> list[dict]:
    """``k`` points of ``front`` (sorted by gain), in its order: every ``chosen`` point, then its two ends
    (largest gain first), then again and again the point farthest in gain from all picked ones (ties: the
    larger gain), which halves the largest gap each time. All of ``front`` when ``k`` reaches its size."""
    if k >= len(front):
        return list(front)
    gains = [p["energy_gain"] for p in front]
    picks = list(dict.fromkeys(i for i, p in enumerate(front) if any(p is c for c in chosen)))
    for i in (len(front) - 1, 0):
        if len(picks) < k and i not in picks:
            picks.append(i)
    while len(picks) < k:
        free = [i for i in range(len(front)) if i not in picks]
        picks.append(max(free, key=lambda i: (min(abs(gains[i] - gains[j]) for j in picks), i)))
    return [front[i] for i in sorted(picks)]
