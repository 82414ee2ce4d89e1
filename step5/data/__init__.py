"""Input data for Step 5 (torch-free): survivors and history loaders, seeded splits and
fold NPZ files.

The sample generator, :mod:`step5.data.sample`, is not re-exported: it is also run as
``python -m step5.data.sample``, and a package that imports it first makes runpy warn
that the module was found in ``sys.modules`` before it ran.
"""
from __future__ import annotations

from step5.data.history import draws_from_data, load_history
from step5.data.splits import FoldFiles, holdout_split, kfold_splits, write_fold_npz
from step5.data.survivors import (
    DEFAULT_TARGET,
    LEAKAGE_COLUMNS,
    SurvivorFeatures,
    SurvivorTable,
    load_features,
    load_survivors,
)

__all__ = [
    "DEFAULT_TARGET",
    "LEAKAGE_COLUMNS",
    "FoldFiles",
    "SurvivorFeatures",
    "SurvivorTable",
    "draws_from_data",
    "holdout_split",
    "kfold_splits",
    "load_features",
    "load_history",
    "load_survivors",
    "write_fold_npz",
]
