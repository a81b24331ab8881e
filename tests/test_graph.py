"""The integer graph: PyTorch front end, fast engine against the integer reference, persistence, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import LOSSLESS_ZIP, need
from maxdnn.engine.approx import ApproxNetwork, Assignment, filter_assignment, kernel_assignment, layer_assignment, logits_shared
from maxdnn.ir.graph import Add, Affine, Clamp, Concat, Flatten, GraphError, MulLayer, Pool, QuantizedGraph
from maxdnn.zoo.models import ModelError, load_model
from maxdnn.multipliers.models import roup_specs
from maxdnn.engine.reference import reference_forward
from maxdnn.frontends.pytorch import quantize_module

FIXTURES = Path(__file__).parent / "fixtures"


class DepthwiseNet(nn.Module):
    """Normalized input (signed first layer), depthwise-separable block with ReLU6, max pooling,
    a linear bottleneck feeding a layer with signed input, a residual add without ReLU, global mean."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([125.0, 122.0, 113.0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([63.0, 62.0, 66.0]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.bottleneck = nn.Conv2d(12, 6, 1)  # linear: no activation, so the next input is signed
        self.expand = nn.Conv2d(6, 12, 3, padding=(1, 1))
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu6(self.dw(x))
        x = F.max_pool2d(F.relu(self.pw(x)), 2)
        y = self.bottleneck(x)
        x = self.expand(y)
        return self.head(x.mean(dim=(2, 3)))


class BranchNet(nn.Module):
    """Scalar input scaling, concat of two branches, average pooling with padding, hardtanh, clamp,
    a standalone ReLU on a tensor with two consumers, flatten + two linear layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, stride=1, padding=2)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.d = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = x / 255.0
        x = torch.cat([F.relu(self.a(x)), F.hardtanh(self.b(x), 0.0, 2.0)], dim=1)
        x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        t = self.c(x)  # two consumers: the ReLU stays a node of its own, and d gets a signed input
        x = F.relu(t) + torch.clamp(self.d(t), min=0.0)
        x = F.avg_pool2d(x, 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class ResidualSignedNet(nn.Module):
    """A residual sum without ReLU feeding a conv (signed input), adaptive average pooling, padding op."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu(self.c1(x * (1 / 255.0)))
        s = self.c2(F.pad(a, (1, 1, 1, 1))) + a  # no ReLU: signed
        y = F.relu(self.c3(s))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


NETS = [DepthwiseNet, BranchNet, ResidualSignedNet]


def random_net(cls, seed=0):
    torch.manual_seed(seed)
    m = cls().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


def images(rng, n):
    return rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)


@pytest.fixture(scope="module", params=NETS, ids=lambda c: c.__name__)
def net_and_graph(request):
    rng = np.random.default_rng(7)
    m = random_net(request.param)
    return m, quantize_module(m, images(rng, 64))


def test_graph_covers_every_node_type():
    kinds = set()
    for cls in NETS:
        g = quantize_module(random_net(cls), images(np.random.default_rng(0), 16))
        kinds |= {type(n) for n in g.nodes}
        for layer in g.layers.values():
            assert layer.weight.min() >= -127 and layer.weight.max() <= 127
    assert kinds == {MulLayer, Add, Concat, Affine, Clamp, Pool, Flatten}


def test_depthwise_and_signed_layers_are_recognised():
    g = quantize_module(random_net(DepthwiseNet), images(np.random.default_rng(0), 16))
    assert g.layers["dw"].groups == 8 and g.layers["dw"].weight.shape == (8, 1, 3, 3)
    assert g.layers["stem"].x_signed  # normalized input
    assert g.layers["expand"].x_signed  # fed by a linear bottleneck
    assert not g.layers["pw"].x_signed
    dw = g.layers["dw"].out
    assert dw.lo == 0 and dw.hi == min(255, int(np.floor(6.0 / dw.scale + 0.5)))  # ReLU6
    rows = {r["name"]: r for r in g.describe_layers()}
    assert rows["dw"]["kind"] == "depthwise conv" and rows["expand"]["input"] == "signed"
    g2 = quantize_module(random_net(ResidualSignedNet), images(np.random.default_rng(0), 16))
    assert g2.layers["c3"].x_signed and not g2.layers["c2"].x_signed
    assert g2.layers["c2"].pads == (1, 1, 1, 1)  # the explicit pad op folded into the conv


def test_fast_engine_equals_reference_exact(net_and_graph):
    _, g = net_and_graph
    rng = np.random.default_rng(1)
    x = images(rng, 5)
    x[0] = 255
    x[1] = 0
    assert np.array_equal(g.forward_int(torch.as_tensor(x)).numpy(), reference_forward(g, x))


