"""The ``maxdnn`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from maxdnn.errors import MaxdnnError
from maxdnn.atomic import atomic_path, write_json, write_text

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="Approximate multipliers in quantized DNNs (MAx-DNN).")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"maxdnn {version('maxdnn')}")
        raise typer.Exit()


@app.callback()
def _root(_: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
          multiplier_dir: Optional[Path] = typer.Option(
              None, "--multiplier-dir", envvar="MAXDNN_MULTIPLIERS",
              help="User library of imported multipliers (default ~/.local/share/maxdnn/multipliers).")) -> None:
    """Approximate multipliers in quantized DNNs (MAx-DNN)."""
    from maxdnn.engine.allocator import keep_freed_memory

    keep_freed_memory()  # batches reuse freed buffers instead of faulting fresh mappings in (maxdnn.engine.allocator)
    if multiplier_dir is not None:
        import os

        os.environ["MAXDNN_MULTIPLIERS"] = str(multiplier_dir)


MODEL_HELP = ("Model: a zoo name (resnet8, resnet20), a maxdnn checkpoint (.pt), MLPerf Tiny's Keras ResNet-8 (.h5), "
              "a torch.export program (.pt2) or float ONNX model (.onnx) of any CNN taking float 0..255 pixels NCHW, "
              "an int8 TFLite or ONNX model (.tflite, .onnx: run as deployed) or a saved integer graph (.npz, from "
              "maxdnn finetune). Default: resnet8.")


class UserError(MaxdnnError):
    """A problem with the user's input: reported as one line, exit code 2."""


def fail(msg: str) -> None:
    typer.echo(f"maxdnn: error: {msg}", err=True)
    raise typer.Exit(2)


multipliers_app = typer.Typer(rich_markup_mode=None, help="Error metrics of the multipliers; import your own (Verilog or a product table).")
app.add_typer(multipliers_app, name="multipliers")


