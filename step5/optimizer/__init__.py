"""The Step 5 optimizer (torch-free); re-exports only (the modules: docs/optimizer.md)."""
from __future__ import annotations

from step5.artifacts import MODEL_TYPES
from step5.optimizer.config import OptimizerConfig, RunOutcome, validate_config
from step5.optimizer.objective import OBJECTIVE_FORMULA, OVERFIT_PENALTY, anti_overfit_score
from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

__all__ = ["MODEL_TYPES", "OBJECTIVE_FORMULA", "OVERFIT_PENALTY", "AntiOverfitMetaOptimizer", "OptimizerConfig",
           "RunOutcome", "anti_overfit_score", "validate_config"]
