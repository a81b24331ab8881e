"""The public API (``import maxdnn``): lazy, documented, and giving the integer engine's numbers."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import maxdnn
from conftest import LOSSLESS_ZIP, REPO, need
from maxdnn.engine.approx import ApproxNetwork


@pytest.fixture(scope="module")
def small():
    train = maxdnn.load_cifar10(need(LOSSLESS_ZIP), "train")
    test = maxdnn.load_cifar10(need(LOSSLESS_ZIP), "test")
    graph = maxdnn.quantize(maxdnn.load_model("resnet8"), train.images[:200])
    return graph, train, test


def test_import_is_lazy_and_every_public_name_is_documented_with_an_example():
    r = subprocess.run([sys.executable, "-c", "import sys, maxdnn; print('torch' in sys.modules, 'numpy' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"], r.stdout + r.stderr
    for name in maxdnn.__all__:
        if name == "__version__":
            continue
        obj = getattr(maxdnn, name)
        doc = obj.__doc__ or ""
        assert doc.strip(), name
        assert "Example" in doc or ">>>" in doc, f"maxdnn.{name} has no example"
    with pytest.raises(AttributeError):
        maxdnn.no_such_name


def test_no_subpackage_shadows_an_api_name():
    """Importing a subpackage sets it as an attribute of maxdnn: none may be named like a public name."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(maxdnn.__path__, "maxdnn."):
        if info.name.count(".") == 1 and info.name != "maxdnn.__main__":
            assert info.name.split(".")[1] not in maxdnn.__all__, info.name
            importlib.import_module(info.name)
    assert callable(maxdnn.explore) and callable(maxdnn.evaluate) and not isinstance(maxdnn.layers, type(maxdnn))


def test_evaluate_and_assignments_give_the_engine_numbers(small):
    graph, _, test = small
    names = [layer.name for layer in maxdnn.layers(graph)]
    assert names == list(graph.layers) and maxdnn.layers(graph)[0]["name"] == names[0]
    imgs, labels = test.images[:100], test.labels[:100]
    fo, ci = graph.layers["s3.conv2"].weight.shape[:2]
    grid = [["roup-p2r4" if (i * ci + j) % 3 else "roup-p1r2" for j in range(ci)] for i in range(fo)]
    cases = [maxdnn.layer_assignment(graph, {"s1.conv1": "roup-p1r2"}),
             maxdnn.filter_assignment(graph, {"s2.conv1": ["roup-p2r2", "exact"] * (graph.layers["s2.conv1"].weight.shape[0] // 2)}),
             maxdnn.kernel_assignment(graph, {"s3.conv2": grid})]
    for a in cases:
        r = maxdnn.evaluate(graph, imgs, labels, a)
        want = ApproxNetwork(graph, a).outputs(imgs)
        assert np.array_equal(r.outputs, want)
        assert r.accuracy == (want.argmax(1) == labels).mean() and r.images == 100
        assert 0 < r.energy_gain < 1 and 0 < r.pe_energy_gain < 1
    k = cases[2].maps["s3.conv2"]
    assert [cases[2].specs[v] for v in k[0, :3]] == grid[0][:3]
    assert np.array_equal(maxdnn.evaluate(graph, imgs, labels).outputs, graph.outputs(imgs))
    with pytest.raises(maxdnn.MaxdnnError, match="unknown layer 'nope'"):
        maxdnn.layer_assignment(graph, {"nope": "roup-p1r2"})
    with pytest.raises(maxdnn.MaxdnnError, match="pass the training images"):
        maxdnn.evaluate(graph, imgs, labels, cases[0], bias_correction=True)


def test_approximate_is_the_integer_engine_and_trains(small):
    graph, train, _ = small
    a = maxdnn.layer_assignment(graph, {n: "roup-p2r2" for n in list(graph.layers)[1:]})
    net = maxdnn.approximate(graph, a)
    x = torch.as_tensor(train.images[:16])
    out = net(x)
    assert np.array_equal(out.detach().numpy(), ApproxNetwork(graph, a).outputs(train.images[:16]).astype(np.float64))
    g0 = net.to_graph()
    assert all(np.array_equal(g0.layers[n].weight, graph.layers[n].weight) for n in graph.layers)
    loss = torch.nn.functional.cross_entropy(out * graph.output_scale, torch.as_tensor(train.labels[:16]))
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    torch.optim.SGD(net.parameters(), lr=0.5).step()  # a big step: some integer weight must move
    g1 = net.to_graph()
    assert any(not np.array_equal(g1.layers[n].weight, graph.layers[n].weight) for n in graph.layers)
    after = net(x).detach().numpy()
    assert np.array_equal(after, ApproxNetwork(g1, a).outputs(train.images[:16]).astype(np.float64))


def test_tutorial_runs(tmp_path):
    """The Python tutorial of the docs, exploration included, on the lossless subset."""
    r = subprocess.run([sys.executable, str(REPO / "examples" / "tutorial.py"), str(need(LOSSLESS_ZIP)), "--explore"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exact int8:" in r.stdout and "kernel:" in r.stdout and "error: unknown layer" in r.stdout
    run = maxdnn.Run.open(tmp_path / "runs" / "tutorial")
    assert set(run.best) == {"layer", "kernel"} and run.fronts["kernel"]
    assert run.info["budget"]["name"] == "tiny" and len(run.points) > 0


def test_a_bad_run_directory_is_a_maxdnn_error(tmp_path):
    """``except maxdnn.MaxdnnError`` catches every problem with a user's input, a run directory's too."""
    with pytest.raises(maxdnn.MaxdnnError, match="not an exploration run \\(no run.json\\)"):
        maxdnn.Run.open(tmp_path / "none")
    (tmp_path / "run.json").write_text("{cut")
    with pytest.raises(maxdnn.MaxdnnError, match="run.json: not a readable run description"):
        maxdnn.Run.open(tmp_path)
    (tmp_path / "run.json").write_text("[]")
    with pytest.raises(maxdnn.MaxdnnError, match="run.json: not a maxdnn run description"):
        maxdnn.Run.open(tmp_path)
