"""Is onnxruntime's int8 convolution exact integer arithmetic on this CPU? (The referee of an ONNX import.)

    pip install onnx onnxruntime && python benchmarks/onnxruntime_u8s8.py

Runs one QLinearConv (uint8 activations with a zero point, int8 per-channel weights, int32 bias) through
onnxruntime's CPU execution provider and compares it byte by byte with exact integer accumulation followed by
onnxruntime's documented requantization (float32 scale x_scale * w_scale / y_scale, round half to even, add
the zero point, saturate), once with weights over the full int8 range and once with 7-bit weights
(``reduce_range``). Without AVX-512 VNNI, x86 MLAS multiplies u8 x s8 with pairwise int16 sums that
saturate, so full-range weights may differ while 7-bit ones match; the CPU's flags are printed with it.
"""
import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper


def compare(w_bits: int, seed: int = 0) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    c, f, h = 16, 32, 16
    x = rng.integers(0, 256, (4, c, h, h)).astype(np.uint8)
    w = rng.integers(-(1 << (w_bits - 1)), 1 << (w_bits - 1), (f, c, 3, 3)).astype(np.int8)
    bias = rng.integers(-5000, 5000, f).astype(np.int32)
    xs, xz, ys, yz = np.float32(0.02), np.uint8(3), np.float32(0.5), np.uint8(10)
    ws = rng.random(f).astype(np.float32) * 0.01 + 0.001
    inits = [numpy_helper.from_array(np.array(v), n) for v, n in
             ((xs, "xs"), (xz, "xz"), (w, "w"), (ws, "ws"), (np.zeros(f, np.int8), "wz"), (ys, "ys"), (yz, "yz"),
              (bias, "b"))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    acc = torch.nn.functional.conv2d(torch.tensor(x.astype(np.float64) - float(xz)),
                                     torch.tensor(w.astype(np.float64)), padding=1).numpy().astype(np.int64)
    acc += bias[None, :, None, None]
    scale = (xs * ws / ys).astype(np.float32)
    q = np.clip(np.rint(acc.astype(np.float32) * scale[None, :, None, None]) + int(yz), 0, 255).astype(np.uint8)
    return int((q != y).sum()), int(y.size)


flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split() if __import__("os").path.exists(
    "/proc/cpuinfo") else []
print("onnxruntime", ort.__version__, "; CPU:", " ".join(sorted(f for f in flags if "avx" in f or "vnni" in f)))
for bits in (8, 7):
    d, n = compare(bits)
    print(f"{bits}-bit weights: {d} of {n} output bytes differ from exact integer arithmetic")
