"""Gradient-boosted tree models (xgboost, lightgbm, catboost), trained in-process.

The optimizer's objective runs the same K-fold CV, holdout test set and anti-overfit score
for every model type; for a tree model each fold is one call of :func:`train_fold`::

    params = suggest_params(trial, "lightgbm")           # the search space
    metrics, model = train_fold("lightgbm", params, X_tr, y_tr, X_va, y_va, seed=42,
                                X_test=X_te, y_test=y_te)
    save_model(model, "lightgbm", out / "best_model.txt")
    load_model(out / "best_model.txt", "lightgbm").predict(X_new)   # Step 6

What differs between the libraries (search space, fit, predict, save, load) sits in one
adapter per library behind :class:`~step5.models.tree_adapter.TreeAdapter`, found in
:data:`ADAPTERS` by model type. This module does what they share: argument and data
checks, the device choice and its CPU fallback (:class:`TreeDevices`), metrics, and
atomic checkpoint files.

Decisions:

* **Native parameter names.** Each search space uses the names the library itself reads
  (``lambda_l2`` for lightgbm, ``l2_leaf_reg`` for catboost), so the sidecar's
  ``hyperparameters`` say exactly what trained the model. Two driver keys are shared:
  ``n_estimators`` (the cap on boosting rounds) and ``early_stopping_rounds``.
* **Early stopping on the validation fold**, then the model is cut to its best round, so
  the fitted model, the saved checkpoint and the reported metrics all use the same trees.
* **No scale-sensitive split penalties** (xgboost ``gamma``, lightgbm ``min_gain_to_split``)
  in the search: the target (``holdout_quality``) lives in [0, 1] with a variance around
  1e-2, so a loss-unit threshold that suits one target kills every split on another.
* **Devices.** When :func:`step5.devices.detect_gpus` (no torch) finds a GPU, xgboost
  trains with ``device="cuda:0"``, catboost with ``task_type="GPU"``, and lightgbm with
  ``device_type="gpu"`` only if a one-off probe shows its build can (the PyPI wheel needs an
  OpenCL device); otherwise CPU, with one log line saying why. A GPU fit that fails falls
  back to CPU, logged, and later fits that share the same :class:`TreeDevices` (the
  optimizer keeps one per run) go straight to CPU. GPU training is not bit-for-bit
  deterministic in xgboost/catboost; CPU training is, given the seed.
* **Predictions run on the CPU.** A GPU-trained xgboost booster is switched to CPU before
  it predicts, so metrics are computed the same way Step 6 computes predictions.
* The three libraries are imported lazily: a neural-net run imports this module without
  paying for them.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from step5.artifacts import MODEL_TYPES, checkpoint_filename
from step5.data.splits import as_xy
from step5.errors import DataError, JobError, MissingDependency, is_out_of_memory
from step5.fsutil import atomic_output
from step5.models.catboost_adapter import CatBoostAdapter
from step5.models.lightgbm_adapter import LightGBMAdapter
from step5.models.tree_adapter import TreeAdapter
from step5.models.xgboost_adapter import XGBoostAdapter

logger = logging.getLogger(__name__)

#: The adapter of each tree library, by model type (read-only: adapters hold no state).
ADAPTERS: Mapping[str, TreeAdapter] = MappingProxyType(
    {adapter.model_type: adapter for adapter in (XGBoostAdapter(), LightGBMAdapter(), CatBoostAdapter())}
)

TREE_MODEL_TYPES: tuple[str, ...] = tuple(ADAPTERS)

#: Rounds without improvement on the validation fold before boosting stops.
DEFAULT_EARLY_STOPPING_ROUNDS = 50

#: Keys every tree model's params may carry besides its library parameters.
_DRIVER_KEYS = ("n_estimators", "early_stopping_rounds")


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


def _check_model_type(model_type: str) -> TreeAdapter:
    """The adapter of ``model_type``; a ``ValueError`` for any other model type."""
    if model_type not in ADAPTERS:
        if model_type in MODEL_TYPES:
            raise ValueError(
                f"`model_type` {model_type!r} is not a tree model: its folds run in worker "
                "subprocesses and its checkpoints are loaded on the torch side"
            )
        raise ValueError(f"`model_type` must be one of {TREE_MODEL_TYPES}, got {model_type!r}")
    return ADAPTERS[model_type]


# --------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------

def suggest_params(trial: Any, model_type: str) -> dict[str, Any]:
    """Sample one point of ``model_type``'s search space from an Optuna trial.

    Returns plain ints/floats (JSON-ready) keyed by the names the library reads, plus
    ``n_estimators`` (the boosting-round cap; early stopping usually ends sooner).
    """
    return _check_model_type(model_type).suggest(trial)


def _split_params(model_type: str, params: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """Validate ``params``; return (n_estimators, early_stopping_rounds, library params)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"`params` for {model_type} must be a dict, got {type(params).__name__}")
    adapter = ADAPTERS[model_type]
    allowed = set(adapter.library_keys) | set(adapter.choice_keys) | set(_DRIVER_KEYS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown {model_type} parameter(s) {unknown}; expected keys among {sorted(allowed)}"
        )
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


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------

