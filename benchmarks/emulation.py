"""Emulation speed: bit-exact approximate inference against exact float inference, in one process.

    python benchmarks/emulation.py --data PATH/cifar10-jpeg.zip [--model M] [--images 10000] [--device cpu|cuda]

Times, on the same images and batch size: exact float inference of the
network (``--model``: a zoo name, .pt, .h5 or .pt2; default resnet8; the baseline), the exact int8 engine, ROUP emulation with random
layer-, filter- and kernel-level assignments (kernel-level twice: two
configurations per layer, as MAx-DNN's kernel-level approach produces, and all
32 ROUP configurations at random; filter-level both ways too), the generic lookup-table path (numba on
CPU: the scatter kernels, and the gather kernel alone for comparison; torch gather on CUDA) on a subset, and several assignments in one pass: every layer
alone with each of 4 configurations (the exploration's resilience measurements), one network at a time
and in one shared pass (the exact layers before the approximated one run once per batch); their times
are per assignment, scaled to the full image count. Every approximate run is checked
bit-exact against the integer reference engine on a few images first.
Prints each time and its ratio to exact float inference (PyTorch defaults);
on the CPU the float model on channels_last tensors is timed too, for reference.
Freed buffers are kept for reuse (``maxdnn.engine.allocator``, as the command line
does), for every case alike; ``--fresh-mappings`` leaves the allocator as it is.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from maxdnn.engine.allocator import keep_freed_memory
from maxdnn.engine.approx import ApproxNetwork, Assignment, filter_assignment, kernel_assignment, layer_assignment, logits_shared
from maxdnn.data import load_cifar10
from maxdnn.ir.graph import QuantizedGraph
from maxdnn.zoo.models import load_model, predict
from maxdnn.multipliers.models import roup_specs
from maxdnn.ir.quant import calibration_images
from maxdnn.engine.reference import reference_forward
from maxdnn.frontends.pytorch import quantize_module


def timed(fn, repeats=3):
    fn()  # warm-up (compilation, allocation)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--lut-images", type=int, default=500)
    ap.add_argument("--multi-images", type=int, default=1000, help="images for the several-assignments cases")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="zoo name, .pt, .h5 or .pt2 (default resnet8)")
    ap.add_argument("--quantized", help="A saved quantized graph (.npz) instead of calibrating on the train split.")
    ap.add_argument("--fresh-mappings", action="store_true",
                    help="leave the C allocator as it is (default: keep freed buffers, as the command line does)")
    args = ap.parse_args()
    kept = not args.fresh_mappings and keep_freed_memory()
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    test = load_cifar10(args.data, "test").sample(args.images)
    imgs, labels = test.images, test.labels
    model = load_model(args.model)
    if args.quantized:
        q = QuantizedGraph.load(args.quantized)
    else:
        q = quantize_module(model, calibration_images(load_cifar10(args.data, "train").images))
    rng = np.random.default_rng(0)
    roup = roup_specs(8)
    hidden = [n for n in q.layers]
    cases = {
        "layer-level (random ROUP per layer)": layer_assignment(q, {n: str(rng.choice(roup)) for n in hidden}),
        "filter-level (random ROUP per filter)": filter_assignment(
            q, {n: [str(rng.choice(roup)) for _ in range(l.weight.shape[0])] for n, l in q.layers.items()}),
        "filter-level (exact + 1 ROUP per layer, 50% filters)": None,
        "kernel-level (exact + 1 ROUP per layer, 50% kernels)": None,
        "kernel-level (all 32 ROUP at random)": kernel_assignment(
            roup, {n: rng.integers(0, len(roup), l.weight.shape[:2]) for n, l in q.layers.items()}),
    }
    specs2 = ["exact"] + [str(rng.choice(roup[1:])) for _ in hidden]
    cases["filter-level (exact + 1 ROUP per layer, 50% filters)"] = kernel_assignment(
        specs2, {n: np.repeat(np.where(rng.random((l.weight.shape[0], 1)) < 0.5, i + 1, 0), l.weight.shape[1], 1)
                 for i, (n, l) in enumerate(q.layers.items())})
    cases["kernel-level (exact + 1 ROUP per layer, 50% kernels)"] = kernel_assignment(
        specs2, {n: np.where(rng.random(l.weight.shape[:2]) < 0.5, i + 1, 0) for i, (n, l) in enumerate(q.layers.items())})
    lut_case = kernel_assignment(["exact", "mitchell", "drum-k4", "trunc-k6"],
                                 {n: rng.integers(0, 4, l.weight.shape[:2]) for n, l in q.layers.items()})

    # correctness first: every case against the integer reference engine
    few = imgs[:4]
    for name, a in list(cases.items()) + [("lut", lut_case)]:
        ref = reference_forward(q, few, a.reference_products(q))
        got = ApproxNetwork(q, a, device=dev).logits(torch.as_tensor(few, device=dev)).cpu().numpy()
        assert np.array_equal(ref, got), f"{name}: not bit-exact"

    rows = []
    t_float, pf = timed(lambda: predict(model, imgs, args.batch_size, dev).numpy(), args.repeats)
    rows.append(("exact float (PyTorch, BN unfused)", t_float, (pf == labels).mean(), len(imgs)))
    if dev == "cpu":
        # the same float model on NHWC tensors, the layout the int8 engine uses on the CPU
        model_cl = model.to(memory_format=torch.channels_last)

        def predict_cl():
            out = []
            for i in range(0, len(imgs), args.batch_size):
                xb = torch.as_tensor(imgs[i:i + args.batch_size]).float().contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    out.append(model_cl(xb).argmax(1))
            return torch.cat(out).numpy()

        t, p = timed(predict_cl, args.repeats)
        rows.append(("exact float, channels_last (reference only)", t, (p == labels).mean(), len(imgs)))
    t, p = timed(lambda: q.predict(imgs, args.batch_size, dev), args.repeats)
    rows.append(("exact int8 engine", t, (p == labels).mean(), len(imgs)))
    for name, a in cases.items():
        net = ApproxNetwork(q, a, device=dev)
        t, p = timed(lambda: net.predict(imgs, args.batch_size), args.repeats)
        rows.append((name, t, (p == labels).mean(), len(imgs)))
    sub = test.sample(args.lut_images, seed=1)
    n_lut = len(sub)
    net = ApproxNetwork(q, lut_case, device=dev)
    t, p = timed(lambda: net.predict(sub.images, args.batch_size), 1)
    rows.append((f"lookup-table path (Mitchell/DRUM/trunc, kernel-level), scaled from {n_lut}", t * len(imgs) / n_lut,
                 (p == sub.labels).mean(), n_lut))
    if dev == "cpu":  # the same with the gather kernel alone (the scatter kernels off), for comparison
        import maxdnn.engine.approx as approx_mod

        keep, approx_mod.SCATTER_MIN_CHANNELS = approx_mod.SCATTER_MIN_CHANNELS, 1 << 30
        try:
            net = ApproxNetwork(q, lut_case, device=dev)
            t, p = timed(lambda: net.predict(sub.images, args.batch_size), 1)
        finally:
            approx_mod.SCATTER_MIN_CHANNELS = keep
        rows.append((f"lookup-table path, gather kernel only, scaled from {n_lut}", t * len(imgs) / n_lut,
                     (p == sub.labels).mean(), n_lut))

    # several assignments in one pass: every layer alone with each of 4 ROUP configurations (the
    # exploration's resilience measurements), one network at a time and all in one shared pass
    sub = test.sample(args.multi_images, seed=2)
    nets = [ApproxNetwork(q, Assignment(["exact", s], {n: np.full(l.weight.shape[:2], int(n == name))
                                                       for n, l in q.layers.items()}), device=dev)
            for name in q.layers for s in ("roup-p0r2", "roup-p1r2", "roup-p2r0", "roup-p2r2")]

    def one_by_one():
        return [net.predict(sub.images, args.batch_size) for net in nets]

    def shared():
        outs = [[] for _ in nets]
        for i in range(0, len(sub), args.batch_size):
            x = torch.as_tensor(sub.images[i:i + args.batch_size], device=dev)
            for k, o in enumerate(logits_shared(nets, x)):
                outs[k].append(o.argmax(1).cpu().numpy())
        return [np.concatenate(o) for o in outs]

    t1, p1 = timed(one_by_one, 1)
    t2, p2 = timed(shared, 1)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2)), "shared pass differs"
    scale = len(imgs) / len(sub) / len(nets)
    rows.append((f"{len(nets)} one-layer assignments, one by one (per assignment, from {len(sub)})", t1 * scale,
                 float(np.mean([(p == sub.labels).mean() for p in p1])), len(sub)))
    rows.append((f"{len(nets)} one-layer assignments, one shared pass (per assignment)", t2 * scale,
                 float(np.mean([(p == sub.labels).mean() for p in p2])), len(sub)))

    dev_name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{len(imgs)} test images of {args.data}, batch {args.batch_size}, {dev_name}, torch {torch.__version__}, "
          f"freed buffers {'kept for reuse' if kept else 'left to the allocator'}")
    print(f"{'case':70s} {'seconds':>9s} {'x float':>8s} {'accuracy':>9s} {'images':>7s}")
    for name, t, acc, n in rows:
        print(f"{name:70s} {t:9.3f} {t / t_float:8.2f} {acc:9.4f} {n:7d}")


if __name__ == "__main__":
    main()
