"""The Step 5 optimizer (torch-free): config, study, objective, the run, the CLI.

Re-exports only; the modules are ``config`` (settings and outcome), ``study`` (open /
resume), ``search`` (the one ask/tell loop), ``grouping`` (a batch's folds -> the runner's
groups), ``search_space`` (NN hyperparameters), ``objective`` (the anti-overfit score),
``backends`` (what trains a trial's folds: NN runner jobs or in-process trees),
``optimizer`` (one run, start to sidecar), ``diagnostics``, ``plots`` and ``cli``.
"""
from __future__ import annotations

from step5.artifacts import MODEL_TYPES
from step5.optimizer.config import OptimizerConfig, RunOutcome, validate_config
from step5.optimizer.objective import OBJECTIVE_FORMULA, OVERFIT_PENALTY, anti_overfit_score
from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

__all__ = [
    "MODEL_TYPES",
    "OBJECTIVE_FORMULA",
    "OVERFIT_PENALTY",
    "AntiOverfitMetaOptimizer",
    "OptimizerConfig",
    "RunOutcome",
    "anti_overfit_score",
    "validate_config",
]
