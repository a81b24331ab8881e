"""Fine-tuning cost: an approximation-aware training step against an ordinary float training step, in one process.

    python benchmarks/finetune_step.py --data PATH/cifar10-jpeg.zip [--steps 20] [--batch-size 64]

Times, on the same batches: one SGD step of the float ResNet-8 (the baseline, as ``maxdnn train`` trains it)
and one step of the fine-tuning twin (``maxdnn.compensate.finetune``) under an exact, a layer-level and a kernel-level
ROUP assignment (kernel level: exact plus one configuration per layer, half of the kernels each, as
MAx-DNN's kernel approach produces). Prints seconds per step and the ratio to the float step; an epoch
costs the same ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from maxdnn.engine.approx import Assignment
from maxdnn.data import load_cifar10
from maxdnn.compensate.finetune import FakeQuantTwin
from maxdnn.zoo.models import load_model
from maxdnn.ir.quant import calibration_images
from maxdnn.frontends.pytorch import quantize_module


def per_step(model, batches) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()  # warm-up
    t = time.perf_counter()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t) / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    train = load_cifar10(args.data, "train")
    model = load_model()
    q = quantize_module(model, calibration_images(train.images, 1000))
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(train))[: args.steps * args.batch_size].reshape(args.steps, -1)
    batches = [(torch.as_tensor(train.images[i]).float(), torch.as_tensor(train.labels[i])) for i in idx]
    model.train()
    base = per_step(model, batches)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} steps")
    print(f"{'float ResNet-8 training step (baseline)':58s} {base * 1000:8.1f} ms  1.00")
    kernel_maps = {n: rng.integers(0, 2, l.weight.shape[:2]) for n, l in q.layers.items()}
    cases = [("fine-tuning twin, all exact", Assignment.uniform(q, "exact")),
             ("fine-tuning twin, layer-level roup-p1r3", Assignment.uniform(q, "roup-p1r3")),
             ("fine-tuning twin, kernel-level exact + roup-p2r2 (half)", Assignment(["exact", "roup-p2r2"], kernel_maps))]
    for name, a in cases:
        t = per_step(FakeQuantTwin(q, a), batches)
        print(f"{name:58s} {t * 1000:8.1f} ms  {t / base:.2f}")


if __name__ == "__main__":
    main()
