"""catboost behind :class:`~step5.models.tree_adapter.TreeAdapter`.

Symmetric trees, trained with ``task_type="GPU"`` on a GPU; ``allow_writing_files=False``
keeps a ``catboost_info/`` folder out of the working directory. Checkpoints are
catboost's binary ``cbm`` format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from step5.models.tree_adapter import NO_CHOICES, LoadedBooster, suggest_boosting


class CatBoostAdapter:
    model_type = "catboost"
    library_keys = ("learning_rate", "depth", "l2_leaf_reg", "random_strength", "bagging_temperature")
    choice_keys = NO_CHOICES

    def suggest(self, trial: Any) -> dict[str, Any]:
        # No `rsm`: the GPU build supports it only for pairwise losses, and a search space
        # must mean the same thing on both devices.
        return {
            **suggest_boosting(trial),
            "depth": trial.suggest_int("depth", 3, 8),
            "l2_leaf_reg": trial.suggest_float("l2_leaf_reg", 1.0, 10.0, log=True),
            "random_strength": trial.suggest_float("random_strength", 1e-3, 10.0, log=True),
            "bagging_temperature": trial.suggest_float("bagging_temperature", 0.0, 1.0),
        }

    def fit(
        self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
        *, max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
        feature_names: list[str] | None,
    ) -> tuple[Any, int]:
        from catboost import CatBoostRegressor, Pool

        settings: dict[str, Any] = {
            "loss_function": "RMSE",
            "iterations": max_rounds,
            "random_seed": seed,
            "logging_level": "Silent",
            "allow_writing_files": False,  # otherwise catboost_info/ appears in the working dir
            **params,
        }
        if n_threads is not None:
            settings["thread_count"] = n_threads
        if device != "cpu":
            settings.update(task_type="GPU", devices=device[5:])
        model = CatBoostRegressor(**settings)
        model.fit(
            Pool(X_tr, y_tr, feature_names=feature_names), eval_set=Pool(X_va, y_va, feature_names=feature_names),
            early_stopping_rounds=early_stopping_rounds,
            use_best_model=True,  # shrinks the model to its best round
        )
        return model, int(model.tree_count_)

    def reads_validation_rows(self, params: dict[str, Any]) -> bool:
        return True  # every fit early-stops on them

    def cpu_only_reason(self, params: dict[str, Any]) -> str | None:
        return None

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        return booster.predict(X)

    def save(self, booster: Any, path: Path) -> None:
        booster.save_model(str(path), format="cbm")

    def load(self, path: Path) -> LoadedBooster:
        from catboost import CatBoostRegressor

        booster = CatBoostRegressor()
        booster.load_model(str(path), format="cbm")
        return LoadedBooster(booster, len(booster.feature_names_), int(booster.tree_count_), booster.feature_names_)

    def library_error(self) -> type[BaseException]:
        import catboost

        return catboost.CatBoostError

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        return None  # not probed: a GPU fit that fails falls back to CPU (trees.train_fold)
