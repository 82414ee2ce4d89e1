"""The optimizer's settings and outcome: one dataclass per direction.

The CLI (SPEC section 3) parses into :class:`OptimizerConfig`; ``--compare-models`` runs
derive one config per model type with :func:`dataclasses.replace`, so every accepted flag
reaches every sub-run by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("neural_net", "xgboost", "lightgbm", "catboost")


@dataclass(frozen=True)
class OptimizerConfig:
    """Everything one Step 5 run needs; field names follow the CLI flags."""

    survivors: Path  # survivors_with_scores.json
    lottery_data: Path  # train_history.json
    model_type: str = "neural_net"  # one of MODEL_TYPES
    compare_models: bool = False  # run all four model types, keep the best
    trials: int = 50  # Optuna trials to have completed in the study (a resumed study runs the rest)
    k_folds: int = 5  # CV folds per trial
    test_holdout: float = 0.2  # fraction of rows held out as the test set no trial sees
    output_dir: Path = Path("models/reinforcement")
    study_name: str | None = None  # default derived from model type and data fingerprint
    storage: str | None = None  # Optuna storage URL; default a SQLite file (resumable)
    seed: int = 42  # splits, sampler and training seeds derive from it
    target: str = "holdout_quality"
    persistent_workers: bool | None = None  # None: the policy's kill switch decides
    policy_path: Path | None = Path("watcher_policies.json")
    gpus: list[str] | None = None  # None: detect without torch
    cpu_workers: int | None = None  # workers when there is no GPU; None: one per core
    normalize_features: bool = True
    use_leaky_relu: bool = True
    dropout: float | None = None  # fixes the NN dropout instead of searching it
    enable_diagnostics: bool = False
    prng_type: str | None = None  # recorded in data_context; default from survivors metadata
    mod: int | None = None  # likewise
    holdout_draws: int | None = None  # draws held out upstream, recorded in data_context
    parent_run_id: str | None = None  # provenance link to the pipeline run
    log_level: str = "INFO"
    diagnostics_dir: Path = Path("diagnostics_outputs")  # relative to the working directory
    fuse_folds: bool | None = None  # None: the policy's training.fuse_folds decides
    fuse_trials: int = 1  # trials asked from Optuna at once and fused by layer shape


@dataclass
class RunOutcome:
    """What one model type's run produced; compare runs collect one per model type."""

    model_type: str
    status: str  # "SUCCESS" | "DEGENERATE_SIGNAL" | "FAILED"
    sidecar: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: Path | None = None
    sidecar_path: Path | None = None
    cv_score: float | None = None  # best trial's objective value
    test_r2: float | None = None  # final model on the held-out test set
    trials_run: int = 0
    wall_s: float = 0.0
    error: str | None = None
