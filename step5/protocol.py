"""The worker protocol's messages (SPEC section 6; docs/workers.md, "Protocol"): one type
per request, defined once, and the one decoder, :func:`decode_request`.

Torch-free. The parent builds requests with these types; the worker, the one-shot trainer
and the fakes decode them here, so no side can drift. Replies are built by the worker's
dispatcher (:mod:`step5.nn.worker`) and echo their request's identity (``trial_number``,
``fold_idx``, ``job_id``), errors included. Framing (bytes <-> lines) is
:mod:`step5.framing`; this module deals only in dicts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypedDict, Union

from step5.errors import BadRequest, JobError
from step5.values import is_int, is_number

PROTOCOL_VERSION = 1

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
#: (:func:`batch_plan`); the other hyperparameters and the seed may differ per model. The
#: parent groups trials with the very list the worker's ``step5.nn.job.run_fold_group`` checks.
FUSE_KEYS = ("hidden_layers", "optimizer", "epochs", "normalize_features", "use_leaky_relu")


def identity(raw: Any) -> dict[str, Any]:
    """``trial_number``, ``fold_idx`` and ``job_id`` of a raw request, each None unless
    readable (a malformed request's garbage is not echoed back). The one echo rule."""
    raw = raw if isinstance(raw, dict) else {}
    job_id = raw.get("job_id")
    return {
        "trial_number": raw["trial_number"] if is_int(raw.get("trial_number")) else None,
        "fold_idx": raw["fold_idx"] if is_int(raw.get("fold_idx")) else None,
        "job_id": job_id if isinstance(job_id, str) or is_int(job_id) else None,
    }


def echo(request: Any) -> dict[str, Any]:
    """The identity fields of a decoded request (a ``merge`` has no ``fold_idx``: None)."""
    return {"trial_number": request.trial_number, "fold_idx": request.fold_idx, "job_id": request.job_id}


def tagged(error: JobError, source: Any) -> JobError:
    """``error`` with its missing identity fields filled from ``source`` (a decoded request,
    or a raw request dict); returns the same error."""
    for key, value in (identity(source) if isinstance(source, dict) else echo(source)).items():
        if getattr(error, key) is None:
            setattr(error, key, value)
    return error


def error_reply(error: JobError, request: Any) -> dict[str, Any]:
    """The ``error`` reply to ``request`` (leaves ``error``, which may fail several jobs, as it is)."""
    reply = error.to_dict()
    return {**reply, **{key: value for key, value in echo(request).items() if reply[key] is None}}


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

    #: (name, lower bound, bound included, upper bound excluded or None) of the float fields.
    _FLOATS: ClassVar = (("learning_rate", 0.0, False, None), ("dropout", 0.0, True, 1.0),
                         ("input_dropout", 0.0, True, 1.0), ("input_sparsity", 0.0, True, None),
                         ("weight_decay", 0.0, True, None), ("gradient_clip", 0.0, True, None))
    _INTS: ClassVar = (("epochs", 1), ("batch_size", 1), ("early_stopping_patience", 0))

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
        for name, lo, inclusive, hi in (f for f in cls._FLOATS if f[0] in raw):
            v = raw[name]
            if not (is_number(v) and (v >= lo if inclusive else v > lo) and (hi is None or v < hi)):
                bound = f"{'>=' if inclusive else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
                raise BadRequest(f"`{name}` must be a finite number {bound}, got {v!r}")
            values[name] = float(v)
        for name, lo in (f for f in cls._INTS if f[0] in raw):
            if not (is_int(raw[name]) and raw[name] >= lo):
                raise BadRequest(f"`{name}` must be an int >= {lo}, got {raw[name]!r}")
            values[name] = raw[name]
        if "optimizer" in raw:
            if raw["optimizer"] not in OPTIMIZERS:
                raise BadRequest(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {raw['optimizer']!r}")
            values["optimizer"] = raw["optimizer"]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hidden_layers": list(self.hidden_layers)}


class _Request:
    command: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The wire form (``command`` included), accepted back by :func:`decode_request`."""
        return {"command": self.command, **asdict(self)}  # type: ignore[call-overload]


def _check_path(raw: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = raw.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"`{name}` must be a non-empty string, got {value!r}")
    return value


def _check_identity(raw: dict[str, Any], allowed: set[str], what: str) -> None:
    """No key outside ``allowed``; ``trial_number``/``fold_idx`` ints and ``job_id`` a string
    or int when present."""
    unknown = sorted(set(raw) - allowed - {"command"})
    if unknown:
        raise BadRequest(f"unknown key(s) in {what}: {unknown}")
    for name in ("trial_number", "fold_idx"):
        if raw.get(name) is not None and not is_int(raw[name]):
            raise BadRequest(f"`{name}` must be an int, got {raw[name]!r}")
    job_id = raw.get("job_id")
    if job_id is not None and not (isinstance(job_id, str) or is_int(job_id)):
        raise BadRequest(f"`job_id` must be a string or int, got {job_id!r}")


@dataclass(frozen=True)
class TrainRequest(_Request):
    """``train``: one fold to train."""
    command: ClassVar[str] = "train"
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
        """Validate a ``train`` request dict; a refusal carries the readable identity fields."""
        if not isinstance(raw, dict):
            raise BadRequest(f"a request must be a JSON object, got {type(raw).__name__}")
        try:
            _check_identity(raw, {"X_train_path", "params", "trial_number", "fold_idx", "normalize_features",
                                  "use_leaky_relu", "batch_mode", "seed", "job_id", "save_model_path"}, "train request")
            path = _check_path(raw, "X_train_path")
            params = NNParams.from_dict(raw.get("params", {}))
            for name in ("normalize_features", "use_leaky_relu"):
                if not isinstance(raw.get(name, True), bool):
                    raise BadRequest(f"`{name}` must be true or false, got {raw[name]!r}")
            if raw.get("batch_mode", "auto") not in BATCH_MODES:
                raise BadRequest(f"`batch_mode` must be one of {list(BATCH_MODES)}, got {raw['batch_mode']!r}")
            seed = raw.get("seed", 0)
            if not (is_int(seed) and 0 <= seed < 2**63):
                raise BadRequest(f"`seed` must be a non-negative int, got {seed!r}")
            return cls(path, params, trial_number=raw.get("trial_number"), fold_idx=raw.get("fold_idx"),  # type: ignore[arg-type]
                       normalize_features=raw.get("normalize_features", True),
                       use_leaky_relu=raw.get("use_leaky_relu", True), batch_mode=raw.get("batch_mode", "auto"),
                       seed=seed, job_id=raw.get("job_id"),
                       save_model_path=_check_path(raw, "save_model_path", required=False))
        except BadRequest as exc:
            raise tagged(exc, raw) from None

    def to_dict(self) -> dict[str, Any]:
        d = {"command": self.command, "X_train_path": self.data_path, **asdict(self), "params": self.params.to_dict()}
        del d["data_path"]
        if self.save_model_path is None:
            del d["save_model_path"]
        return d


@dataclass(frozen=True)
class TrainFolds(_Request):
    """``train_folds``: several ``train`` jobs in one fused pass (they agree on
    :data:`FUSE_KEYS`). A job refused on decoding stays in its place as its
    :class:`BadRequest`, answered there; the others still train."""
    command: ClassVar[str] = "train_folds"
    jobs: tuple[TrainRequest | BadRequest, ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainFolds":
        unknown = sorted(set(raw) - {"command", "jobs"})
        jobs = raw.get("jobs")
        if unknown or not isinstance(jobs, list) or not jobs:
            why = f"unknown key(s) {unknown}" if unknown else f"`jobs` must be a non-empty list, got {jobs!r:.80}"
            raise BadRequest(f"bad `train_folds` request: {why}")
        decoded: list[TrainRequest | BadRequest] = []
        for i, job in enumerate(jobs):
            try:
                if isinstance(job, dict) and job.get("command", "train") != "train":
                    raise tagged(BadRequest(f"`jobs[{i}]` has `command` {job.get('command')!r}; only train jobs "
                                            "can be fused"), job)
                decoded.append(TrainRequest.from_dict(job))
            except BadRequest as exc:
                if not exc.message.startswith(f"`jobs[{i}]`"):
                    exc.message = f"`jobs[{i}]`: {exc.message}"
                decoded.append(exc)
        return cls(tuple(decoded))

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "jobs": [job.to_dict() for job in self.jobs]}


@dataclass(frozen=True)
class MergeRequest(_Request):
    """``merge``: K fold checkpoints into one network that predicts their mean, written at
    ``out_path`` and scored on the final split at ``score_path`` (its ``X_train``/``y_train``:
    every development row; ``X_test``/``y_test``: the holdout rows, scored only)."""
    command: ClassVar[str] = "merge"
    fold_paths: tuple[str, ...]
    out_path: str
    score_path: str
    trial_number: int | None = None  # echoed back
    job_id: Any = None  # echoed back
    fold_idx: ClassVar[None] = None  # a merge is no fold; every request answers the identity triple

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MergeRequest":
        _check_identity(raw, {"fold_paths", "out_path", "score_path", "trial_number", "job_id"}, "merge request")
        folds = raw.get("fold_paths")
        if not isinstance(folds, list) or not folds or not all(isinstance(p, str) and p for p in folds):
            raise BadRequest(f"`fold_paths` must be a non-empty list of non-empty strings, got {folds!r:.200}")
        return cls(tuple(folds), _check_path(raw, "out_path"), _check_path(raw, "score_path"),  # type: ignore[arg-type]
                   trial_number=raw.get("trial_number"), job_id=raw.get("job_id"))


@dataclass(frozen=True)
class Ping(_Request):
    """``ping``: is the worker there (answered in order, after the jobs before it)."""
    command: ClassVar[str] = "ping"
    job_id: Any = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Ping":
        return cls(identity(raw)["job_id"])


@dataclass(frozen=True)
class Heartbeat(Ping):
    """``heartbeat``: the pool's liveness probe while a job runs (answered at once)."""
    command: ClassVar[str] = "heartbeat"

@dataclass(frozen=True)
class Shutdown(_Request):
    """``shutdown``: answer, then exit 0."""
    command: ClassVar[str] = "shutdown"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Shutdown":
        return cls()


Request = Union[TrainRequest, TrainFolds, MergeRequest, Ping, Heartbeat, Shutdown]
#: What a fold runner trains: one job (a ``train`` or a ``merge``) of a group.
Job = Union[TrainRequest, MergeRequest]
_REQUEST_TYPES: dict[str, Any] = {t.command: t for t in (TrainRequest, TrainFolds, MergeRequest, Ping, Heartbeat,
                                                          Shutdown)}
COMMANDS = tuple(_REQUEST_TYPES)


def decode_request(raw: Any) -> Request:
    """The request a decoded JSON line holds; :class:`BadRequest` (with the readable
    identity fields) for anything else. The one decoder of worker and one-shot trainer."""
    if not isinstance(raw, dict):
        raise BadRequest(f"a request must be a JSON object, got {type(raw).__name__}")
    command = raw.get("command")
    try:
        if command is None:
            raise BadRequest(f"request has no `command`; expected one of {list(COMMANDS)}")
        kind = _REQUEST_TYPES.get(command) if isinstance(command, str) else None
        if kind is None:
            raise BadRequest(f"unknown `command` {command!r}; expected one of {list(COMMANDS)}")
        return kind.from_dict(raw)  # type: ignore[no-any-return]
    except BadRequest as exc:
        raise tagged(exc, raw) from None


class ReadyMessage(TypedDict):
    """Sent once by a worker, before it reads a request (the other replies: docs/workers.md)."""
    status: Literal["ready"]
    device: str  # "cuda:0 (NVIDIA H200)" or "cpu"
    backend: str  # "cuda" | "rocm" | "cpu": what the worker's torch build drives
    pid: int
    protocol: int  # PROTOCOL_VERSION
    torch_version: str
    torch_threads: int
    cuda_visible_devices: str | None
    hip_visible_devices: str | None
    boot_s: float  # interpreter start -> ready, as the worker measured it


PongMessage = TypedDict("PongMessage", {"status": Literal["pong"], "pid": int, "device": str, "jobs_done": int,
                                        "uptime_s": float, "job_id": Any})
AliveMessage = TypedDict("AliveMessage", {"status": Literal["alive"], "pid": int, "job_id": Any, "jobs_done": int})
ShutdownMessage = TypedDict("ShutdownMessage", {"status": Literal["shutdown"], "reason": Literal["command"],
                                                "jobs_done": int, "pid": int})


def resolve_batch_mode(batch_mode: str, n_train: int) -> str:
    """``full`` or ``mini`` for a fold of ``n_train`` rows (``auto`` decided by size)."""
    if batch_mode == "auto":
        return "full" if n_train <= AUTO_FULL_BATCH_MAX_ROWS else "mini"
    if batch_mode not in ("full", "mini"):
        raise ValueError(f"`batch_mode` must be one of {list(BATCH_MODES)}, got {batch_mode!r}")
    return batch_mode


def batch_plan(request: TrainRequest, n_train: int | None) -> tuple[str, int | None]:
    """How an epoch is cut into steps: ``("full", None)`` or ``("mini", batch_size)``
    (so two full-batch requests share a plan whatever their batch sizes). With ``n_train``
    unknown an ``auto`` request's plan is ``("auto", batch_size)``: equal only to the same request's."""
    if n_train is None and request.batch_mode == "auto":
        return ("auto", request.params.batch_size)
    mode = resolve_batch_mode(request.batch_mode, n_train if n_train is not None else 0)
    return (mode, request.params.batch_size if mode == "mini" else None)


def fusion_key(request: TrainRequest, n_train: int | None = None) -> tuple[Any, ...]:
    """The values of :data:`FUSE_KEYS` (from ``params`` or the request itself) plus the batch
    plan: equal keys share one fused pass. ``n_train``, the fold's training rows, resolves
    an ``auto`` batch mode."""
    values: list[Any] = []
    for name in FUSE_KEYS:
        value = getattr(request.params if hasattr(request.params, name) else request, name)
        values.append(tuple(value) if isinstance(value, (list, tuple)) else value)
    return (*values, batch_plan(request, n_train))
