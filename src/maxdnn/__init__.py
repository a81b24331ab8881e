"""maxdnn: fine-grained approximate multipliers in quantized DNNs (MAx-DNN).

The public API, imported lazily (``import maxdnn`` loads nothing heavy until a name is used)::

    import maxdnn

    graph = maxdnn.quantize(maxdnn.load_model("resnet8"), maxdnn.load_cifar10("cifar10-jpeg.zip", "train").images[:1000])
    a = maxdnn.kernel_assignment(graph, {...})
    r = maxdnn.evaluate(graph, images, labels, a)

See ``maxdnn.api`` for every function, with examples.
"""

__version__ = "0.1.0"

_API = {
    "load_model": "maxdnn.api", "quantize": "maxdnn.api", "load_cifar10": "maxdnn.api", "get_multiplier": "maxdnn.api",
    "layers": "maxdnn.api", "LayerInfo": "maxdnn.api", "layer_assignment": "maxdnn.api",
    "filter_assignment": "maxdnn.api", "kernel_assignment": "maxdnn.api", "evaluate": "maxdnn.api",
    "Evaluation": "maxdnn.api", "approximate": "maxdnn.api", "ApproximateModule": "maxdnn.api",
    "explore": "maxdnn.api", "Run": "maxdnn.api", "accelerator_energy": "maxdnn.accelerator",
    "Assignment": "maxdnn.engine.approx", "QuantizedGraph": "maxdnn.ir.graph", "Dataset": "maxdnn.data",
    "Multiplier": "maxdnn.multipliers.models", "MaxdnnError": "maxdnn.errors",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maxdnn' has no attribute {name!r}")


def __dir__():
    return __all__