class TreeDevices:
    """Where the tree fits of one owner train; the optimizer's tree backend holds one per run.

    It finds each of these out once and remembers it: the GPUs visible under each
    ``CUDA_VISIBLE_DEVICES`` value (:func:`step5.devices.detect_gpus` may run nvidia-smi),
    whether a library's build can train on a GPU (lightgbm's probe fit), and which
    libraries' GPU fits failed: their later fits go straight to the CPU.
    """

    def __init__(self) -> None:
        self._visible: dict[str | None, tuple[str, ...]] = {}  # CUDA_VISIBLE_DEVICES -> GPU ids
        self._gpu_usable: set[tuple[str, int]] = set()  # (model type, CUDA ordinal) that passed the check
        self.gpu_failures: dict[str, str] = {}  # model type -> why it cannot use the GPU here

    def visible_gpus(self) -> tuple[str, ...]:
        """GPU ids visible to this process."""
        key = os.environ.get("CUDA_VISIBLE_DEVICES")
        if key not in self._visible:
            from step5.devices import detect_gpus

            self._visible[key] = tuple(detect_gpus(dict(os.environ)))
        return self._visible[key]

    def resolve(self, model_type: str, device: str | None = None) -> str:
        """Where ``model_type`` trains: ``"cpu"`` or ``"cuda:N"`` (N: CUDA ordinal in this process).

        ``device=None`` detects (GPU 0 of the visible ones, if any); ``"cpu"``, ``"cuda"`` and
        ``"cuda:N"`` ask explicitly. A GPU request still ends on CPU, with a log line, when the
        library cannot use it (lightgbm without GPU support, or an earlier GPU failure).
        """
        adapter = _check_model_type(model_type)
        if device is None:
            if not self.visible_gpus():
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

    def gpu_fit_failed(self, model_type: str, reason: str) -> None:
        """Record that a GPU fit of ``model_type`` failed: its later fits train on CPU."""
        self.gpu_failures[model_type] = reason
        logger.warning("%s GPU fit failed (%s); falling back to CPU for this and later folds", model_type, reason)


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
        out = _check_model_type(self.model_type).predict(self.booster, X)
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
    feature_names: Sequence[str] | None = None,
    devices: TreeDevices | None = None,
) -> tuple[dict[str, Any], TreeModel]:
    """Train one fold of ``model_type`` and score it; returns (metrics, model).

    Boosting stops early on (``X_val``, ``y_val``) and the model keeps its best round;
    a fit that does not early-stop (:func:`reads_validation_rows`) only scores them.
    ``seed`` seeds the library (same data, params, seed and device -> same model on CPU).
    ``n_threads=None`` lets the library choose; ``device``: see :meth:`TreeDevices.resolve`
    (and :func:`device_for_gpus` for ``--gpus``); ``devices`` remembers GPU failures across
    the folds that share it (None: a fresh one for this fold).
    ``feature_names`` (one per column) are stored in the model and its checkpoint, so that
    Step 6 can check a checkpoint against its sidecar's feature schema.

    Metrics: ``r2`` (validation R^2), ``val_mse``, ``train_r2``, ``train_mse``,
    ``test_r2``/``test_mse`` (when the test set is given), ``duration`` (seconds, fit and
    scoring), ``best_iteration`` (0-based index of the last kept round), ``n_iterations``
    (rounds kept), ``rounds_trained`` (rounds run, the kept ones and those after them that
    did not improve), ``early_stopped``, ``device`` ("cpu" or "cuda"), ``device_fallback`` (why a GPU fit
    ended on CPU, or None), ``model_type``, ``seed``, ``n_train``, ``n_val``.

    Raises ``ValueError`` for bad arguments (naming the argument), and
    :class:`~step5.errors.JobError` when the library rejects the fit (a parameter value it
    refuses, out of memory): deterministic failures that should fail the trial.
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
        fallback = f"{type(exc).__name__}: {exc}"
        devices.gpu_fit_failed(model_type, fallback)
        where = "cpu"
        try:
            booster, kept = fit("cpu")
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
        "early_stopped": kept < n_estimators,
        # Rounds the fit ran: an early stop ends `early_rounds` after the round it keeps.
        "rounds_trained": min(n_estimators, kept + early_rounds) if kept < n_estimators else n_estimators,
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


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

def _check_suffix(path: Path, model_type: str) -> None:
    suffix = Path(checkpoint_filename(model_type)).suffix
    if path.suffix != suffix:
        raise ValueError(f"a {model_type} checkpoint must end with {suffix!r}, got {str(path)!r}")


def save_model(model: TreeModel, model_type: str, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` in its library's native format, atomically.

    The file appears complete or not at all (temp file in the same folder + ``os.replace``),
    so a reader never loads half a checkpoint. Returns the path.
    """
    adapter = _check_model_type(model_type)
    if not isinstance(model, TreeModel):
        raise ValueError(f"`model` must be a TreeModel from train_fold/load_model, got {type(model).__name__}")
    if model.model_type != model_type:
        raise ValueError(f"`model` is a {model.model_type} model, but `model_type` is {model_type!r}")
    p = Path(path)
    _check_suffix(p, model_type)
    # xgboost picks its format from the file extension, so the temp name keeps the suffix
    with atomic_output(p, keep_suffix=True) as tmp:
        adapter.save(model.booster, tmp)
    return p