@pytest.mark.parametrize("family", ["roup", "lut"])
def test_fast_engine_equals_reference_approximate(net_and_graph, family):
    _, g = net_and_graph
    rng = np.random.default_rng(2)
    x = images(rng, 3)
    roup = roup_specs(8)
    lut = ["exact", "mitchell", "trunc-k6", "roup-p1r3"]
    assignments = [
        layer_assignment(g, {n: str(rng.choice(roup)) for n in g.layers}),
        filter_assignment(g, {n: [str(rng.choice(roup)) for _ in range(l.weight.shape[0])] for n, l in g.layers.items()}),
        kernel_assignment(roup, {n: rng.integers(0, len(roup), l.weight.shape[:2]) for n, l in g.layers.items()}),
    ] if family == "roup" else [
        kernel_assignment(lut, {n: rng.integers(0, len(lut), l.weight.shape[:2]) for n, l in g.layers.items()}),
    ]
    for a in assignments:
        got = ApproxNetwork(g, a).logits(torch.as_tensor(x)).numpy()
        assert np.array_equal(got, reference_forward(g, x, a.reference_products(g))), a.granularity()


def test_shared_pass_equals_each_network_alone(net_and_graph):
    """Several assignments in one pass (shared prefix, branches where the products differ) give each
    assignment's own output, on every node type: branches, concat, residual sums, depthwise, signed input;
    and the layers every member computes alike run once."""
    _, g = net_and_graph
    rng = np.random.default_rng(4)
    x = torch.as_tensor(images(rng, 4))
    roup = roup_specs(8)
    names = list(g.layers)
    one_layer = [Assignment(["exact", s], {n: np.full(g.layers[n].weight.shape[:2], int(n == name)) for n in names})
                 for name in names[::-1] for s in ("roup-p1r2", "roup-p2r0")]
    assignments = one_layer + [
        Assignment.uniform(g, "exact"),
        Assignment.uniform(g, "roup-p0r0"),  # exact products, spelled another way
        layer_assignment(g, {n: str(rng.choice(roup)) for n in names}),
        filter_assignment(g, {n: [str(rng.choice(roup)) for _ in range(l.weight.shape[0])] for n, l in g.layers.items()}),
        kernel_assignment(["exact", "mitchell", "roup-p1r3"], {n: rng.integers(0, 3, l.weight.shape[:2]) for n, l in g.layers.items()}),
        one_layer[0],  # the same assignment twice
    ]
    nets = [ApproxNetwork(g, a) for a in assignments]
    alone = [net.logits(x) for net in nets]
    calls: dict[str, int] = {}
    for net in nets:
        def counted(name, t, conv=net.conv):
            calls[name] = calls.get(name, 0) + 1
            return conv(name, t)
        net.conv = counted
    together = logits_shared(nets, x)
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    # the first layer is approximated only by the two one-layer members that target it, and by the three
    # whole-network ones: every other member shares one exact computation of it
    assert calls[names[0]] == 1 + 2 + 3
    assert sum(calls.values()) < sum(len(names) for _ in nets)


def test_float_twin_tracks_float_network(net_and_graph):
    m, g = net_and_graph
    x = images(np.random.default_rng(3), 8)
    with torch.no_grad():
        ref = m(torch.as_tensor(x).float()).double()
        twin = g.float_forward(torch.as_tensor(x))
    # the twin clamps at the calibrated ranges and uses 8-bit weights: close, not equal
    assert torch.corrcoef(torch.stack([ref.flatten(), twin.flatten()]))[0, 1] > 0.9


def test_save_load_roundtrip_every_node_type(net_and_graph, tmp_path):
    _, g = net_and_graph
    g.save(tmp_path / "g.npz")
    g2 = QuantizedGraph.load(tmp_path / "g.npz")
    x = torch.as_tensor(images(np.random.default_rng(4), 4))
    assert torch.equal(g.forward_int(x), g2.forward_int(x))
    assert [n.name for n in g.nodes] == [n.name for n in g2.nodes]
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(GraphError, match="bad.npz"):
        QuantizedGraph.load(tmp_path / "bad.npz")


def test_pt2_file_imports_like_the_module(tmp_path):
    m = random_net(DepthwiseNet)
    ep = torch.export.export(m, (torch.zeros(1, 3, 16, 16),))  # a static batch of 1, as users often export
    torch.export.save(ep, tmp_path / "net.pt2")
    loaded = load_model(tmp_path / "net.pt2")
    x = images(np.random.default_rng(5), 12)
    with torch.no_grad():
        assert torch.allclose(loaded(torch.as_tensor(x).float()), m(torch.as_tensor(x).float()), atol=1e-4)
    calib = images(np.random.default_rng(6), 32)
    g1, g2 = quantize_module(m, calib), quantize_module(loaded, calib)
    assert torch.equal(g1.forward_int(torch.as_tensor(x)), g2.forward_int(torch.as_tensor(x)))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.sigmoid(self.c(x)).flatten(1)


