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

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import atomic_path, write_text
from maxdnn.exploration.storage import read_run_info
from maxdnn.exploration.front import THRESHOLDS, largest_gain_within, pareto_front, point_key
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


COLUMNS = ["approach", "source", "trial", "finetuned", "on_front", "granularity", "summary", "val_accuracy",
           "val_images", "test_accuracy", "test_images", "test_ci95_low", "test_ci95_high", "energy", "energy_gain",
           "val_loss_pts", "test_loss_pts", "val_loss_below_noise", "pe_energy_gain"]


class ReportError(MaxdnnError, ValueError):
    pass


def _row(ap: str, p: dict, measured: dict, base: dict, finetuned: bool) -> dict:
    """One points.csv row: the point's validation and test numbers (``measured`` may lack test ones)."""
    t = measured if "test_accuracy" in measured else {}
    val_acc = measured.get("val_accuracy", p["val_accuracy"])
    return {
        "approach": ap, "source": p["source"], "trial": p["trial"], "finetuned": int(finetuned), "on_front": 0,
        "granularity": p["granularity"], "summary": p["summary"],
        "val_accuracy": val_acc, "val_images": base["val_images"],
        "test_accuracy": t.get("test_accuracy", ""), "test_images": t.get("test_images", ""),
        **(dict(zip(("test_ci95_low", "test_ci95_high"), wilson(t["test_accuracy"], t["test_images"])))
           if t else {"test_ci95_low": "", "test_ci95_high": ""}),
        "val_loss_below_noise": int(abs(100 * (base["val_accuracy"] - val_acc))
                                    < noise_pts(base["val_accuracy"], base["val_images"])),
        "energy": p["energy"], "energy_gain": p["energy_gain"],
        "val_loss_pts": 100 * (base["val_accuracy"] - val_acc),
        "test_loss_pts": 100 * (base["test_accuracy"] - t["test_accuracy"]) if t else "",
    }


def write_points(run_dir: Path, store) -> Path:
    """Every evaluated point (``finetuned`` = 0), and every fine-tuned one again with its numbers after
    fine-tuning (``finetuned`` = 1); ``on_front``: on its approach's validation front, fine-tuned points
    among fine-tuned ones. Losses are against the exact int8 model as quantized (not fine-tuned)."""

    info = read_run_info(run_dir)
    base = info["baseline"]
    tests = json.loads((run_dir / "test_eval.json").read_text()) if (run_dir / "test_eval.json").exists() else {}
    ft = read_finetune(run_dir)
    rows = []
    pts = store.points()
    for ap in sorted({p["approach"] for p in pts}):
        mine = [p for p in pts if p["approach"] == ap]
        before = [_row(ap, p, tests.get(point_key(p), {}), base, False) for p in mine]
        after = [_row(ap, p, ft["assignments"][ft["points"][point_key(p)]], base, True) for p in mine
                 if ft["assignments"].get(ft["points"].get(point_key(p)))]
        for group in (before, after):
            for r in pareto_front(group):
                r["on_front"] = 1
            rows += group
    pe = _pe_gains(run_dir, [r for r in rows if r["on_front"]])
    for r in rows:
        r["pe_energy_gain"] = pe.get((r["approach"], r["source"], r["trial"]), "")
    path = run_dir / "points.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _pe_gains(run_dir: Path, rows: list[dict]) -> dict:
    """Processing-element energy gain (multiplier + accumulator, ``maxdnn.energy``) of the front points whose
    assignment is saved in RUN_DIR/pareto; empty when the energy table has no PE energies for their specs."""
    from maxdnn.engine.approx import Assignment
    from maxdnn.energy import EnergyModelError, energy_table, network_energy
    from maxdnn.ir.graph import QuantizedGraph

    if not rows or not (run_dir / "quantized.npz").exists():
        return {}
    q = QuantizedGraph.load(run_dir / "quantized.npz")
    out = {}
    for r in rows:
        path = run_dir / "pareto" / f"{r['approach']}-{r['source']}-{r['trial']}.json"
        if not path.exists():
            continue
        a = Assignment.load(path, q)
        try:
            gain = network_energy(q, a, energy_table(a.specs, a.bits))["pe_energy_gain"]
        except EnergyModelError:
            gain = None
        if gain is not None:
            out[(r["approach"], r["source"], r["trial"])] = gain
    return out


