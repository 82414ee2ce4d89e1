"""One adapter per tree library (xgboost, lightgbm, catboost): what differs between them.

:mod:`step5.models.trees` does what they share and finds them in :data:`ADAPTERS` by model
type. An adapter holds no state and imports its library only inside its methods, so
importing this module costs nothing without the ``trees`` extra (docs/models.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np


class LoadedBooster(NamedTuple):
    """What an adapter reads back from a checkpoint file."""

    booster: Any  # the library's model object, set up to predict on the CPU
    n_features: int
    n_iterations: int  # boosting rounds the file holds
    feature_names: Sequence[str] | None  # as the library reports them (may be made up, e.g. Column_0)


def suggest_boosting(trial: Any) -> dict[str, Any]:
    """The part of every search space the libraries share, suggested first (the order of
    suggestions decides what a seeded sampler draws): the cap on rounds and the learning rate."""
    return {
        "n_estimators": trial.suggest_int("n_estimators", 100, 1000, step=50),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
    }


class TreeAdapter:
    """The interface every library answers; the defaults suit a library that early-stops
    every fit on its validation rows and may train on any GPU it is given."""

    #: The model type (and the library's module and PyPI name): "xgboost", ...
    model_type: str
    #: Library parameters :meth:`suggest` may produce; train_fold accepts exactly these
    #: (plus the shared driver keys), so a typo in a hand-written dict is an error.
    library_keys: tuple[str, ...]
    #: Parameters whose value is one of a few strings, and those strings; every other
    #: library parameter is a finite number.
    choice_keys: Mapping[str, tuple[str, ...]] = MappingProxyType({})

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One point of the search space: library parameters plus ``n_estimators``, JSON-ready."""
        raise NotImplementedError

    def fit(self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, *,
            max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
            feature_names: list[str] | None) -> tuple[Any, int]:
        """Boost at most ``max_rounds``, stopping once the validation loss has not improved for
        ``early_stopping_rounds``; returns (booster cut to its best round, rounds it keeps).
        ``device`` is "cpu" or "cuda:N"; the returned booster predicts on the CPU."""
        raise NotImplementedError

    def reads_validation_rows(self, params: dict[str, Any]) -> bool:
        """Whether a fit early-stops on its validation rows (else it only scores them, and
        its final model can fit every development row)."""
        return True

    def cpu_only_reason(self, params: dict[str, Any]) -> str | None:
        """Why a fit of ``params`` trains on the CPU even where a GPU is asked for, or None."""
        return None

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        """Predictions for float32 rows ``X`` (n >= 1), shape (n,)."""
        return booster.predict(X)

    def save(self, booster: Any, path: Path) -> None:
        """Write ``booster`` in the library's native format (the caller makes it atomic)."""
        booster.save_model(str(path))

    def load(self, path: Path) -> LoadedBooster:
        """Read a file written by :meth:`save`; any library error propagates."""
        raise NotImplementedError

    def library_error(self) -> type[BaseException]:
        """The exception class the library raises for a fit it rejects; imports the library."""
        raise NotImplementedError

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        """Why this build cannot train on GPU ``gpu_id``, or None when it can or cannot tell
        before trying (a failing GPU fit then falls back to CPU: trees.train_fold)."""
        return None


#: Booster attribute holding the feature names of a saved xgboost model (see _unnamed).
NAMES_ATTR = "step5_feature_names"
#: xgboost's ``booster`` values the search chooses from; params without the key mean "gbtree".
BOOSTERS = ("gbtree", "gblinear")
#: Library parameters the linear booster reads (anything else is a tree parameter).
LINEAR_KEYS = frozenset({"booster", "lambda", "alpha"})
#: Coordinate-descent rounds a linear fit may take; the training loss stops falling long
#: before on standardised data (tens to a few hundred rounds).
LINEAR_MAX_ROUNDS = 1000


