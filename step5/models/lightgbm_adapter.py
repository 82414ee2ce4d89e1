"""lightgbm behind :class:`~step5.models.tree_adapter.TreeAdapter`.

On CPU it trains with ``deterministic=True`` and ``force_row_wise=True`` (same data,
params, seed and threads -> the same model). On GPU it needs a build with GPU support:
the PyPI wheel uses OpenCL and still needs an OpenCL device at run time, so
:meth:`LightGBMAdapter.gpu_unsupported_reason` tries a 1-round fit first. Checkpoints
are lightgbm's text format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from step5.models.tree_adapter import NO_CHOICES, LoadedBooster, suggest_boosting


class LightGBMAdapter:
    model_type = "lightgbm"
    library_keys = (
        "learning_rate", "num_leaves", "max_depth", "min_data_in_leaf", "bagging_fraction",
        "bagging_freq", "feature_fraction", "lambda_l1", "lambda_l2",
    )
    choice_keys = NO_CHOICES

    def suggest(self, trial: Any) -> dict[str, Any]:
        # No `min_gain_to_split`: a split-gain threshold is in loss units (see xgboost's `gamma`).
        return {
            **suggest_boosting(trial),
            "num_leaves": trial.suggest_int("num_leaves", 8, 128, log=True),
            "max_depth": trial.suggest_int("max_depth", 3, 12),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 5, 100, log=True),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "bagging_freq": 1,  # bagging_fraction is ignored unless bagging runs every k rounds
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "lambda_l1": trial.suggest_float("lambda_l1", 1e-8, 1.0, log=True),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
        }

    def fit(
        self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
        *, max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
        feature_names: list[str] | None,
    ) -> tuple[Any, int]:
        import lightgbm as lgb

        settings: dict[str, Any] = {
            "objective": "regression",
            "metric": "l2",
            "seed": seed,
            "verbose": -1,
            **params,
        }
        if device == "cpu":
            # same seed + same threads-independent histograms -> the same model every run
            settings.update(device_type="cpu", deterministic=True, force_row_wise=True)
        else:
            settings.update(device_type="gpu", gpu_device_id=int(device[5:]))
        if n_threads is not None:
            settings["num_threads"] = n_threads
        train_set = lgb.Dataset(X_tr, label=y_tr, feature_name=feature_names or "auto", free_raw_data=True)
        val_set = lgb.Dataset(X_va, label=y_va, reference=train_set)
        booster = lgb.train(
            settings, train_set, num_boost_round=max_rounds, valid_sets=[val_set], valid_names=["val"],
            callbacks=[lgb.early_stopping(early_stopping_rounds, first_metric_only=True, verbose=False)],
        )
        # lightgbm's best_iteration counts rounds (1-based); 0 means "no early stopping happened"
        kept = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
        if kept < booster.current_iteration():
            booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=kept))
        return booster, kept

    def reads_validation_rows(self, params: dict[str, Any]) -> bool:
        return True  # every fit early-stops on them

    def cpu_only_reason(self, params: dict[str, Any]) -> str | None:
        return None

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        return booster.predict(X)

    def save(self, booster: Any, path: Path) -> None:
        booster.save_model(str(path))

    def load(self, path: Path) -> LoadedBooster:
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(path))
        return LoadedBooster(booster, booster.num_feature(), booster.current_iteration(), booster.feature_name())

    def library_error(self) -> type[BaseException]:
        import lightgbm

        return lightgbm.basic.LightGBMError

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        """Probe with a 1-round fit: a build without GPU support, or without an OpenCL
        device, raises at the first GPU fit."""
        import lightgbm as lgb

        rng = np.random.default_rng(0)
        X = rng.random((64, 2))
        y = rng.random(64)
        try:
            lgb.train(
                {"device_type": "gpu", "gpu_device_id": gpu_id, "verbose": -1, "num_threads": 1},
                lgb.Dataset(X, y),
                num_boost_round=1,
            )
        except Exception as exc:  # LightGBMError for "no OpenCL device" / "GPU not enabled"
            return f"{type(exc).__name__}: {exc}"
        return None
