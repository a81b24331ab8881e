"""The model zoo (ResNet-8, ResNet-20 for CIFAR-10), checkpoints and the Keras import.

Every zoo network takes raw 0..255 pixels (float, NCHW) and multiplies them by
a fixed ``input_scale`` (1 for the MLPerf model, 1/255 for maxdnn's own).
ResNet-8 (the MLPerf Tiny shape) uses TensorFlow's "same" padding (stride-2
layers pad one extra row/column at the bottom/right), so Keras weights import
unchanged. ResNet-20 is He et al.'s CIFAR network (3 stages of 3 basic blocks,
16/32/64 filters) with 1x1 projection shortcuts where the shape changes.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from maxdnn.errors import ModelError
from maxdnn.ir.quant import same_padding
from maxdnn.atomic import atomic_path
CHECKPOINT_FORMAT = "maxdnn-model-v1"
LEGACY_FORMATS = {"maxdnn-resnet8-v1": "resnet8"}
DEFAULT_CHECKPOINT = "resnet8-cifar10-jpeg.pt"


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding (explicit, possibly asymmetric)."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=True)

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) as F.pad takes them."""
        t, b = same_padding(h, self.kernel_size[0], self.stride[0])
        left, r = same_padding(w, self.kernel_size[1], self.stride[1])
        return (left, r, t, b)

    def forward(self, x):
        return super().forward(F.pad(x, self.pads(x.shape[2], x.shape[3])))


