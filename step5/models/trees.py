"""Gradient-boosted tree models (xgboost, lightgbm, catboost), trained in-process.

The optimizer's objective runs the same K-fold CV, holdout test set and anti-overfit score
for every model type; for a tree model each fold is one call of :func:`train_fold`::

    params = suggest_params(trial, "lightgbm")           # the search space
    metrics, model = train_fold("lightgbm", params, X_tr, y_tr, X_va, y_va, seed=42,
                                X_test=X_te, y_test=y_te)
    save_model(model, "lightgbm", out / "best_model.txt")
    load_model(out / "best_model.txt", "lightgbm").predict(X_new)   # Step 6

Decisions:

* **Native parameter names.** Each search space uses the names the library itself reads
  (``lambda_l2`` for lightgbm, ``l2_leaf_reg`` for catboost), so the sidecar's
  ``hyperparameters`` say exactly what trained the model. Two driver keys are shared:
  ``n_estimators`` (the cap on boosting rounds) and ``early_stopping_rounds``.
* **Early stopping on the validation fold**, then the model is cut to its best round, so
  the fitted model, the saved checkpoint and the reported metrics all use the same trees.
  ``n_rounds=`` trains an exact number of rounds instead (e.g. a final refit on all
  development rows with the CV folds' mean best round count, see :func:`final_n_rounds`).
* **No scale-sensitive split penalties** (xgboost ``gamma``, lightgbm ``min_gain_to_split``)
  in the search: the target (``holdout_quality``) lives in [0, 1] with a variance around
  1e-2, so a loss-unit threshold that suits one target kills every split on another.
* **Devices.** When :func:`step5.devices.detect_gpus` (no torch) finds a GPU, xgboost
  trains with ``device="cuda:0"``, catboost with ``task_type="GPU"``, and lightgbm with
  ``device_type="gpu"`` only if a one-off probe shows its build can (the PyPI wheel needs an
  OpenCL device); otherwise CPU, with one log line saying why. A GPU fit that fails falls
  back to CPU for the rest of the process, logged. GPU training is not bit-for-bit
  deterministic in xgboost/catboost; CPU training is, given the seed.
* **Predictions run on the CPU.** A GPU-trained xgboost booster is switched to CPU before
  it predicts, so metrics are computed the same way Step 6 computes predictions.
* The three libraries are imported lazily: a neural-net run imports this module without
  paying for them.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from step5.artifacts import CHECKPOINT_FILENAMES, CHECKPOINT_FORMATS
from step5.data.splits import as_xy
from step5.errors import DataError, JobError, MissingDependency, is_out_of_memory
from step5.fsutil import atomic_output

logger = logging.getLogger(__name__)

TREE_MODEL_TYPES: tuple[str, ...] = ("xgboost", "lightgbm", "catboost")

#: File suffix of ``best_model.*`` per model type (SPEC section 4); the file names and
#: formats are defined once, in :mod:`step5.artifacts`, which writes and checks sidecars.
CHECKPOINT_SUFFIX: dict[str, str] = {mt: Path(name).suffix for mt, name in CHECKPOINT_FILENAMES.items()}

#: The sidecar's ``checkpoint_format`` per model type.
CHECKPOINT_FORMAT: dict[str, str] = dict(CHECKPOINT_FORMATS)

#: Rounds without improvement on the validation fold before boosting stops.
DEFAULT_EARLY_STOPPING_ROUNDS = 50

#: Keys every tree model's params may carry besides its library parameters.
_DRIVER_KEYS = ("n_estimators", "early_stopping_rounds")

#: Library parameters each search space produces; train_fold accepts exactly these (plus
#: the driver keys), so a typo in a hand-written params dict is an error, not a default.
_LIBRARY_KEYS: dict[str, tuple[str, ...]] = {
    "xgboost": (
        "learning_rate", "max_depth", "min_child_weight", "subsample", "colsample_bytree",
        "reg_alpha", "reg_lambda",
    ),
    "lightgbm": (
        "learning_rate", "num_leaves", "max_depth", "min_data_in_leaf", "bagging_fraction",
        "bagging_freq", "feature_fraction", "lambda_l1", "lambda_l2",
    ),
    "catboost": (
        "learning_rate", "depth", "l2_leaf_reg", "random_strength", "bagging_temperature",
    ),
}


def require_libraries(model_types: Iterable[str]) -> None:
    """Raise :class:`MissingDependency` naming each tree library ``model_types`` need that is
    not installed. They are the optional ``trees`` extra: a neural-net-only install lacks them.

    Each model type's library is the module (and PyPI package) of the same name.
    """
    missing = [mt for mt in dict.fromkeys(model_types)
               if mt in TREE_MODEL_TYPES and importlib.util.find_spec(mt) is None]
    if missing:
        raise MissingDependency(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; the tree model types "
            "come with the `trees` extra: pip install -c requirements.txt 'step5[trees]' "
            "(or the checkout: pip install -c requirements.txt '.[trees]')"
        )


def _check_model_type(model_type: str) -> str:
    if model_type not in TREE_MODEL_TYPES:
        if model_type == "neural_net":
            raise ValueError(
                "`model_type` 'neural_net' is not a tree model: its folds run in worker "
                "subprocesses and its checkpoints are loaded on the torch side"
            )
        raise ValueError(f"`model_type` must be one of {TREE_MODEL_TYPES}, got {model_type!r}")
    return model_type


def checkpoint_name(model_type: str, stem: str = "best_model") -> str:
    """``best_model.json`` etc.: the checkpoint file name for ``model_type``."""
    if model_type not in CHECKPOINT_SUFFIX:
        raise ValueError(f"`model_type` must be one of {tuple(CHECKPOINT_SUFFIX)}, got {model_type!r}")
    return stem + CHECKPOINT_SUFFIX[model_type]


# --------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------

def suggest_params(trial: Any, model_type: str) -> dict[str, Any]:
    """Sample one point of ``model_type``'s search space from an Optuna trial.

    Returns plain ints/floats (JSON-ready) keyed by the names the library reads, plus
    ``n_estimators`` (the boosting-round cap; early stopping usually ends sooner).
    """
    _check_model_type(model_type)
    if model_type == "xgboost":
        return {
            "n_estimators": trial.suggest_int("n_estimators", 100, 1000, step=50),
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            "max_depth": trial.suggest_int("max_depth", 2, 10),
            # squared error: the hessian is 1 per row, so this is a minimum row count
            "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 20.0, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
            "reg_alpha": trial.suggest_float("reg_alpha", 1e-8, 1.0, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 10.0, log=True),
        }
    if model_type == "lightgbm":
        return {
            "n_estimators": trial.suggest_int("n_estimators", 100, 1000, step=50),
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 8, 128, log=True),
            "max_depth": trial.suggest_int("max_depth", 3, 12),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 5, 100, log=True),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "bagging_freq": 1,  # bagging_fraction is ignored unless bagging runs every k rounds
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "lambda_l1": trial.suggest_float("lambda_l1", 1e-8, 1.0, log=True),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
        }
    # catboost: symmetric trees; `rsm` is left out because the GPU build supports it only
    # for pairwise losses, and a search space must mean the same thing on both devices.
    return {
        "n_estimators": trial.suggest_int("n_estimators", 100, 1000, step=50),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
        "depth": trial.suggest_int("depth", 3, 8),
        "l2_leaf_reg": trial.suggest_float("l2_leaf_reg", 1.0, 10.0, log=True),
        "random_strength": trial.suggest_float("random_strength", 1e-3, 10.0, log=True),
        "bagging_temperature": trial.suggest_float("bagging_temperature", 0.0, 1.0),
    }


def _split_params(model_type: str, params: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """Validate ``params``; return (n_estimators, early_stopping_rounds, library params)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"`params` for {model_type} must be a dict, got {type(params).__name__}")
    allowed = set(_LIBRARY_KEYS[model_type]) | set(_DRIVER_KEYS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown {model_type} parameter(s) {unknown}; expected keys among {sorted(allowed)}"
        )
    lib = {k: v for k, v in params.items() if k not in _DRIVER_KEYS}
    for key, value in lib.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            raise ValueError(f"{model_type} parameter `{key}` must be a finite number, got {value!r}")
    n_estimators = params.get("n_estimators", 500)
    early = params.get("early_stopping_rounds", DEFAULT_EARLY_STOPPING_ROUNDS)
    for key, value in (("n_estimators", n_estimators), ("early_stopping_rounds", early)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{model_type} parameter `{key}` must be an int >= 1, got {value!r}")
    return int(n_estimators), int(early), lib


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------

#: model type -> why its GPU mode failed in this process (later folds go straight to CPU)
_GPU_BROKEN: dict[str, str] = {}


@functools.lru_cache(maxsize=8)
def _visible_gpus(cuda_visible_devices: str | None) -> tuple[str, ...]:
    """GPU ids for this process; cached per CUDA_VISIBLE_DEVICES so nvidia-smi runs once."""
    from step5.devices import detect_gpus

    env = dict(os.environ)
    if cuda_visible_devices is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return tuple(detect_gpus(env))


@functools.lru_cache(maxsize=8)
def lightgbm_gpu_supported(gpu_id: int = 0) -> tuple[bool, str]:
    """Can this lightgbm build train on GPU ``gpu_id``? Probed once with a 1-round fit.

    The PyPI wheel is built with the OpenCL backend, which still needs an OpenCL runtime
    and device at run time; a CPU-only build raises at the first GPU fit. Returns
    (supported, reason) so the caller can log why it fell back.
    """
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
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def resolve_device(model_type: str, device: str | None = None) -> str:
    """Where ``model_type`` trains: ``"cpu"`` or ``"cuda:N"`` (N: CUDA ordinal in this process).

    ``device=None`` detects (GPU 0 of the visible ones, if any); ``"cpu"``, ``"cuda"`` and
    ``"cuda:N"`` ask explicitly. A GPU request still ends on CPU, with a log line, when the
    library cannot use it (lightgbm without GPU support, or an earlier GPU failure).
    """
    _check_model_type(model_type)
    if device is None:
        gpus = _visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if not gpus:
            return "cpu"
        device = "cuda:0"  # ordinal 0 is the first *visible* GPU, whatever its physical id
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        device = "cuda:0"
    if not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"`device` must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if model_type in _GPU_BROKEN:
        return "cpu"
    if model_type == "lightgbm":
        ok, reason = lightgbm_gpu_supported(int(device[5:]))
        if not ok:
            _GPU_BROKEN["lightgbm"] = reason
            logger.info("lightgbm cannot train on the GPU in this build (%s); training on CPU", reason)
            return "cpu"
    return device


def device_for_gpus(gpus: Sequence[str] | None, env: Mapping[str, str] | None = None) -> str | None:
    """The ``device`` argument that honours ``--gpus`` for an in-process tree fit.

    ``None`` (no flag) -> None: detect. ``[]`` (``--gpus none``) -> ``"cpu"``. Otherwise the
    first listed GPU, as a CUDA ordinal of this process: its position in
    ``CUDA_VISIBLE_DEVICES`` when that is set (CUDA renumbers the visible GPUs from 0),
    else the index itself. A GPU that is not visible is a ``ValueError`` naming it.
    """
    if gpus is None:
        return None
    if len(gpus) == 0:
        return "cpu"
    env = os.environ if env is None else env
    first = str(gpus[0]).strip()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if first not in ids:
            raise ValueError(f"--gpus asks for GPU {first}, but CUDA_VISIBLE_DEVICES={visible!r} hides it")
        return f"cuda:{ids.index(first)}"
    if not first.isdigit():
        raise ValueError(f"`gpus` must hold GPU indices like '0', got {first!r}")
    return f"cuda:{int(first)}"


# --------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------

@dataclass
class TreeModel:
    """A fitted (or loaded) tree model cut to its best round; what Step 6 predicts with.

    ``booster`` is an ``xgboost.Booster``, a ``lightgbm.Booster`` or a
    ``catboost.CatBoostRegressor``; every tree it holds is used for prediction.
    """

    model_type: str
    booster: Any
    n_features: int
    n_iterations: int  # boosting rounds kept (the best round + 1 after early stopping)
    device: str = "cpu"  # where it was trained: "cpu" or "cuda"
    feature_names: list[str] | None = None  # stored in the checkpoint, so Step 6 can check the schema
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict the target for rows ``X`` (n, n_features); returns float64 (n,)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"`X` must be 2-D (rows, features), got shape {X.shape}")
        if X.shape[1] != self.n_features:
            raise ValueError(
                f"`X` has {X.shape[1]} feature columns but this {self.model_type} model was "
                f"trained on {self.n_features}"
            )
        if X.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        if self.model_type == "xgboost":
            out = self.booster.inplace_predict(X)
        elif self.model_type == "lightgbm":
            out = self.booster.predict(X)
        else:
            out = self.booster.predict(X)
        return np.asarray(out, dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def _as_xy(name: str, X: Any, y: Any, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fold-file shape checks (:func:`step5.data.splits.as_xy`), plus what a fit needs."""
    X, y = as_xy(name, X, y)
    if X.shape[0] < 2:
        raise ValueError(f"`X_{name}` needs at least 2 rows, got {X.shape[0]}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"`X_{name}` has {X.shape[1]} features but `X_train` has {n_features}")
    if not np.isfinite(X).all():
        row, col = (int(v) for v in np.argwhere(~np.isfinite(X))[0])
        raise ValueError(f"`X_{name}` has a non-finite value {float(X[row, col])!r} at row {row}, column {col}")
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"`y_{name}` has a non-finite value {float(y[row])!r} at row {row}")
    return X, y


#: Characters xgboost ("[", "]", "<") or lightgbm (JSON punctuation) refuse in feature names.
_NAME_FORBIDDEN = frozenset('[]<>{}:,"')


def _checked_feature_names(names: Sequence[str] | None, n_features: int, model_type: str) -> list[str] | None:
    """``feature_names`` as a list, or None when absent or not storable by every library.

    Names a library would reject are left out of the model (with a log line) rather than
    failing the fit: they are a safety check for Step 6, not an input of the model.
    """
    if names is None:
        return None
    out = [str(n) for n in names]
    if len(out) != n_features:
        raise ValueError(f"`feature_names` has {len(out)} names but `X_train` has {n_features} columns")
    if len(set(out)) != len(out):
        raise ValueError("`feature_names` must be unique")
    bad = [n for n in out if not n or any(ch in _NAME_FORBIDDEN or ch.isspace() for ch in n)]
    if bad:
        logger.info("%s: feature names such as %r cannot be stored in the model; storing none", model_type, bad[0])
        return None
    return out


def r2_mse(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(R^2, MSE). R^2 of a constant ``y_true`` is 1.0 for a perfect fit, else 0.0
    (sklearn's ``force_finite`` convention), so a metric is never NaN or infinite."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    mse = ss_res / y_true.size
    if ss_tot == 0.0:
        return (1.0 if ss_res == 0.0 else 0.0), mse
    return 1.0 - ss_res / ss_tot, mse


def _fit_xgboost(
    lib: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
    *, n_rounds: int, early_stopping: int | None, seed: int, n_threads: int | None, device: str,
    names: list[str] | None = None,
) -> tuple[Any, int]:
    import xgboost as xgb

    params: dict[str, Any] = {
        "objective": "reg:squarederror",
        "eval_metric": "rmse",
        "tree_method": "hist",
        "device": device,
        "seed": seed,
        "verbosity": 0,
        **lib,
    }
    if n_threads is not None:
        params["nthread"] = n_threads
    dtrain = xgb.DMatrix(X_tr, label=y_tr, feature_names=names)
    dval = xgb.DMatrix(X_va, label=y_va, feature_names=names)
    booster = xgb.train(
        params, dtrain, num_boost_round=n_rounds, evals=[(dval, "val")],
        early_stopping_rounds=early_stopping, verbose_eval=False,
    )
    kept = booster.best_iteration + 1 if early_stopping is not None else n_rounds
    if kept < booster.num_boosted_rounds():
        booster = booster[:kept]  # a copy holding only the kept rounds; it is what gets saved
    booster.set_param({"device": "cpu"})  # predict like Step 6 will, without a device copy
    return booster, kept


def _fit_lightgbm(
    lib: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
    *, n_rounds: int, early_stopping: int | None, seed: int, n_threads: int | None, device: str,
    names: list[str] | None = None,
) -> tuple[Any, int]:
    import lightgbm as lgb

    params: dict[str, Any] = {
        "objective": "regression",
        "metric": "l2",
        "seed": seed,
        "verbose": -1,
        **lib,
    }
    if device == "cpu":
        # same seed + same threads-independent histograms -> the same model every run
        params.update(device_type="cpu", deterministic=True, force_row_wise=True)
    else:
        params.update(device_type="gpu", gpu_device_id=int(device[5:]))
    if n_threads is not None:
        params["num_threads"] = n_threads
    train_set = lgb.Dataset(X_tr, label=y_tr, feature_name=names or "auto", free_raw_data=True)
    val_set = lgb.Dataset(X_va, label=y_va, reference=train_set)
    callbacks = []
    if early_stopping is not None:
        callbacks.append(lgb.early_stopping(early_stopping, first_metric_only=True, verbose=False))
    booster = lgb.train(
        params, train_set, num_boost_round=n_rounds, valid_sets=[val_set],
        valid_names=["val"], callbacks=callbacks,
    )
    # lightgbm's best_iteration counts rounds (1-based); 0 means "no early stopping happened"
    kept = booster.best_iteration if early_stopping is not None and booster.best_iteration > 0 \
        else booster.current_iteration()
    if kept < booster.current_iteration():
        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=kept))
    return booster, kept


def _fit_catboost(
    lib: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
    *, n_rounds: int, early_stopping: int | None, seed: int, n_threads: int | None, device: str,
    names: list[str] | None = None,
) -> tuple[Any, int]:
    from catboost import CatBoostRegressor, Pool

    kwargs: dict[str, Any] = {
        "loss_function": "RMSE",
        "iterations": n_rounds,
        "random_seed": seed,
        "logging_level": "Silent",
        "allow_writing_files": False,  # otherwise catboost_info/ appears in the working dir
        **lib,
    }
    if n_threads is not None:
        kwargs["thread_count"] = n_threads
    if device != "cpu":
        kwargs.update(task_type="GPU", devices=device[5:])
    model = CatBoostRegressor(**kwargs)
    model.fit(
        Pool(X_tr, y_tr, feature_names=names), eval_set=Pool(X_va, y_va, feature_names=names),
        early_stopping_rounds=early_stopping,
        use_best_model=early_stopping is not None,  # shrinks the model to its best round
    )
    return model, int(model.tree_count_)


_FITTERS = {"xgboost": _fit_xgboost, "lightgbm": _fit_lightgbm, "catboost": _fit_catboost}


def _library_error(model_type: str) -> type[BaseException]:
    """The exception class ``model_type``'s library raises for a fit it rejects (only that
    library is imported: the others may not be installed)."""
    if model_type == "xgboost":
        import xgboost

        return xgboost.core.XGBoostError
    if model_type == "lightgbm":
        import lightgbm

        return lightgbm.basic.LightGBMError
    import catboost

    return catboost.CatBoostError


def _as_job_error(model_type: str, exc: Exception) -> Exception:
    """A library's refusal (bad parameter value, out of memory) as a deterministic
    :class:`JobError` that fails the trial, not the run; anything else (a bug) unchanged."""
    if isinstance(exc, MemoryError):
        return JobError(f"{model_type} ran out of memory: {exc}", "out_of_memory")
    if isinstance(exc, _library_error(model_type)):
        text = str(exc).strip()
        kind = "out_of_memory" if is_out_of_memory(exc) else "train_error"
        return JobError(f"{model_type} training failed: {type(exc).__name__}: {text}", kind)
    return exc


def train_fold(
    model_type: str,
    params: Mapping[str, Any],
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int,
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    n_threads: int | None = None,
    device: str | None = None,
    n_rounds: int | None = None,
    feature_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], TreeModel]:
    """Train one fold of ``model_type`` and score it; returns (metrics, model).

    Boosting stops early on (``X_val``, ``y_val``) and the model keeps its best round,
    unless ``n_rounds`` is given: then exactly that many rounds are trained and the
    validation set is only scored. ``seed`` seeds the library (same data, params, seed and
    device -> same model on CPU). ``n_threads=None`` lets the library choose; ``device``:
    see :func:`resolve_device` (and :func:`device_for_gpus` for ``--gpus``).
    ``feature_names`` (one per column) are stored in the model and its checkpoint, so that
    Step 6 can check a checkpoint against its sidecar's feature schema.

    Metrics: ``r2`` (validation R^2), ``val_mse``, ``train_r2``, ``train_mse``,
    ``test_r2``/``test_mse`` (when the test set is given), ``duration`` (seconds, fit and
    scoring), ``best_iteration`` (0-based index of the last kept round), ``n_iterations``,
    ``early_stopped``, ``device`` ("cpu" or "cuda"), ``device_fallback`` (why a GPU fit
    ended on CPU, or None), ``model_type``, ``seed``, ``n_train``, ``n_val``.

    Raises ``ValueError`` for bad arguments (naming the argument), and
    :class:`~step5.errors.JobError` when the library rejects the fit (a parameter value it
    refuses, out of memory): deterministic failures that should fail the trial.
    """
    _check_model_type(model_type)
    started = time.perf_counter()
    n_estimators, early_rounds, lib = _split_params(model_type, params)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}")
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"`n_threads` must be an int >= 1 or None, got {n_threads!r}")
    if n_rounds is not None and (isinstance(n_rounds, bool) or not isinstance(n_rounds, (int, np.integer)) or n_rounds < 1):
        raise ValueError(f"`n_rounds` must be an int >= 1 or None, got {n_rounds!r}")
    X_tr, y_tr = _as_xy("train", X_train, y_train)
    X_va, y_va = _as_xy("val", X_val, y_val, X_tr.shape[1])
    if (X_test is None) != (y_test is None):
        raise ValueError("`X_test` and `y_test` must be given together")
    test = _as_xy("test", X_test, y_test, X_tr.shape[1]) if X_test is not None else None

    names = _checked_feature_names(feature_names, X_tr.shape[1], model_type)
    rounds = int(n_rounds) if n_rounds is not None else n_estimators
    early = None if n_rounds is not None else early_rounds
    seed = int(seed)
    where = resolve_device(model_type, device)
    fallback: str | None = None
    fit = _FITTERS[model_type]
    try:
        booster, kept = fit(lib, X_tr, y_tr, X_va, y_va, n_rounds=rounds, early_stopping=early,
                            seed=seed, n_threads=n_threads, device=where, names=names)
    except Exception as exc:
        if where == "cpu":
            raise _as_job_error(model_type, exc) from exc
        # A broken driver or a build without GPU support must not cost the run; the same
        # params are tried on CPU, and later folds skip the GPU straight away.
        fallback = f"{type(exc).__name__}: {exc}"
        _GPU_BROKEN[model_type] = fallback
        logger.warning("%s GPU fit failed (%s); falling back to CPU for this process", model_type, fallback)
        where = "cpu"
        try:
            booster, kept = fit(lib, X_tr, y_tr, X_va, y_va, n_rounds=rounds, early_stopping=early,
                                seed=seed, n_threads=n_threads, device="cpu", names=names)
        except Exception as exc2:
            raise _as_job_error(model_type, exc2) from exc2

    kind = "cpu" if where == "cpu" else "cuda"
    model = TreeModel(model_type, booster, n_features=X_tr.shape[1], n_iterations=kept, device=kind,
                      feature_names=names)
    train_r2, train_mse = r2_mse(y_tr, model.predict(X_tr))
    val_r2, val_mse = r2_mse(y_va, model.predict(X_va))
    metrics: dict[str, Any] = {
        "model_type": model_type,
        "r2": val_r2,
        "val_mse": val_mse,
        "train_r2": train_r2,
        "train_mse": train_mse,
        "best_iteration": kept - 1,
        "n_iterations": kept,
        "early_stopped": early is not None and kept < rounds,
        "device": kind,
        "device_fallback": fallback,
        "seed": seed,
        "n_train": int(X_tr.shape[0]),
        "n_val": int(X_va.shape[0]),
    }
    if test is not None:
        metrics["test_r2"], metrics["test_mse"] = r2_mse(test[1], model.predict(test[0]))
    metrics["duration"] = time.perf_counter() - started
    model.info = {"params": dict(params), "seed": seed}
    return metrics, model


def final_n_rounds(best_iterations: list[int] | tuple[int, ...]) -> int:
    """Rounds for a refit on all development rows: the folds' mean kept round count.

    ``best_iterations`` are the folds' 0-based ``best_iteration`` metrics.
    """
    values = [int(v) for v in best_iterations]
    if not values or any(v < 0 for v in values):
        raise ValueError(f"`best_iterations` must be a non-empty list of ints >= 0, got {best_iterations!r}")
    return max(1, int(round(sum(v + 1 for v in values) / len(values))))


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

def _check_suffix(path: Path, model_type: str) -> None:
    suffix = CHECKPOINT_SUFFIX[model_type]
    if path.suffix != suffix:
        raise ValueError(f"a {model_type} checkpoint must end with {suffix!r}, got {str(path)!r}")


def save_model(model: TreeModel, model_type: str, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` in its library's native format, atomically.

    The file appears complete or not at all (temp file in the same folder + ``os.replace``),
    so a reader never loads half a checkpoint. Returns the path.
    """
    _check_model_type(model_type)
    if not isinstance(model, TreeModel):
        raise ValueError(f"`model` must be a TreeModel from train_fold/load_model, got {type(model).__name__}")
    if model.model_type != model_type:
        raise ValueError(f"`model` is a {model.model_type} model, but `model_type` is {model_type!r}")
    p = Path(path)
    _check_suffix(p, model_type)
    # xgboost picks its format from the file extension, so the temp name keeps the suffix
    with atomic_output(p, keep_suffix=True) as tmp:
        if model_type == "catboost":
            model.booster.save_model(str(tmp), format="cbm")
        elif model_type == "xgboost":
            _unnamed_xgboost(model.booster).save_model(str(tmp))
        else:
            model.booster.save_model(str(tmp))
    return p


#: Booster attribute holding the feature names of a saved xgboost model (see _unnamed_xgboost).
XGBOOST_NAMES_ATTR = "step5_feature_names"


def _unnamed_xgboost(booster: Any) -> Any:
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
    unnamed.set_attr(**{XGBOOST_NAMES_ATTR: json.dumps(list(names)) if names else None})
    return unnamed


def load_model(path: str | os.PathLike[str], model_type: str) -> TreeModel:
    """Load a checkpoint written by :func:`save_model`; predictions run on the CPU.

    Raises :class:`~step5.errors.DataError` naming the file when it is missing or its
    library cannot read it.
    """
    _check_model_type(model_type)
    p = Path(path)
    _check_suffix(p, model_type)
    if not p.is_file():
        raise DataError(f"{model_type} checkpoint not found: {p}")
    require_libraries([model_type])
    try:
        if model_type == "xgboost":
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(str(p))
            booster.set_param({"device": "cpu"})
            n_features, n_iter = booster.num_features(), booster.num_boosted_rounds()
            stored = booster.attr(XGBOOST_NAMES_ATTR)
            names = json.loads(stored) if stored else booster.feature_names
        elif model_type == "lightgbm":
            import lightgbm as lgb

            booster = lgb.Booster(model_file=str(p))
            n_features, n_iter = booster.num_feature(), booster.current_iteration()
            names = booster.feature_name()
        else:
            from catboost import CatBoostRegressor

            booster = CatBoostRegressor()
            booster.load_model(str(p), format="cbm")
            n_features, n_iter = len(booster.feature_names_), int(booster.tree_count_)
            names = booster.feature_names_
    except Exception as exc:
        raise DataError(f"cannot load {model_type} checkpoint {p}: {type(exc).__name__}: {exc}") from exc
    return TreeModel(model_type, booster, n_features=int(n_features), n_iterations=int(n_iter),
                     feature_names=_stored_names(names, int(n_features)))


def _stored_names(names: Sequence[str] | None, n_features: int) -> list[str] | None:
    """The feature names a checkpoint carries, or None when the library made them up
    (lightgbm ``Column_0``..., catboost ``0``...: the model was trained without names)."""
    if not names:
        return None
    names = [str(n) for n in names]
    if names in ([f"Column_{i}" for i in range(n_features)], [str(i) for i in range(n_features)]):
        return None
    return names
