"""Front ends below the zoo: a ``torch.export`` program or ``nn.Module`` lowered and quantized (``pytorch``), an
int8 TFLite model as deployed (``tflite``), .pt2 files loaded without running code (``pt2_safe``)."""
