"""The report of an exploration run: points.csv, pareto.png/svg and report.md.

Every number in report.md is recomputed from points.csv (and run.json's
baseline): the table of the largest energy gain at a validation accuracy loss
of at most 0.5, 1, 2 and 4 points takes, per approach, the validation-Pareto
points (``on_front`` = 1) within the threshold and reports the one with the
largest energy gain, with its test-set accuracy loss.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .atomic import atomic_path, write_text

THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
Z95 = 1.959963984540054


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p measured on n trials (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def noise_pts(p: float, n: int) -> float:
    """Half-width (accuracy points) of the 95% binomial interval of an accuracy p on n images."""
    return 100 * Z95 * (p * (1 - p) / max(n, 1)) ** 0.5
COLUMNS = ["approach", "source", "trial", "on_front", "granularity", "summary", "val_accuracy", "val_images",
           "test_accuracy", "test_images", "test_ci95_low", "test_ci95_high", "energy", "energy_gain", "val_loss_pts",
           "test_loss_pts", "val_loss_below_noise"]


class ReportError(ValueError):
    pass


def write_points(run_dir: Path, explorer) -> Path:
    from .explore import pareto_front, point_key

    info = json.loads((run_dir / "run.json").read_text())
    base = info["baseline"]
    tests = json.loads((run_dir / "test_eval.json").read_text()) if (run_dir / "test_eval.json").exists() else {}
    rows = []
    pts = explorer.points()
    for ap in sorted({p["approach"] for p in pts}):
        mine = [p for p in pts if p["approach"] == ap]
        front = {(p["source"], p["trial"]) for p in pareto_front(mine)}
        for p in mine:
            t = tests.get(point_key(p), {})
            rows.append({
                "approach": ap, "source": p["source"], "trial": p["trial"],
                "on_front": int((p["source"], p["trial"]) in front),
                "granularity": p["granularity"], "summary": p["summary"],
                "val_accuracy": p["val_accuracy"], "val_images": base["val_images"],
                "test_accuracy": t.get("test_accuracy", ""), "test_images": t.get("test_images", ""),
                **(dict(zip(("test_ci95_low", "test_ci95_high"), wilson(t["test_accuracy"], t["test_images"])))
                   if t else {"test_ci95_low": "", "test_ci95_high": ""}),
                "val_loss_below_noise": int(abs(100 * (base["val_accuracy"] - p["val_accuracy"]))
                                            < noise_pts(base["val_accuracy"], base["val_images"])),
                "energy": p["energy"], "energy_gain": p["energy_gain"],
                "val_loss_pts": 100 * (base["val_accuracy"] - p["val_accuracy"]),
                "test_loss_pts": 100 * (base["test_accuracy"] - t["test_accuracy"]) if t else "",
            })
    path = run_dir / "points.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def read_points(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("val_accuracy", "energy", "energy_gain", "val_loss_pts"):
            r[k] = float(r[k])
        for k in ("test_accuracy", "test_loss_pts", "test_ci95_low", "test_ci95_high"):
            r[k] = float(r[k]) if r.get(k, "") != "" else None
        r["on_front"] = int(r["on_front"])
    return rows


def best_at_thresholds(rows: list[dict]) -> dict[str, dict[float, dict | None]]:
    out: dict[str, dict[float, dict | None]] = {}
    for ap in sorted({r["approach"] for r in rows}):
        front = [r for r in rows if r["approach"] == ap and r["on_front"]]
        out[ap] = {}
        for t in THRESHOLDS:
            ok = [r for r in front if r["val_loss_pts"] <= t + 1e-9]
            out[ap][t] = max(ok, key=lambda r: r["energy_gain"]) if ok else None
    return out


def plot(rows: list[dict], baseline_label: str, run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ap in sorted({r["approach"] for r in rows}):
        front = sorted([r for r in rows if r["approach"] == ap and r["on_front"] and r["test_loss_pts"] is not None],
                       key=lambda r: r["energy_gain"])
        if front:
            ax.plot([r["test_loss_pts"] for r in front], [100 * r["energy_gain"] for r in front], "o-", ms=4, label=ap)
    ax.plot([0], [0], "k*", ms=12, label=f"exact 8-bit ({baseline_label})")
    losses = [r["test_loss_pts"] for r in rows if r["on_front"] and r["test_loss_pts"] is not None]
    if losses and max(losses) > 10:
        ax.set_xlim(min(-0.5, min(losses) - 0.5), 10)  # the region of interest; the csv has every point
    ax.set_xlabel("test accuracy loss vs exact 8-bit (points; axis cut at 10)" if losses and max(losses) > 10
                  else "test accuracy loss vs exact 8-bit (points)")
    ax.set_ylabel("multiplication energy gain (%)")
    ax.set_title("MAx-DNN fronts (chosen on validation, measured on test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "svg"):
        with atomic_path(run_dir / f"pareto.{ext}", f".{ext}") as tmp:
            fig.savefig(tmp, dpi=130)
    plt.close(fig)


def write_report(run_dir: str | os.PathLike, explorer=None) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise ReportError(f"{run_dir}: not an exploration run (no run.json)")
    info = json.loads((run_dir / "run.json").read_text())
    if explorer is not None:
        write_points(run_dir, explorer)
    if not (run_dir / "points.csv").exists():
        raise ReportError(f"{run_dir}: no points.csv and no study to read")
    rows = read_points(run_dir / "points.csv")
    base = info["baseline"]
    plot(rows, f"test {100 * base['test_accuracy']:.2f}%", run_dir)
    best = best_at_thresholds(rows)
    lines = [
        "# MAx-DNN exploration report", "",
        f"- model: `{info['model']}`",
        f"- data: `{info['data']}`",
        f"- search data (validation): {info['validation']}",
        f"- final numbers (test): {info['test']}",
        f"- budget: {info['budget']['name']}; multiplier library: {', '.join(info['library'])}",
        f"- energy: {info['energy_source']}",
        f"- exact 8-bit baseline: validation {100 * base['val_accuracy']:.2f}% ({base['val_images']} images), "
        f"test {100 * base['test_accuracy']:.2f}% ({base['test_images']} images)",
    ]
    if "resilience" in info:
        lines.append(f"- resilience proxy vs direct (Spearman): {info['resilience']}")
    if not rows:
        lines.append("- **no evaluated points yet**: the tables below are empty")
    if "wall_seconds" in info:
        lines.append(f"- exploration wall time: {info['wall_seconds']:.0f} s")
    noise = noise_pts(base["val_accuracy"], base["val_images"])
    t_lo, t_hi = wilson(base["test_accuracy"], base["test_images"])
    lines += ["", "## Largest energy gain at a given accuracy loss", "",
              "Chosen on the validation split among each approach's validation-Pareto points; "
              "test loss is the same assignment measured on the test split. Loss in accuracy points. "
              f"Statistics: {base['val_images']} validation images measure an accuracy of "
              f"{100 * base['val_accuracy']:.1f}% to about +-{noise:.1f} points (95%), so validation losses below "
              f"that are marked `~`; the exact baseline's test accuracy has the 95% Wilson interval "
              f"{100 * t_lo:.2f}..{100 * t_hi:.2f}% ({base['test_images']} images), and points.csv gives each "
              "front point's interval.", "",
              "| approach | " + " | ".join(f"<= {t:g} pt: gain / val loss / test loss" for t in THRESHOLDS) + " |",
              "|---|" + "---|" * len(THRESHOLDS)]
    for ap, per in best.items():
        cells = []
        for t in THRESHOLDS:
            r = per[t]
            if r is None:
                cells.append("-")
            else:
                tl = f"{r['test_loss_pts']:.2f}" if r["test_loss_pts"] is not None else "n/a"
                mark = "~" if abs(r["val_loss_pts"]) < noise else ""
                cells.append(f"{100 * r['energy_gain']:.1f}% / {mark}{r['val_loss_pts']:.2f} / {tl}")
        lines.append(f"| {ap} | " + " | ".join(cells) + " |")
    layerwise = {t: (best.get("alwann", {}).get(t) or best.get("layer", {}).get(t)) for t in THRESHOLDS}
    lines += ["", "## Against the paper's claims", "",
              "MAx-DNN (LASCAS 2022) reports up to 54% energy gain at up to 4% accuracy loss, and 2x the energy gain "
              "of layer-wise assignment (ALWANN) at better accuracy.", ""]
    for t in THRESHOLDS:
        lw = layerwise[t]
        fine = [best[a][t] for a in ("filter", "kernel") if a in best and best[a][t] is not None]
        if lw is not None and fine:
            top = max(fine, key=lambda r: r["energy_gain"])
            ratio = top["energy_gain"] / lw["energy_gain"] if lw["energy_gain"] > 0 else float("inf")
            lines.append(f"- at <= {t:g} pt: best fine-grained ({top['approach']}) {100 * top['energy_gain']:.1f}% vs "
                         f"layer-wise {100 * lw['energy_gain']:.1f}% ({ratio:.2f}x)")
    lines += ["", "## Files", "", "- `points.csv`: every evaluated point", "- `pareto.png`, `pareto.svg`: the fronts",
              "- `pareto/`: the assignment of every front point (`maxdnn evaluate --assign ...`)", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
