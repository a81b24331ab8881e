"""The MAx-DNN exploration: the explorer and its budgets (``explorer``), its stages (``resilience``, ``search``,
``testset``, ``finetune_stage``), fronts (``front``), its storage (``storage``) and the report (``report``)."""
