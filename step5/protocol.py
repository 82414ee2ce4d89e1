"""Message shapes of the worker protocol (SPEC section 6) and their validation.

Torch-free: the parent builds requests with these types, the worker and the one-shot
trainer validate what they receive with the same code, so the two sides cannot drift.
Framing (bytes <-> lines) lives in :mod:`step5.framing`; this module deals only in dicts.

Request (parent -> worker), one JSON object per line::

    {"command": "train", "X_train_path": "/tmp/.../fold_0.npz",
     "params": {"hidden_layers": [128, 64], "learning_rate": 0.001, ...},
     "trial_number": 0, "fold_idx": 0, "normalize_features": true,
     "use_leaky_relu": true, "batch_mode": "auto", "seed": 42, "job_id": "t0-f0"}

Responses (worker -> parent): ``ready`` once, then exactly one ``complete`` / ``error`` /
``pong`` / ``shutdown`` per request line, in order; ``heartbeat`` is answered with
``{"status": "alive", "job_id": ...}`` as soon as it is read, even while a job trains.

The NPZ named by ``X_train_path`` holds ``X_train``, ``y_train``, ``X_val``, ``y_val`` and,
optionally, ``X_test``/``y_test`` (scored after training, never used for fitting or early
stopping) and ``feature_names`` (a unicode array, stored in checkpoints). It is always
loaded with ``allow_pickle=False``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypedDict

from step5.errors import BadRequest
from step5.values import is_int, is_number

PROTOCOL_VERSION = 1

COMMANDS = ("train", "train_folds", "ping", "heartbeat", "shutdown")
#: Answered at once by the worker's reader thread, even while a job trains (the only
#: request answered out of order): the parent's way to tell a slow job from a hung worker.
OUT_OF_BAND_COMMANDS = ("heartbeat",)
OPTIMIZERS = ("adam", "adamw", "sgd")
BATCH_MODES = ("auto", "full", "mini")

#: A request line longer than this is rejected without being parsed (a runaway writer
#: must not make the worker allocate unbounded memory).
MAX_REQUEST_BYTES = 1 << 20

#: ``batch_mode="auto"`` trains full-batch when a fold has at most this many training rows
#: (one step per epoch is then the fastest path, and a 10k x 90 fold is ~4 MB), and in
#: shuffled mini-batches of ``batch_size`` above it. Torch-free so the parent can tell
#: which folds share a batch plan.
AUTO_FULL_BATCH_MAX_ROWS = 10_000

#: Request fields that fix the tensor shapes or the loop of a training pass: requests fused
#: into one pass (``train_folds``) must agree on all of them and on their batch plan
#: (:func:`batch_plan`), while learning_rate, weight_decay, dropout, input_dropout, input_sparsity,
#: seed, patience and gradient_clip may differ per model. Defined here, torch-free, so the parent groups
#: trials for fusion with the very list the worker's ``step5.nn.job.run_fold_group`` checks.
FUSE_KEYS = ("hidden_layers", "optimizer", "epochs", "normalize_features", "use_leaky_relu")


@dataclass(frozen=True)
class NNParams:
    """Hyperparameters of one survivor-quality MLP (the ``params`` object of a request)."""

    hidden_layers: tuple[int, ...] = (128, 64)  # widths of the hidden Linear layers, in order
    learning_rate: float = 1e-3  # optimizer step size, > 0
    dropout: float = 0.3  # dropout probability after each hidden activation, in [0, 1)
    input_dropout: float = 0.0  # dropout probability on the input features (training only), in [0, 1)
    input_sparsity: float = 0.0  # group-lasso strength on the weights reading each input (training only), >= 0
    epochs: int = 100  # upper bound on passes over the training fold
    weight_decay: float = 0.0  # L2 (adam, sgd) or decoupled (adamw) weight decay, >= 0
    optimizer: str = "adam"  # one of OPTIMIZERS
    batch_size: int = 256  # rows per step in mini-batch mode
    early_stopping_patience: int = 10  # epochs without val improvement before stopping; 0 = never
    gradient_clip: float = 1.0  # max global grad norm per model; 0 = no clipping

    @classmethod
    def from_dict(cls, raw: Any) -> "NNParams":
        """Validate a ``params`` object; unknown keys and wrong types are errors."""
        if not isinstance(raw, dict):
            raise BadRequest(f"`params` must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BadRequest(f"unknown key(s) in `params`: {unknown}; expected a subset of {sorted(known)}")
        values: dict[str, Any] = {}
        if "hidden_layers" in raw:
            hl = raw["hidden_layers"]
            if not isinstance(hl, (list, tuple)) or not all(is_int(w) and w > 0 for w in hl):
                raise BadRequest(f"`hidden_layers` must be a list of positive ints (empty: a linear model), got {hl!r}")
            values["hidden_layers"] = tuple(hl)
        for name, lo, lo_inclusive, hi in (
            ("learning_rate", 0.0, False, None),
            ("dropout", 0.0, True, 1.0),
            ("input_dropout", 0.0, True, 1.0),
            ("input_sparsity", 0.0, True, None),
            ("weight_decay", 0.0, True, None),
            ("gradient_clip", 0.0, True, None),
        ):
            if name not in raw:
                continue
            v = raw[name]
            ok = is_number(v) and (v >= lo if lo_inclusive else v > lo) and (hi is None or v < hi)
            if not ok:
                bound = f"{'>=' if lo_inclusive else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
                raise BadRequest(f"`{name}` must be a finite number {bound}, got {v!r}")
            values[name] = float(v)
        for name, lo in (("epochs", 1), ("batch_size", 1), ("early_stopping_patience", 0)):
            if name not in raw:
                continue
            v = raw[name]
            if not (is_int(v) and v >= lo):
                raise BadRequest(f"`{name}` must be an int >= {lo}, got {v!r}")
            values[name] = v
        if "optimizer" in raw:
            v = raw["optimizer"]
            if v not in OPTIMIZERS:
                raise BadRequest(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {v!r}")
            values["optimizer"] = v
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        return d


@dataclass(frozen=True)
class TrainRequest:
    """One fold to train: the validated form of a ``train`` request."""

    data_path: str  # the NPZ (wire name ``X_train_path``, kept from the proposal)
    params: NNParams = field(default_factory=NNParams)
    trial_number: int | None = None  # echoed back
    fold_idx: int | None = None  # echoed back
    normalize_features: bool = True  # standardise X with train-fold statistics ("Category B")
    use_leaky_relu: bool = True  # LeakyReLU instead of ReLU ("Category B")
    batch_mode: str = "auto"  # auto: full-batch when the fold is small, else mini-batch
    seed: int = 0  # seeds init, dropout masks and mini-batch order
    job_id: Any = None  # opaque to the worker, echoed back so the parent can match results
    save_model_path: str | None = None  # when set, the trained model is written here (.pth)

    @classmethod
    def from_dict(cls, raw: Any) -> "TrainRequest":
        """Validate a ``train`` request dict (the ``command`` key is checked by the caller)."""
        if not isinstance(raw, dict):
            raise BadRequest(f"a request must be a JSON object, got {type(raw).__name__}")
        echo = {"trial_number": raw.get("trial_number"), "fold_idx": raw.get("fold_idx"), "job_id": raw.get("job_id")}
        try:
            return cls._from_dict(raw)
        except BadRequest as exc:
            # Attach whatever identifying fields were readable, so the parent can match the error.
            exc.trial_number = echo["trial_number"] if is_int(echo["trial_number"]) else None
            exc.fold_idx = echo["fold_idx"] if is_int(echo["fold_idx"]) else None
            exc.job_id = echo["job_id"] if isinstance(echo["job_id"], (str, int)) else None
            raise

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> "TrainRequest":
        allowed = {
            "command", "X_train_path", "params", "trial_number", "fold_idx", "normalize_features",
            "use_leaky_relu", "batch_mode", "seed", "job_id", "save_model_path",
        }
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise BadRequest(f"unknown key(s) in train request: {unknown}")
        path = raw.get("X_train_path")
        if not isinstance(path, str) or not path:
            raise BadRequest(f"`X_train_path` must be a non-empty string, got {path!r}")
        params = NNParams.from_dict(raw.get("params", {}))
        for name in ("trial_number", "fold_idx"):
            v = raw.get(name)
            if v is not None and not is_int(v):
                raise BadRequest(f"`{name}` must be an int, got {v!r}")
        for name in ("normalize_features", "use_leaky_relu"):
            v = raw.get(name, True)
            if not isinstance(v, bool):
                raise BadRequest(f"`{name}` must be true or false, got {v!r}")
        batch_mode = raw.get("batch_mode", "auto")
        if batch_mode not in BATCH_MODES:
            raise BadRequest(f"`batch_mode` must be one of {list(BATCH_MODES)}, got {batch_mode!r}")
        seed = raw.get("seed", 0)
        if not (is_int(seed) and 0 <= seed < 2**63):
            raise BadRequest(f"`seed` must be a non-negative int, got {seed!r}")
        job_id = raw.get("job_id")
        if job_id is not None and not isinstance(job_id, (str, int)):
            raise BadRequest(f"`job_id` must be a string or int, got {job_id!r}")
        save = raw.get("save_model_path")
        if save is not None and (not isinstance(save, str) or not save):
            raise BadRequest(f"`save_model_path` must be a non-empty string, got {save!r}")
        return cls(
            data_path=path,
            params=params,
            trial_number=raw.get("trial_number"),
            fold_idx=raw.get("fold_idx"),
            normalize_features=raw.get("normalize_features", True),
            use_leaky_relu=raw.get("use_leaky_relu", True),
            batch_mode=batch_mode,
            seed=seed,
            job_id=job_id,
            save_model_path=save,
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form (``command`` included), accepted back by :meth:`from_dict`."""
        d: dict[str, Any] = {
            "command": "train",
            "X_train_path": self.data_path,
            "params": self.params.to_dict(),
            "trial_number": self.trial_number,
            "fold_idx": self.fold_idx,
            "normalize_features": self.normalize_features,
            "use_leaky_relu": self.use_leaky_relu,
            "batch_mode": self.batch_mode,
            "seed": self.seed,
            "job_id": self.job_id,
        }
        if self.save_model_path is not None:
            d["save_model_path"] = self.save_model_path
        return d