@multipliers_app.callback(invoke_without_command=True)
def multipliers(
    ctx: typer.Context,
    spec: Optional[list[str]] = typer.Option(None, "--spec", help="Restrict to these specs (repeatable)."),
    bits: int = typer.Option(8, help="Operand width (2..16)."),
    x_signed: bool = typer.Option(False, "--x-signed", help="Signed activation operand x."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
    lut: Optional[Path] = typer.Option(None, help="Write the lookup table (.npy) of the single --spec."),
):
    """Error metrics of exact, ROUP, published approximate and imported multipliers."""
    if ctx.invoked_subcommand:
        return
    import numpy as np

    from maxdnn.multipliers.metrics import error_metrics
    from maxdnn.multipliers.library import readable_entries
    from maxdnn.multipliers.models import SpecError, default_family, get_multiplier

    if spec:
        specs = list(spec)
    else:  # the default family and every readable imported entry of these formats
        specs = default_family(bits) + [n for n, m in readable_entries().items()
                                         if m["bits"] == bits and m["x_signed"] == x_signed]
    try:
        mults = [get_multiplier(s, bits, x_signed) for s in specs]
    except SpecError as e:
        fail(str(e))
    if lut is not None:
        if len(mults) != 1:
            fail("--lut needs exactly one --spec")
        table = mults[0].lut()
        try:
            with atomic_path(lut, ".npy") as tmp:
                np.save(tmp, table)
        except OSError as e:
            fail(f"{lut}: cannot write ({e.strerror})")
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


PUBLISHED_LABELS = {"pdk45_pwr_mw": "PDK45 power (mW)", "pdk45_area_um2": "PDK45 area (um2)",
                    "pdk45_delay_ns": "PDK45 delay (ns)"}


@multipliers_app.command("import")
def multipliers_import(
    file: Path = typer.Argument(..., help="A Verilog design (.v, .sv) or a product table (.npy)."),
    name: str = typer.Option(..., help="Name in the user library (used as a spec everywhere)."),
    top: Optional[str] = typer.Option(None, help="Verilog top module (default: the file's only module)."),
    bits: int = typer.Option(8, help="Operand width."),
    x_signed: bool = typer.Option(False, "--x-signed", help="Signed activation operand x (default unsigned)."),
    w_format: str = typer.Option("signed", help="How the circuit serves maxdnn's signed weights: signed (its weight "
                                 "port takes two's complement, e.g. EvoApprox mul8s_*) or sign-magnitude "
                                 "(p = sign(w) * M(x, |w|): an unsigned circuit, e.g. EvoApprox mul8u_*)."),
    force: bool = typer.Option(False, "--force", help="Import a Verilog design even when its product has the wrong "
                               "sign on over 5% of the operand pairs (the mark of a wrong operand mapping)."),
    x_port: Optional[str] = typer.Option(None, help="Activation input port (default: the first input)."),
    w_port: Optional[str] = typer.Option(None, help="Weight input port (default: the second input)."),
    product_port: Optional[str] = typer.Option(None, help="Product output port (default: the only output)."),
    energy: Optional[float] = typer.Option(None, help="Tables only: energy relative to the exact multiplier."),
    data: Optional[str] = typer.Option(None, help="CIFAR-10 source: also measure energy on the resnet8 stream "
                                       "(the stream of the energy table that exploration uses)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite an imported multiplier of the same name."),
):
    """Import a multiplier: Verilog is synthesized (Yosys), tabulated exhaustively and its energy simulated."""
    from maxdnn.hardware.design_import import import_table, import_verilog
    from maxdnn.hardware.power import uniform_stream
    from maxdnn.multipliers.library import LibraryError, ensure_writable, library_dir

    if not file.is_file():  # before any stream is built
        fail(f"{file}: no such file")
    suffix = file.suffix.lower()
    try:
        ensure_writable()
        if suffix in (".v", ".sv"):
            if energy is not None:
                fail("--energy is for tables; a Verilog design's energy is simulated from its netlist")
            streams = [uniform_stream()]
            if data is not None:
                streams.append(_model_stream_or_fail(None, data, "resnet8"))
            meta = import_verilog(file, top, name, bits, x_signed, streams, x_port, w_port, product_port, replace,
                                  w_format, force)
        elif suffix == ".npy":
            if data is not None or top is not None:
                fail("--data and --top are for Verilog designs; a table gets energy only from --energy")
            meta = import_table(file, name, bits, x_signed, energy, replace)
        else:
            fail(f"{file}: expected a Verilog design (.v, .sv) or a product table (.npy)")
    except LibraryError as e:
        fail(str(e))
    m = meta["metrics"]
    typer.echo(f"imported '{name}' into {library_dir() / name}: x {'s' if x_signed else 'u'}{bits}, w s{bits}"
               f"{' (sign-magnitude)' if meta.get('w_format') == 'sign-magnitude' else ''}; "
               f"error rate {m['error_rate']:.4f}, bias {m['bias']:.2f}, NMED {m['nmed']:.2e}, MRED {m['mred']:.2e}, WCE {m['wce']}")
    if meta.get("gates"):
        typer.echo(f"netlist: {meta['gates']} gates, {meta['area_nand2']:.1f} NAND2 eq., depth {meta['depth']}")
    if meta.get("published"):
        typer.echo("published in the file: " + ", ".join(f"{PUBLISHED_LABELS.get(k, k)} {v:g}"
                                                          for k, v in meta["published"].items()))
    if meta["energy_rel"]:
        typer.echo("energy / exact Booth: " + ", ".join(f"{k} {v:.3f}" for k, v in meta["energy_rel"].items()))
    elif meta.get("energy_given") is not None:
        typer.echo(f"energy / exact: {meta['energy_given']} (stated)")
    else:
        typer.echo("energy: none (" + meta.get("energy_note", "give --energy, or import the design's Verilog") + ")")


ENERGY_HELP = ("Energy per multiplication: average (one operand stream for every layer), per-layer (each layer's "
               "own stream; the committed ResNet-8's table) or a table FILE.json saved by hardware report --per-layer.")
EXPLORE_ENERGY_HELP = ("The energy the search minimises: multiplication energy, average, per-layer or a table FILE.json "
                       "(as evaluate's --energy), or accelerator:NAME, the network's energy per image on an "
                       "accelerator through ZigZag (a template such as tpu_like, or accelerator:HW.yaml:MAPPING.yaml; "
                       "needs maxdnn[accelerator]; the multiplication gain is reported beside it).")


def _model_stream_or_fail(model, data, name, per_layer: bool = False):
    """The weight-stationary operand stream of a model (default the committed ResNet-8); with ``per_layer``
    (stream, {layer: its own stream}, quantized graph)."""
    from maxdnn.data import DataError
    from maxdnn.hardware.power import layer_streams, model_stream
    from maxdnn.zoo.models import ModelError
    from maxdnn.ir.quant import calibration_images
    from maxdnn.workload import Workload

    try:
        wl = Workload.open(model, _data_or_fail(data))
        q = wl.quantized()
        imgs = calibration_images(wl.split("train").images, 2, seed=1)
    except (DataError, ModelError) as e:
        fail(str(e))
    try:
        stream = model_stream(q, imgs, name=name)
        return (stream, layer_streams(q, imgs), q) if per_layer else stream
    except ValueError as e:
        fail(f"{model}: {e}")


def _data_or_fail(data):
    from maxdnn.data import DataError, resolve_data

    try:
        return resolve_data(data)
    except DataError as e:
        fail(str(e))


def _load_split(data, split):
    from maxdnn.data import DataError, load_cifar10

    try:
        return load_cifar10(_data_or_fail(data), split)
    except DataError as e:
        fail(str(e))


@app.command("download-data")
def download_data(dest: Optional[Path] = typer.Option(None, help="Folder for cifar-10-python.tar.gz (default: the cache).")):
    """Download the official CIFAR-10 archive and verify its MD5."""
    from maxdnn.data import DataError, download_cifar10

    try:
        typer.echo(str(download_cifar10(dest)))
    except DataError as e:
        fail(str(e))


@app.command()
def train(
    out: Path = typer.Option(..., help="Checkpoint to write (resumes from OUT.state if present)."),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source."),
    epochs: int = typer.Option(60, help="Training epochs (SGD, cosine learning rate)."),
    batch_size: int = typer.Option(128, help="Images per step."),
    lr: float = typer.Option(0.1, help="Peak learning rate."),
    seed: int = typer.Option(0, help="Seed of the initialization, the data order and the augmentation."),
    holdout: int = typer.Option(5000, help="Training images held out as the validation split (seeded)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    arch: str = typer.Option("resnet8", help="Zoo architecture: resnet8 or resnet20."),
    init: Optional[str] = typer.Option(None, help="Start from this checkpoint's weights (a zoo name or a .pt of the same "
                                                   "architecture) with a fresh schedule, instead of a seeded initialization."),
):
    """Train a zoo network on the training split minus the validation hold-out."""
    import numpy as np

    import tempfile

    from maxdnn.data import validation_split
    from maxdnn.zoo.models import ARCHITECTURES
    from maxdnn.zoo.train import train as run_train

    if arch not in ARCHITECTURES:
        fail(f"--arch {arch}: expected one of {', '.join(ARCHITECTURES)}")
    if epochs <= 0 or batch_size <= 0 or holdout < 0:
        fail("--epochs and --batch-size must be positive, --holdout not negative")
    try:  # the checkpoint's folder must take files before an epoch is spent
        tempfile.TemporaryFile(dir=out.parent if str(out.parent) else ".").close()
    except OSError as e:
        fail(f"{out}: cannot write the checkpoint there ({e.strerror})")
    init_model = None
    if init is not None:
        from maxdnn.zoo.models import ModelError, arch_of, load_model
        try:
            init_model = load_model(init)
        except ModelError as e:
            fail(str(e))
        if arch_of(init_model) != arch:
            fail(f"--init {init}: a {arch_of(init_model)} checkpoint, not {arch}")
    ds = _load_split(data, "train")
    tr, held = validation_split(len(ds), holdout, seed=0) if holdout else (np.arange(len(ds)), np.zeros(0, int))
    sub = ds.subset(tr)
    typer.echo(f"training on {len(sub)} images of {ds.source} (train split, {len(held)} held out)", err=True)
    command = (f"maxdnn train --arch {arch} --data {data} --out {out.name} --epochs {epochs} --batch-size {batch_size} "
               f"--lr {lr} --seed {seed} --holdout {holdout}" + (f" --init {Path(init).name}" if init else ""))
    meta = {"data": str(ds.source), "train_images": len(sub), "holdout": int(len(held)), "command": command}
    try:
        run_train(sub.images, sub.labels, out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                  meta=meta, arch=arch, init=init_model)
    except ValueError as e:  # a saved state from other settings
        fail(str(e))
    typer.echo(str(out))


@app.command()
def finetune(
    assign: Path = typer.Option(..., help="The multiplier assignment (JSON) the fine-tuning keeps fixed."),
    out: Path = typer.Option(..., help="Fine-tuned integer graph to write (.npz; resumes from OUT.state if present)."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source."),
    epochs: int = typer.Option(2, help="Fine-tuning epochs."),
    batch_size: int = typer.Option(64, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Initial learning rate (SGD, momentum 0.9, cosine decay)."),
    images: Optional[int] = typer.Option(None, help="Only N training images (a seeded sample; default: all "
                                         "training images outside the validation hold-out)."),
    seed: int = typer.Option(0, help="Seed of the data order and the augmentation."),
    fit_scales: bool = typer.Option(True, "--fit-weight-scales/--keep-weight-scales",
                                    help="First fit each filter's weight scale to its multipliers' weight grid where "
                                    "that at least halves the grid error (ROUP with 3 perforated rows)."),
    distill: bool = typer.Option(True, "--distill/--labels",
                                 help="Learn the exact quantized model's answers (its logits) or the labels."),
):
    """Approximation-aware fine-tuning: train the quantized model with the assignment's arithmetic in the forward pass."""
    import tempfile

    from maxdnn.engine.approx import Assignment, AssignmentError
    from maxdnn.data import DataError, training_sample
    from maxdnn.compensate.finetune import FinetuneError, finetune as run_finetune
    from maxdnn.zoo.models import ModelError
    from maxdnn.workload import Workload

    if epochs <= 0 or batch_size <= 0 or lr <= 0 or (images is not None and images <= 0):
        fail("--epochs, --batch-size, --lr and --images must be positive")
    if out.suffix.lower() != ".npz":
        fail(f"{out}: the fine-tuned graph is written as .npz")
    try:  # the output's folder must take files before an epoch is spent
        tempfile.TemporaryFile(dir=out.parent if str(out.parent) else ".").close()
    except OSError as e:
        fail(f"{out}: cannot write the fine-tuned graph there ({e.strerror})")
    try:
        wl = Workload.open(model, _data_or_fail(data))
        q = wl.quantized()
        a = Assignment.load(assign, q)
        train = wl.split("train")
    except (DataError, ModelError, AssignmentError) as e:
        fail(str(e))
    tr = training_sample(len(train), images, seed)
    typer.echo(f"fine-tuning on {len(tr)} training images of {train.source} (validation hold-out excluded)", err=True)
    try:
        run_finetune(q, a, train.images[tr], train.labels[tr], out, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, log=lambda m: typer.echo(m, err=True), fit_scales=fit_scales,
                     distill=distill)
    except FinetuneError as e:
        fail(str(e))
    typer.echo(f"wrote {out}; measure it with: maxdnn evaluate --model {out} --assign {assign} --data ...", err=True)
    typer.echo(str(out))


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source (archive, folder or zip)."),
    precision: str = typer.Option("float", help="float or int8 (int8 is implied by --assign)."),
    split: str = typer.Option("test", help="train or test."),
    limit: Optional[int] = typer.Option(None, help="Only N images: a fixed seeded random sample of the split."),
    assign: Optional[Path] = typer.Option(None, help="Multiplier assignment (JSON) for approximate int8 inference."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(100, help="Images per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    save_outputs: Optional[Path] = typer.Option(
        None, help="Write the model's output tensor for every image (.npy, dataset order): the int8 graph's integer "
                   "output (a TFLite model: the int8 input of its softmax), or the float logits."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="With --assign: correct the biases for the "
                                         "assignment's mean accumulator error (measured on 256 training images "
                                         "outside the validation hold-out)."),
    energy: str = typer.Option("average", help=ENERGY_HELP),
    accelerator: Optional[str] = typer.Option(None, help="With --assign: also the network's energy on a DNN "
                                              "accelerator through ZigZag: a ZigZag template (tpu_like, "
                                              "edge_tpu_like, ...) or HW.yaml:MAPPING.yaml (needs maxdnn[accelerator])."),
):
    """Accuracy (and, with --assign, multiplication, PE and accelerator energy) of a model on CIFAR-10."""
    from maxdnn.api import evaluate as maxdnn_evaluate
    from maxdnn.compensate.bias_correction import BiasCorrectionError, correction_images
    from maxdnn.engine.approx import Assignment, AssignmentError
    from maxdnn.data import DataError
    from maxdnn.energy import EnergyModelError
    from maxdnn.multipliers.models import SpecError
    import numpy as np

    from maxdnn.zoo.models import ModelError, float_outputs
    from maxdnn.workload import Workload, accuracy, check_outputs, describe_data

    _check_evaluate_options(precision, limit, device, assign, bias_correction, accelerator)
    try:
        wl = Workload.open(model, _data_or_fail(data))
        ds = wl.split(split)
        if limit is not None and limit > len(ds):
            fail(f"--limit {limit}: the {split} split has only {len(ds)} images")
        ds = ds.sample(limit)
        result = {"model": wl.model_path, "data": describe_data(ds), "split": split}
        if assign is None and precision == "float":
            if wl.model is None:
                fail(f"{wl.model_path}: an int8 model has no float version; use --precision int8")
            outs = float_outputs(wl.model, ds.images, batch_size, device)
            result.update(precision="float", float_note="float inference: may differ in the last digit between "
                          "machines (CPU kernels sum in different orders); int8 numbers do not")
        else:
            q = wl.quantized()
            result.update(precision="int8", calibration=q.meta["calibration"])
            a = Assignment.load(assign, q) if assign is not None else None
            images = correction_images(wl.split("train").images) if bias_correction else False
            try:
                r = maxdnn_evaluate(q, ds.images, ds.labels, a, images, batch_size, device, energy)
            except BiasCorrectionError as e:
                fail(f"{assign}: {e}")
            outs = r.outputs
            if a is not None:
                if bias_correction:
                    result.update(bias_correction=f"{len(images)} training images")
                result.update(_energy_fields(q, a, r, assign, accelerator))
        check_outputs(outs, wl.model_path)
    except (DataError, ModelError, AssignmentError, SpecError, EnergyModelError) as e:
        fail(str(e))
    pred = outs.argmax(1) if len(outs) else np.zeros(0, dtype=np.int64)
    if save_outputs is not None:
        try:
            with atomic_path(save_outputs, ".npy") as tmp:
                np.save(tmp, outs)
        except OSError as e:
            fail(f"{save_outputs}: cannot write ({e.strerror})")
        result["outputs"] = f"{save_outputs}: {outs.dtype} {list(outs.shape)}"
    result = {**accuracy(pred, ds.labels), **result}
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            typer.echo(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


@app.command()
def explore(
    out: Path = typer.Option(..., help="Run directory (rerun the same command to resume)."),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    approach: str = typer.Option("all", help="layer, filter, kernel, alwann or all."),
    budget: str = typer.Option("quick", help="quick or full."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: SQLite in the run directory)."),
    seed: int = typer.Option(0, help="Seed of the sweep and NSGA-II samplers."),
    library: Optional[str] = typer.Option(None, help="Comma-separated multiplier specs the approaches choose from "
                                          "(imported ones included; default: ROUP configurations that save energy)."),
    library_file: Optional[Path] = typer.Option(None, help="The same as a file: one spec per line ('#' comments)."),
    compensation: str = typer.Option("finetune", help="finetune: the search ranks points bias-corrected, then "
                                     "fine-tunes a spread of front points and the exact model (the fair baseline; "
                                     "epochs and points set by the budget); bias: bias correction only; none: "
                                     "points as quantized. The report gives every level the run has."),
    bias_correction: bool = typer.Option(False, "--bias-correction", hidden=True, help="Old name of "
                                         "--compensation bias."),
    energy: str = typer.Option("average", help=EXPLORE_ENERGY_HELP),
    finetune: bool = typer.Option(False, "--finetune", hidden=True, help="Old name of --compensation finetune."),
    accelerator: Optional[str] = typer.Option(None, help="Also report each front point's energy gain on this "
                                              "accelerator (ZigZag template or HW.yaml:MAPPING.yaml; needs "
                                              "maxdnn[accelerator]); kept for 'maxdnn report'."),
    workers: int = typer.Option(1, help="Worker processes on this machine sharing the exploration through the "
                                "storage (each extra one runs in OUT/workers/wK)."),
):
    """MAx-DNN exploration: resilience, the three approaches and ALWANN, Pareto report."""
    import time

    from maxdnn.data import DataError
    from maxdnn.exploration.explorer import APPROACHES, BUDGETS, Explorer, run_exploration
    from maxdnn.compensate.finetune import check_finetunable
    from maxdnn.zoo.models import ModelError
    from maxdnn.exploration.storage import add_wall_seconds
    from maxdnn.runs.workers import (WorkerError, sigterm_interrupts, start_workers, stop_workers, threads_per_worker,
                                     wait_for_workers)
    from maxdnn.workload import Workload

    aps = list(APPROACHES) if approach == "all" else [approach]
    if any(a not in APPROACHES for a in aps):
        fail(f"--approach {approach}: expected one of {', '.join(APPROACHES)} or all")
    if budget not in BUDGETS:
        fail(f"--budget {budget}: expected quick or full")
    specs = _library_specs(library, library_file)
    compensation = _compensation_option(compensation, bias_correction, finetune)
    if energy.startswith("accelerator:"):
        _check_accelerator(energy[len("accelerator:"):])
        if accelerator is not None and accelerator != energy[len("accelerator:"):]:
            fail(f"--accelerator {accelerator} and --energy {energy}: the report's accelerator is the objective's; "
                 "give one of them")
    if accelerator is not None:
        _check_accelerator(accelerator)
    if workers < 1:
        fail(f"--workers {workers}: expected at least 1")
    t0 = time.time()
    try:
        wl = Workload.open(model, _data_or_fail(data))
    except (DataError, ModelError) as e:
        fail(str(e))
    created = _prepare_run_dir(out)
    if workers > 1:  # the others share this run's database (or the given server)
        storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        ex = Explorer(out, wl, BUDGETS[budget], storage, seed, log=lambda m: typer.echo(m, err=True), library=specs,
                      compensation=compensation, energy=energy)
        if compensation == "finetune":  # before any search: a graph the fine-tuning cannot take is refused now
            check_finetunable(ex.q)
    except (DataError, ModelError, ValueError) as e:
        if created:  # nothing of this run is kept: no half-made run directory
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        fail(str(e))
    helpers = []
    if workers > 1:
        args = ["--approach", approach, "--budget", budget, "--storage", storage, "--seed", str(seed), "--energy",
                energy] + (["--data", data] if data else []) + (["--model", model] if model else []) \
            + (["--library", ",".join(specs)] if specs else []) + ["--compensation", compensation]
        threads = threads_per_worker(workers)
        helpers = start_workers(out, workers - 1, args, threads)
        import torch

        torch.set_num_threads(threads)
    try:
        with sigterm_interrupts():  # terminated = interrupted: its claims are released
            run_exploration(ex, aps)
            wait_for_workers(helpers)
    except KeyboardInterrupt:  # the time spent counts towards the run's wall time; a rerun resumes
        stop_workers(helpers)
        add_wall_seconds(out, time.time() - t0)
        typer.echo(f"maxdnn: {out}: interrupted; the same command resumes it", err=True)
        raise typer.Exit(130)
    except WorkerError as e:  # the others are stopped too: none goes on with the run after this command
        stop_workers(helpers)
        add_wall_seconds(out, time.time() - t0)
        fail(f"{e} (the other workers were stopped; the same command resumes the run)")
    except MaxdnnError as e:  # a file of the run directory the stage cannot take (a fine-tuning state, graph)
        stop_workers(helpers)
        fail(str(e))
    _finish_exploration(out, ex, time.time() - t0, accelerator)


def _finish_exploration(out: Path, ex, seconds: float, accelerator: str | None) -> None:
    """The run's wall time and resilience summary into run.json, then the report, printed."""
    from maxdnn.accelerator import AcceleratorError
    from maxdnn.exploration.report import write_report
    from maxdnn.exploration.storage import add_wall_seconds

    res = ex.resilience()
    extra = {"accelerator": accelerator} if accelerator else {}
    add_wall_seconds(out, seconds, resilience=", ".join(
        f"{k} {v:.2f}" for k, v in zip(["layers", "filter bins", "kernel bins"], res["validation"])), **extra)
    try:
        path = write_report(out, ex.store)
    except AcceleratorError as e:
        fail(str(e))
    typer.echo(path.read_text())


def _check_evaluate_options(precision, limit, device, assign, bias_correction, accelerator) -> None:
    """``evaluate``'s options refused in one line before any data is read."""
    if precision not in ("float", "int8"):
        fail(f"--precision {precision}: expected float or int8")
    if limit is not None and limit <= 0:
        fail(f"--limit {limit}: expected a positive number of images")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device available")
    if bias_correction and assign is None:
        fail("--bias-correction needs --assign (an all-exact network has nothing to correct)")
    if accelerator is not None:
        if assign is None:
            fail("--accelerator needs --assign (give an all-exact assignment for the exact network)")
        _check_accelerator(accelerator)


def _energy_fields(q, a, r, assign, accelerator) -> dict:
    """``evaluate``'s assignment and energy fields: multiplication and PE energy from the evaluation ``r``, and
    with ``accelerator`` the accelerator's."""
    out = {k: r.energy[k] for k in ("energy", "energy_gain", "pe_energy_gain", "energy_unit", "energy_source",
                                    "multiplications") if k in r.energy}
    if out.get("pe_energy_gain") is None:
        out.pop("pe_energy_gain", None)
    out = {"assignment": str(assign), "granularity": a.granularity(), **out}
    if accelerator is not None:
        out.update(_accelerator_fields(q, a, accelerator))
    return out


def _check_accelerator(accelerator: str) -> None:
    """``--accelerator`` refused in one line before any data is read."""
    from maxdnn.accelerator import AcceleratorError, resolve

    try:
        resolve(accelerator)
    except AcceleratorError as e:
        fail(str(e))


def _accelerator_fields(q, a, accelerator: str) -> dict:
    """``evaluate``'s accelerator numbers (``maxdnn.accelerator``), or one line."""
    from maxdnn.accelerator import AcceleratorError, accelerator_energy

    try:
        r = accelerator_energy(q, a, accelerator)
    except AcceleratorError as e:
        fail(str(e))
    t = r["total"]
    return {"accelerator": r["accelerator"], "accelerator_energy_gain": t["gain"],
            "accelerator_energy_pj": t["total_pj"], "accelerator_energy_exact_pj": t["total_exact_pj"],
            "accelerator_mac_share_exact": t["mac_share_exact"],
            "accelerator_memory_pj": {k: round(v, 3) for k, v in t["memory_pj"].items()},
            "accelerator_energy_unit": r["unit"], "accelerator_energy_source": r["source"]}


def _compensation_option(compensation: str, bias_correction: bool, finetune: bool) -> str:
    """``explore --compensation``, with its old flags (``--finetune`` wins, as the stronger level); one line."""
    if bias_correction or finetune:
        compensation = "finetune" if finetune else "bias"
    if compensation not in ("none", "bias", "finetune"):
        fail(f"--compensation {compensation}: expected none, bias or finetune")
    return compensation


def _library_specs(library: str | None, library_file: Path | None) -> list[str] | None:
    """Specs of --library / --library-file, checked to exist (one line otherwise)."""
    from maxdnn.multipliers.models import SpecError, get_multiplier

    if library is not None and library_file is not None:
        fail("give --library or --library-file, not both")
    if library_file is not None:
        try:
            lines = library_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{library_file}: cannot read ({getattr(e, 'strerror', None) or e})")
        specs = [ln.split("#")[0].strip() for ln in lines]
        where = str(library_file)
    elif library is not None:
        specs = library.split(",")
        where = "--library"
    else:
        return None
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        fail(f"{where}: no multiplier specs")
    for spec in specs:  # exists at all (the explorer checks each layer's operand format)
        try:
            get_multiplier(spec)
        except SpecError as e:
            try:
                get_multiplier(spec, x_signed=True)
            except SpecError:
                fail(f"{where}: {e}")
    return specs


def _check_writable(path: Path) -> None:
    """One line now, not after the work, when ``path``'s folder cannot take a file."""
    import tempfile

    try:
        tempfile.TemporaryFile(dir=path.parent if str(path.parent) else ".").close()
    except OSError as e:
        fail(f"{path}: cannot write there ({e.strerror})")


def _prepare_run_dir(out: Path) -> bool:
    """Create (or check) a writable run directory before any work; True if it was created."""
    import tempfile

    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        fail(f"{out}: cannot write the run directory ({e.strerror})")
    return created


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory of maxdnn explore.")):
    """Write points.csv, pareto.png/svg and report.md of an exploration run."""
    from maxdnn.exploration.report import ReportError, write_report

    if not (run_dir / "run.json").exists():
        fail(f"{run_dir}: not an exploration run (no run.json)")
    import sqlalchemy.exc

    try:
        from maxdnn.exploration.storage import RunStorage

        path = write_report(run_dir, RunStorage.of_run(run_dir))
    except (ReportError, ValueError) as e:
        fail(str(e))
    except sqlalchemy.exc.SQLAlchemyError as e:  # a damaged study database
        msg = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:160]
        fail(f"{run_dir / 'study.db'}: not a readable study database ({msg})")
    from maxdnn.exploration.report import read_points

    if not read_points(run_dir / "points.csv"):
        typer.echo(f"maxdnn: warning: {run_dir} has no evaluated points yet; the report's tables are empty", err=True)
    typer.echo(str(path))


@app.command()
def layers(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source (calibration images)."),
    calib: int = typer.Option(1000, help="Calibration images (seeded sample of the train split)."),
    as_json: bool = typer.Option(False, "--json", help="Print the layers as JSON."),
):
    """The multiplying layers of the quantized model: the names assignments are written against."""
    from maxdnn.data import DataError
    from maxdnn.zoo.models import ModelError
    from maxdnn.workload import Workload

    try:
        q = Workload.open(model, _data_or_fail(data)).quantized(calib)
    except (DataError, ModelError) as e:
        fail(str(e))
    rows = q.describe_layers()
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{model or 'resnet8'}: {len(rows)} multiplying layers, "
                    f"{sum(r['multiplications'] for r in rows):,} multiplications per image (padding excluded)")
    for c in ["name", "kind", "weight [F, C/groups, kh, kw]", "stride", "input", "multiplications"]:
        t.add_column(c, justify="left" if c in ("name", "kind") else "right")
    for r in rows:
        t.add_row(r["name"], r["kind"], str(r["weight_shape"]), str(r["stride"]),
                  f"{r['input']} {r['input_range'][0]}..{r['input_range'][1]}", f"{r['multiplications']:,}")
    Console(width=140).print(t)


hardware_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Gate-level netlists, area, depth and energy of the multipliers.")
app.add_typer(hardware_app, name="hardware")


ROUNDING_HELP = ("ROUP rounding design: folded (the rounding bit enters the partial-product generators, no adder; "
                 "the default) or incrementer (the multiplicand is rounded by a half-adder chain first).")


@hardware_app.command("verilog")
def hardware_verilog(spec: str = typer.Argument(..., help="exact or roup-p{P}r{R} (the forms with a hardware design)."),
                     out: Path = typer.Option(..., help="Verilog file to write."),
                     rounding: str = typer.Option("folded", help=ROUNDING_HELP)):
    """Write the structural Verilog of SPEC (exact or roup-p{P}r{R}); module mul(x, w, p)."""
    from maxdnn.hardware.booth_verilog import ROUNDING_DESIGNS
    from maxdnn.hardware.power import NoHardwareError, verilog_for

    if rounding not in ROUNDING_DESIGNS:
        fail(f"--rounding {rounding}: expected one of {', '.join(ROUNDING_DESIGNS)}")
    try:
        v = verilog_for(spec, rounding=rounding)
    except NoHardwareError as e:
        fail(str(e))
    try:
        write_text(out, v)
    except OSError as e:
        fail(f"{out}: cannot write ({e.strerror})")
    typer.echo(str(out))


@hardware_app.command("report")
def hardware_report_cmd(
    spec: Optional[list[str]] = typer.Option(None, "--spec", help="Designs: exact, roup-p{P}r{R} or a multiplier imported from Verilog (default: exact and every 8-bit ROUP)."),
    stream: Optional[list[str]] = typer.Option(None, "--stream", help="uniform and/or model (repeatable; default uniform). "
                                               "'resnet8' is the model stream of the committed ResNet-8 under the name the energy table uses."),
    data: Optional[str] = typer.Option(None, envvar="MAXDNN_DATA", help="CIFAR-10 source for the model stream."),
    model: Optional[str] = typer.Option(None, help="Model for the model stream (zoo name, .pt, .h5 or .pt2; default resnet8)."),
    as_json: bool = typer.Option(False, "--json", help="Print the designs as JSON."),
    save_table: Optional[Path] = typer.Option(None, help="Also write the table (JSON) that energy accounting reads."),
    rounding: str = typer.Option("folded", help=ROUNDING_HELP),
    liberty: Optional[Path] = typer.Option(None, help="Map each design to this liberty library's cells and take "
                                           "energy (fJ), leakage and area from it (needs maxdnn[liberty])."),
    pe: bool = typer.Option(False, "--pe", help="Also the processing element: the multiplier with a 24-bit "
                            "accumulator adder and register, energy per operation (register clock from --liberty)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also measure every design on each layer's own "
                                   "operand stream (with --stream model or resnet8); --save-table then holds the "
                                   "per-layer table that --energy FILE reads."),
):
    """Area, logic depth and energy per multiplication of each design (NAND2 model, or a liberty library)."""
    import time

    from tqdm import tqdm

    from maxdnn.hardware.power import NoHardwareError, check_design, hardware_report, uniform_stream
    from maxdnn.hardware.synth import SynthesisError
    from maxdnn.multipliers.models import roup_specs

    from maxdnn.hardware.booth_verilog import ROUNDING_DESIGNS

    if rounding not in ROUNDING_DESIGNS:
        fail(f"--rounding {rounding}: expected one of {', '.join(ROUNDING_DESIGNS)}")
    specs = list(spec) if spec else ["exact"] + [s for s in roup_specs(8) if s != "roup-p0r0"]
    streams = list(stream) if stream else ["uniform"]
    for s in streams:
        if s not in ("uniform", "model", "resnet8"):
            fail(f"--stream {s}: expected uniform or model")
        if s == "resnet8" and model not in (None, "resnet8"):
            fail("--stream resnet8 is the committed ResNet-8's stream; use --stream model with --model")
    try:
        for s in specs:
            check_design(s, pe=pe)
    except NoHardwareError as e:
        fail(str(e))
    lib = None
    if liberty is not None:
        from maxdnn.hardware.liberty import LibertyError, read_liberty

        try:
            lib = read_liberty(liberty)
        except LibertyError as e:
            fail(str(e))
    if save_table is not None:  # the table's folder must take files before minutes of synthesis
        _check_writable(save_table)
    model_streams = [s for s in streams if s != "uniform"]
    if per_layer and len(model_streams) != 1:
        fail("--per-layer measures a model's layers: give one --stream model (or resnet8)")
    t0 = time.time()
    built, layer_q = [], None
    for s in streams:
        if s == "uniform":
            built.append(uniform_stream())
        elif per_layer:
            stream, by_layer, layer_q = _model_stream_or_fail(model, data, s, per_layer=True)
            built.append(stream)
            built += list(by_layer.values())
        else:
            built.append(_model_stream_or_fail(model, data, s))
    from maxdnn.hardware.synth import first_use_note
    from maxdnn.hardware.netlist import NetlistError

    if note := first_use_note():
        typer.echo(note, err=True)
    bar = tqdm(total=len(specs), desc="designs", disable=as_json, leave=False)

    try:
        rows = hardware_report(specs, built, progress=lambda _: bar.update(), rounding=rounding, liberty=lib, pe=pe)
    except (SynthesisError, NetlistError, ValueError) as e:
        fail(str(e))
    bar.close()
    elapsed = time.time() - t0
    if save_table:
        from maxdnn.hardware.power import energy_table_doc

        doc = energy_table_doc(rows, built, rounding, lib, liberty, pe, layer_q, model)
        try:
            write_json(save_table, doc)
        except OSError as e:
            fail(f"{save_table}: cannot write ({e.strerror})")
    if as_json:
        _print_hardware_json(rows, lib, pe)
        return
    _print_hardware_tables(rows, streams, rounding, elapsed, lib, liberty, pe, layer_q)


def _print_hardware_json(rows, lib, pe) -> None:
    """``hardware report --json``: one object per design, each with the units of its figures."""
    from maxdnn.hardware.power import units_of

    keys = ("spec", "area_nand2", "depth", "energy", "energy_zero_delay", "energy_rel", "gates") \
        + (("area_lib", "leakage_nw") if lib else ()) + (("pe_energy", "pe_energy_rel") if pe else ())
    units = units_of(lib, pe)
    if lib and not any(r["area_lib"] for r in rows):
        units["area_lib_unit"] = "none: the library's cells have no area; area_nand2 (the NAND2 model) stands in"
    optional = ("w_format", "x_signed", "reference", "published")
    typer.echo(json.dumps([{**{k: r[k] for k in keys}, **units, **{k: r[k] for k in optional if k in r}}
                           for r in rows], indent=1))


def _print_hardware_tables(rows, streams, rounding, elapsed, lib, liberty, pe, layer_q) -> None:
    """``hardware report``'s tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"8-bit radix-4 Booth / ROUP designs, {rounding} rounding ({elapsed:.1f} s); energy in "
                    + (f"fJ per multiplication ({lib.name}, {lib.voltage:g} V)" if lib else
                       "NAND2-toggle eq. per multiplication"))
    t.add_column("spec")
    cols = ["cells" if lib else "gates", "area (NAND2)"] + (["area (lib)", "leakage (nW)"] if lib else []) + ["depth"]
    pe_cols = [f"PE/PE_exact {s}" for s in streams] if pe else []
    for c in cols + [f"E {s}" for s in streams] + [f"E/E_exact {s}" for s in streams] + pe_cols:
        t.add_column(c, justify="right")
    if layer_q is not None:
        from maxdnn.hardware.power import per_layer_relative

        table_pl = per_layer_relative(rows, layer_q)
        names = list(table_pl)
        tl = Table(title="energy on each layer's own stream, in average exact multiplications")
        tl.add_column("spec")
        for n in names:
            tl.add_column(n, justify="right")
        for r in rows:
            tl.add_row(r["spec"], *[f"{table_pl[n][r['spec']]:.3f}" if r["spec"] in table_pl[n] else "n/a"
                                    for n in names])
        Console(width=200).print(tl)
    for r in rows:
        extra = [f"{r['area_lib']:.1f}" if r["area_lib"] else "n/a", f"{r['leakage_nw']:.0f}"] if lib else []
        t.add_row(r["spec"], str(r["gates"]), f"{r['area_nand2']:.1f}", *extra, str(r["depth"]),
                  *[f"{r['energy'][s]:.1f}" if s in r["energy"] else "n/a" for s in streams],
                  *[f"{r['energy_rel'][s]:.3f}" if s in r["energy_rel"] else "n/a" for s in streams],
                  *([f"{r['pe_energy_rel'][s]:.3f}" for s in streams] if pe else []))
    Console(width=240).print(t)
    for r in rows:
        if r.get("published"):  # an imported design whose file publishes its own synthesis figures
            pub = r["published"]
            typer.echo(f"{r['spec']}: its file publishes " + ", ".join(
                f"{PUBLISHED_LABELS.get(k, k)} {v:g}" for k, v in pub.items()))
    if any(r.get("x_signed") for r in rows):
        typer.echo("x-signed designs (" + ", ".join(r["spec"] for r in rows if r.get("x_signed")) + "): measured on "
                   "the uniform stream with signed x, relative to the exact Booth design with signed x; the model "
                   "streams have unsigned activations (n/a)", err=True)
    if lib and not any(r["area_lib"] for r in rows):
        typer.echo(f"{liberty}: its cells have no area; the area column is the NAND2-equivalent model", err=True)


def _out_of_space(e: BaseException) -> str | None:
    """Why a write failed for lack of room (a full disk or quota, SQLite's 'disk is full'), or None."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:  # a chain of causes can loop back
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return os.strerror(e.errno)
        if "database or disk is full" in str(e):
            return "database or disk is full"
        e = e.__cause__ or e.__context__ or getattr(e, "orig", None)
    return None


def main() -> None:
    """The ``maxdnn`` command: the app, with a full disk (of any write, standard output included) said in one line,
    exit code 2. What was being written is left as before (every result file is written atomically)."""
    code = 0
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into a line here; the rest propagates
        if (why := _out_of_space(e)) is None:
            raise
        typer.echo(f"maxdnn: error: no room to write ({why}); free some space and rerun the same command", err=True)
        code = 2
    try:
        sys.stdout.flush()
    except OSError as e:
        why = _out_of_space(e) or e.strerror
        try:
            sys.stdout = open(os.devnull, "w")  # the interpreter's own flush at exit would fail again
        finally:
            typer.echo(f"maxdnn: error: cannot write the output ({why})", err=True)
        code = 2
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
