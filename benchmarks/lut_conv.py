"""Per layer: the lookup-table scatter kernels against the gather kernel, in one process.

    python benchmarks/lut_conv.py [--images 100] [--repeats 5] [--zeros 0.5]

For each convolution shape of ResNet-8 at CIFAR-10 size (as ``benchmarks/transform_conv.py``), random
unsigned 8-bit activations of which a share ``--zeros`` is 0 (as after a ReLU; the stem gets none), random
int8 weights and a kernel-level assignment of exact, Mitchell, DRUM-4 and trunc-6 at random per kernel
(multipliers that are not operand-separable, so every product is a table lookup), times one layer's exact
accumulators with the scatter kernels (``maxdnn.engine.approx.lut_scatter_numba``) and with the gather kernel
(``lut_conv_numba``) beside the exact float convolution of the same shape (oneDNN, channels_last). Both
kernels are checked equal first. Best of ``--repeats``, in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.engine.allocator import keep_freed_memory
from maxdnn.engine.approx import LayerPlan, lut_conv_numba, lut_scatter_numba
from maxdnn.multipliers.models import get_multiplier

from transform_conv import RESNET8_SHAPES, best_ms  # noqa: E402 (benchmarks/ is the script's folder)

SPECS = ["exact", "mitchell", "drum-k4", "trunc-k6"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--zeros", type=float, default=0.5, help="share of zero activations after the stem")
    args = ap.parse_args()
    keep_freed_memory()
    rng = np.random.default_rng(0)
    mults = [get_multiplier(s) for s in SPECS]
    print(f"{args.images} images, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; milliseconds; "
          f"{100 * args.zeros:.0f}% zero activations after the stem")
    print(f"{'C':>3s} {'F':>3s} {'HxW':>5s} {'k':>2s} {'s':>2s} {'float':>6s} {'scatter':>8s} {'gather':>8s} "
          f"{'scatter/float':>13s}")
    for c, f, h, k, stride, pads in RESNET8_SHAPES:
        x = rng.integers(0, 256, (args.images, c, h, h)).astype(np.float32)
        if c > 3:
            x[rng.random(x.shape) < args.zeros] = 0
        xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        w = rng.integers(-128, 128, (f, c, k, k))
        plan = LayerPlan(w, mults, rng.integers(0, len(SPECS), (f, c)), stride, pads)
        wf = torch.from_numpy(w.astype(np.float32))
        xn = xt.numpy()
        tables: dict = {}
        scatter = lambda: lut_scatter_numba(xn, plan.w, plan.kmap, plan.luts, plan.x_min, plan.w_min,  # noqa: E731
                                            stride, pads, tables, 0)
        gather = lambda: lut_conv_numba(xn, plan.w, plan.kmap, plan.luts, plan.x_min, plan.w_min,  # noqa: E731
                                        stride, pads)
        assert np.array_equal(scatter(), gather()), (c, f, h, k, stride)
        t_float = best_ms(lambda: F.conv2d(F.pad(xt, pads), wf, stride=stride), args.repeats)
        t_s, t_g = best_ms(scatter, args.repeats), best_ms(gather, args.repeats)
        print(f"{c:3d} {f:3d} {h:2d}x{h:<2d} {k:2d} {stride:2d} {t_float:6.1f} {t_s:8.1f} {t_g:8.1f} "
              f"{t_s / t_float:13.1f}", flush=True)


if __name__ == "__main__":
    main()
