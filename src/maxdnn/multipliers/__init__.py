"""Multiplier models: the built-in forms and the spec grammar (``models``), error metrics (``metrics``), the user
library on disk (``store``) and importing into it (``library``)."""
