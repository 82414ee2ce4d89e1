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

from step5.optimizer import AntiOverfitMetaOptimizer, OptimizerConfig, RunOutcome  # noqa: E402
from step5.optimizer.cli import main  # noqa: E402

__all__ = ["AntiOverfitMetaOptimizer", "OptimizerConfig", "RunOutcome", "main"]

if __name__ == "__main__":
    sys.exit(main())
