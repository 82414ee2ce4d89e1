"""The torch side: the MLP, the one training core, jobs, checkpoints, the one-shot trainer.

Re-exports are lazy (PEP 562): ``import step5.nn.oneshot`` must not import torch before
the one-shot trainer has claimed stdout, so this package ``__init__`` imports nothing
until a name is asked for.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FusedMLP": "step5.nn.model",
    "build_reference_mlp": "step5.nn.model",
    "TrainConfig": "step5.nn.trainer",
    "ModelSpec": "step5.nn.trainer",
    "Fold": "step5.nn.trainer",
    "TrainedModel": "step5.nn.trainer",
    "train_models": "step5.nn.trainer",
    "configure_torch_threads": "step5.nn.trainer",
    "resolve_batch_mode": "step5.nn.trainer",
    "AUTO_FULL_BATCH_MAX_ROWS": "step5.nn.trainer",
    "DataCache": "step5.nn.job",
    "FoldData": "step5.nn.job",
    "load_fold": "step5.nn.job",
    "describe_device": "step5.nn.job",
    "run_train_job": "step5.nn.job",
    "run_fold_group": "step5.nn.job",
    "save_checkpoint": "step5.nn.checkpoint",
    "load_checkpoint": "step5.nn.checkpoint",
    "LoadedModel": "step5.nn.checkpoint",
    "CHECKPOINT_FORMAT": "step5.nn.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'step5.nn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