class ReadyMessage(TypedDict, total=False):
    status: Literal["ready"]
    device: str  # "cuda:0 (NVIDIA H200)" or "cpu"
    pid: int
    protocol: int
    torch_version: str
    boot_s: float  # interpreter start -> ready, as the worker measured it


class CompleteMessage(TypedDict, total=False):
    status: Literal["complete"]
    model_type: Literal["neural_net"]
    r2: float  # validation R^2 of the restored best weights
    val_mse: float
    train_mse: float
    train_r2: float
    test_r2: float  # only when the NPZ carries X_test/y_test
    test_mse: float
    duration: float  # seconds inside the worker for this job (load + train + score)
    load_s: float  # of which: reading the NPZ (0 on a cache hit)
    train_s: float  # of which: the training loop
    device: str
    trial_number: int | None
    fold_idx: int | None
    job_id: Any
    epochs_run: int
    best_epoch: int
    n_train: int
    n_val: int
    model_path: str  # only when save_model_path was given


class ErrorMessage(TypedDict, total=False):
    status: Literal["error"]
    error: str
    error_type: str  # one of step5.errors.JOB_ERROR_TYPES
    trial_number: int | None
    fold_idx: int | None
    job_id: Any
    traceback: str


def resolve_batch_mode(batch_mode: str, n_train: int) -> str:
    """``full`` or ``mini`` for a fold of ``n_train`` rows (``auto`` decided by size)."""
    if batch_mode == "auto":
        return "full" if n_train <= AUTO_FULL_BATCH_MAX_ROWS else "mini"
    if batch_mode not in ("full", "mini"):
        raise ValueError(f"`batch_mode` must be one of {list(BATCH_MODES)}, got {batch_mode!r}")
    return batch_mode


