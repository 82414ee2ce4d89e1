"""xgboost behind :class:`~step5.models.tree_adapter.TreeAdapter`.

Two boosters, one categorical choice of the search (``booster``):

* ``gbtree`` (the default, and what params without a ``booster`` key get): trees with
  ``tree_method="hist"`` on ``device="cpu"`` or ``"cuda:N"``, early-stopped on the
  validation fold and cut to the best round.
* ``gblinear``: an elastic-net linear model (L2 ``lambda``, L1 ``alpha``, xgboost's own
  names) fitted by cyclic coordinate descent to convergence. It is what small, nearly
  linear tables need, where every tree model loses to a ridge regression (docs/models.md).
  It trains on standardised features and target, so its penalties mean the same on any
  data, and the scaling is then folded into the saved weights (:func:`_fold_scaling`): the
  checkpoint predicts on raw features like any other xgboost model. It needs no
  validation rows: the penalties regularise it, and the validation fold only scores it;
  ``early_stopping_rounds`` ends coordinate descent once the *training* loss stops falling.
  It always trains on the CPU (:meth:`XGBoostAdapter.cpu_only_reason`).

A trained booster is switched to the CPU before it predicts, so metrics are computed the
way Step 6 predicts. Checkpoints are xgboost JSON, saved *without* feature names (see
:func:`_unnamed`).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from step5.models.tree_adapter import LoadedBooster, suggest_boosting

#: Booster attribute holding the feature names of a saved model (see _unnamed).
NAMES_ATTR = "step5_feature_names"

#: The ``booster`` values the search chooses from; params without the key mean "gbtree".
BOOSTERS = ("gbtree", "gblinear")

#: Library parameters the linear booster reads (anything else is a tree parameter).
LINEAR_KEYS = frozenset({"booster", "lambda", "alpha"})

#: Coordinate-descent rounds a linear fit may take; the training loss stops falling long
#: before on standardised data (tens to a few hundred rounds).
LINEAR_MAX_ROUNDS = 1000


class XGBoostAdapter:
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

    def fit(
        self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
        *, max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
        feature_names: list[str] | None,
    ) -> tuple[Any, int]:
        import xgboost as xgb

        if _is_linear(params):
            stray = sorted(set(params) - LINEAR_KEYS)
            if stray:
                raise ValueError(f"xgboost parameter(s) {stray} do not apply to booster 'gblinear', which reads "
                                 f"{sorted(LINEAR_KEYS - {'booster'})}")
            return _fit_linear(params, X_tr, y_tr, max_rounds=max_rounds, converged_after=early_stopping_rounds,
                               seed=seed, n_threads=n_threads, device=device, feature_names=feature_names)
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

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        return None  # not probed: a GPU fit that fails falls back to CPU (trees.train_fold)


def _is_linear(params: dict[str, Any]) -> bool:
    """Whether ``params`` fit the linear booster (no ``booster`` key means trees)."""
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
        "booster": "gblinear",
        "updater": "coord_descent",
        "feature_selector": "cyclic",  # deterministic, unlike the default "shotgun"
        "learning_rate": 1.0,  # plain coordinate descent: each step solves its coordinate exactly
        "objective": "reg:squarederror",
        "eval_metric": "rmse",
        "base_score": 0.0,  # the standardised target has mean 0; the intercept is the bias weight
        "device": device,
        "seed": seed,
        "verbosity": 0,
        "lambda": params["lambda"],
        "alpha": params["alpha"],
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
