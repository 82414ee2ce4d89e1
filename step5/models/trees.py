"""Gradient-boosted tree models (xgboost, lightgbm, catboost), trained in-process: first what
the libraries share, then one :class:`TreeAdapter` per library for what differs, found in
:data:`ADAPTERS` by model type (docs/models.md)."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from step5.artifacts import MODEL_TYPES, checkpoint_filename
from step5.data.splits import as_xy
from step5.errors import DataError, JobError, MissingDependency, is_out_of_memory
from step5.fsutil import atomic_output

logger = logging.getLogger(__name__)

#: Rounds without improvement on the validation fold before boosting stops.
DEFAULT_EARLY_STOPPING_ROUNDS = 50

#: Keys every tree model's params may carry besides its library parameters.
_DRIVER_KEYS = ("n_estimators", "early_stopping_rounds")


def require_libraries(model_types: Iterable[str]) -> None:
    """Raise :class:`MissingDependency` naming each tree library ``model_types`` need that is not installed."""
    missing = [mt for mt in dict.fromkeys(model_types)
               if mt in TREE_MODEL_TYPES and importlib.util.find_spec(mt) is None]
    if missing:
        raise MissingDependency(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; the tree model types "
            "come with the `trees` extra: pip install -c requirements.txt 'step5[trees]' "
            "(or the checkout: pip install -c requirements.txt '.[trees]')"
        )


def adapter_for(model_type: str) -> TreeAdapter:
    """The adapter of ``model_type``; a ``ValueError`` for any other model type."""
    if model_type not in ADAPTERS:
        if model_type in MODEL_TYPES:
            raise ValueError(f"`model_type` {model_type!r} is not a tree model: its folds run in worker "
                             "subprocesses and its checkpoints are loaded on the torch side")
        raise ValueError(f"`model_type` must be one of {TREE_MODEL_TYPES}, got {model_type!r}")
    return ADAPTERS[model_type]


def _split_params(adapter: TreeAdapter, params: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """Validate ``params``; return (n_estimators, early_stopping_rounds, library params)."""
    model_type = adapter.model_type
    allowed = set(adapter.library_keys) | set(adapter.choice_keys) | set(_DRIVER_KEYS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown {model_type} parameter(s) {unknown}; expected keys among {sorted(allowed)}")
    lib = {k: v for k, v in params.items() if k not in _DRIVER_KEYS}
    for key, value in lib.items():
        if key in adapter.choice_keys:
            if value not in adapter.choice_keys[key]:
                raise ValueError(f"{model_type} parameter `{key}` must be one of {list(adapter.choice_keys[key])}, "
                                 f"got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            raise ValueError(f"{model_type} parameter `{key}` must be a finite number, got {value!r}")
    n_estimators = params.get("n_estimators", 500)
    early = params.get("early_stopping_rounds", DEFAULT_EARLY_STOPPING_ROUNDS)
    for key, value in (("n_estimators", n_estimators), ("early_stopping_rounds", early)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{model_type} parameter `{key}` must be an int >= 1, got {value!r}")
    return int(n_estimators), int(early), lib


class TreeDevices:
    """What one owner's tree fits found out about the devices, each once (docs/models.md, "Devices")."""

    def __init__(self) -> None:
        self._visible: dict[str | None, tuple[str, ...]] = {}  # CUDA_VISIBLE_DEVICES -> GPU ids
        self._gpu_usable: set[tuple[str, int]] = set()  # (model type, CUDA ordinal) that passed the check
        self.gpu_failures: dict[str, str] = {}  # model type -> why it cannot use the GPU here

    def resolve(self, model_type: str, device: str | None = None) -> str:
        """``"cpu"`` or ``"cuda:N"`` (a CUDA ordinal here) for ``device`` None (detect), "cpu", "cuda"
        or "cuda:N"; CPU, logged, when the library cannot use the GPU."""
        adapter = adapter_for(model_type)
        asked = device is not None  # --gpus named it: falling back to the CPU is worth a warning
        if device is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible not in self._visible:
                from step5.devices import detect_gpus  # may run nvidia-smi: once per value

                self._visible[visible] = tuple(detect_gpus(dict(os.environ)))
            if not self._visible[visible]:
                return "cpu"
            device = "cuda:0"  # ordinal 0 is the first *visible* GPU, whatever its physical id
        if device == "cpu":
            return "cpu"
        if device == "cuda":
            device = "cuda:0"
        if not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"`device` must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if model_type in self.gpu_failures:
            return "cpu"
        gpu = (model_type, int(device[5:]))
        if gpu not in self._gpu_usable:
            reason = adapter.gpu_unsupported_reason(gpu[1])
            if reason is not None:
                self.gpu_failures[model_type] = reason
                logger.log(logging.WARNING if asked else logging.INFO, "%s cannot train on GPU %s here (%s); "
                           "training on CPU", model_type, device, reason)
                return "cpu"
            self._gpu_usable.add(gpu)
        return device