class XGBoostAdapter(TreeAdapter):
    """``gbtree`` (``tree_method="hist"``) or ``gblinear``, an elastic net fitted on
    standardised rows (:func:`_fit_linear`). Checkpoints are xgboost JSON, saved without
    feature names (:func:`_unnamed`)."""

    model_type = "xgboost"
    library_keys = (
        "learning_rate", "max_depth", "min_child_weight", "subsample", "colsample_bytree",
        "reg_alpha", "reg_lambda", "lambda", "alpha",
    )
    choice_keys = MappingProxyType({"booster": BOOSTERS})

    def suggest(self, trial: Any) -> dict[str, Any]:
        booster = trial.suggest_categorical("booster", BOOSTERS)
        if booster == "gblinear":
            # On standardised features and target: alpha 0.5 zeroes nearly every column,
            # lambda 1e-4 is nearly ordinary least squares.
            return {
                "booster": booster,
                "n_estimators": LINEAR_MAX_ROUNDS,
                "lambda": trial.suggest_float("lambda", 1e-4, 10.0, log=True),
                "alpha": trial.suggest_float("alpha", 1e-5, 0.5, log=True),
            }
        # No `gamma`: a split-gain threshold is in loss units, and the target's variance
        # (about 1e-2) makes a value that suits one target kill every split on another.
        return {
            "booster": booster,
            **suggest_boosting(trial),
            "max_depth": trial.suggest_int("max_depth", 2, 10),
            # squared error: the hessian is 1 per row, so this is a minimum row count
            "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 20.0, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
            "reg_alpha": trial.suggest_float("reg_alpha", 1e-8, 1.0, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        }

    def fit(self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, *,
            max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
            feature_names: list[str] | None) -> tuple[Any, int]:
        import xgboost as xgb

        if _is_linear(params):
            stray = sorted(set(params) - LINEAR_KEYS)
            if stray:
                raise ValueError(f"xgboost parameter(s) {stray} do not apply to booster 'gblinear', which reads "
                                 f"{sorted(LINEAR_KEYS - {'booster'})}")
            return _fit_linear(params, X_tr, y_tr, max_rounds=max_rounds, converged_after=early_stopping_rounds,
                               seed=seed, n_threads=n_threads, device=device, feature_names=feature_names)
        settings: dict[str, Any] = {"objective": "reg:squarederror", "eval_metric": "rmse", "tree_method": "hist",
                                    "device": device, "seed": seed, "verbosity": 0, **params}
        if n_threads is not None:
            settings["nthread"] = n_threads
        dtrain = xgb.DMatrix(X_tr, label=y_tr, feature_names=feature_names)
        dval = xgb.DMatrix(X_va, label=y_va, feature_names=feature_names)
        booster = xgb.train(settings, dtrain, num_boost_round=max_rounds, evals=[(dval, "val")],
                            early_stopping_rounds=early_stopping_rounds, verbose_eval=False)
        kept = booster.best_iteration + 1
        if kept < booster.num_boosted_rounds():
            booster = booster[:kept]  # a copy holding only the kept rounds; it is what gets saved
        booster.set_param({"device": "cpu"})  # predict like Step 6 will, without a device copy
        return booster, kept

    def reads_validation_rows(self, params: dict[str, Any]) -> bool:
        return not _is_linear(params)

    def cpu_only_reason(self, params: dict[str, Any]) -> str | None:
        if _is_linear(params):
            # A failed GPU fit would send every later xgboost fit of the run to the CPU,
            # trees too; a linear fit gains nothing on a GPU worth that risk.
            return "a gblinear model is a few coordinate-descent passes over the rows"
        return None

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        # Through a DMatrix, as Step 6 predicts: gblinear has no in-place prediction.
        return booster.predict(xgb.DMatrix(X, feature_names=booster.feature_names))

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


def _is_linear(params: dict[str, Any]) -> bool:
    return params.get("booster", "gbtree") == "gblinear"


def _fit_linear(
    params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, *, max_rounds: int, converged_after: int,
    seed: int, n_threads: int | None, device: str, feature_names: list[str] | None,
) -> tuple[Any, int]:
    """The gblinear fit: coordinate descent on standardised rows until the training loss
    has not fallen for ``converged_after`` rounds; returns (booster on raw features, rounds)."""
    import xgboost as xgb

    x_mean = X_tr.mean(axis=0, dtype=np.float64)
    x_scale = X_tr.std(axis=0, dtype=np.float64)
    x_scale[x_scale == 0.0] = 1.0  # a constant column keeps weight 0 whatever its scale
    y_mean = float(np.mean(y_tr))
    y_scale = float(np.std(y_tr)) or 1.0
    Z = ((X_tr - x_mean) / x_scale).astype(np.float32)
    settings: dict[str, Any] = {
        "booster": "gblinear", "updater": "coord_descent",
        "feature_selector": "cyclic",  # deterministic, unlike the default "shotgun"
        "learning_rate": 1.0,  # plain coordinate descent: each step solves its coordinate exactly
        "objective": "reg:squarederror", "eval_metric": "rmse",
        "base_score": 0.0,  # the standardised target has mean 0; the intercept is the bias weight
        "device": device, "seed": seed, "verbosity": 0, "lambda": params["lambda"], "alpha": params["alpha"],
    }
    if n_threads is not None:
        settings["nthread"] = n_threads
    dtrain = xgb.DMatrix(Z, label=(y_tr - y_mean) / y_scale, feature_names=feature_names)
    booster = xgb.train(settings, dtrain, num_boost_round=max_rounds, evals=[(dtrain, "train")],
                        early_stopping_rounds=converged_after, verbose_eval=False)
    booster = _fold_scaling(booster, x_mean, x_scale, y_mean, y_scale)
    return booster, booster.num_boosted_rounds()


def _fold_scaling(booster: Any, x_mean: np.ndarray, x_scale: np.ndarray, y_mean: float, y_scale: float) -> Any:
    """A copy of a gblinear ``booster`` fitted on standardised rows that predicts on raw ones.

    With z = (x - m) / s and a prediction y = mu + sd * (b + w.z), the same function of x
    has weights sd * w / s and bias mu + sd * (b - sum(w * m / s)). The booster's JSON holds
    the weights feature by feature, then the bias (one output); base_score is 0.
    """
    import xgboost as xgb

    model = json.loads(bytes(booster.save_raw("json")))
    linear = model["learner"]["gradient_booster"]["model"]
    weights = np.asarray(linear["weights"], dtype=np.float64)
    coef, bias = weights[:-1], float(weights[-1])
    if coef.shape != x_mean.shape:
        raise ValueError(f"a gblinear model with {weights.size} weights cannot hold {x_mean.size} features and a bias")
    raw_coef = y_scale * coef / x_scale
    raw_bias = y_mean + y_scale * (bias - float(np.sum(coef * x_mean / x_scale)))
    linear["weights"] = [float(v) for v in raw_coef] + [raw_bias]
    folded = xgb.Booster()
    folded.load_model(bytearray(json.dumps(model).encode()))
    folded.set_param({"device": "cpu"})
    return folded


def _unnamed(booster: Any) -> Any:
    """A copy of ``booster`` without feature names, which is what gets saved.

    A booster saved with names refuses ``predict(xgb.DMatrix(X))`` on a plain array, and
    that is how the existing Step 6 predicts. The names belong in the sidecar; a copy goes
    in a booster attribute, which prediction ignores, so this project's loader can still
    check the checkpoint against its sidecar.
    """
    names = booster.feature_names
    unnamed = booster.copy()
    unnamed.feature_names = None
    unnamed.feature_types = None
    unnamed.set_attr(**{NAMES_ATTR: json.dumps(list(names)) if names else None})
    return unnamed


class LightGBMAdapter(TreeAdapter):
    """Deterministic on CPU (``deterministic``, ``force_row_wise``); text checkpoints. The
    PyPI wheel's GPU support needs an OpenCL device, so :meth:`gpu_unsupported_reason` probes."""

    model_type = "lightgbm"
    library_keys = (
        "learning_rate", "num_leaves", "max_depth", "min_data_in_leaf", "bagging_fraction",
        "bagging_freq", "feature_fraction", "lambda_l1", "lambda_l2",
    )

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

    def fit(self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, *,
            max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
            feature_names: list[str] | None) -> tuple[Any, int]:
        import lightgbm as lgb

        settings: dict[str, Any] = {"objective": "regression", "metric": "l2", "seed": seed, "verbose": -1, **params}
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

    def load(self, path: Path) -> LoadedBooster:
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(path))
        return LoadedBooster(booster, booster.num_feature(), booster.current_iteration(), booster.feature_name())

    def library_error(self) -> type[BaseException]:
        import lightgbm

        return lightgbm.basic.LightGBMError

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        """A 1-round fit: a build without GPU support, or without an OpenCL device, raises."""
        import lightgbm as lgb

        rng = np.random.default_rng(0)
        X, y = rng.random((64, 2)), rng.random(64)
        try:
            lgb.train({"device_type": "gpu", "gpu_device_id": gpu_id, "verbose": -1, "num_threads": 1},
                      lgb.Dataset(X, y), num_boost_round=1)
        except Exception as exc:  # LightGBMError for "no OpenCL device" / "GPU not enabled"
            return f"{type(exc).__name__}: {exc}"
        return None


