"""xgboost behind :class:`~step5.models.tree_adapter.TreeAdapter`.

Trains with ``tree_method="hist"`` on ``device="cpu"`` or ``"cuda:N"``; a trained booster
is switched to the CPU before it predicts, so metrics are computed the way Step 6
predicts. Checkpoints are xgboost JSON, saved *without* feature names (see
:func:`_unnamed`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from step5.models.tree_adapter import LoadedBooster, suggest_boosting

#: Booster attribute holding the feature names of a saved model (see _unnamed).
NAMES_ATTR = "step5_feature_names"


class XGBoostAdapter:
    model_type = "xgboost"
    library_keys = (
        "learning_rate", "max_depth", "min_child_weight", "subsample", "colsample_bytree",
        "reg_alpha", "reg_lambda",
    )

    def suggest(self, trial: Any) -> dict[str, Any]:
        # No `gamma`: a split-gain threshold is in loss units, and the target's variance
        # (about 1e-2) makes a value that suits one target kill every split on another.
        return {
            **suggest_boosting(trial),
            "max_depth": trial.suggest_int("max_depth", 2, 10),
            # squared error: the hessian is 1 per row, so this is a minimum row count
            "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 20.0, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
            "reg_alpha": trial.suggest_float("reg_alpha", 1e-8, 1.0, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        }

    def fit(
        self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
        *, max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
        feature_names: list[str] | None,
    ) -> tuple[Any, int]:
        import xgboost as xgb

        settings: dict[str, Any] = {
            "objective": "reg:squarederror",
            "eval_metric": "rmse",
            "tree_method": "hist",
            "device": device,
            "seed": seed,
            "verbosity": 0,
            **params,
        }
        if n_threads is not None:
            settings["nthread"] = n_threads
        dtrain = xgb.DMatrix(X_tr, label=y_tr, feature_names=feature_names)
        dval = xgb.DMatrix(X_va, label=y_va, feature_names=feature_names)
        booster = xgb.train(
            settings, dtrain, num_boost_round=max_rounds, evals=[(dval, "val")],
            early_stopping_rounds=early_stopping_rounds, verbose_eval=False,
        )
        kept = booster.best_iteration + 1
        if kept < booster.num_boosted_rounds():
            booster = booster[:kept]  # a copy holding only the kept rounds; it is what gets saved
        booster.set_param({"device": "cpu"})  # predict like Step 6 will, without a device copy
        return booster, kept

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(X)

    def save(self, booster: Any, path: Path) -> None:
        _unnamed(booster).save_model(str(path))  # the format follows the file's suffix (.json)

    def load(self, path: Path) -> LoadedBooster:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(path))
        booster.set_param({"device": "cpu"})
        stored = booster.attr(NAMES_ATTR)
        names = json.loads(stored) if stored else booster.feature_names
        return LoadedBooster(booster, booster.num_features(), booster.num_boosted_rounds(), names)

    def library_error(self) -> type[BaseException]:
        import xgboost

        return xgboost.core.XGBoostError

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        return None  # not probed: a GPU fit that fails falls back to CPU (trees.train_fold)


def _unnamed(booster: Any) -> Any:
    """A copy of ``booster`` without feature names, which is what gets saved.

    A booster saved with names refuses ``predict(xgb.DMatrix(X))`` on a plain array ("data
    did not contain feature names"), and that is how the existing Step 6 predicts: on a
    float32 array in schema order. The names belong in the sidecar; a copy is also kept in
    a booster attribute, which prediction ignores, so that this project's loader can still
    check the checkpoint against its sidecar.
    """
    names = booster.feature_names
    unnamed = booster.copy()
    unnamed.feature_names = None
    unnamed.feature_types = None
    unnamed.set_attr(**{NAMES_ATTR: json.dumps(list(names)) if names else None})
    return unnamed