def read_finetune(run_dir: Path) -> dict:
    """finetune_eval.json of ``maxdnn explore --finetune`` (empty entries when the run has none)."""
    path = run_dir / "finetune_eval.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    return {"settings": doc.get("settings"), "exact": doc.get("exact"), "assignments": doc.get("assignments", {}),
            "points": doc.get("points", {})}


def read_points(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("val_accuracy", "energy", "energy_gain", "val_loss_pts"):
            r[k] = float(r[k])
        for k in ("test_accuracy", "test_loss_pts", "test_ci95_low", "test_ci95_high", "pe_energy_gain"):
            r[k] = float(r[k]) if r.get(k, "") != "" else None
        r["on_front"] = int(r["on_front"])
        r["finetuned"] = int(r.get("finetuned") or 0)  # runs written before fine-tuning existed: all 0
    return rows


def best_at_thresholds(rows: list[dict], finetuned: bool = False) -> dict[str, dict[float, dict | None]]:
    """Per approach and threshold, the validation-front point of largest gain within the validation loss
    (points as searched, or with ``finetuned`` their fine-tuned versions)."""
    out: dict[str, dict[float, dict | None]] = {}
    rows = [r for r in rows if r["finetuned"] == int(finetuned)]
    for ap in sorted({r["approach"] for r in rows}):
        front = [r for r in rows if r["approach"] == ap and r["on_front"]]
        out[ap] = {}
        for t in THRESHOLDS:
            out[ap][t] = largest_gain_within(front, lambda r: r["val_loss_pts"], t)
    return out


STYLES = {"layer": ("tab:blue", "o", "-"), "alwann": ("tab:orange", "s", "--"), "filter": ("tab:green", "^", "-."),
          "kernel": ("tab:red", "D", ":")}
PAPER_CLAIM = (4.0, 54.0)  # MAx-DNN (LASCAS 2022): up to 54% energy gain at up to 4% accuracy loss


def _staircase(front: list[dict]) -> tuple[list[float], list[float]]:
    """The validation front as a step function: the largest gain reachable at a loss <= x."""
    xs, ys, best = [], [], -1.0
    for r in sorted(front, key=lambda r: (r["val_loss_pts"], -r["energy_gain"])):
        if 100 * r["energy_gain"] > best:
            best = 100 * r["energy_gain"]
            xs.append(r["val_loss_pts"])
            ys.append(best)
    return xs, ys


def plot(rows: list[dict], baseline_label: str, run_dir: Path) -> None:
    """Validation fronts as step lines, test measurements of the front points as unjoined markers (hollow
    for ALWANN-style, so that it shows where it coincides with layer level), fine-tuned points' own front
    and markers in a second panel when the run has them; the paper's claim marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(False, "as searched")] + ([(True, "after fine-tuning")] if any(r["finetuned"] for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False, sharey=True)
    cut = False
    for ax, (ft, title) in zip(axes[0], panels):
        for ap in sorted({r["approach"] for r in rows}):
            color, marker, ls = STYLES.get(ap, ("tab:gray", "v", "-"))
            front = [r for r in rows if r["approach"] == ap and r["on_front"] and r["finetuned"] == int(ft)]
            if not front:
                continue
            xs, ys = _staircase(front)
            ax.step(xs, ys, where="post", color=color, ls=ls, lw=1.2, alpha=0.8, label=f"{ap}: validation front")
            tested = [r for r in front if r["test_loss_pts"] is not None]
            face = "none" if ap == "alwann" else color
            ax.plot([r["test_loss_pts"] for r in tested], [100 * r["energy_gain"] for r in tested], ls="none",
                    marker=marker, ms=6 if ap == "alwann" else 4, mfc=face, mec=color, label=f"{ap}: test")
        ax.plot([0], [0], "k*", ms=12, label=f"exact 8-bit ({baseline_label})")
        ax.plot([PAPER_CLAIM[0]], [PAPER_CLAIM[1]], "kX", ms=9, label="paper: 54% at 4 pt")
        losses = [r["test_loss_pts"] for r in rows if r["on_front"] and r["test_loss_pts"] is not None]
        losses += [r["val_loss_pts"] for r in rows if r["on_front"]]
        if losses and max(losses) > 10:
            ax.set_xlim(min(-0.5, min(losses) - 0.5), 10)  # the region of interest; the csv has every point
            cut = True
        ax.set_title(f"MAx-DNN fronts, {title}")
        ax.set_xlabel("accuracy loss vs exact 8-bit (points)" + ("; axis cut at 10" if cut else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("multiplication energy gain (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("lines: validation fronts (where the choice is made); markers: the same points on test", fontsize=9)
    fig.tight_layout()
    for ext in ("png", "svg"):
        with atomic_path(run_dir / f"pareto.{ext}", f".{ext}") as tmp:
            fig.savefig(tmp, dpi=130)
    plt.close(fig)


def _threshold_table(best: dict, noise: float) -> list[str]:
    lines = ["| approach | " + " | ".join(f"<= {t:g} pt: gain / val loss / test loss" for t in THRESHOLDS) + " |",
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
                pe = f" (PE {100 * r['pe_energy_gain']:.1f}%)" if r.get("pe_energy_gain") is not None else ""
                cells.append(f"{100 * r['energy_gain']:.1f}%{pe} / {mark}{r['val_loss_pts']:.2f} / {tl}")
        lines.append(f"| {ap} | " + " | ".join(cells) + " |")
    return lines


def _finetune_section(rows: list[dict], run_dir: Path, base: dict, noise: float) -> list[str]:
    """The front after fine-tuning (``explore --finetune``), in the same table, and the fair baseline."""
    ft = read_finetune(run_dir)
    if not ft["settings"] or not any(r["finetuned"] for r in rows):
        return []
    st, ex = ft["settings"], ft["exact"]
    n_images = "all" if st["images"] is None else f"{st['images']:,}"
    lines = ["", "## After fine-tuning", "",
             f"Up to {st['points']} validation-front points per approach (within {st['max_val_loss_pts']:g} "
             f"validation points of exact) fine-tuned with their assignment fixed: {st['epochs']} epoch(s) on "
             f"{n_images} training images outside the validation hold-out (lr {st['lr']:g}, batch "
             f"{st['batch_size']}), then measured through the integer engine. Losses are still against the exact "
             "int8 model as quantized; the front is that of the fine-tuned points.", ""]
    if ex:
        shift = 100 * (base["test_accuracy"] - ex["test_accuracy"])
        lines += [f"Fair baseline: the exact int8 model fine-tuned the same way reaches validation "
                  f"{100 * ex['val_accuracy']:.2f}% and test {100 * ex['test_accuracy']:.2f}% "
                  f"({'-' if shift > 0 else '+'}{abs(shift):.2f} points on test); against it every test loss below "
                  f"is {abs(shift):.2f} points {'smaller' if shift > 0 else 'larger'}.", ""]
    secs = [e["seconds"] for e in ft["assignments"].values()]
    if secs:
        lines += [f"{len(secs)} distinct assignments fine-tuned, {sum(secs) / len(secs):.0f} s each on average "
                  "(training and both measurements).", ""]
    return lines + _threshold_table(best_at_thresholds(rows, finetuned=True), noise)


def write_report(run_dir: str | os.PathLike, store=None) -> Path:
    """points.csv from ``store`` (the run's ``RunStorage``; None: the points.csv there), then the plot and
    report.md."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise ReportError(f"{run_dir}: not an exploration run (no run.json)")
    info = read_run_info(run_dir)
    if "baseline" not in info:
        raise ReportError(f"{run_dir / 'run.json'}: no baseline yet (the run stopped before measuring the exact model)")
    if store is not None:
        write_points(run_dir, store)
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
              "front point's interval. Gains are of multiplication energy, as in the paper; `PE` is the gain of "
              "the whole processing element (multiplier + 24-bit accumulator adder and register).", "",
              *_threshold_table(best, noise)]
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
    lines += _finetune_section(rows, run_dir, base, noise)
    lines += ["", "## Files", "", "- `points.csv`: every evaluated point", "- `pareto.png`, `pareto.svg`: the fronts",
              "- `pareto/`: the assignment of every front point (`maxdnn evaluate --assign ...`)", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
