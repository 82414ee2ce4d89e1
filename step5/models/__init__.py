"""Tree models trained in-process (xgboost, lightgbm, catboost): search spaces, one-fold
training, checkpoints. :mod:`step5.models.trees` holds what the libraries share, one
adapter module per library (``xgboost_adapter`` ...) what differs. Neural nets live on
the torch side (:mod:`step5.nn`); this package never imports torch, and imports each tree
library only when it is used."""
from __future__ import annotations

from step5.models.trees import (
    ADAPTERS,
    DEFAULT_EARLY_STOPPING_ROUNDS,
    TREE_MODEL_TYPES,
    TreeDevices,
    TreeModel,
    device_for_gpus,
    load_model,
    require_libraries,
    save_model,
    suggest_params,
    train_fold,
)

__all__ = [
    "ADAPTERS",
    "DEFAULT_EARLY_STOPPING_ROUNDS",
    "TREE_MODEL_TYPES",
    "TreeDevices",
    "TreeModel",
    "device_for_gpus",
    "load_model",
    "require_libraries",
    "save_model",
    "suggest_params",
    "train_fold",
]
