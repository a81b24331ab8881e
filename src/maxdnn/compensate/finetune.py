"""Approximation-aware fine-tuning of a quantized graph with its multiplier assignment fixed.

The trainable twin (``FakeQuantTwin``) runs the graph in real numbers with the
hardware's arithmetic in the forward pass:

- every node output is rounded to its 8-bit grid (scale, zero point, clamp),
  as the integer engine stores it;
- a multiplying layer takes its operands as integers (x - zero point), its
  weights as int8 (w / w_scale rounded, clamped to +-127) and its bias as an
  int32 in accumulator units; kernels are grouped by their multiplier's
  activation transform, as in the engine: per group, one convolution of the
  transformed activations (R_R(x) for ROUP) with the transformed weights of
  the group's kernels (R_2P(w)), zero elsewhere. The accumulators are
  therefore the engine's exactly (float64; float32 where the engine also
  proves it exact);
- multipliers that are not operand-separable (lookup tables) add their exact
  product error to the exact convolution, without a gradient of their own;
- rounding, clamping and the transforms pass gradients straight through
  (straight-through estimators); a clamped value passes none.

Requantization is real-valued in the twin (the engine's is fixed-point), so
node outputs can differ by one step at exact ties. After training the weights
and biases are rounded back to integers: the result is a ``QuantizedGraph``
with the original scales, which the integer engine runs bit-exactly
(``maxdnn evaluate --model FILE.npz``). Training data: the training split minus
the validation hold-out; never validation or test images.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maxdnn.errors import MaxdnnError
from maxdnn.engine.approx import ApproxNetwork, Assignment, LayerPlan, assignment_key, transform_groups
from maxdnn.atomic import atomic_path, load_state
from maxdnn.ir.graph import Affine, Clamp, Concat, Flatten, Merge, MulLayer, Pool, QuantizedGraph, TfliteAdd, _pool_real
from maxdnn.ir.quant import Requant

W_MAX = 127


class FinetuneError(MaxdnnError, ValueError):
    pass


def ste(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` in the forward pass, the gradient of ``value`` in the backward pass."""
    return value + (target - value).detach()


def fake_quant(y: torch.Tensor, q) -> torch.Tensor:
    """Round a real tensor to the grid of QParams ``q``, half up, and clamp it to the range (a wide
    tensor: no clamp); gradient straight through inside the clamp range."""
    if not q.wide:
        y = y.clamp((q.lo - q.zero_point) * q.scale, (q.hi - q.zero_point) * q.scale)
    return ste(y, torch.floor(y / q.scale + 0.5) * q.scale)  # half up, as the engine's requantization


class _LayerGroups:
    """Per layer: kernels grouped by activation transform (separable multipliers), or a lookup-table plan."""

    def __init__(self, layer: MulLayer, mults, amap: np.ndarray):
        used = np.unique(amap)
        self.separable = all(mults[i].separable for i in used)
        self.mults, self.amap = mults, amap
        x_min, x_max = layer.in_q.operand_range
        self.x_min = x_min
        self.groups = []  # (x table [X] float64, kernel mask [F, C])
        if self.separable:  # the engine's grouping
            for t, members in transform_groups(mults, used, np.arange(x_min, x_max + 1)):
                self.groups.append((torch.as_tensor(t, dtype=torch.float64), np.isin(amap, members)))

    def w_transform(self, wi: np.ndarray) -> np.ndarray:
        """Every kernel's weights through its own multiplier's weight transform (separable only)."""
        out = np.zeros_like(wi)
        for i in np.unique(self.amap):
            sel = self.amap == i
            out[sel] = self.mults[i].w_transform(wi[sel])
        return out


def check_finetunable(q: QuantizedGraph) -> None:
    """One line (FinetuneError) unless the graph is maxdnn's own quantization, which the twin reproduces."""
    if any(isinstance(n, TfliteAdd) or (isinstance(n, MulLayer) and n.requant.mode != "half_up") for n in q.nodes):
        raise FinetuneError("fine-tuning takes maxdnn's own graphs (a float model quantized by maxdnn); "
                            "an imported TFLite or ONNX model keeps its own requantization")


