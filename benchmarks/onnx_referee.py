"""maxdnn's int8 ONNX import against onnxruntime, byte by byte (the outside referee).

    pip install -e ".[onnx,test]"
    python benchmarks/onnx_referee.py PATH/pretrainedResnet.h5 --data cifar10-jpeg.zip [--lossless SUBSET.zip]

Exports MLPerf Tiny's Keras ResNet-8 to a float ONNX model (pixel values 0..255, NCHW), quantizes it with
``onnxruntime.quantization.quantize_static`` in both formats (QOperator and QDQ, ``DedicatedQDQPair``), with
int8 and uint8 activations and per-channel and per-tensor weights, calibrated on the first training images, and
counts the bytes of the last quantized tensor (the input of the final DequantizeLinear) where maxdnn's integer
graph and onnxruntime's CPU execution provider differ on the test images. The functions are also the tests'
fixtures (tests/test_onnx.py).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _static_same_padding():
    """SameConv2d with its pads as Python integers while tracing: the exported Pad has constant pads."""
    from maxdnn.zoo.models import SameConv2d

    old = SameConv2d.forward
    SameConv2d.forward = lambda self, x: torch.nn.Conv2d.forward(
        self, F.pad(x, self.pads(int(x.shape[2]), int(x.shape[3]))))
    try:
        yield
    finally:
        SameConv2d.forward = old


class _Pixels(torch.nn.Module):
    """maxdnn's ResNet-8 without its input scaling (1 for the Keras import): pixels 0..255 in, logits out."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        x = torch.relu(m.bn1(m.conv1(x)))
        x = m.s3(m.s2(m.s1(x)))
        return m.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def export_float(h5: str | Path, out: str | Path) -> Path:
    """MLPerf Tiny's Keras ResNet-8 as a float ONNX model (opset 13, batch dimension free)."""
    import maxdnn

    model = maxdnn.load_model(str(h5))
    assert model.input_scale == 1.0
    with _static_same_padding():
        torch.onnx.export(_Pixels(model).eval(), torch.zeros(1, 3, 32, 32), str(out), dynamo=False,
                          input_names=["input"], output_names=["logits"], opset_version=13,
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return Path(out)


def quantize(float_onnx: str | Path, out: str | Path, calibration: np.ndarray, fmt: str = "QOperator",
             activations: str = "int8", per_channel: bool = True, weights: str = "int8",
             reduce_range: bool = False) -> Path:
    """onnxruntime's static quantization (MinMax calibration on ``calibration``, uint8 [N, 3, 32, 32])."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = [{"input": calibration[i:i + 50].astype(np.float32)} for i in range(0, len(calibration), 50)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    quantize_static(str(float_onnx), str(out), Reader(), quant_format=getattr(QuantFormat, fmt),
                    activation_type=types[activations], weight_type=types[weights], per_channel=per_channel,
                    reduce_range=reduce_range,
                    extra_options={"DedicatedQDQPair": True})
    return Path(out)


def onnxruntime_outputs(path: str | Path, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """The last quantized tensor (the input of the final DequantizeLinear) by onnxruntime's CPU provider."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    last = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == m.graph.output[0].name)
    elem = next(t.data_type for t in m.graph.initializer if t.name == last.input[2])  # its zero point's type
    m.graph.output.append(onnx.helper.make_tensor_value_info(last.input[0], elem, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run([last.input[0]], {"input": images[i:i + batch].astype(np.float32)})[0]
                           for i in range(0, len(images), batch)])


def main() -> None:
    import maxdnn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("h5")
    ap.add_argument("--data", required=True, help="CIFAR-10 (test images and the calibration's training images)")
    ap.add_argument("--lossless", help="the lossless subset: its 1,000 test images too")
    ap.add_argument("--calibration", type=int, default=1000, help="training images for the calibration")
    ap.add_argument("--out", default="onnx-referee", help="folder for the models")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split() \
        if Path("/proc/cpuinfo").exists() else []
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}; {platform.machine()} with "
          f"{' '.join(sorted(f for f in flags if f.startswith('avx512') or f in ('avx2', 'fma', 'avx_vnni')))}")
    test = maxdnn.load_cifar10(a.data, "test")
    images, labels = test.images, test.labels
    sources = f"{len(images)} test images of {Path(a.data).name}"
    if a.lossless:
        extra = maxdnn.load_cifar10(a.lossless, "test")
        images, labels = np.concatenate([images, extra.images]), np.concatenate([labels, extra.labels])
        sources += f" + {len(extra.images)} of {Path(a.lossless).name}"
    cal = maxdnn.load_cifar10(a.data, "train").images[:a.calibration]
    f32 = export_float(a.h5, out / "resnet8-float.onnx")
    print(f"{sources}; calibration: the first {len(cal)} training images of {Path(a.data).name}")
    print("| format | activations | weights | differing bytes | accuracy (maxdnn) | maxdnn s | onnxruntime s |")
    print("|---|---|---|---|---|---|---|")
    for fmt, act, per_channel, reduce in (("QOperator", "int8", True, False), ("QOperator", "int8", False, False),
                                      ("QOperator", "uint8", True, True), ("QOperator", "uint8", True, False),
                                      ("QDQ", "int8", True, False), ("QDQ", "int8", True, True),
                                      ("QDQ", "uint8", True, True)):
        wdesc = ("per channel" if per_channel else "per tensor") + (", 7-bit (reduce_range)" if reduce else "")
        path = quantize(f32, out / f"resnet8-{fmt}-{act}-{'pc' if per_channel else 'pt'}{'-rr' if reduce else ''}"
                        f".onnx", cal, fmt, act, per_channel, reduce_range=reduce)
        t = time.perf_counter()
        ours = maxdnn.load_model(str(path)).outputs(images)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = onnxruntime_outputs(path, images)
        t_ort = time.perf_counter() - t
        diff = int((ours != theirs.reshape(ours.shape)).sum())
        acc = float((ours.argmax(1) == labels).mean())
        print(f"| {fmt} | {act} | {wdesc} | {diff} of {ours.size} | "
              f"{acc:.2%} | {t_ours:.1f} | {t_ort:.1f} |", flush=True)


if __name__ == "__main__":
    main()
