"""A ``train`` job end to end: NPZ -> training core -> protocol result (and checkpoint).

The worker, the one-shot trainer and in-process callers all call :func:`run_train_job`, so
the three paths give the same metrics for the same request. :func:`run_fold_group` trains
several fusable requests (the K folds of a trial, or same-shape trials) as one M-model
pass of the same core and returns what each would have returned alone.

Failures are :class:`~step5.errors.JobError` with the protocol's ``error_type``:

* ``data_error``   -- the NPZ is missing/unreadable, lacks an array, holds a pickled
  (object) array, has wrong shapes or non-finite values;
* ``train_error``  -- training diverged to NaN/inf, or the checkpoint could not be written;
* ``out_of_memory`` -- torch (CPU or CUDA) could not allocate.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
import traceback
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from step5 import errors
from step5.errors import JobError
from step5.nn.checkpoint import save_checkpoint
from step5.nn.device_loop import device_backend
from step5.nn.trainer import Fold, ModelSpec, TrainConfig, TrainedModel, padded_rows, train_models
from step5.protocol import FUSE_KEYS, TrainRequest, batch_plan, echo, fusion_key  # torch-free, shared with the parent

logger = logging.getLogger(__name__)

REQUIRED_ARRAYS = ("X_train", "y_train", "X_val", "y_val")
OPTIONAL_ARRAYS = ("X_test", "y_test")


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FoldData:
    """A validated fold file: read-only float32 arrays (shared through :class:`DataCache`)."""

    path: str
    X_train: np.ndarray  # (n_train, D)
    y_train: np.ndarray  # (n_train,)
    X_val: np.ndarray  # (n_val, D)
    y_val: np.ndarray  # (n_val,)
    X_test: np.ndarray | None
    y_test: np.ndarray | None
    feature_names: tuple[str, ...] | None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def nbytes(self) -> int:
        arrays = (self.X_train, self.y_train, self.X_val, self.y_val, self.X_test, self.y_test)
        return sum(a.nbytes for a in arrays if a is not None)

    def as_fold(self, early_stopping: bool = True, seed: int = 0) -> Fold:
        """The core's fold. With ``early_stopping`` a seeded slice of the training rows
        (:func:`early_stopping_split`) becomes the early-stopping rows and is not fitted,
        so the validation rows only score the model; without it every training row is fitted."""
        if not early_stopping:
            return Fold(self.X_train, self.y_train, self.X_val, self.y_val, self.X_test, self.y_test)
        fit, stop = early_stopping_split(self.X_train.shape[0], seed)
        return Fold(self.X_train[fit], self.y_train[fit], self.X_val, self.y_val, self.X_test, self.y_test,
                    X_stop=self.X_train[stop], y_stop=self.y_train[stop])


#: Share of a training fold carved off (seeded) for early stopping; the rest is fitted.
EARLY_STOPPING_FRACTION = 0.2


def early_stopping_split(n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, early-stopping rows) of a training fold of ``n_train`` rows, both sorted.

    The slice is ~:data:`EARLY_STOPPING_FRACTION` of the rows (at least 1, and at least 2
    rows stay to fit), drawn from ``seed`` alone, so a fold's split is the same in a lone
    run, a fused pass, a worker or the one-shot trainer.
    """
    n_stop = min(max(1, round(n_train * EARLY_STOPPING_FRACTION)), n_train - 2)
    if n_stop < 1:
        raise ValueError(f"a training fold of {n_train} rows cannot spare early-stopping rows")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[n_stop:]), np.sort(order[:n_stop])