class Stack(nn.Module):
    """conv3x3+BN+ReLU, conv3x3+BN, shortcut (1x1 strided projection or identity), add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = SameConv2d(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-3)
        self.conv2 = SameConv2d(cout, cout, 3, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.proj = SameConv2d(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = self.proj(x) if self.proj is not None else x
        return F.relu(s + y)


class ResNet8(nn.Module):
    """ResNet-8 (EEMBC/MLPerf Tiny): 16/32/64 filters, ~78k parameters."""

    def __init__(self, num_classes: int = 10, input_scale: float = 1.0 / 255.0):
        super().__init__()
        self.input_scale = float(input_scale)
        self.conv1 = SameConv2d(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16, eps=1e-3)
        self.s1 = Stack(16, 16, 1)
        self.s2 = Stack(16, 32, 2)
        self.s3 = Stack(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = x * self.input_scale
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.s3(self.s2(self.s1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class BasicBlock(nn.Module):
    """conv3x3+BN+ReLU, conv3x3+BN, shortcut (identity or 1x1 projection + BN), add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR-10 (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 filters."""

    def __init__(self, num_classes: int = 10, input_scale: float = 1.0 / 255.0, blocks: int = 3):
        super().__init__()
        self.input_scale = float(input_scale)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            stage = [BasicBlock(cin if b == 0 else cout, cout, 2 if (b == 0 and i > 0) else 1) for b in range(blocks)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x * self.input_scale)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


ARCHITECTURES = {"resnet8": ResNet8, "resnet20": ResNet20}
# built-in names -> committed checkpoints (names without one can be trained with ``maxdnn train --arch``)
ZOO_CHECKPOINTS = {"resnet8": "resnet8-cifar10-jpeg.pt", "resnet20": "resnet20-cifar10-jpeg.pt"}


def build_model(arch: str, input_scale: float = 1.0 / 255.0) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture '{arch}' (built in: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](input_scale=input_scale)


def arch_of(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ModelError(f"{type(model).__name__} is not a built-in architecture")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "arch": arch_of(model), "input_scale": model.input_scale,
                    "state_dict": model.state_dict(), "meta": meta or {}}, tmp)


def default_checkpoint(name: str = "resnet8") -> Path:
    return Path(str(resources.files("maxdnn") / "checkpoints" / ZOO_CHECKPOINTS[name]))


def load_checkpoint(path: str | os.PathLike) -> nn.Module:
    """A maxdnn checkpoint (.pt) of a zoo architecture."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        known = "" if path.suffix.lower() in (".pt", ".pth") else \
            "; models are a zoo name, .pt, .pt2, .h5, .onnx, .tflite or .npz"
        raise ModelError(f"{path}: not a readable maxdnn checkpoint ({type(e).__name__}){known}") from None
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, *LEGACY_FORMATS):
        raise ModelError(f"{path}: not a maxdnn checkpoint (format {fmt!r})")
    arch = LEGACY_FORMATS.get(fmt) or ck.get("arch")
    model = build_model(arch, input_scale=ck["input_scale"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit {arch} ({str(e).splitlines()[0]})") from None
    model.meta = ck.get("meta", {})
    return model.eval()


def load_model(path: str | os.PathLike | None = None) -> nn.Module:
    """A float model: a zoo name (``resnet8``, ``resnet20``: the committed checkpoint; default
    resnet8), a maxdnn checkpoint (.pt), MLPerf Tiny's Keras ResNet-8 (.h5) or a ``torch.export``
    program (.pt2) of any CNN taking float 0..255 pixels NCHW."""
    if path is None or str(path) in ZOO_CHECKPOINTS:
        name = str(path or "resnet8")
        path = default_checkpoint(name)
        if not path.exists():
            raise ModelError(f"{name}: no committed checkpoint ({path.name}); train one with "
                             f"'maxdnn train --arch {name}' and pass it with --model")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras"):
        return import_keras_resnet8(path)
    if suffix == ".pt2":
        from maxdnn.frontends.pytorch import load_exported

        return load_exported(path)
    return load_checkpoint(path)


def import_keras_resnet8(path: str | os.PathLike) -> ResNet8:
    """Import MLPerf Tiny's Keras ResNet-8 (HDF5) with h5py; input scale 1 (raw pixels)."""
    import h5py
    import numpy as np

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ModelError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        try:
            cfg = json.loads(f.attrs["model_config"])
            layers = cfg["config"]["layers"]
            g = f["model_weights"]
        except (KeyError, ValueError, TypeError):
            raise ModelError(f"{path}: not a Keras model file (no model_config/model_weights)") from None

        def weights(layer: str, name: str):
            grp = g[layer]
            hits = []
            grp.visititems(lambda n, o: hits.append(o) if isinstance(o, h5py.Dataset) and n.endswith(name) else None)
            if len(hits) != 1:
                raise ModelError(f"{path}: layer {layer} has no weight {name}")
            return np.asarray(hits[0][()])

        convs = [l["config"]["name"] for l in layers if l["class_name"] == "Conv2D"]
        denses = [l["config"]["name"] for l in layers if l["class_name"] == "Dense"]
        bn_of = {}
        for l in layers:
            if l["class_name"] == "BatchNormalization":
                src = l["inbound_nodes"][0][0][0]
                bn_of[src] = l["config"]["name"]
        model = ResNet8(input_scale=1.0)
        targets = [("conv1", "bn1"), ("s1.conv1", "s1.bn1"), ("s1.conv2", "s1.bn2"),
                   ("s2.conv1", "s2.bn1"), ("s2.conv2", "s2.bn2"), ("s2.proj", None),
                   ("s3.conv1", "s3.bn1"), ("s3.conv2", "s3.bn2"), ("s3.proj", None)]
        if len(convs) != len(targets) or len(denses) != 1:
            raise ModelError(f"{path}: {len(convs)} Conv2D and {len(denses)} Dense layers; an MLPerf Tiny ResNet-8 has 9 and 1")
        mods = dict(model.named_modules())
        with torch.no_grad():
            for kname, (cname, bname) in zip(convs, targets):
                conv = mods[cname]
                k = torch.from_numpy(weights(kname, "kernel:0")).permute(3, 2, 0, 1)
                if k.shape != conv.weight.shape:
                    raise ModelError(f"{path}: layer {kname} kernel {tuple(k.shape)} does not fit {cname} {tuple(conv.weight.shape)}")
                conv.weight.copy_(k)
                conv.bias.copy_(torch.from_numpy(weights(kname, "bias:0")))
                if (bname is None) != (kname not in bn_of):
                    raise ModelError(f"{path}: layer {kname} batch-norm placement differs from ResNet-8")
                if bname:
                    bn = mods[bname]
                    kb = bn_of[kname]
                    bn.weight.copy_(torch.from_numpy(weights(kb, "gamma:0")))
                    bn.bias.copy_(torch.from_numpy(weights(kb, "beta:0")))
                    bn.running_mean.copy_(torch.from_numpy(weights(kb, "moving_mean:0")))
                    bn.running_var.copy_(torch.from_numpy(weights(kb, "moving_variance:0")))
            kd = torch.from_numpy(weights(denses[0], "kernel:0")).T
            if kd.shape != model.fc.weight.shape:
                raise ModelError(f"{path}: dense kernel {tuple(kd.shape)} does not fit fc {tuple(model.fc.weight.shape)}")
            model.fc.weight.copy_(kd)
            model.fc.bias.copy_(torch.from_numpy(weights(denses[0], "bias:0")))
    model.meta = {"source": str(path), "origin": "MLPerf Tiny Keras ResNet-8"}
    return model.eval()


@torch.no_grad()
def float_outputs(model: nn.Module, images, batch_size: int = 100, device: str = "cpu"):
    """Float logits (numpy float32 [N, classes]) for uint8 images [N, 3, H, W]."""
    model = model.to(device).eval()
    out = [model(torch.as_tensor(images[i:i + batch_size], device=device).float()).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else torch.zeros((0, 0)).numpy()


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 100, device: str = "cpu") -> torch.Tensor:
    """Float predictions for uint8 images [N, 3, 32, 32]."""
    model = model.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i:i + batch_size], device=device).float()
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
