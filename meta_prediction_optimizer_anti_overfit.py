#!/usr/bin/env python3
"""Step 5 CLI: Optuna search for a survivor-quality regressor with an anti-overfit objective.

    python3 meta_prediction_optimizer_anti_overfit.py --survivors survivors_with_scores.json \\
        --lottery-data train_history.json --model-type neural_net --trials 20

A thin door: the code lives in :mod:`step5.optimizer` (see ``docs/optimizer.md``). This
process never imports torch; neural-net folds train in worker / one-shot subprocesses.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step5.launch import missing_dependency  # noqa: E402 (standard library only)

try:
    from step5.optimizer import AntiOverfitMetaOptimizer, OptimizerConfig, RunOutcome
    from step5.optimizer.cli import main
except ModuleNotFoundError as exc:
    sys.exit(missing_dependency(exc))

__all__ = ["AntiOverfitMetaOptimizer", "OptimizerConfig", "RunOutcome", "main"]

if __name__ == "__main__":
    sys.exit(main())
