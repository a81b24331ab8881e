"""The engines above the integer graph: approximate multipliers at layer, filter and kernel level (``approx``),
the slow integer reference (``reference``) and the compiled kernels they use."""
