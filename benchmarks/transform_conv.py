"""Per layer: the compiled transform convolution against oneDNN convolutions per transform group, in one process.

    python benchmarks/transform_conv.py [--images 100] [--repeats 10]

For each convolution shape of ResNet-8 at CIFAR-10 size (input channels, filters, input size, kernel,
stride, padding), random 8-bit operands and ROUP assignments with 2 and 8 activation transforms at filter
and kernel level, times one layer's exact accumulators both ways (``LayerPlan(fused=True)`` and
``fused=False``: one oneDNN convolution per group over its filters, or one over the stacked transformed
copies) and the exact float convolution of the same shape (oneDNN, channels_last, the baseline). Both
paths are checked equal first. Best of ``--repeats``, in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.engine.allocator import keep_freed_memory
from maxdnn.engine.approx import LayerPlan
from maxdnn.multipliers.models import get_multiplier

# (input channels, filters, input height = width, kernel, stride, (left, right, top, bottom) padding)
RESNET8_SHAPES = [
    (3, 16, 32, 3, 1, (1, 1, 1, 1)),
    (16, 16, 32, 3, 1, (1, 1, 1, 1)),
    (16, 32, 32, 3, 2, (0, 1, 0, 1)),
    (32, 32, 16, 3, 1, (1, 1, 1, 1)),
    (16, 32, 32, 1, 2, (0, 0, 0, 0)),
    (32, 64, 16, 3, 2, (0, 1, 0, 1)),
    (64, 64, 8, 3, 1, (1, 1, 1, 1)),
    (32, 64, 16, 1, 2, (0, 0, 0, 0)),
]
# eight ROUP configurations with eight different roundings (R = 0..7)
CONFIGS = ["exact", "roup-p1r1", "roup-p1r2", "roup-p0r3", "roup-p3r4", "roup-p2r5", "roup-p0r6", "roup-p1r7"]


def best_ms(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    keep_freed_memory()
    rng = np.random.default_rng(0)
    mults = [get_multiplier(s) for s in CONFIGS]
    cases = [("filter", 2), ("kernel", 2), ("filter", 8), ("kernel", 8)]
    print(f"{args.images} images, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; milliseconds, "
          "transform convolution / oneDNN per group or stacked")
    print(f"{'C':>3s} {'F':>3s} {'HxW':>5s} {'k':>2s} {'s':>2s} {'float':>6s} "
          + " ".join(f"{g + ' ' + str(n):>17s}" for g, n in cases))
    for c, f, h, k, stride, pads in RESNET8_SHAPES:
        x = torch.from_numpy(rng.integers(0, 256, (args.images, c, h, h)).astype(np.float32))
        x = x.contiguous(memory_format=torch.channels_last)
        w = rng.integers(-128, 128, (f, c, k, k))
        wf = torch.from_numpy(w.astype(np.float32))
        t_float = best_ms(lambda: F.conv2d(F.pad(x, pads), wf, stride=stride), args.repeats)
        row = f"{c:3d} {f:3d} {h:2d}x{h:<2d} {k:2d} {stride:2d} {t_float:6.1f} "
        for gran, n in cases:
            amap = np.repeat(rng.integers(0, n, (f, 1)), c, 1) if gran == "filter" else rng.integers(0, n, (f, c))
            fused = LayerPlan(w, mults, amap, stride, pads, fused=True)
            onednn = LayerPlan(w, mults, amap, stride, pads, fused=False)
            assert torch.equal(fused(x).to(torch.float64), onednn(x).to(torch.float64)), (c, f, h, gran, n)
            row += f"{best_ms(lambda: fused(x), args.repeats):8.1f}/{best_ms(lambda: onednn(x), args.repeats):<8.1f} "
        print(row, flush=True)


if __name__ == "__main__":
    main()