def test_bad_models_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"node 'sigmoid'.*sigmoid.*unsupported operation"):
        quantize_module(Unsupported(), images(np.random.default_rng(0), 4))
    with pytest.raises(ModelError, match=r"input of shape \[1, 16, 16\]"):
        quantize_module(random_net(BranchNet), np.zeros((4, 1, 16, 16), dtype=np.uint8))
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(ModelError, match="junk.pt2: not a readable torch.export program"):
        load_model(tmp_path / "junk.pt2")
    with pytest.raises(ModelError, match="resnet99|no such model file"):
        load_model("resnet99")


def test_resnet8_reproduces_the_integer_calibrated_quantizer_exactly():
    """Int8 logits of the committed ResNet-8 as the integer-graph calibration produced them when it replaced
    the float calibration (the fixture: any change to the graph it builds fails here)."""
    fx = np.load(FIXTURES / "resnet8-int8-logits.npz")
    rng = np.random.default_rng(2026)
    calib = rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    imgs = rng.integers(0, 256, (32, 3, 32, 32), dtype=np.uint8)
    g = quantize_module(load_model("resnet8"), calib)
    assert np.array_equal(g.forward_int(torch.as_tensor(imgs)).numpy(), fx["synthetic"])


def test_resnet8_reproduces_the_integer_calibrated_quantizer_on_real_images(qnet, lossless_test):
    fx = np.load(FIXTURES / "resnet8-int8-logits.npz")
    assert np.array_equal(qnet.forward_int(torch.as_tensor(lossless_test.images[:200])).numpy(), fx["lossless_test_0_199"])


@pytest.mark.slow
def test_trained_outside_network_int8_within_one_point(tmp_path):
    """A network not in the zoo, trained here on the lossless subset, exported to .pt2: int8 accuracy
    within 1 point of float on the 1,000 lossless test images (through the CLI)."""
    import json

    from typer.testing import CliRunner

    from maxdnn.cli import app
    from maxdnn.data import load_cifar10

    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    torch.manual_seed(0)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.pw = nn.Conv2d(16, 32, 1)
            self.lin = nn.Conv2d(32, 16, 1)
            self.c = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = (x - 120.0) / 64.0
            x = F.relu(self.bn(self.stem(x)))
            x = F.relu6(self.bn2(self.dw(x)))
            x = F.max_pool2d(F.relu(self.pw(x)), 2)
            x = F.relu(self.c(self.lin(x)))
            return self.fc(x.mean(dim=(2, 3)))

    m = Small()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    x_all, y_all = torch.as_tensor(train.images).float(), torch.as_tensor(train.labels)
    for _ in range(4):
        m.train()
        perm = torch.randperm(len(y_all))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(m(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    torch.export.save(torch.export.export(m, (torch.zeros(1, 3, 32, 32),)), tmp_path / "small.pt2")
    runner = CliRunner()
    res = {}
    for p in ("float", "int8"):
        r = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "small.pt2"), "--data", str(LOSSLESS_ZIP),
                                "--precision", p, "--json"])
        assert r.exit_code == 0, r.output
        res[p] = json.loads(r.output)
    assert res["float"]["images"] == 1000
    assert res["float"]["accuracy"] > 0.3  # it learned something (chance: 0.1)
    assert abs(res["int8"]["accuracy"] - res["float"]["accuracy"]) <= 0.01
    r = runner.invoke(app, ["layers", "--model", str(tmp_path / "small.pt2"), "--data", str(LOSSLESS_ZIP), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["dw"]["kind"] == "depthwise conv" and rows["stem"]["input"] == "signed"
    assert rows["c"]["input"] == "signed" and rows["fc"]["multiplications"] == 320


def _export_depthwise_32(path):
    m = random_net(DepthwiseNet)
    torch.export.save(torch.export.export(m, (torch.zeros(1, 3, 32, 32),)), path)
    return path


@pytest.mark.slow
def test_exploration_and_model_stream_on_a_pt2_network(tmp_path):
    """Nothing above the graph knows the network: a tiny exploration and the hardware model stream
    on a non-zoo .pt2 network with depthwise and signed-input layers."""
    from maxdnn.exploration.explorer import BUDGETS, Explorer, run_exploration
    from maxdnn.hardware.power import model_stream
    from maxdnn.exploration.report import read_points, write_report
    from maxdnn.workload import Workload

    pt2 = _export_depthwise_32(tmp_path / "dw.pt2")
    wl = Workload.open(str(pt2), need(LOSSLESS_ZIP))
    ex = Explorer(tmp_path / "run", wl, BUDGETS["tiny"], progress=False, log=lambda m: None)
    run_exploration(ex)
    write_report(tmp_path / "run", ex.store)
    rows = read_points(tmp_path / "run" / "points.csv")
    assert rows and any(r["on_front"] for r in rows)
    assert {r["approach"] for r in rows} == {"layer", "filter", "kernel", "alwann"}
    q = ex.q
    s = model_stream(q, np.asarray(ex.val.images[:1]), n_taps=5)
    assert len(s.x) > 0 and s.x.min() >= 0 and s.x.max() <= 255  # unsigned-input layers only