class CatBoostAdapter(TreeAdapter):
    """Symmetric trees, ``task_type="GPU"`` on a GPU; binary ``cbm`` checkpoints."""

    model_type = "catboost"
    library_keys = ("learning_rate", "depth", "l2_leaf_reg", "random_strength", "bagging_temperature")

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

    def fit(self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, *,
            max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
            feature_names: list[str] | None) -> tuple[Any, int]:
        from catboost import CatBoostRegressor, Pool

        settings: dict[str, Any] = {
            "loss_function": "RMSE", "iterations": max_rounds, "random_seed": seed, "logging_level": "Silent",
            "allow_writing_files": False,  # otherwise catboost_info/ appears in the working dir
            **params,
        }
        if n_threads is not None:
            settings["thread_count"] = n_threads
        if device != "cpu":
            settings.update(task_type="GPU", devices=device[5:])
        model = CatBoostRegressor(**settings)
        model.fit(Pool(X_tr, y_tr, feature_names=feature_names), eval_set=Pool(X_va, y_va, feature_names=feature_names),
                  early_stopping_rounds=early_stopping_rounds, use_best_model=True)  # cut to its best round
        return model, int(model.tree_count_)

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


#: The adapter of each tree library, by model type (read-only: adapters hold no state).
ADAPTERS: Mapping[str, TreeAdapter] = MappingProxyType(
    {adapter.model_type: adapter for adapter in (XGBoostAdapter(), LightGBMAdapter(), CatBoostAdapter())}
)
TREE_MODEL_TYPES: tuple[str, ...] = tuple(ADAPTERS)