def batch_plan(request: TrainRequest, n_train: int | None) -> tuple[str, int | None]:
    """How an epoch is cut into steps: ``("full", None)`` or ``("mini", batch_size)``.

    ``batch_size`` matters only in mini-batch mode, so two full-batch requests share a plan
    whatever their batch sizes. With ``n_train`` unknown an ``auto`` request cannot be
    resolved, and its plan is ``("auto", batch_size)``: equal only to the same request's.
    """
    if n_train is None and request.batch_mode == "auto":
        return ("auto", request.params.batch_size)
    mode = resolve_batch_mode(request.batch_mode, n_train if n_train is not None else 0)
    return (mode, request.params.batch_size if mode == "mini" else None)


def fusion_key(request: TrainRequest, n_train: int | None = None) -> tuple[Any, ...]:
    """The values of :data:`FUSE_KEYS` plus the batch plan: equal keys share one fused pass.

    Each key is read from the request's ``params`` when it is a hyperparameter, else from
    the request itself (``normalize_features``, ``use_leaky_relu``). ``n_train``, the
    fold's training rows, resolves an ``auto`` batch mode.
    """
    values: list[Any] = []
    for name in FUSE_KEYS:
        source: Any = request.params if hasattr(request.params, name) else request
        value = getattr(source, name)
        values.append(tuple(value) if isinstance(value, (list, tuple)) else value)
    return (*values, batch_plan(request, n_train))
