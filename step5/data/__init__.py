"""Input data for Step 5 (torch-free): survivors and history loaders, seeded splits and fold
NPZ files (docs/data.md). The sample generator is not re-exported: run as ``python -m
step5.data.sample``, it would make runpy warn that it was imported before it ran."""
from __future__ import annotations

from step5.data.history import draws_from_data, load_history
from step5.data.splits import FoldFiles, holdout_split, kfold_splits, write_fold_npz
from step5.data.survivors import (
    DEFAULT_TARGET, LEAKAGE_COLUMNS, SurvivorFeatures, SurvivorTable, load_features, load_survivors,
)

__all__ = [
    "DEFAULT_TARGET", "LEAKAGE_COLUMNS", "FoldFiles", "SurvivorFeatures", "SurvivorTable", "draws_from_data",
    "holdout_split", "kfold_splits", "load_features", "load_history", "load_survivors", "write_fold_npz",
]