def device_for_gpus(gpus: Sequence[str] | None, env: Mapping[str, str] | None = None) -> str | None:
    """The ``device`` that honours ``--gpus``: None (no flag) detects, ``[]`` is ``"cpu"``, else the
    first listed GPU as a CUDA ordinal: its position in ``CUDA_VISIBLE_DEVICES`` when that is set
    (CUDA renumbers the visible GPUs from 0), else the index itself."""
    if gpus is None:
        return None
    if len(gpus) == 0:
        return "cpu"
    env = os.environ if env is None else env
    first = str(gpus[0]).strip()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        from step5.devices import read_hip_visible  # as CUDA reads it: "NoDevFiles" or "0,-1,2" hide GPU 2

        ids = read_hip_visible(visible)
        if first not in ids:
            raise ValueError(f"--gpus asks for GPU {first}, but CUDA_VISIBLE_DEVICES={visible!r} hides it")
        return f"cuda:{ids.index(first)}"
    if not first.isdigit():
        raise ValueError(f"`gpus` must hold GPU indices like '0', got {first!r}")
    return f"cuda:{int(first)}"


@dataclass
class TreeModel:
    """A fitted (or loaded) tree model cut to its best round; what Step 6 predicts with."""

    model_type: str
    booster: Any  # the library's model; every tree it holds is used for prediction
    n_features: int
    n_iterations: int  # boosting rounds kept (the best round + 1 after early stopping)
    feature_names: list[str] | None = None  # stored in the checkpoint, so Step 6 can check the schema

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The target for rows ``X`` (n, n_features), float64 (n,)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"`X` must be 2-D (rows, features), got shape {X.shape}")
        if X.shape[1] != self.n_features:
            raise ValueError(f"`X` has {X.shape[1]} feature columns but this {self.model_type} model was "
                             f"trained on {self.n_features}")
        if X.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        out = adapter_for(self.model_type).predict(self.booster, X)
        return np.asarray(out, dtype=np.float64).reshape(-1)


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
    """``feature_names`` as a list, or None when absent or not storable by every library (logged:
    they only help Step 6 check, so they do not fail the fit)."""
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


def _as_job_error(model_type: str, exc: Exception) -> Exception:
    """A library's refusal (bad parameter value, out of memory) as a deterministic
    :class:`JobError` that fails the trial, not the run; anything else (a bug) unchanged."""
    if isinstance(exc, MemoryError):
        return JobError(f"{model_type} ran out of memory: {exc}", "out_of_memory")
    if isinstance(exc, ADAPTERS[model_type].library_error()):
        text = str(exc).strip()
        kind = "out_of_memory" if is_out_of_memory(exc) else "train_error"
        return JobError(f"{model_type} training failed: {type(exc).__name__}: {text}", kind)
    return exc


