"""What the fine-tuning benchmarks share: the committed ResNet-8 quantized as ``maxdnn explore`` quantizes it,
the training split, the 5,000 held-out training images the exploration confirms its choices on, a seeded
training sample outside the hold-out, and the integer engine's accuracy on the confirmation images."""
import argparse
from pathlib import Path

import numpy as np

from maxdnn.data import training_sample, validation_split
from maxdnn.energy import energy_table, network_energy
from maxdnn.engine.approx import ApproxNetwork, Assignment
from maxdnn.exploration.paired import correctness
from maxdnn.workload import Workload


def setup(data: str, images: int):
    """(quantized graph, training split, confirmation split, training sample indices, accuracy(graph, assignment))."""
    wl = Workload.open(None, data)
    q = wl.quantized()
    train = wl.split("train")
    conf = train.subset(np.sort(validation_split(len(train), 5000, seed=0)[1]))
    tr = training_sample(len(train), images, 0)

    def accuracy(g, a) -> float:
        return float((ApproxNetwork(g, a).predict(conf.images) == conf.labels).mean())

    return q, train, conf, tr, accuracy


def ladder_rungs(run: str, q) -> list:
    """(multiplication energy gain, assignment) of each ladder rung of run folder ``run``
    (``RUN/pareto/layer-ladder-*.json``), by increasing gain."""
    rungs = []
    for f in Path(run, "pareto").glob("layer-ladder-*.json"):
        a = Assignment.load(f, q)
        rungs.append((network_energy(q, a, energy_table(list(a.specs)))["energy_gain"], a))
    return sorted(rungs, key=lambda t: t[0])


def run_arguments(epochs: int) -> argparse.ArgumentParser:
    """The arguments of the scripts that train a run's ladder again: --data, --run, --epochs, --images."""
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--images", type=int, default=20000)
    return p


def on_images(split):
    """measure(graph, assignment): the integer engine's packed per-image correctness on ``split``
    (``maxdnn.exploration.paired``: what ``paired_loss`` compares)."""
    return lambda g, a: correctness([ApproxNetwork(g, a)], split.images, split.labels)[0]
