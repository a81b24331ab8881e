"""The report of an exploration run: points.csv, pareto.png/svg and report.md.

Every number in report.md is recomputed from points.csv (and run.json's
baseline): the table of the largest energy gain at a validation accuracy loss
of at most 0.5, 1, 2 and 4 points takes, per approach, the validation-Pareto
points (``on_front`` = 1) within the threshold and reports the one with the
largest energy gain, with its test-set accuracy loss.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import atomic_path, read_json, write_text
from maxdnn.exploration.storage import read_run_info
from maxdnn.exploration.front import APPROACHES, THRESHOLDS, largest_gain_within, pareto_front, point_key
from maxdnn.exploration.paired import paired_loss
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


COLUMNS = ["approach", "source", "trial", "compensation", "finetuned", "on_front", "granularity", "summary",
           "val_accuracy", "val_images", "val_loss_pts", "val_loss_below_noise", "reference",
           "confirm_accuracy", "confirm_images", "confirm_loss_pts", "confirm_loss_se",
           "test_accuracy", "test_images", "test_ci95_low", "test_ci95_high", "test_loss_pts", "test_loss_ci95",
           "energy", "energy_gain", "multiplication_energy_gain", "pe_energy_gain", "accelerator_energy_gain"]
LEVEL_NAMES = {"ptq": "as quantized (PTQ)", "bias": "bias-corrected", "finetune": "fine-tuned"}


class ReportError(MaxdnnError, ValueError):
    pass


def _row(ap: str, p: dict, level: str, val: tuple[float, float], m: dict, ref_name: str, ref: dict,
         base: dict) -> dict:
    """One points.csv row: the point at one compensation level, with validation numbers ``val`` (accuracy
    and the reference's accuracy on the same images) and measurement ``m`` (confirmation and test bits,
    or an older run's plain test accuracy), compared with reference ``ref`` image by image."""
    val_acc, ref_val = val
    row = {"approach": ap, "source": p["source"], "trial": p["trial"], "compensation": level,
           "finetuned": int(level == "finetune"), "on_front": 0, "granularity": p["granularity"],
           "summary": p["summary"], "val_accuracy": val_acc, "val_images": base["val_images"],
           "val_loss_pts": 100 * (ref_val - val_acc),
           "val_loss_below_noise": int(abs(100 * (ref_val - val_acc)) < noise_pts(ref_val, base["val_images"])),
           "reference": ref_name, "energy": p["energy"], "energy_gain": p["energy_gain"],
           "multiplication_energy_gain": p.get("mult_energy_gain", p["energy_gain"])}
    for k in ("confirm_accuracy", "confirm_images", "confirm_loss_pts", "confirm_loss_se", "test_accuracy",
              "test_images", "test_ci95_low", "test_ci95_high", "test_loss_pts", "test_loss_ci95"):
        row[k] = ""
    if "confirm" in m and "confirm" in ref:
        loss, se = paired_loss(ref["confirm"], m["confirm"])
        row.update(confirm_accuracy=m["confirm"]["accuracy"], confirm_images=m["confirm"]["images"],
                   confirm_loss_pts=loss, confirm_loss_se=se)
    if "test" in m:
        t = m["test"]
        row.update(test_accuracy=t["accuracy"], test_images=t["images"])
        if "test" in ref:
            loss, se = paired_loss(ref["test"], t)
            row.update(test_loss_pts=loss, test_loss_ci95=Z95 * se)
    elif "test_accuracy" in m:  # a run made before per-image measurements
        row.update(test_accuracy=m["test_accuracy"], test_images=m["test_images"],
                   test_loss_pts=100 * (base["test_accuracy"] - m["test_accuracy"]))
    if row["test_accuracy"] != "":
        row["test_ci95_low"], row["test_ci95_high"] = wilson(row["test_accuracy"], row["test_images"])
    return row


def write_points(run_dir: Path, store) -> Path:
    """Every evaluated point at every compensation level of the run (``compensation``: ptq, bias,
    finetune; fine-tuned points only where fine-tuned); ``on_front``: on its approach's and level's
    validation front. Losses are paired (same images) against the level's reference
    (``maxdnn.exploration.confirm``): confirmation losses where the point was measured again, test losses
    where it was chosen (every fine-tuned point is measured on test)."""
    from maxdnn.exploration.confirm import level_points, levels_of, reference_for

    info = read_run_info(run_dir)
    base = info["baseline"]
    conf = read_confirm(run_dir)
    ft = read_finetune(run_dir)
    refs = conf["reference"]
    legacy_tests = read_json(run_dir / "test_eval.json", ReportError, default={})
    levels = levels_of(info.get("compensation", "bias" if info.get("bias_correction") else "none"))
    if ft["settings"] and "finetune" not in levels:  # an older run fine-tuned without the option
        levels = (*levels, "finetune")
    rows = []
    pts = store.points()
    for ap in sorted({p["approach"] for p in pts}):
        mine = [p for p in pts if p["approach"] == ap]
        for lv in levels:
            group = []
            if lv == "finetune":
                name, ref = reference_for("finetune", refs) if refs.get("ptq") else ("exact", {})
                ref_val = (ft["exact"] or {}).get("val_accuracy", base["val_accuracy"]) \
                    if name == "exact fine-tuned" else base["val_accuracy"]
                for p in mine:
                    e = ft["assignments"].get(ft["points"].get(point_key(p), ""))
                    if e:
                        group.append(_row(ap, p, lv, (e["val_accuracy"], ref_val), e, name, ref, base))
            else:
                for p in level_points(mine, lv):
                    m = conf["points"].get(f"{lv}|{point_key(p)}") or \
                        ({} if conf["points"] else legacy_tests.get(point_key(p), {}))
                    group.append(_row(ap, p, lv, (p["val_accuracy"], base["val_accuracy"]), m, "exact",
                                      refs.get("ptq", {}), base))
            for r in pareto_front(group):
                r["on_front"] = 1
            rows += group
    pe, chip = _front_gains(run_dir, rows, info.get("accelerator"))
    # a point whose assignment was not saved takes the gains of a saved point of the same approach and genes
    # (the sweep and NSGA-II often find the same assignment; front ties keep one of them)
    ident = lambda r: (r["approach"], r["source"], r["trial"])  # noqa: E731
    measured = {ident(r) for r in rows} & (pe.keys() | chip.keys())
    twins = {(r["approach"], r["summary"]): ident(r) for r in rows if ident(r) in measured}
    for r in rows:
        key = ident(r) if ident(r) in measured else twins.get((r["approach"], r["summary"]), ident(r))
        r["pe_energy_gain"] = pe.get(key, "")
        r["accelerator_energy_gain"] = chip.get(key, "")
    path = run_dir / "points.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _front_gains(run_dir: Path, rows: list[dict], accelerator: str | None) -> tuple[dict, dict]:
    """(processing-element gains, accelerator gains) by (approach, source, trial) of the points whose
    assignment is saved in RUN_DIR/pareto (front and fine-tuned points), each assignment loaded once however
    many levels' rows share it.
    PE: multiplier + accumulator (``maxdnn.energy``), none where the energy table has no PE energies for its
    specs. Accelerator (``maxdnn.accelerator``, ZigZag), when the run names one (``explore --accelerator``):
    ZigZag maps the network once (cached), every point then costs a sum over its layers."""
    from maxdnn.engine.approx import Assignment
    from maxdnn.energy import EnergyModelError, energy_table, network_energy
    from maxdnn.ir.graph import QuantizedGraph

    pe, chip = {}, {}
    if not rows or not (run_dir / "quantized.npz").exists():
        return pe, chip
    q = QuantizedGraph.load(run_dir / "quantized.npz")
    model = None  # ZigZag's mapping of the network, read once
    for key in dict.fromkeys((r["approach"], r["source"], r["trial"]) for r in rows):
        path = run_dir / "pareto" / f"{key[0]}-{key[1]}-{key[2]}.json"
        if not path.exists():
            continue
        a = Assignment.load(path, q)
        try:
            gain = network_energy(q, a, energy_table(a.specs, a.bits))["pe_energy_gain"]
        except EnergyModelError:
            gain = None
        if gain is not None:
            pe[key] = gain
        if accelerator:
            if model is None:
                from maxdnn.accelerator import AcceleratorModel

                model = AcceleratorModel(q, accelerator)
            chip[key] = model.energy(a)["total"]["gain"]
    return pe, chip


def read_finetune(run_dir: Path) -> dict:
    """finetune_eval.json of the fine-tuning stage (empty entries when the run has none)."""
    doc = read_json(run_dir / "finetune_eval.json", ReportError, default={})
    return {"settings": doc.get("settings"), "exact": doc.get("exact"), "assignments": doc.get("assignments", {}),
            "points": doc.get("points", {})}


def read_confirm(run_dir: Path) -> dict:
    """confirm_eval.json of the confirmation stage (empty entries when the run has none)."""
    doc = read_json(run_dir / "confirm_eval.json", ReportError, default={})
    return {"reference": doc.get("reference", {}), "points": doc.get("points", {}), "chosen": doc.get("chosen", {}),
            "z": doc.get("z")}


def read_points(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("val_accuracy", "energy", "energy_gain", "val_loss_pts"):
            r[k] = float(r[k])
        # the objective's gain is energy_gain; runs made before other objectives: multiplication energy
        r["multiplication_energy_gain"] = float(r.get("multiplication_energy_gain") or r["energy_gain"])
        for k in ("test_accuracy", "test_loss_pts", "test_ci95_low", "test_ci95_high", "pe_energy_gain",
                  "accelerator_energy_gain",
                  "confirm_accuracy", "confirm_loss_pts", "confirm_loss_se", "test_loss_ci95"):
            r[k] = float(r[k]) if r.get(k, "") != "" else None
        for k in ("confirm_images", "test_images"):
            r[k] = int(r[k]) if r.get(k, "") != "" else None
        r["on_front"] = int(r["on_front"])
        r["finetuned"] = int(r.get("finetuned") or 0)  # runs written before fine-tuning existed: all 0
        r["compensation"] = r.get("compensation") or ("finetune" if r["finetuned"] else "ptq")
    return rows


def best_at_thresholds(rows: list[dict], finetuned: bool = False, level: str | None = None
                       ) -> dict[str, dict[float, dict | None]]:
    """Per approach and threshold, the chosen point of a compensation level (``level``; default ``finetune``
    with ``finetuned``, else the level the search ranked by: ``bias`` when the run has it, else ``ptq``): the
    largest gain whose paired confirmation loss plus ``Z_CHOICE`` standard errors is within the threshold
    (``maxdnn.exploration.confirm.choose``); a run without confirmation numbers falls back to the
    validation front."""
    from maxdnn.exploration.confirm import choose

    if level is None:
        levels = {r["compensation"] for r in rows}
        level = "finetune" if finetuned else ("bias" if "bias" in levels else "ptq")
    rows = [r for r in rows if r["compensation"] == level]
    out: dict[str, dict[float, dict | None]] = {}
    for ap in [a for a in APPROACHES if any(r["approach"] == a for r in rows)]:
        mine = [r for r in rows if r["approach"] == ap]
        confirmed = any(r["confirm_loss_pts"] is not None for r in mine)
        front = [r for r in mine if r["on_front"]]
        out[ap] = {t: choose(mine, t) if confirmed else largest_gain_within(front, lambda r: r["val_loss_pts"], t)
                   for t in THRESHOLDS}
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


def plot(rows: list[dict], baseline_label: str, run_dir: Path, gain_label: str = "multiplication energy") -> None:
    """One panel per compensation level: validation fronts as step lines, the test measurements of the
    points chosen for the report's table as unjoined markers (hollow for ALWANN-style, so that it shows
    where it coincides with layer level); the paper's claim marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in LEVEL_NAMES if any(r["compensation"] == lv for r in rows)] or ["ptq"]
    fig, axes = plt.subplots(1, len(levels), figsize=(6.5 * len(levels), 4.8), squeeze=False, sharey=True)
    cut = False
    for ax, lv in zip(axes[0], levels):
        mine = [r for r in rows if r["compensation"] == lv]
        chosen = best_at_thresholds(mine, level=lv)
        for ap in [a for a in APPROACHES if any(r["approach"] == a for r in mine)]:
            color, marker, ls = STYLES.get(ap, ("tab:gray", "v", "-"))
            front = [r for r in mine if r["approach"] == ap and r["on_front"]]
            if front:
                xs, ys = _staircase(front)
                ax.step(xs, ys, where="post", color=color, ls=ls, lw=1.2, alpha=0.8, label=f"{ap}: validation front")
            tested = [r for r in {id(r): r for r in chosen.get(ap, {}).values() if r is not None}.values()
                      if r["test_loss_pts"] is not None]
            face = "none" if ap == "alwann" else color
            ax.plot([r["test_loss_pts"] for r in tested], [100 * r["energy_gain"] for r in tested], ls="none",
                    marker=marker, ms=6 if ap == "alwann" else 4, mfc=face, mec=color, label=f"{ap}: chosen, on test")
        ax.plot([0], [0], "k*", ms=12, label=f"exact 8-bit ({baseline_label})")
        ax.plot([PAPER_CLAIM[0]], [PAPER_CLAIM[1]], "kX", ms=9, label="paper: 54% at 4 pt")
        losses = [r["test_loss_pts"] for r in mine if r["test_loss_pts"] is not None]
        losses += [r["val_loss_pts"] for r in mine if r["on_front"]]
        if losses and max(losses) > 10:
            ax.set_xlim(min(-0.5, min(losses) - 0.5), 10)  # the region of interest; the csv has every point
            cut = True
        ax.set_title(f"MAx-DNN fronts, {LEVEL_NAMES[lv]}")
        ax.set_xlabel("accuracy loss vs reference (points)" + ("; axis cut at 10" if cut else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{gain_label} gain (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("lines: validation fronts; markers: the points chosen on the confirmation images, measured on test",
                 fontsize=9)
    fig.tight_layout()
    for ext in ("png", "svg"):
        with atomic_path(run_dir / f"pareto.{ext}", f".{ext}") as tmp:
            fig.savefig(tmp, dpi=130)
    plt.close(fig)


def _cell(r: dict | None, chip_objective: bool = False) -> str:
    """"gain (PE x%, chip y%) / test loss +- 95% half-width"; with the accelerator as the objective
    "chip y% (mult g%, PE x%) / ..." (the objective first)."""
    if r is None:
        return "-"
    parts = [f"PE {100 * r['pe_energy_gain']:.1f}%"] if r.get("pe_energy_gain") is not None else []
    if chip_objective:
        head = f"chip {100 * r['energy_gain']:.2f}%"
        parts.insert(0, f"mult {100 * r['multiplication_energy_gain']:.1f}%")
    else:
        head = f"{100 * r['energy_gain']:.1f}%"
        if r.get("accelerator_energy_gain") is not None:
            parts.append(f"chip {100 * r['accelerator_energy_gain']:.2f}%")
    pe = f" ({', '.join(parts)})" if parts else ""
    if r["test_loss_pts"] is None:
        return f"{head}{pe} / n/a"
    ci = f" +-{r['test_loss_ci95']:.2f}" if r.get("test_loss_ci95") is not None else ""
    return f"{head}{pe} / {r['test_loss_pts']:.2f}{ci}"


def _level_table(by_level: dict, t: float, chip_objective: bool = False) -> list[str]:
    """Rows: approaches; columns: compensation levels; cell: gain (PE) / test loss +- 95% half-width."""
    levels = list(by_level)
    lines = [f"**<= {t:g} point{'s' if t != 1 else ''}**", "",
             "| approach | " + " | ".join(f"{LEVEL_NAMES[lv]}: gain / test loss" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for ap in [a for a in APPROACHES if any(a in b for b in by_level.values())]:
        lines.append(f"| {ap} | " + " | ".join(_cell(by_level[lv].get(ap, {}).get(t), chip_objective)
                                               for lv in levels) + " |")
    return lines + [""]


def _claims(by_level: dict, t_noise: float) -> list[str]:
    """The paper's question per level and threshold, and how often the chosen points held on test."""
    lines = ["## Against the paper's claims", "",
             "MAx-DNN (LASCAS 2022) reports up to 54% energy gain at up to 4% accuracy loss, and 2x the energy gain "
             "of layer-wise assignment (ALWANN) at better accuracy. Here layer-wise is the better of layer level "
             "and ALWANN-style at each threshold, fine-grained the better of filter and kernel level.", "",
             "| level | " + " | ".join(f"<= {t:g} pt: fine-grained / layer-wise (ratio; paper 2x)" for t in THRESHOLDS)
             + " |", "|---|" + "---|" * len(THRESHOLDS)]
    held, cells, reached, ratios = 0, 0, [], []
    for lv, best in by_level.items():
        out = []
        for t in THRESHOLDS:
            lw = [best[a][t] for a in ("layer", "alwann") if a in best and best[a][t] is not None]
            fine = [best[a][t] for a in ("filter", "kernel") if a in best and best[a][t] is not None]
            for r in lw + fine:
                if r["test_loss_pts"] is not None:
                    cells += 1
                    held += int(r["test_loss_pts"] <= t + t_noise)
            if not lw or not fine:
                out.append("-")
                continue
            g = "multiplication_energy_gain"  # the paper's claims are of multiplication energy
            lo = max(lw, key=lambda r: r[g])
            hi = max(fine, key=lambda r: r[g])
            ratio = hi[g] / lo[g] if lo[g] > 0 else float("inf")
            out.append(f"{100 * hi[g]:.1f}% ({hi['approach']}) / {100 * lo[g]:.1f}% "
                       f"({lo['approach']}): {ratio:.2f}x")
            ratios.append((ratio, f"{LEVEL_NAMES[lv]} at <= {t:g} point{'s' if t != 1 else ''}"))
            if t == 4.0 and hi[g] >= 0.54 and hi["test_loss_pts"] is not None \
                    and hi["test_loss_pts"] <= 4.0 + t_noise:
                reached.append(LEVEL_NAMES[lv])
        lines.append(f"| {LEVEL_NAMES[lv]} | " + " | ".join(out) + " |")
    lines += ["", f"- 54% at <= 4 points (on test, within its noise): "
                  f"{'reproduced ' + ', '.join(reached) if reached else 'not reproduced'}.",
              f"- 2x layer-wise: {_twice_line(ratios)}.",
              f"- The choice held on test (test loss at most the threshold plus the test noise, {t_noise:.2f} points) "
              f"in {held} of {cells} chosen cells.", ""]
    return lines


def _twice_line(ratios: list[tuple[float, str]]) -> str:
    """Whether fine-grained assignment reaches 2x the layer-wise gain, and where: ``ratios`` holds
    (fine-grained / layer-wise gain, "level at <= t points") for every cell of the table above.

    >>> _twice_line([(1.4, "as quantized (PTQ) at <= 2 points"), (0.8, "fine-tuned at <= 1 point")])
    'not reproduced: the largest ratio is 1.40x (as quantized (PTQ) at <= 2 points), fine-grained ahead in 1 of 2 cells'
    >>> _twice_line([(2.3, "as quantized (PTQ) at <= 4 points"), (0.9, "fine-tuned at <= 4 points")])
    'reproduced in 1 of 2 cells (as quantized (PTQ) at <= 4 points: 2.30x)'
    """
    if not ratios:
        return "not measured (no threshold has both a layer-wise and a fine-grained point)"
    twice = [(r, where) for r, where in ratios if r >= 2.0]
    if twice:
        return (f"reproduced in {len(twice)} of {len(ratios)} cells ("
                + "; ".join(f"{where}: {r:.2f}x" for r, where in twice) + ")")
    r, where = max(ratios)
    ahead = sum(1 for r_, _ in ratios if r_ > 1.0)
    return (f"not reproduced: the largest ratio is {r:.2f}x ({where}), fine-grained ahead in {ahead} of "
            f"{len(ratios)} cells")


def _finetune_line(ft: dict) -> str:
    """The report's sentence on the fine-tuning stage (finetune_eval.json's ``ft``: its settings and entries)."""
    st = ft["settings"]
    distilled = ", to the exact model's answers (distillation)" if st.get("distill") else ""
    n_images = "all" if st["images"] is None else f"{st['images']:,}"
    secs = [e["seconds"] for e in ft["assignments"].values()]
    floor = (f", and of at least the gain of the largest-gain point within {st['floor_pts']:g} validation points"
             if "floor_pts" in st else "")
    warm = ", each rung's training starting from the rung below it as fine-tuned" if st.get("ladder_warm") else ""
    ladder = (f", and up to {st['ladder_points']} rungs of the fine-tuning ladder (layer level: each layer exact, "
              "on the next-lowest-energy weight-only configuration or on the lowest, the steps that lose least "
              f"untrained per energy saved first{warm}; steps that save under 0.1% of what the ladder saves are "
              "left to no rung), whatever their loss untrained," if st.get("ladder_points")
              else "")
    return (f"Fine-tuning: up to {st['points']} validation-front points per approach (within "
            f"{st['max_val_loss_pts']:g} validation points of exact, as ranked by the search{floor}){ladder} trained "
            f"with their assignment fixed{', weight scales fitted' if st.get('fit_scales') else ''}{distilled}, "
            f"{st['epochs']} epoch(s) on {n_images} training images outside the validation "
            f"hold-out (lr {st['lr']:g}, batch {st['batch_size']}), then measured through the integer engine"
            + (f"; {len(secs)} distinct assignments, {sum(secs) / len(secs):.0f} s each on average." if secs
               else "."))


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
    chip_objective = str(info.get("energy", "")).startswith("accelerator:")
    plot(rows, f"test {100 * base['test_accuracy']:.2f}%", run_dir,
         f"accelerator ({info.get('accelerator')}) energy" if chip_objective else "multiplication energy")
    conf, ft = read_confirm(run_dir), read_finetune(run_dir)
    levels = [lv for lv in LEVEL_NAMES if any(r["compensation"] == lv for r in rows)]
    by_level = {lv: best_at_thresholds(rows, level=lv) for lv in levels}
    lines = [
        "# MAx-DNN exploration report", "",
        f"- model: `{info['model']}`",
        f"- data: `{info['data']}`",
        f"- search data (validation): {info['validation']}",
        f"- choice data (confirmation): {info.get('confirmation', 'none (an older run)')}",
        f"- final numbers (test): {info['test']}",
        f"- budget: {info['budget']['name']}; compensation: {info.get('compensation', 'none')}; "
        f"multiplier library: {', '.join(info['library'])}",
        f"- energy ({'objective: the accelerator' if chip_objective else 'objective: multiplication'}): "
        f"{info['energy_source']}",
        f"- exact 8-bit baseline: validation {100 * base['val_accuracy']:.2f}% ({base['val_images']} images), "
        f"test {100 * base['test_accuracy']:.2f}% ({base['test_images']} images)",
    ]
    if ft["exact"]:
        ex = ft["exact"]
        lines.append(f"- exact 8-bit fine-tuned the same way as the points (the fair baseline of fine-tuned "
                     f"points): validation {100 * ex['val_accuracy']:.2f}%, "
                     + (f"confirmation {100 * ex['confirm']['accuracy']:.2f}%, " if "confirm" in ex else "")
                     + f"test {100 * ex['test_accuracy']:.2f}%")
    if info.get("accelerator"):
        lines.append(f"- accelerator: {info['accelerator']} (ZigZag, `maxdnn.accelerator`): `chip` is the gain of the "
                     "whole accelerator's energy per image, MACs scaled by each point's PE energy, memories as mapped")
    if "resilience" in info:
        lines.append(f"- resilience proxy vs direct (Spearman): {info['resilience']}")
    if not rows:
        lines.append("- **no evaluated points yet**: the tables below are empty")
    if "wall_seconds" in info:
        lines.append(f"- exploration wall time: {info['wall_seconds']:.0f} s")
    t_noise = noise_pts(base["test_accuracy"], base["test_images"])
    t_lo, t_hi = wilson(base["test_accuracy"], base["test_images"])
    z = conf["z"]
    how = (f"Each approach's candidates near the thresholds were measured again on the confirmation images, "
           f"image by image against the reference; the point shown is the one of largest gain whose paired "
           f"confirmation loss plus {z:g} standard error{'s' if z != 1 else ''} is within the threshold. "
           if z is not None else "Chosen on the validation split among each approach's validation-Pareto points. ")
    lines += ["", "## Largest energy gain at a given accuracy loss", "",
              how + "Test loss: the same assignment on the test images, paired against the same reference, with "
              "its 95% half-width. The reference is the exact 8-bit model as quantized, for fine-tuned points the "
              "better of it and the exact model fine-tuned the same way (on the confirmation images). Loss in "
              f"accuracy points; the exact baseline's test accuracy has the 95% Wilson interval "
              f"{100 * t_lo:.2f}..{100 * t_hi:.2f}% ({base['test_images']} images, about +-{t_noise:.2f} points). "
              + ("The objective was the accelerator's energy (`--energy accelerator:...`): the first figure, `chip`, "
                 "is the gain of its energy per image (ZigZag), `mult` the gain of multiplication energy as in the "
                 "paper" if chip_objective else "Gains are of multiplication energy, as in the paper")
              + "; `PE` is the gain of the whole processing element (multiplier + 24-bit accumulator adder and "
              "register).", ""]
    for t in THRESHOLDS:
        lines += _level_table(by_level, t, chip_objective)
    if ft["settings"]:
        lines += [_finetune_line(ft), ""]
    lines += _claims(by_level, t_noise)
    lines += ["## Files", "", "- `points.csv`: every evaluated point at every compensation level",
              "- `pareto.png`, `pareto.svg`: the fronts",
              "- `pareto/`: the assignment of every front point (`maxdnn evaluate --assign ...`)",
              "- `finetuned/`: the fine-tuned graphs (`maxdnn evaluate --model finetuned/X.npz --assign pareto/Y.json`)",
              "- `confirm_eval.json`, `finetune_eval.json`: the per-image measurements behind the choice", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
