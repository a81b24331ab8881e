"""Training a zoo network on CIFAR-10: seeded, augmented, resumable.

SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle learning rate,
per-sample augmentation (random 32x32 crop of the 4-pixel zero-padded image and a
random horizontal flip). After every epoch the full training state (model,
optimiser, scheduler, RNG) is written atomically to ``OUT.state``; rerunning the
same command resumes from the last finished epoch. The final checkpoint is
written atomically to ``OUT`` and the state file removed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from maxdnn.atomic import atomic_path, load_state
from maxdnn.zoo.models import build_model, save_checkpoint


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a batch [N, C, H, W]."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # [n, w]
    flip = torch.rand(n, generator=gen, device=gen.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def train(
    images: np.ndarray,
    labels: np.ndarray,
    out: str | Path,
    epochs: int = 60,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str = "cpu",
    meta: dict | None = None,
    eval_fn=None,
    arch: str = "resnet8",
    init: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Train ``arch`` from a seeded initialization, or from ``init``'s weights (a model of the same
    architecture: a warm restart with a fresh one-cycle schedule)."""
    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    torch.manual_seed(seed)
    model = build_model(arch)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(device)
    if device == "cpu":
        model = model.to(memory_format=torch.channels_last)  # oneDNN trains NHWC faster on the CPU
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = -(-len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.15, div_factor=10, final_div_factor=100)
    gen = torch.Generator(device=device).manual_seed(seed)
    start = 0
    if state_path.exists():
        st = load_state(state_path, ValueError, map_location=device)
        if st.get("epochs") != epochs or st.get("seed") != seed or st.get("arch", "resnet8") != arch:
            raise ValueError(f"{state_path}: saved run has arch={st.get('arch', 'resnet8')} epochs={st.get('epochs')} seed={st.get('seed')}; "
                             f"delete it or rerun with the same settings")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"].to(gen.device) if device == "cpu" else st["gen"].cpu())
        start = st["epoch"]
        print(f"resuming {out} after epoch {start}/{epochs}")
    x_all = torch.as_tensor(images, device=device)
    y_all = torch.as_tensor(labels, device=device)
    history = []
    for epoch in range(start, epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(y_all), generator=gen, device=device)
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=2)
        for s in bar:
            idx = perm[s * batch_size:(s + 1) * batch_size]
            x = augment(x_all[idx].float(), gen)
            if device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        rec = {"epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total, "seconds": time.time() - t0}
        if eval_fn is not None:
            rec.update(eval_fn(model))
        history.append(rec)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "epoch": epoch + 1, "epochs": epochs, "seed": seed, "arch": arch}, tmp)
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    save_checkpoint(model, out, meta={**(meta or {}), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                                      "weight_decay": weight_decay, "seed": seed})
    state_path.unlink(missing_ok=True)
    return model
