"""The integer graph: its nodes and fast exact engine (``graph``), the 8-bit quantization arithmetic (``quant``),
the float-to-integer quantizer calibrated on the graph itself (``quantizer``) and the compiled requantization
kernels."""
