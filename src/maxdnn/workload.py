"""The model + data a command works on: loading, describing and quantizing them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maxdnn.data import Dataset, load_cifar10, resolve_data
import torch.nn as nn

from maxdnn.ir.graph import QuantizedGraph
from maxdnn.zoo.models import load_model
from maxdnn.ir.quant import calibration_images
from maxdnn.frontends.pytorch import quantize_module


def describe_data(ds: Dataset) -> str:
    """Which data an accuracy came from, in words."""
    p = Path(ds.source)
    name = p.name.lower()
    if "jpeg" in name or "jpg" in name:
        kind = "JPEG copy (lossy)"
    elif "lossless" in name:
        kind = "lossless official pixels"
    elif name.endswith((".tar.gz", ".tgz")) or "batches" in name:
        kind = "official archive"
    else:
        kind = "image folder"
    return f"{p.name} {ds.split} split, {len(ds)} images ({kind})"


@dataclass
class Workload:
    model: nn.Module | None  # the float network (None for an int8 TFLite model)
    model_path: str
    data_path: Path
    imported: QuantizedGraph | None = None  # an already quantized model (TFLite, saved graph), used as it is

    @classmethod
    def open(cls, model: str | None, data: str | None) -> "Workload":
        """``model``: a zoo name, .pt checkpoint, Keras .h5, torch.export .pt2 or int8 .tflite (default: resnet8)."""
        m = load_any_model(model)
        if isinstance(m, QuantizedGraph):
            return cls(None, str(model), resolve_data(data), m)
        return cls(m, str(model or "resnet8"), resolve_data(data))

    def split(self, split: str, limit: int | None = None) -> Dataset:
        """The split, or a fixed seeded random sample of ``limit`` images of it."""
        return load_cifar10(self.data_path, split).sample(limit)

    def quantized(self, calib: int = 1000, percentile: float = 99.99) -> QuantizedGraph:
        """8-bit integer graph calibrated on ``calib`` seeded training images of the same data source
        (an imported int8 model: its own quantization)."""
        if self.imported is not None:
            self.imported.meta.setdefault("calibration", "none: the model's own int8 quantization")
            return self.imported
        train = load_cifar10(self.data_path, "train")
        q = quantize_module(self.model, calibration_images(train.images, calib), percentile)
        q.meta.update({"model": self.model_path, "calibration": f"{calib} images of {describe_data(train)}"})
        return q


def load_any_model(spec: str | None) -> nn.Module | QuantizedGraph:
    """A float network (zoo name, .pt, .h5, .pt2, float .onnx), or an already integer one: an int8 .tflite or .onnx
    model (its own quantization) or a saved integer graph (.npz, from maxdnn finetune)."""
    if spec is not None and str(spec).lower().endswith(".tflite"):
        from maxdnn.frontends.tflite import load_tflite

        return load_tflite(spec)
    if spec is not None and str(spec).lower().endswith(".onnx"):
        from maxdnn.frontends.onnx_int8 import load_onnx_model

        return load_onnx_model(spec)
    if spec is not None and str(spec).lower().endswith(".npz"):
        from maxdnn.ir.graph import GraphError
        from maxdnn.zoo.models import ModelError

        if not Path(spec).exists():
            raise ModelError(f"{spec}: no such model file")
        try:
            return QuantizedGraph.load(spec)
        except GraphError as e:
            raise ModelError(str(e)) from None
    return load_model(spec)


def check_outputs(outs: np.ndarray, model: str, classes: int = 10) -> None:
    """A classifier's outputs must have one score per class of the data (a 5-class head on CIFAR-10 is refused,
    not scored)."""
    from maxdnn.zoo.models import ModelError

    if outs.ndim != 2 or outs.shape[1] != classes:
        got = list(outs.shape[1:])
        raise ModelError(f"{model}: the network outputs {got} per image; the data has {classes} classes "
                         f"(expected [{classes}])")


def accuracy(pred: np.ndarray, labels: np.ndarray) -> dict:
    correct = int((pred == labels).sum())
    return {"accuracy": correct / max(len(labels), 1), "correct": correct, "images": int(len(labels))}
