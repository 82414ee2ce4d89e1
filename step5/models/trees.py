"""Gradient-boosted tree models (xgboost, lightgbm, catboost), trained in-process: what the
libraries share (argument and data checks, the device choice and its CPU fallback, metrics,
atomic checkpoint files); what differs sits in :mod:`step5.models.adapters`. The libraries
are imported lazily, so a neural-net run imports this module without them. Decisions
(native parameter names, early stopping, devices, checkpoints): docs/models.md.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from step5.artifacts import MODEL_TYPES, checkpoint_filename
from step5.data.splits import as_xy
from step5.errors import DataError, JobError, MissingDependency, is_out_of_memory
from step5.fsutil import atomic_output
from step5.models.adapters import ADAPTERS, TREE_MODEL_TYPES, TreeAdapter

logger = logging.getLogger(__name__)

#: Rounds without improvement on the validation fold before boosting stops.
DEFAULT_EARLY_STOPPING_ROUNDS = 50

#: Keys every tree model's params may carry besides its library parameters.
_DRIVER_KEYS = ("n_estimators", "early_stopping_rounds")


def require_libraries(model_types: Iterable[str]) -> None:
    """Raise :class:`MissingDependency` naming each tree library ``model_types`` need that is
    not installed (the optional ``trees`` extra; a library's module is named as its model type)."""
    missing = [mt for mt in dict.fromkeys(model_types)
               if mt in TREE_MODEL_TYPES and importlib.util.find_spec(mt) is None]
    if missing:
        raise MissingDependency(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; the tree model types "
            "come with the `trees` extra: pip install -c requirements.txt 'step5[trees]' "
            "(or the checkout: pip install -c requirements.txt '.[trees]')"
        )


def _check_model_type(model_type: str) -> TreeAdapter:
    """The adapter of ``model_type``; a ``ValueError`` for any other model type."""
    if model_type not in ADAPTERS:
        if model_type in MODEL_TYPES:
            raise ValueError(f"`model_type` {model_type!r} is not a tree model: its folds run in worker "
                             "subprocesses and its checkpoints are loaded on the torch side")
        raise ValueError(f"`model_type` must be one of {TREE_MODEL_TYPES}, got {model_type!r}")
    return ADAPTERS[model_type]


def suggest_params(trial: Any, model_type: str) -> dict[str, Any]:
    """One point of ``model_type``'s search space (JSON-ready, the library's own names)."""
    return _check_model_type(model_type).suggest(trial)


def _split_params(model_type: str, params: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """Validate ``params``; return (n_estimators, early_stopping_rounds, library params)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"`params` for {model_type} must be a dict, got {type(params).__name__}")
    adapter = ADAPTERS[model_type]
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


def reads_validation_rows(model_type: str, params: Mapping[str, Any]) -> bool:
    """Whether :func:`train_fold` early-stops ``params`` on its validation rows (every tree
    booster does; xgboost's ``gblinear`` only scores them)."""
    return _check_model_type(model_type).reads_validation_rows(dict(params))


class TreeDevices:
    """Where the tree fits of one owner train (the optimizer's tree backend holds one per run),
    each found out once: the GPUs visible under each ``CUDA_VISIBLE_DEVICES`` value, whether a
    library's build can train on a GPU, and which libraries' GPU fits failed (later fits of
    those go straight to the CPU)."""

    def __init__(self) -> None:
        self._visible: dict[str | None, tuple[str, ...]] = {}  # CUDA_VISIBLE_DEVICES -> GPU ids
        self._gpu_usable: set[tuple[str, int]] = set()  # (model type, CUDA ordinal) that passed the check
        self.gpu_failures: dict[str, str] = {}  # model type -> why it cannot use the GPU here

    def resolve(self, model_type: str, device: str | None = None) -> str:
        """``"cpu"`` or ``"cuda:N"`` (a CUDA ordinal here). ``device=None`` detects; ``"cpu"``,
        ``"cuda"`` and ``"cuda:N"`` ask. A GPU request ends on CPU, logged, when the library
        cannot use it (lightgbm without GPU support, or an earlier GPU failure)."""
        adapter = _check_model_type(model_type)
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
                logger.info("%s cannot train on the GPU in this build (%s); training on CPU", model_type, reason)
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
        ids = [part.strip() for part in visible.split(",") if part.strip()]
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
        out = _check_model_type(self.model_type).predict(self.booster, X)
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
    """``feature_names`` as a list, or None when absent or not storable by every library: such
    names are left out (logged) rather than failing the fit, as they only help Step 6 check."""
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
    score it; returns (metrics, model). The metrics and arguments: docs/models.md.
    ``devices`` remembers GPU checks and failures across the folds sharing it (None: fresh).

    A bad argument is a ``ValueError`` naming it; a fit the library rejects (a parameter
    value, out of memory) a :class:`~step5.errors.JobError`, which fails the trial.
    """
    adapter = _check_model_type(model_type)
    started = time.perf_counter()
    n_estimators, early_rounds, lib = _split_params(model_type, params)
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

    def fit(on: str) -> tuple[Any, int]:
        return adapter.fit(lib, X_tr, y_tr, X_va, y_va, max_rounds=n_estimators, early_stopping_rounds=early_rounds,
                           seed=seed, n_threads=n_threads, device=on, feature_names=names)

    try:
        booster, kept = fit(where)
    except Exception as exc:
        if where == "cpu":
            raise _as_job_error(model_type, exc) from exc
        # A broken driver or a build without GPU support must not cost the run; the same
        # params are tried on CPU, and later folds skip the GPU straight away.
        fallback = devices.gpu_failures[model_type] = f"{type(exc).__name__}: {exc}"
        logger.warning("%s GPU fit failed (%s); falling back to CPU for this and later folds", model_type, fallback)
        where = "cpu"
        try:
            booster, kept = fit("cpu")
        except Exception as exc2:
            raise _as_job_error(model_type, exc2) from exc2

    kind = "cpu" if where == "cpu" else "cuda"
    model = TreeModel(model_type, booster, n_features=X_tr.shape[1], n_iterations=kept, feature_names=names)
    train_r2, train_mse = r2_mse(y_tr, model.predict(X_tr))
    val_r2, val_mse = r2_mse(y_va, model.predict(X_va))
    metrics: dict[str, Any] = {
        "model_type": model_type, "r2": val_r2, "val_mse": val_mse, "train_r2": train_r2, "train_mse": train_mse,
        "best_iteration": kept - 1, "n_iterations": kept, "early_stopped": kept < n_estimators,
        # Rounds the fit ran: an early stop ends `early_rounds` after the round it keeps.
        "rounds_trained": min(n_estimators, kept + early_rounds) if kept < n_estimators else n_estimators,
        "device": kind, "device_fallback": fallback, "seed": seed,
        "n_train": int(X_tr.shape[0]), "n_val": int(X_va.shape[0]),
    }
    if test is not None:
        metrics["test_r2"], metrics["test_mse"] = r2_mse(test[1], model.predict(test[0]))
    metrics["duration"] = time.perf_counter() - started
    return metrics, model


def _checkpoint(model_type: str, path: str | os.PathLike[str]) -> tuple[TreeAdapter, Path]:
    """The adapter of ``model_type``, and ``path``, which must end with its checkpoint's suffix."""
    adapter = _check_model_type(model_type)
    p = Path(path)
    suffix = Path(checkpoint_filename(model_type)).suffix
    if p.suffix != suffix:
        raise ValueError(f"a {model_type} checkpoint must end with {suffix!r}, got {str(p)!r}")
    return adapter, p


def save_model(model: TreeModel, model_type: str, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` in its library's native format, atomically (a reader never loads half a
    checkpoint); returns the path."""
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
        loaded = adapter.load(p)
    except Exception as exc:
        raise DataError(f"cannot load {model_type} checkpoint {p}: {type(exc).__name__}: {exc}") from exc
    n = int(loaded.n_features)
    names = [str(k) for k in loaded.feature_names or ()]
    if names in ([f"Column_{i}" for i in range(n)], [str(i) for i in range(n)]):
        names = []  # made up by the library (lightgbm, catboost): the model was trained without names
    return TreeModel(model_type, loaded.booster, n_features=n, n_iterations=int(loaded.n_iterations),
                     feature_names=names or None)