class DataCache:
    """The most recently loaded fold files, so a worker does not re-read the same NPZ.

    Keyed by (path, mtime_ns, size): a file rewritten in place is a different key and is
    re-read. Bounded by entry count and by bytes; least recently used entries go first.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int = 2 << 30) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"DataCache needs max_entries >= 1 and max_bytes >= 1, got {max_entries}, {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int, int], FoldData] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int, int]) -> FoldData | None:
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[str, int, int], data: FoldData) -> None:
        with self._lock:
            if data.nbytes > self.max_bytes:
                return  # larger than the whole budget: do not evict everything for it
            self._entries[key] = data
            self._entries.move_to_end(key)
            total = sum(d.nbytes for d in self._entries.values())
            while len(self._entries) > self.max_entries or total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _data_error(message: str) -> JobError:
    return JobError(message, "data_error")


def _check_array(path: str, name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    """Validate dtype/shape/finiteness of one array and return it as read-only float32."""
    if a.dtype.kind not in "iuf":
        raise _data_error(f"array `{name}` in {path} has dtype {a.dtype}; expected a numeric (int or float) array")
    if name.startswith("y") and a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]  # a column vector is an unambiguous 1-D target
    if a.ndim != ndim:
        expected = "(n_rows, n_features)" if ndim == 2 else "(n_rows,)"
        raise _data_error(f"array `{name}` in {path} has shape {a.shape}; expected {expected}")
    out = np.ascontiguousarray(a, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad = np.argwhere(~finite)
        where = f"row {bad[0][0]}" + (f", column {bad[0][1]}" if ndim == 2 else "")
        raise _data_error(
            f"array `{name}` in {path} has {len(bad)} non-finite value(s) (NaN/inf, or too large for float32), "
            f"first at {where}"
        )
    out.setflags(write=False)
    return out


def read_fold_npz(path: str) -> FoldData:
    """Read and validate a fold NPZ (``allow_pickle=False``); any problem is a data_error."""
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise _data_error(f"fold file not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _data_error(f"cannot read fold file {path} as an NPZ archive: {exc}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _data_error(f"fold file {path} holds a single array, not an NPZ archive of named arrays")
    with npz:
        missing = [k for k in REQUIRED_ARRAYS if k not in npz.files]
        if missing:
            raise _data_error(
                f"fold file {path} lacks array(s) {missing}; it has {sorted(npz.files)}, "
                f"expected {list(REQUIRED_ARRAYS)} (and optionally {list(OPTIONAL_ARRAYS)}, feature_names)"
            )
        raw: dict[str, np.ndarray] = {}
        for key in (*REQUIRED_ARRAYS, *OPTIONAL_ARRAYS, "feature_names"):
            if key not in npz.files:
                continue
            try:
                raw[key] = npz[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise _data_error(
                        f"array `{key}` in {path} is a pickled object array; fold files must hold plain "
                        "numeric arrays (they are loaded with allow_pickle=False)"
                    ) from None
                raise _data_error(f"cannot read array `{key}` in {path}: {exc}") from None
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise _data_error(f"cannot read array `{key}` in {path}: {exc}") from None
    if ("X_test" in raw) != ("y_test" in raw):
        raise _data_error(f"fold file {path} has only one of X_test / y_test; both or neither are expected")
    arrays: dict[str, np.ndarray] = {}
    for key in (*REQUIRED_ARRAYS, *OPTIONAL_ARRAYS):
        if key in raw:
            arrays[key] = _check_array(path, key, raw[key], 2 if key.startswith("X") else 1)
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
    for part, least in (("train", 2), ("val", 2)):
        if arrays[f"X_{part}"].shape[0] < least:
            raise _data_error(
                f"`X_{part}` in {path} has {arrays[f'X_{part}'].shape[0]} row(s); at least {least} are needed"
            )
    names: tuple[str, ...] | None = None
    if "feature_names" in raw:
        fn = raw["feature_names"]
        if fn.dtype.kind != "U" or fn.shape != (d,):
            raise _data_error(
                f"array `feature_names` in {path} must be {d} strings, got dtype {fn.dtype} and shape {fn.shape}"
            )
        names = tuple(str(s) for s in fn)
    return FoldData(
        path=path, X_train=arrays["X_train"], y_train=arrays["y_train"], X_val=arrays["X_val"],
        y_val=arrays["y_val"], X_test=arrays.get("X_test"), y_test=arrays.get("y_test"), feature_names=names,
    )


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def load_fold(path: str, cache: DataCache | None = None) -> tuple[FoldData, float]:
    """A validated fold and the seconds spent reading it (0.0 on a cache hit)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _data_error(f"fold file not found: {path}") from None
    except OSError as exc:
        raise _data_error(f"cannot stat fold file {path}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or a device would block np.load (and the whole worker) forever.
        raise _data_error(f"fold file {path} is not a regular file ({_file_kind(st.st_mode)}); "
                          "fold files must be regular NPZ files")
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit, 0.0
    t0 = time.perf_counter()
    data = read_fold_npz(path)
    if cache is not None:
        cache.put(key, data)
    return data, time.perf_counter() - t0


# ---------------------------------------------------------------------------- devices


def describe_device(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``: the device string results carry."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device.type)


def describe_backend(device: torch.device) -> str:
    """``cuda``, ``rocm`` or ``cpu``: what this torch build trains on ``device`` with (the
    ``backend`` of the worker's ``ready`` line and of the sidecar's worker records)."""
    return device_backend(device)


def release_memory(device: torch.device) -> None:
    """Return cached allocator blocks after a job, so the next one starts from a clean slate.

    Host tensors are freed by reference counting when the job's locals go; a full
    ``gc.collect()`` would cost a large process a quarter second per job for nothing.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: torch's own allocation failures (CUDA; recent versions also name a CPU one).
_TORCH_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a training failure was torch (CPU or CUDA) failing to allocate."""
    return errors.is_out_of_memory(exc, _TORCH_OOM_TYPES)


def _as_job_error(exc: BaseException, where: str) -> JobError:
    """Classify an exception raised while training (never a data problem: data is checked)."""
    if isinstance(exc, JobError):
        return exc
    if is_out_of_memory(exc):
        return JobError(f"out of memory while {where}: {exc}", "out_of_memory")
    return JobError(
        f"{type(exc).__name__} while {where}: {exc}", "train_error",
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


# ---------------------------------------------------------------------------- jobs


def _echo(error: JobError, request: TrainRequest) -> JobError:
    """A copy of ``error`` (one may fail several requests) carrying this request's identity."""
    return JobError(error.message, error.error_type, traceback=error.traceback, **echo(request))


def _config(request: TrainRequest, mode: str) -> TrainConfig:
    p = request.params
    return TrainConfig(
        hidden_layers=tuple(p.hidden_layers), use_leaky_relu=request.use_leaky_relu,
        normalize_features=request.normalize_features, optimizer=p.optimizer, epochs=p.epochs,
        batch_mode=mode, batch_size=p.batch_size,
    )


def _early_stops(request: TrainRequest, data: FoldData) -> bool:
    """Patience > 0 early-stops on rows carved from the training fold; patience 0 trains
    exactly ``epochs`` epochs on every training row and keeps the last weights (the final
    refit; a fold too small to spare rows does the same)."""
    return request.params.early_stopping_patience > 0 and data.X_train.shape[0] >= 3


def _spec(request: TrainRequest, data: FoldData) -> ModelSpec:
    p = request.params
    return ModelSpec(
        learning_rate=p.learning_rate, weight_decay=p.weight_decay, dropout=p.dropout,
        input_dropout=p.input_dropout, input_sparsity=p.input_sparsity, seed=request.seed,
        patience=p.early_stopping_patience, gradient_clip=p.gradient_clip,
        restore_best=_early_stops(request, data),
    )


def _fold(request: TrainRequest, data: FoldData) -> Fold:
    return data.as_fold(_early_stops(request, data), request.seed)


def _pass_rows(request: TrainRequest, data: FoldData) -> tuple[int, int, int]:
    """Padded (fit, early-stopping, validation) lengths: models that share a pass must
    agree on them, so their tensors round as they would alone."""
    n_train, n_val = data.X_train.shape[0], data.X_val.shape[0]
    if not _early_stops(request, data):
        return padded_rows(n_train), padded_rows(n_val), padded_rows(n_val)
    fit, stop = early_stopping_split(n_train, request.seed)
    return padded_rows(len(fit)), padded_rows(len(stop)), padded_rows(n_val)


def _fuse_key(request: TrainRequest) -> tuple[Any, ...]:
    """The shape-fixing part of :func:`step5.protocol.fusion_key` (the batch plan needs the
    fold's row count, so :func:`_run_requests` splits passes by it after loading)."""
    return fusion_key(request)[: len(FUSE_KEYS)]


def _train_pass(
    requests: Sequence[TrainRequest], data: Sequence[FoldData], mode: str, device: torch.device
) -> list[TrainedModel | JobError]:
    """One M-model pass; if a fused pass runs out of memory, each model is retried alone
    (same results, less memory), so fusing never makes a job fail that fits by itself."""
    try:
        return list(train_models(_config(requests[0], mode), [_spec(r, d) for r, d in zip(requests, data)],
                                 [_fold(r, d) for r, d in zip(requests, data)], device=device))
    except Exception as exc:  # noqa: BLE001 - classified below; bugs become train_error with a traceback
        error = _as_job_error(exc, f"training {len(requests)} model(s) on {describe_device(device)}")
    if error.error_type != "out_of_memory" or len(requests) == 1:
        return [error] * len(requests)
    logger.warning("fused pass of %d models ran out of memory; training them one at a time", len(requests))
    release_memory(device)
    out: list[TrainedModel | JobError] = []
    for r, d in zip(requests, data):
        out.extend(_train_pass([r], [d], mode, device))
        release_memory(device)
    return out


def _result(
    request: TrainRequest, data: FoldData, trained: TrainedModel, *, load_s: float, train_s: float, device_name: str
) -> dict[str, Any]:
    """The ``complete`` message for one trained model; writes its checkpoint if asked."""
    if trained.error is not None:
        raise JobError(trained.error, "train_error")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"status": "complete", "model_type": "neural_net", **trained.metrics}
    if request.save_model_path is not None:
        assert trained.state_dict is not None and trained.feature_mean is not None and trained.feature_scale is not None
        try:
            path = save_checkpoint(
                request.save_model_path, state_dict=trained.state_dict, n_features=data.n_features,
                hidden_layers=request.params.hidden_layers, use_leaky_relu=request.use_leaky_relu,
                dropout=request.params.dropout, feature_mean=trained.feature_mean,
                feature_scale=trained.feature_scale, target_mean=trained.target_mean,
                target_std=trained.target_std, normalize_features=request.normalize_features,
                feature_names=data.feature_names, config=request.params.to_dict(),
                training={
                    "seed": request.seed, "batch_mode": request.batch_mode,
                    "epochs_run": trained.epochs_run, "best_epoch": trained.best_epoch,
                    "metrics": dict(trained.metrics), "data_path": request.data_path,
                },
            )
        except OSError as exc:
            raise JobError(f"cannot write checkpoint {request.save_model_path}: {exc}", "train_error") from None
        result["model_path"] = str(path)
    save_s = time.perf_counter() - t0
    result.update(
        duration=load_s + train_s + save_s, load_s=load_s, train_s=train_s, device=device_name, **echo(request),
        epochs_run=trained.epochs_run, best_epoch=trained.best_epoch, n_train=trained.n_train, n_val=trained.n_val,
    )
    return result


def _run_requests(
    requests: Sequence[TrainRequest], device: torch.device, cache: DataCache | None
) -> list[dict[str, Any] | JobError]:
    """Load every request's fold, train the loadable ones in as few passes as their shapes
    allow, and return a result or an error per request, in order.

    One pass per (n_features, batch plan, padded fit / early-stopping / validation lengths,
    whether the pass has early-stopping rows): models whose tensors have the same shapes
    round exactly as they would alone.
    """
    out: list[dict[str, Any] | JobError | None] = [None] * len(requests)
    loaded: dict[int, tuple[FoldData, float]] = {}
    device_name = describe_device(device)
    try:
        for i, r in enumerate(requests):
            try:
                loaded[i] = load_fold(r.data_path, cache)
            except JobError as exc:
                out[i] = _echo(exc, r)
            except MemoryError as exc:
                out[i] = _echo(_as_job_error(exc, f"loading {r.data_path}"), r)
        passes: dict[tuple[Any, ...], list[int]] = {}
        for i, (data, _) in loaded.items():
            plan = batch_plan(requests[i], data.X_train.shape[0])
            key = (data.n_features, plan, _early_stops(requests[i], data), *_pass_rows(requests[i], data))
            passes.setdefault(key, []).append(i)
        for (_, (mode, _), *_), idx in passes.items():
            t0 = time.perf_counter()
            trained = _train_pass([requests[i] for i in idx], [loaded[i][0] for i in idx], mode, device)
            train_s = (time.perf_counter() - t0) / len(idx)  # a fused pass's time, shared equally
            for i, t in zip(idx, trained):
                if isinstance(t, JobError):
                    out[i] = _echo(t, requests[i])
                    continue
                try:
                    out[i] = _result(requests[i], loaded[i][0], t, load_s=loaded[i][1], train_s=train_s,
                                     device_name=device_name)
                except JobError as exc:
                    out[i] = _echo(exc, requests[i])
    finally:
        loaded.clear()
        release_memory(device)
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


def run_train_job(request: TrainRequest, *, device: torch.device, cache: DataCache | None = None) -> dict[str, Any]:
    """Train one fold and return its ``complete`` message (step5.protocol.CompleteMessage).

    Raises :class:`JobError` (data_error / train_error / out_of_memory) carrying the
    request's trial_number, fold_idx and job_id.
    """
    (result,) = _run_requests([request], device, cache)
    if isinstance(result, JobError):
        raise result
    return result


def run_fold_group(
    requests: Sequence[TrainRequest], *, device: torch.device, cache: DataCache | None = None
) -> list[dict[str, Any]]:
    """Train fusable requests as one M-model pass; one result dict per request, in order.

    Each result equals what :func:`run_train_job` returns for that request alone (metrics
    within float rounding; ``train_s`` is the pass time divided by M). Requests must agree
    on :data:`FUSE_KEYS`, else ``ValueError``. A request that fails (bad NPZ, divergence)
    gets its error dict (``JobError.to_dict()``) in its slot and does not fail the others:
    the parent then handles each fold exactly as if it had been sent alone. Folds with
    different feature counts, or whose ``auto`` batch mode resolves differently, are
    trained in separate passes.
    """
    if not requests:
        return []
    first = _fuse_key(requests[0])
    for r in requests[1:]:
        key = _fuse_key(r)
        if key != first:
            diff = [f"{name}: {a!r} != {b!r}" for name, a, b in zip(FUSE_KEYS, first, key) if a != b]
            raise ValueError(
                f"requests cannot be fused (job {r.job_id!r} differs from job {requests[0].job_id!r}): "
                + "; ".join(diff)
            )
    return [r.to_dict() if isinstance(r, JobError) else r for r in _run_requests(requests, device, cache)]