class FakeQuantTwin(nn.Module):
    """The graph with trainable real weights and biases and the assignment's arithmetic (module docstring)."""

    def __init__(self, q: QuantizedGraph, assignment: Assignment, dtype=torch.float32):
        super().__init__()
        check_finetunable(q)
        self.q = q
        self.a = assignment.bind(q)
        self.dtype = dtype
        mults = {s: self.a.multipliers(x_signed=s) for s in {l.x_signed for l in q.layers.values()}}
        self.groups = {n: _LayerGroups(l, mults[l.x_signed], self.a.maps[n]) for n, l in q.layers.items()}
        self.w = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for name, l in q.layers.items():
            key = self._key(name)
            self.w[key] = nn.Parameter(torch.as_tensor(l.weight * l.w_scale[:, None, None, None], dtype=dtype))
            self.b[key] = nn.Parameter(torch.as_tensor(l.bias * l.acc_scale, dtype=dtype))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "/")

    # ---------------------------------------------------------------- integers the hardware sees
    def int_weight(self, name: str) -> torch.Tensor:
        l = self.q.layers[name]
        ws = torch.as_tensor(l.w_scale, dtype=self.dtype)[:, None, None, None]
        w = (self.w[self._key(name)] / ws).clamp(-W_MAX, W_MAX)
        return ste(w, torch.round(w))

    def int_bias(self, name: str) -> torch.Tensor:
        l = self.q.layers[name]
        b = self.b[self._key(name)] / torch.as_tensor(l.acc_scale, dtype=self.dtype)
        return ste(b, torch.round(b))

    def accumulators(self, name: str, xi: torch.Tensor) -> torch.Tensor:
        """The layer's accumulators (bias excluded) for integer operands ``xi`` (x - zero point, a float
        tensor of integers [N, C, H, W]), with gradients to ``xi`` and the layer's weights."""
        l = self.q.layers[name]
        g = self.groups[name]
        wi = self.int_weight(name)
        if not g.separable:  # exact product, plus the table's exact error (no gradient of its own)
            exact = F.conv2d(F.pad(xi, l.pads), wi, stride=l.stride, groups=l.groups)
            with torch.no_grad():
                plan = LayerPlan(wi.detach().round().to(torch.int64).numpy(), g.mults, g.amap, l.stride, l.pads,
                                 x_min=l.in_q.operand_range[0], x_max=l.in_q.operand_range[1], groups=l.groups)
                approx = plan(xi.detach().round().to(torch.float32)).to(exact.dtype)
            return ste(exact, approx)
        wt_np = g.w_transform(wi.detach().round().to(torch.int64).numpy())
        wt = ste(wi, torch.as_tensor(wt_np, dtype=wi.dtype))
        idx = (xi.detach().round().to(torch.int64) - g.x_min).clamp(0, len(g.groups[0][0]) - 1)
        acc = 0
        for table, mask in g.groups:
            xt = F.pad(ste(xi, table.to(xi.dtype)[idx]), l.pads)  # padding forms no product: transform first
            m = torch.as_tensor(mask, dtype=wi.dtype)[:, :, None, None]
            acc = acc + F.conv2d(xt, wt * m, stride=l.stride, groups=l.groups)
        return acc

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Real-valued logits (output scale included) for integer images x [N, C, H, W]."""
        q0 = self.q.input_q
        vals = {"input": (x.to(self.dtype) + self.q.pixel_offset - q0.zero_point) * q0.scale}
        outs = {"input": q0, **{n.name: n.out for n in self.q.nodes}}
        for n in self.q.nodes:
            ins = [vals[i] for i in n.inputs]
            if isinstance(n, MulLayer):
                xin = ins[0][:, :, None, None] if n.op == "linear" else ins[0]
                xi = ste(xin / n.in_q.scale, torch.round(xin / n.in_q.scale))
                acc = self.accumulators(n.name, xi) + self.int_bias(n.name)[None, :, None, None]
                y = acc * torch.as_tensor(n.acc_scale, dtype=self.dtype)[None, :, None, None]
                y = y.flatten(1) if n.op == "linear" else y
            elif isinstance(n, Merge):
                y = torch.cat(ins, 1) if isinstance(n, Concat) else sum(ins[1:], ins[0])
            elif isinstance(n, Affine):
                a = torch.as_tensor(n.acc_scale, dtype=self.dtype)
                shape = (1, -1) + (1,) * (ins[0].dim() - 2)
                y = ins[0] * (a / n.in_scale).view(shape) + (a * torch.as_tensor(n.offset, dtype=self.dtype)).view(shape)
            elif isinstance(n, Clamp):
                y = ins[0]
            elif isinstance(n, Pool):
                s_in = outs[n.inputs[0]].scale
                if s_in == n.out.scale:  # pool in grid units: averages that end in .5 stay exact ties
                    u = ins[0] / s_in
                    u = _pool_real(ste(u, torch.round(u)), n)
                    vals[n.name] = fake_quant(u, dataclasses.replace(n.out, scale=1.0)) * s_in
                    continue
                y = _pool_real(ins[0], n)
            elif isinstance(n, Flatten):
                y = ins[0].flatten(1)
            else:  # pragma: no cover - every node type is handled above
                raise FinetuneError(f"node {n.name}: unsupported kind {n.kind}")
            vals[n.name] = y if isinstance(n, Flatten) else fake_quant(y, n.out)
        return vals[self.q.output.name]

    # ---------------------------------------------------------------- back to integers
    def export(self) -> QuantizedGraph:
        """The fine-tuned integer graph: the same scales, the weights and biases rounded back."""
        nodes = []
        for n in self.q.nodes:
            if isinstance(n, MulLayer):
                with torch.no_grad():
                    w = self.int_weight(n.name).round().to(torch.int64).numpy()
                    b = self.int_bias(n.name).round().to(torch.int64).numpy()
                n = dataclasses.replace(n, weight=w, bias=b)
                if not n.float_requant_exact():  # fewer multiplier bits keep the float64 requantization exact
                    n.requant = Requant.from_scales(n.acc_scale, n.out.scale, n.requant_bound())
            nodes.append(n)
        meta = {**self.q.meta, "finetuned": True,
                "calibration": "the fine-tuned graph's own (scales of its source model)"}
        return dataclasses.replace(self.q, nodes=nodes, meta=meta)


def distillation_loss(logits: torch.Tensor, teacher: ApproxNetwork, x: torch.Tensor) -> torch.Tensor:
    """KL divergence (temperature 1, mean over the batch) of ``logits`` from the teacher's real-valued logits on
    the same images ``x``: the integer engine's, so the target is the same on every CPU."""
    target = (teacher.logits(x).double() * teacher.qnet.logit_scale).to(logits.dtype)
    return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target, 1), reduction="batchmean", log_target=True)