def load_model(path: str | os.PathLike[str], model_type: str) -> TreeModel:
    """Load a checkpoint written by :func:`save_model`; predictions run on the CPU.

    Raises :class:`~step5.errors.DataError` naming the file when it is missing or its
    library cannot read it.
    """
    adapter = _check_model_type(model_type)
    p = Path(path)
    _check_suffix(p, model_type)
    if not p.is_file():
        raise DataError(f"{model_type} checkpoint not found: {p}")
    require_libraries([model_type])
    try:
        loaded = adapter.load(p)
    except Exception as exc:
        raise DataError(f"cannot load {model_type} checkpoint {p}: {type(exc).__name__}: {exc}") from exc
    n_features = int(loaded.n_features)
    return TreeModel(model_type, loaded.booster, n_features=n_features, n_iterations=int(loaded.n_iterations),
                     feature_names=_stored_names(loaded.feature_names, n_features))


def _stored_names(names: Sequence[str] | None, n_features: int) -> list[str] | None:
    """The feature names a checkpoint carries, or None when the library made them up
    (lightgbm ``Column_0``..., catboost ``0``...: the model was trained without names)."""
    if not names:
        return None
    names = [str(n) for n in names]
    if names in ([f"Column_{i}" for i in range(n_features)], [str(i) for i in range(n_features)]):
        return None
    return names
