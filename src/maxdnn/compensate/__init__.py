"""Compensation of approximate multipliers: bias correction (``bias_correction``) and approximation-aware fine-
tuning (``finetune``)."""
