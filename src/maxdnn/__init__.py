"""maxdnn: fine-grained approximate multipliers in quantized DNNs (MAx-DNN)."""

__version__ = "0.1.0"
