"""Fold NPZ -> training core -> ``complete`` reply (and checkpoint): :func:`run_fold_group` (and
:func:`run_train_job`, one fold) for every path, so every path gives the same metrics.
Failures and the data cache: docs/training.md, "Jobs, errors and the data cache"."""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
import traceback
import zipfile
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from step5 import errors
from step5.errors import JobError
from step5.fsutil import os_error_reason
from step5.nn.checkpoint import Checkpoint
from step5.nn.trainer import Fold, ModelSpec, TrainConfig, TrainedModel, padded_rows, train_models
from step5.protocol import FUSE_KEYS, TrainRequest, batch_plan, echo, error_reply, fusion_key

logger = logging.getLogger(__name__)

REQUIRED_ARRAYS = ("X_train", "y_train", "X_val", "y_val")
OPTIONAL_ARRAYS = ("X_test", "y_test")
#: Share of a training fold carved off (seeded) for early stopping; the rest is fitted.
EARLY_STOPPING_FRACTION = 0.2
#: What a fold path that is not a regular file is, for the error (np.load would block on a FIFO).
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
#: torch's own allocation failures (CUDA; recent versions also name a CPU one).
_TORCH_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)


def early_stopping_split(n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, early-stopping rows) of a training fold, both sorted, drawn from ``seed`` alone:
    ~:data:`EARLY_STOPPING_FRACTION` of the rows, at least 1, leaving at least 2 to fit."""
    n_stop = min(max(1, round(n_train * EARLY_STOPPING_FRACTION)), n_train - 2)
    if n_stop < 1:
        raise ValueError(f"a training fold of {n_train} rows cannot spare early-stopping rows")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[n_stop:]), np.sort(order[:n_stop])


class DataCache:
    """The most recently loaded folds, keyed by (path, mtime_ns, size): a file rewritten in place
    is read again. Bounded by entries and bytes, least recently used out first."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 2 << 30) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int, int], Fold] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int, int]) -> Fold | None:
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return data

    def put(self, key: tuple[str, int, int], data: Fold) -> None:
        with self._lock:
            if data.nbytes > self.max_bytes:
                return  # larger than the whole budget: do not evict everything for it
            self._entries[key] = data
            self._entries.move_to_end(key)
            total = sum(d.nbytes for d in self._entries.values())
            while len(self._entries) > self.max_entries or total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes


def _data_error(message: str) -> JobError:
    return JobError(message, "data_error")


#: The largest magnitude a target may have: float32's, as for the features (the trainer fits a
#: float32 network; its float64 squared errors stay finite far beyond it).
_MAX_TARGET = float(np.finfo(np.float32).max)


def _check_array(path: str, name: str, a: np.ndarray) -> np.ndarray:
    """Validate dtype/shape/finiteness of one array (``X_*`` 2-D, ``y_*`` 1-D) and return it read-only:
    features as float32, targets as float64 (the precision the fold file holds them in: as float32 a
    target of 1e8 + noise would round to a constant, and its R^2 be scored against the rounding)."""
    ndim = 2 if name.startswith("X") else 1
    if a.dtype.kind not in "iuf":
        raise _data_error(f"array `{name}` in {path} has dtype {a.dtype}; expected a numeric (int or float) array")
    if name.startswith("y") and a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]  # a column vector is an unambiguous 1-D target
    if a.ndim != ndim:
        expected = "(n_rows, n_features)" if ndim == 2 else "(n_rows,)"
        raise _data_error(f"array `{name}` in {path} has shape {a.shape}; expected {expected}")
    out = np.ascontiguousarray(a, dtype=np.float32 if ndim == 2 else np.float64)
    finite = np.isfinite(out) if ndim == 2 else np.isfinite(out) & (np.abs(out) <= _MAX_TARGET)
    if not finite.all():
        bad = np.argwhere(~finite)
        where = f"row {bad[0][0]}" + (f", column {bad[0][1]}" if ndim == 2 else "")
        raise _data_error(f"array `{name}` in {path} has {len(bad)} non-finite value(s) (NaN/inf, or too large "
                          f"for float32), first at {where}")
    out.setflags(write=False)
    return out