def _resume(state_path: Path, settings: dict, twin: FakeQuantTwin, opt, sched, gen: torch.Generator) -> int:
    """The epochs already done: 0 without ``state_path``; else its twin, optimiser, schedule and generator states
    are loaded. A state saved with other ``settings`` (the start graph, teacher and assignment among them) is
    refused in one line naming what differs (FinetuneError); a setting the state lacks counts as False."""
    if not state_path.exists():
        return 0
    st = load_state(state_path, FinetuneError)
    saved = {k: st.get(k, False) for k in settings}
    if saved != settings:
        differ = [k for k in settings if saved[k] != settings[k]]
        raise FinetuneError(f"{state_path}: saved run has " + ", ".join(f"{k}={saved[k]} (now {settings[k]})"
                                                                          for k in differ)
                            + "; delete it or rerun with the same settings")
    twin.load_state_dict(st["twin"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    gen.set_state(st["gen"])
    return int(st["epoch"])


def finetune(q: QuantizedGraph, assignment: Assignment, images: np.ndarray, labels: np.ndarray, out: str | Path,
             epochs: int = 2, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log=print,
             progress: bool = True, fit_scales: bool = True, distill: bool = True,
             teacher: QuantizedGraph | None = None) -> QuantizedGraph:
    """Fine-tune ``q`` under ``assignment`` on (images, labels); writes the integer graph to ``out`` (.npz).

    With ``fit_scales`` the weight scales are first fitted to the multipliers' weight grids
    (``maxdnn.compensate.weight_scales``: only where that at least halves a channel's grid error, as for
    roup-p3*). With ``distill`` (the default) the loss is the divergence from the exact model as quantized
    (its integer logits on the same augmented batch, ``q`` with every multiplier exact; temperature 1), not
    the labels: the approximate network learns to answer as the exact one does, and the exact model
    fine-tuned this way stays where it is (with the labels, a few epochs on a sample of the training images
    cost it about half a point). ``labels`` then only count the training accuracy shown. ``teacher``: the graph
    whose exact answers are learnt, when ``q`` is not it (``q`` itself fine-tuned before, for another
    assignment: the fine-tuning ladder's rungs start from the rung below). SGD (momentum 0.9,
    no weight decay), cosine learning rate, the augmentation of ``maxdnn train``. The state after every
    epoch goes to ``OUT.state`` (atomically); rerunning resumes after the last finished epoch, if the
    state was saved with the same settings, start graph, teacher and assignment (else it is refused in one line)."""
    from tqdm import tqdm

    from maxdnn.compensate.weight_scales import fit_weight_scales
    from maxdnn.zoo.train import augment

    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    torch.manual_seed(seed)
    check_finetunable(q)
    source = q if teacher is None else teacher
    start_digest = q.digest()  # the graph training starts from, before its weight scales are fitted
    teacher = ApproxNetwork(source, Assignment.uniform(source, "exact")) if distill else None
    if fit_scales:
        q, moved = fit_weight_scales(q, assignment)
        if moved:
            log(f"weight scales fitted to the multipliers' weight grids: {sum(moved.values())} filters of "
                f"{len(moved)} layers")
    twin = FakeQuantTwin(q, assignment)
    opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=0.9)
    steps = -(-len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps, 1))
    gen = torch.Generator().manual_seed(seed)
    settings = {"epochs": epochs, "seed": seed, "images": len(labels), "fit_scales": fit_scales, "distill": distill,
                "lr": lr, "batch_size": batch_size, "assignment": assignment_key(assignment),
                "start": start_digest[:16], "teacher": source.digest()[:16] if distill else None}
    start = _resume(state_path, settings, twin, opt, sched, gen)
    if start:
        log(f"resuming {out} after epoch {start}/{epochs}")
    x_all = torch.as_tensor(images)
    y_all = torch.as_tensor(labels)
    for epoch in range(start, epochs):
        t0 = time.time()
        perm = torch.randperm(len(y_all), generator=gen)
        loss_sum, correct = 0.0, 0
        for s in tqdm(range(steps), desc=f"fine-tune epoch {epoch + 1}/{epochs}", disable=not progress, leave=True,
                      mininterval=2):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            x = augment(x_all[idx].float(), gen).round()
            logits = twin(x)
            loss = F.cross_entropy(logits, y_all[idx]) if teacher is None else distillation_loss(logits, teacher, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / len(y_all):.4f}, train accuracy (fake-quant) "
            f"{correct / len(y_all):.4f}, {time.time() - t0:.0f} s")
        with atomic_path(state_path) as tmp:
            torch.save({"twin": twin.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "epoch": epoch + 1, **settings}, tmp)
    g = twin.export()
    g.meta.update({"finetune": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                                "images": int(len(labels)), "assignment_specs": list(assignment.specs),
                                "fit_scales": fit_scales, "distill": distill}})
    g.save(out)
    state_path.unlink(missing_ok=True)
    return g