def train_fold(
    model_type: str, params: Mapping[str, Any],
    X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
    *, seed: int, X_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
    n_threads: int | None = None, device: str | None = None, feature_names: Sequence[str] | None = None,
    devices: TreeDevices | None = None,
) -> tuple[dict[str, Any], TreeModel]:
    """Train one fold, early-stopped on (``X_val``, ``y_val``) and cut to its best round, and
    score it; returns (metrics, model). Metrics, arguments and errors: docs/models.md."""
    adapter = adapter_for(model_type)
    started = time.perf_counter()
    n_estimators, early_rounds, lib = _split_params(adapter, params)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}")
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
        raise ValueError(f"`n_threads` must be an int >= 1 or None, got {n_threads!r}")
    X_tr, y_tr = _as_xy("train", X_train, y_train)
    X_va, y_va = _as_xy("val", X_val, y_val, X_tr.shape[1])
    if (X_test is None) != (y_test is None):
        raise ValueError("`X_test` and `y_test` must be given together")
    test = _as_xy("test", X_test, y_test, X_tr.shape[1]) if X_test is not None else None

    names = _checked_feature_names(feature_names, X_tr.shape[1], model_type)
    seed = int(seed)
    devices = TreeDevices() if devices is None else devices
    where = devices.resolve(model_type, device)
    cpu_only = adapter.cpu_only_reason(lib) if where != "cpu" else None
    if cpu_only is not None:
        logger.debug("%s trains on the CPU: %s", model_type, cpu_only)
        where = "cpu"  # not a fallback: these params never train on a GPU
    fallback: str | None = None
    while True:
        try:
            booster, kept = adapter.fit(lib, X_tr, y_tr, X_va, y_va, max_rounds=n_estimators,
                                        early_stopping_rounds=early_rounds, seed=seed, n_threads=n_threads,
                                        device=where, feature_names=names)
            break
        except Exception as exc:
            if where == "cpu":
                raise _as_job_error(model_type, exc) from exc
            # A broken driver or a build without GPU support must not cost the run; the same
            # params are tried on CPU, and later folds skip the GPU straight away.
            fallback = devices.gpu_failures[model_type] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s GPU fit failed (%s); falling back to CPU for this and later folds", model_type, fallback)
            where = "cpu"

    model = TreeModel(model_type, booster, n_features=X_tr.shape[1], n_iterations=kept, feature_names=names)
    train_r2, train_mse = r2_mse(y_tr, model.predict(X_tr))
    val_r2, val_mse = r2_mse(y_va, model.predict(X_va))
    metrics: dict[str, Any] = {
        "model_type": model_type, "r2": val_r2, "val_mse": val_mse, "train_r2": train_r2, "train_mse": train_mse,
        "best_iteration": kept - 1, "n_iterations": kept, "early_stopped": kept < n_estimators,
        # Rounds the fit ran: an early stop ends `early_rounds` after the round it keeps.
        "rounds_trained": min(n_estimators, kept + early_rounds) if kept < n_estimators else n_estimators,
        "device": "cpu" if where == "cpu" else "cuda", "device_fallback": fallback, "seed": seed,
        "n_train": int(X_tr.shape[0]), "n_val": int(X_va.shape[0]),
    }
    if test is not None:
        metrics["test_r2"], metrics["test_mse"] = r2_mse(test[1], model.predict(test[0]))
    metrics["duration"] = time.perf_counter() - started
    return metrics, model


def _checkpoint(model_type: str, path: str | os.PathLike[str]) -> tuple[TreeAdapter, Path]:
    """The adapter of ``model_type``, and ``path``, which must end with its checkpoint's suffix."""
    adapter = adapter_for(model_type)
    p = Path(path)
    suffix = Path(checkpoint_filename(model_type)).suffix
    if p.suffix != suffix:
        raise ValueError(f"a {model_type} checkpoint must end with {suffix!r}, got {str(p)!r}")
    return adapter, p