def read_fold_npz(path: str) -> Fold:
    """Read and validate a fold NPZ (``allow_pickle=False``; :func:`load_fold` checks the path
    first); any problem is a data_error."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _data_error(f"cannot read fold file {path} as an NPZ archive: {exc}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _data_error(f"fold file {path} holds a single array, not an NPZ archive of named arrays")
    with npz:
        missing = [k for k in REQUIRED_ARRAYS if k not in npz.files]
        if missing:
            raise _data_error(f"fold file {path} lacks array(s) {missing}; it has {sorted(npz.files)}, expected "
                              f"{list(REQUIRED_ARRAYS)} (and optionally {list(OPTIONAL_ARRAYS)}, feature_names)")
        raw: dict[str, np.ndarray] = {}
        for key in [k for k in (*REQUIRED_ARRAYS, *OPTIONAL_ARRAYS, "feature_names") if k in npz.files]:
            try:
                raw[key] = npz[key]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
                    raise _data_error(f"array `{key}` in {path} is a pickled object array; fold files must hold "
                                      "plain numeric arrays (they are loaded with allow_pickle=False)") from None
                raise _data_error(f"cannot read array `{key}` in {path}: {exc}") from None
    if ("X_test" in raw) != ("y_test" in raw):
        raise _data_error(f"fold file {path} has only one of X_test / y_test; both or neither are expected")
    arrays = {key: _check_array(path, key, raw[key]) for key in (*REQUIRED_ARRAYS, *OPTIONAL_ARRAYS) if key in raw}
    d = arrays["X_train"].shape[1]
    if d < 1:
        raise _data_error(f"array `X_train` in {path} has no feature columns")
    for part in ("train", "val", "test"):
        if f"X_{part}" not in arrays:
            continue
        X, y = arrays[f"X_{part}"], arrays[f"y_{part}"]
        if X.shape[0] != y.shape[0]:
            raise _data_error(f"`X_{part}` in {path} has {X.shape[0]} rows but `y_{part}` has {y.shape[0]}")
        if X.shape[1] != d:
            raise _data_error(f"`X_{part}` in {path} has {X.shape[1]} features but `X_train` has {d}")
    for part in ("train", "val"):
        if arrays[f"X_{part}"].shape[0] < 2:
            raise _data_error(f"`X_{part}` in {path} has {arrays[f'X_{part}'].shape[0]} row(s); at least 2 are needed")
    names: tuple[str, ...] | None = None
    if "feature_names" in raw:
        fn = raw["feature_names"]
        if fn.dtype.kind != "U" or fn.shape != (d,):
            raise _data_error(f"array `feature_names` in {path} must be {d} strings, got dtype {fn.dtype} "
                              f"and shape {fn.shape}")
        names = tuple(str(s) for s in fn)
    return Fold(arrays["X_train"], arrays["y_train"], arrays["X_val"], arrays["y_val"], arrays.get("X_test"),
                arrays.get("y_test"), feature_names=names)


def load_fold(path: str, cache: DataCache | None = None) -> tuple[Fold, float]:
    """A validated fold and the seconds spent reading it (0.0 on a cache hit)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _data_error(f"fold file not found: {path}") from None
    except OSError as exc:
        raise _data_error(f"cannot stat fold file {path}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise _data_error(f"fold file {path} is not a regular file ({kind}); fold files must be regular NPZ files")
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit, 0.0
    t0 = time.perf_counter()
    data = read_fold_npz(path)
    if cache is not None:
        cache.put(key, data)
    return data, time.perf_counter() - t0


def describe_device(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``: the device string results carry."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device.type)


def release_memory(device: torch.device) -> None:
    """Return cached CUDA blocks after a job. No gc.collect(): job tensors go by reference
    counting, and a full collection would cost a large process a quarter second per job."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a training failure was torch (CPU or CUDA) failing to allocate."""
    return errors.is_out_of_memory(exc, _TORCH_OOM_TYPES)


def _as_job_error(exc: BaseException, where: str) -> JobError:
    """Classify an exception raised while training (never a data problem: data is checked)."""
    if isinstance(exc, JobError):
        return exc
    if is_out_of_memory(exc):
        return JobError(f"out of memory while {where}: {exc}", "out_of_memory")
    return JobError(f"{type(exc).__name__} while {where}: {exc}", "train_error",
                    traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _spec_and_fold(request: TrainRequest, data: Fold) -> tuple[ModelSpec, Fold]:
    """The core's spec and fold for one request: patience > 0 early-stops on a seeded slice of the
    training rows (docs/training.md, "The validation rows only score"); patience 0, or a fold too
    small to spare rows, fits every training row for ``epochs`` epochs and keeps the last weights."""
    p = request.params
    early = p.early_stopping_patience > 0 and data.X_train.shape[0] >= 3
    spec = ModelSpec(
        learning_rate=p.learning_rate, weight_decay=p.weight_decay, dropout=p.dropout, input_dropout=p.input_dropout,
        input_sparsity=p.input_sparsity, seed=request.seed, patience=p.early_stopping_patience,
        gradient_clip=p.gradient_clip, restore_best=early,
    )
    if not early:
        return spec, data
    fit, stop = early_stopping_split(data.X_train.shape[0], request.seed)
    return spec, replace(data, X_train=data.X_train[fit], y_train=data.y_train[fit], X_stop=data.X_train[stop],
                         y_stop=data.y_train[stop])


def _train_pass(config: TrainConfig, models: Sequence[tuple[ModelSpec, Fold]],
                device: torch.device) -> list[TrainedModel | JobError]:
    """One M-model pass; if a fused pass runs out of memory, each model is retried alone
    (same results, less memory), so fusing never fails a job that fits by itself."""
    try:
        return list(train_models(config, [s for s, _ in models], [f for _, f in models], device=device))
    except Exception as exc:  # noqa: BLE001 - classified below; bugs become train_error with a traceback
        error = _as_job_error(exc, f"training {len(models)} model(s) on {describe_device(device)}")
    if error.error_type != "out_of_memory" or len(models) == 1:
        return [error] * len(models)
    logger.warning("fused pass of %d models ran out of memory; training them one at a time", len(models))
    release_memory(device)
    out: list[TrainedModel | JobError] = []
    for model in models:
        out.extend(_train_pass(config, [model], device))
        release_memory(device)
    return out


def _result(request: TrainRequest, data: Fold, trained: TrainedModel | JobError, *, load_s: float, train_s: float,
            device_name: str) -> dict[str, Any]:
    """The ``complete`` message for one trained model; writes its checkpoint if asked."""
    if isinstance(trained, JobError):
        raise trained
    if trained.error is not None:
        where = f"fold file {request.data_path}: " if trained.error_type == "data_error" else ""
        raise JobError(where + trained.error, trained.error_type)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"status": "complete", "model_type": "neural_net", **trained.metrics}
    if request.save_model_path is not None:
        try:
            path = Checkpoint(
                trained.state_dict, data.X_train.shape[1], request.params.hidden_layers, request.use_leaky_relu,
                request.params.dropout, trained.feature_mean, trained.feature_scale, trained.target_mean,
                trained.target_std, request.normalize_features, data.feature_names, request.params.to_dict(),
                training={
                    "seed": request.seed, "batch_mode": request.batch_mode, "epochs_run": trained.epochs_run,
                    "best_epoch": trained.best_epoch, "metrics": dict(trained.metrics),
                    "data_path": request.data_path,
                },
            ).save(request.save_model_path)
        except OSError as exc:
            raise JobError(f"cannot write checkpoint {request.save_model_path}: {os_error_reason(exc)}",
                           "train_error") from None
        result["model_path"] = str(path)
    save_s = time.perf_counter() - t0
    result.update(
        duration=load_s + train_s + save_s, load_s=load_s, train_s=train_s, device=device_name, **echo(request),
        epochs_run=trained.epochs_run, best_epoch=trained.best_epoch, n_train=trained.n_train, n_val=trained.n_val,
    )
    return result


def run_fold_group(requests: Sequence[TrainRequest], *, device: torch.device,
                   cache: DataCache | None = None) -> list[dict[str, Any]]:
    """Train requests in as few M-model passes as their shapes allow; one reply per request, in
    order: its ``complete`` message, or its ``error`` (a failed request does not fail the others).
    One pass per (features, batch plan, early stopping or not, padded fit / early-stopping /
    validation lengths): models whose tensors have the same shapes round as they would alone, so
    each result equals :func:`run_train_job`'s (``train_s`` is the pass time divided by M).
    Requests must agree on :data:`FUSE_KEYS` (else ``ValueError``)."""
    if not requests:
        return []
    first = fusion_key(requests[0])[: len(FUSE_KEYS)]
    for r in requests[1:]:
        key = fusion_key(r)[: len(FUSE_KEYS)]
        if key != first:
            diff = [f"{name}: {a!r} != {b!r}" for name, a, b in zip(FUSE_KEYS, first, key) if a != b]
            raise ValueError(f"requests cannot be fused (job {r.job_id!r} differs from job {requests[0].job_id!r}): "
                             + "; ".join(diff))
    out: dict[int, dict[str, Any]] = {}
    loaded: dict[int, tuple[Fold, float]] = {}
    device_name = describe_device(device)
    try:
        for i, r in enumerate(requests):
            try:
                loaded[i] = load_fold(r.data_path, cache)
            except (JobError, MemoryError) as exc:
                out[i] = error_reply(_as_job_error(exc, f"loading {r.data_path}"), r)
        models = {i: _spec_and_fold(requests[i], data) for i, (data, _) in loaded.items()}
        passes: dict[tuple[Any, ...], list[int]] = {}
        for i, (spec, fold) in models.items():
            plan = batch_plan(requests[i], loaded[i][0].X_train.shape[0])
            rows = (padded_rows(a.shape[0]) for a in (fold.X_train, fold.stop_rows[0], fold.X_val))
            passes.setdefault((fold.X_train.shape[1], plan, spec.restore_best, *rows), []).append(i)
        for (_, (mode, _), *_), idx in passes.items():
            r = requests[idx[0]]
            config = TrainConfig(
                hidden_layers=tuple(r.params.hidden_layers), use_leaky_relu=r.use_leaky_relu,
                normalize_features=r.normalize_features, optimizer=r.params.optimizer, epochs=r.params.epochs,
                batch_mode=mode, batch_size=r.params.batch_size,
            )
            t0 = time.perf_counter()
            trained = _train_pass(config, [models[i] for i in idx], device)
            train_s = (time.perf_counter() - t0) / len(idx)  # a fused pass's time, shared equally
            for i, t in zip(idx, trained):
                try:
                    out[i] = _result(requests[i], loaded[i][0], t, load_s=loaded[i][1], train_s=train_s,
                                     device_name=device_name)
                except JobError as exc:
                    out[i] = error_reply(exc, requests[i])
    finally:
        release_memory(device)
    return [out[i] for i in range(len(requests))]


def run_train_job(request: TrainRequest, *, device: torch.device, cache: DataCache | None = None) -> dict[str, Any]:
    """Train one fold and return its ``complete`` message; raises :class:`JobError` carrying
    the request's identity."""
    (result,) = run_fold_group([request], device=device, cache=cache)
    if result["status"] == "error":
        raise JobError.from_dict(result)
    return result
