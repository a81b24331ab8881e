"""The ``maxdnn`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Approximate multipliers in quantized DNNs (MAx-DNN).")


@app.callback()
def _root() -> None:
    """Approximate multipliers in quantized DNNs (MAx-DNN)."""


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def fail(msg: str) -> None:
    typer.echo(f"maxdnn: error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def multipliers(
    spec: Optional[list[str]] = typer.Option(None, "--spec", help="Restrict to these specs (repeatable)."),
    bits: int = typer.Option(8, help="Operand width (2..16)."),
    x_signed: bool = typer.Option(False, "--x-signed", help="Signed activation operand x."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    lut: Optional[Path] = typer.Option(None, help="Write the lookup table (.npy) of the single --spec."),
):
    """Error metrics of exact, ROUP and published approximate multipliers."""
    import numpy as np

    from .error_metrics import error_metrics
    from .multipliers import SpecError, default_family, get_multiplier

    specs = list(spec) if spec else default_family(bits)
    try:
        mults = [get_multiplier(s, bits, x_signed) for s in specs]
    except SpecError as e:
        fail(str(e))
    if lut is not None:
        if len(mults) != 1:
            fail("--lut needs exactly one --spec")
        table = mults[0].lut()
        tmp = lut.with_name(lut.name + ".part.npy")
        np.save(tmp, table)
        tmp.replace(lut)
        typer.echo(f"wrote {lut}: shape {table.shape}, lut[x - {mults[0].x_format.min}, w - {mults[0].w_format.min}]", err=True)
    rows = [error_metrics(m).as_dict() for m in mults]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    sampled = {r["samples"] for r in rows if r["samples"]}
    title = f"{bits}-bit multipliers, " + (f"sampled metrics ({sampled.pop()} random pairs)" if sampled else "exhaustive metrics")
    t = Table(title=title)
    for c in ["spec", "x", "w", "error rate", "bias", "NMED", "MRED", "WCE"]:
        t.add_column(c, justify="left" if c == "spec" else "right")
    for m, r in zip(mults, rows):
        t.add_row(r["spec"], str(m.x_format), str(m.w_format), f"{r['error_rate']:.4f}", f"{r['bias']:.2f}",
                  f"{r['nmed']:.2e}", f"{r['mred']:.2e}", str(r["wce"]))
    Console(width=120).print(t)


def _data_or_fail(data):
    from .data import DataError, resolve_data

    try:
        return resolve_data(data)
    except DataError as e:
        fail(str(e))


def _load_split(data, split):
    from .data import DataError, load_cifar10

    try:
        return load_cifar10(_data_or_fail(data), split)
    except DataError as e:
        fail(str(e))


@app.command("download-data")
def download_data(dest: Optional[Path] = typer.Option(None, help="Folder for cifar-10-python.tar.gz (default: the cache).")):
    """Download the official CIFAR-10 archive and verify its MD5."""
    from .data import DataError, download_cifar10

    try:
        typer.echo(str(download_cifar10(dest)))
    except DataError as e:
        fail(str(e))


@app.command()
def train(
    out: Path = typer.Option(..., help="Checkpoint to write (resumes from OUT.state if present)."),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source."),
    epochs: int = typer.Option(60),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    holdout: int = typer.Option(5000, help="Training images held out as the validation split (seeded)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
):
    """Train ResNet-8 on the training split minus the validation hold-out."""
    from .data import validation_split
    from .train import train as run_train

    ds = _load_split(data, "train")
    tr, _ = validation_split(len(ds), holdout, seed=0) if holdout else (slice(None), None)
    sub = ds.subset(tr)
    typer.echo(f"training on {len(sub)} images of {ds.source} (train split, {holdout} held out)", err=True)
    run_train(sub.images, sub.labels, out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
              meta={"data": str(ds.source), "train_images": len(sub), "holdout": holdout,
                    "command": f"maxdnn train --data {data} --out {out.name} --epochs {epochs} --batch-size {batch_size} "
                               f"--lr {lr} --seed {seed} --holdout {holdout}"})
    typer.echo(str(out))


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, help="maxdnn checkpoint (.pt, default: the committed one) or Keras .h5."),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source (archive, folder or zip)."),
    precision: str = typer.Option("float", help="float or int8 (int8 is implied by --assign)."),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    assign: Optional[Path] = typer.Option(None, help="Multiplier assignment (JSON) for approximate int8 inference."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(100),
    as_json: bool = typer.Option(False, "--json"),
):
    """Accuracy (and, with --assign, multiplication energy) of a model on CIFAR-10."""
    from .approx import ApproxNetwork, Assignment, AssignmentError
    from .data import DataError
    from .energy import network_energy
    from .models import ModelError, predict
    from .workload import Workload, accuracy, describe_data

    if precision not in ("float", "int8"):
        fail(f"--precision {precision}: expected float or int8")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device available")
    try:
        wl = Workload.open(model, _data_or_fail(data))
        ds = wl.split(split, limit)
        result = {"model": wl.model_path, "data": describe_data(ds), "split": split}
        if assign is None and precision == "float":
            pred = predict(wl.model, ds.images, batch_size, device).numpy()
            result.update(precision="float")
        else:
            q = wl.quantized()
            result.update(precision="int8", calibration=q.meta["calibration"])
            if assign is None:
                pred = q.predict(ds.images, batch_size, device)
            else:
                a = Assignment.load(assign, q)
                net = ApproxNetwork(q, a, device=device)
                pred = net.predict(ds.images, batch_size)
                en = network_energy(q, a)
                result.update(assignment=str(assign), granularity=a.granularity(),
                              **{k: en[k] for k in ("energy", "energy_gain", "energy_unit", "energy_source", "multiplications")})
    except (DataError, ModelError, AssignmentError) as e:
        fail(str(e))
    result = {**accuracy(pred, ds.labels), **result}
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            typer.echo(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