def save_model(model: TreeModel, model_type: str, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` in its library's native format, atomically; returns the path."""
    if not isinstance(model, TreeModel):
        raise ValueError(f"`model` must be a TreeModel from train_fold/load_model, got {type(model).__name__}")
    if model.model_type != model_type:
        raise ValueError(f"`model` is a {model.model_type} model, but `model_type` is {model_type!r}")
    adapter, p = _checkpoint(model_type, path)
    # xgboost picks its format from the file extension, so the temp name keeps the suffix
    with atomic_output(p, keep_suffix=True) as tmp:
        adapter.save(model.booster, tmp)
    return p


def load_model(path: str | os.PathLike[str], model_type: str) -> TreeModel:
    """Load a checkpoint written by :func:`save_model` (predicting on the CPU); a
    :class:`~step5.errors.DataError` naming the file when it is missing or unreadable."""
    adapter, p = _checkpoint(model_type, path)
    if not p.is_file():
        raise DataError(f"{model_type} checkpoint not found: {p}")
    require_libraries([model_type])
    try:
        model = adapter.load(p)
    except Exception as exc:
        # xgboost appends its C++ stack trace ("Stack trace:\n  [bt] (0) ..."): noise to a user, cut off.
        reason = str(exc).split("\nStack trace:", 1)[0].rstrip()
        raise DataError(f"cannot load {model_type} checkpoint {p}: {type(exc).__name__}: {reason}") from exc
    n = model.n_features = int(model.n_features)
    model.n_iterations = int(model.n_iterations)
    names = [str(k) for k in model.feature_names or ()]
    if names in ([f"Column_{i}" for i in range(n)], [str(i) for i in range(n)]):
        names = []  # made up by the library (lightgbm, catboost): the model was trained without names
    model.feature_names = names or None
    return model


def suggest_boosting(trial: Any) -> dict[str, Any]:
    """What every search space shares, suggested first (the order decides what a seeded sampler draws)."""
    return {
        "n_estimators": trial.suggest_int("n_estimators", 100, 1000, step=50),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
    }


class TreeAdapter:
    """The interface every library answers (each method: docs/models.md, "The adapter interface");
    the defaults suit a library that early-stops every fit on its validation rows and may
    train on any GPU it is given."""

    model_type: str  # also the library's module and PyPI name
    library_keys: tuple[str, ...]  # what train_fold accepts besides the driver keys: a typo is an error
    choice_keys: Mapping[str, tuple[str, ...]] = MappingProxyType({})  # string-valued keys and their values
    error_class: str  # "module:Class" the library raises for a fit it rejects, imported when one fails

    def suggest(self, trial: Any) -> dict[str, Any]:
        raise NotImplementedError

    def fit(self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, *,
            max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
            feature_names: list[str] | None) -> tuple[Any, int]:
        raise NotImplementedError

    def reads_validation_rows(self, params: dict[str, Any]) -> bool:
        return True

    def cpu_only_reason(self, params: dict[str, Any]) -> str | None:
        return None

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        return booster.predict(X)

    def save(self, booster: Any, path: Path) -> None:
        booster.save_model(str(path))

    def load(self, path: Path) -> TreeModel:
        raise NotImplementedError

    def library_error(self) -> type[BaseException]:
        module, name = self.error_class.split(":")
        return getattr(importlib.import_module(module), name)

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        return None


#: Booster attribute holding the feature names of a saved xgboost model (see XGBoostAdapter.save).
NAMES_ATTR = "step5_feature_names"
#: xgboost's ``booster`` values the search chooses from; params without the key mean "gbtree".
BOOSTERS = ("gbtree", "gblinear")
#: Library parameters the linear booster reads (anything else is a tree parameter).
LINEAR_KEYS = frozenset({"booster", "lambda", "alpha"})
#: Coordinate-descent rounds a linear fit may take; the training loss stops falling long
#: before on standardised data (tens to a few hundred rounds).
LINEAR_MAX_ROUNDS = 1000


class XGBoostAdapter(TreeAdapter):
    """``gbtree`` (``tree_method="hist"``) or ``gblinear`` (:func:`_fit_linear`); JSON checkpoints (:meth:`save`)."""

    model_type = "xgboost"
    error_class = "xgboost.core:XGBoostError"
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

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        """A 1-round fit: where xgboost finds no GPU at ``gpu_id`` it trains on the CPU all the same, saying
        so only in a warning, so the device its booster ended on is what tells."""
        import xgboost as xgb

        rng = np.random.default_rng(0)
        data = xgb.DMatrix(rng.random((64, 2)), label=rng.random(64))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                booster = xgb.train({"device": f"cuda:{gpu_id}", "tree_method": "hist", "nthread": 1, "verbosity": 1},
                                    data, num_boost_round=1)
            except Exception as exc:  # noqa: BLE001 - XGBoostError from a broken driver or runtime
                return f"{type(exc).__name__}: {exc}"
        used = json.loads(booster.save_config())["learner"]["generic_param"]["device"]
        if used.startswith("cuda"):
            return None
        why = re.sub(r"^\[[^]]*\] WARNING: \S+: ", "", str(said[0].message)) if said else None
        return f"it trained on the {used}" + (f": {why}" if why else "")

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
        # Without feature names, which would make the existing Step 6's predict(xgb.DMatrix(X)) on a
        # plain array fail; they go in an attribute prediction ignores.
        names = booster.feature_names
        unnamed = booster.copy()
        unnamed.feature_names = None
        unnamed.feature_types = None
        unnamed.set_attr(**{NAMES_ATTR: json.dumps(list(names)) if names else None})
        unnamed.save_model(str(path))  # the format follows the file's suffix (.json)

    def load(self, path: Path) -> TreeModel:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(path))
        booster.set_param({"device": "cpu"})
        stored = booster.attr(NAMES_ATTR)
        names = json.loads(stored) if stored else booster.feature_names
        return TreeModel(self.model_type, booster, booster.num_features(), booster.num_boosted_rounds(), names)


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
    # The scaling folded into a copy that predicts on raw rows: with z = (x - m) / s and a prediction
    # y = mu + sd * (b + w.z), the same function of x has weights sd * w / s and bias
    # mu + sd * (b - sum(w * m / s)). The JSON holds the weights feature by feature, then the bias.
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
    return folded, folded.num_boosted_rounds()


class LightGBMAdapter(TreeAdapter):
    """Deterministic on CPU; text checkpoints; the wheel's GPU support needs an OpenCL device (probed)."""

    model_type = "lightgbm"
    error_class = "lightgbm.basic:LightGBMError"
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

    def load(self, path: Path) -> TreeModel:
        import lightgbm as lgb

        booster = lgb.Booster(model_file=str(path))
        return TreeModel(self.model_type, booster, booster.num_feature(), booster.current_iteration(),
                         booster.feature_name())

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
    """Symmetric trees, ``task_type="GPU"`` on a GPU; binary ``cbm`` checkpoints (catboost's default format)."""

    model_type = "catboost"
    error_class = "catboost:CatBoostError"
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

    def load(self, path: Path) -> TreeModel:
        from catboost import CatBoostRegressor

        booster = CatBoostRegressor()
        booster.load_model(str(path), format="cbm")
        return TreeModel(self.model_type, booster, len(booster.feature_names_), int(booster.tree_count_),
                         booster.feature_names_)


#: The adapter of each tree library, by model type (read-only: adapters hold no state).
ADAPTERS: Mapping[str, TreeAdapter] = MappingProxyType(
    {adapter.model_type: adapter for adapter in (XGBoostAdapter(), LightGBMAdapter(), CatBoostAdapter())}
)
TREE_MODEL_TYPES: tuple[str, ...] = tuple(ADAPTERS)
