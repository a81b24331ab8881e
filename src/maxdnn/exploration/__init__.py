"""The MAx-DNN exploration: the explorer and its budgets (``explorer``), its stages (``resilience``, ``search``,
``finetune_stage``, ``confirm``), per-image comparisons (``paired``), fronts (``front``), its storage (``storage``) and the report (``report``)."""
