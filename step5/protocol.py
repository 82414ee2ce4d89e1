"""The worker protocol's messages (SPEC section 6; docs/workers.md, "Protocol"): one type
per request, defined once, one encode/decode path, and the one decoder every side uses,
:func:`decode_request`. Torch-free; dicts only (bytes <-> lines is :mod:`step5.framing`).
Replies echo their request's identity (``trial_number``, ``fold_idx``, ``job_id``).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Literal, TypedDict, Union

from step5.errors import BadRequest, JobError
from step5.jsonio import MAX_INT
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


#: The identity fields, what makes each readable, and what a refusal says it expects.
_IDENTITY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "trial_number": (is_int, "an int"), "fold_idx": (is_int, "an int"),
    "job_id": (lambda v: isinstance(v, str) or is_int(v), "a string or int"),
}


def identity(raw: Any) -> dict[str, Any]:
    """``trial_number``, ``fold_idx`` and ``job_id`` of a raw request, each None unless
    readable (a malformed request's garbage is not echoed back). The one echo rule."""
    raw = raw if isinstance(raw, dict) else {}
    return {name: raw.get(name) if ok(raw.get(name)) else None for name, (ok, _) in _IDENTITY_FIELDS.items()}


def echo(request: Any) -> dict[str, Any]:
    """The identity fields of a decoded request (a ``merge`` has no ``fold_idx``: None)."""
    return {"trial_number": request.trial_number, "fold_idx": request.fold_idx, "job_id": request.job_id}


def tagged(error: JobError, source: Any) -> JobError:
    """``error`` with its missing identity fields filled from ``source`` (a decoded request,
    or anything read off the wire); returns the same error."""
    for key, value in (echo(source) if isinstance(source, _Request) else identity(source)).items():
        if getattr(error, key) is None:
            setattr(error, key, value)
    return error


def error_reply(error: JobError, request: Any) -> dict[str, Any]:
    """The ``error`` reply to ``request`` (leaves ``error``, which may fail several jobs, as it is)."""
    reply = error.to_dict()
    return {**reply, **{key: value for key, value in echo(request).items() if reply[key] is None}}


#: A field's check: ``(wire name, value) -> value`` as the record holds it, or a BadRequest.
Rule = Callable[[str, Any], Any]


def _rule(ok: Callable[[Any], bool], expected: str, convert: Callable[[Any], Any] = lambda v: v) -> Rule:
    """A check naming the field and what it expects (a long value's repr is cut at 200 characters)."""
    def check(name: str, value: Any) -> Any:
        if not ok(value):
            raise BadRequest(f"`{name}` must be {expected}, got {value!r:.200}")
        return convert(value)
    return check


def _number(lo: float, *, above: bool = False, below: float | None = None) -> Rule:
    bound = f"{'>' if above else '>='} {lo}" + (f" and < {below}" if below is not None else "")
    return _rule(lambda v: is_number(v) and (v > lo if above else v >= lo) and (below is None or v < below),
                 f"a finite number {bound}", float)


def _int_from(lo: int) -> Rule:
    return _rule(lambda v: is_int(v) and v >= lo, f"an int >= {lo}")


def _one_of(choices: tuple[str, ...]) -> Rule:
    return _rule(lambda v: v in choices, f"one of {list(choices)}")


_PATH = _rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string")
_FLAG = _rule(lambda v: isinstance(v, bool), "true or false")
#: The identity fields' checks, first in a request (a refusal echoes what of them it could read).
_IDENTITY: dict[str, Rule] = {name: _rule(ok, expected) for name, (ok, expected) in _IDENTITY_FIELDS.items()}
#: Wire names that differ from the field's (``X_train_path`` is kept from the proposal).
_WIRE_NAMES = {"data_path": "X_train_path"}
_FIELD_NAMES = {wire: name for name, wire in _WIRE_NAMES.items()}


class _Record:
    """The one encode/decode path of every record on the wire: ``_RULES`` names each wire key
    and its check, in the order they are checked; unknown keys and wrong types are errors,
    an absent optional field takes its default, and null is accepted where the default is."""
    _RULES: ClassVar[dict[str, Rule]] = {}

    @classmethod
    def _decode(cls, raw: Any, noun: str, where: str) -> Any:
        if not isinstance(raw, dict):
            raise BadRequest(f"{noun} must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(cls._RULES) - ({"command"} if hasattr(cls, "command") else set()))
        if unknown:
            raise BadRequest(f"unknown key(s) in {where}: {unknown}; expected a subset of {sorted(cls._RULES)}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}  # type: ignore[arg-type]
        nullable = {f.name for f in fields(cls) if f.default is None}  # type: ignore[arg-type]
        values = {}
        for wire, check in cls._RULES.items():
            name = _FIELD_NAMES.get(wire, wire)
            if wire in raw or name in required:
                value = raw.get(wire)
                values[name] = None if value is None and name in nullable else check(wire, value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The wire form (with the ``command`` of a request), accepted back by its decoder;
        an optional field that is null is left out."""
        out: dict[str, Any] = {"command": self.command} if hasattr(self, "command") else {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                out[_WIRE_NAMES.get(f.name, f.name)] = _encode(value)
        return out


def _encode(value: Any) -> Any:
    """JSON scalars as they are, tuples as lists; anything else must be a record (or an error)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value.to_dict()


@dataclass(frozen=True)
class NNParams(_Record):
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

    _RULES: ClassVar[dict[str, Rule]] = {
        "hidden_layers": _rule(lambda v: isinstance(v, (list, tuple)) and all(is_int(w) and w > 0 for w in v),
                               "a list of positive ints (empty: a linear model)", tuple),
        "learning_rate": _number(0.0, above=True), "dropout": _number(0.0, below=1.0),
        "input_dropout": _number(0.0, below=1.0), "input_sparsity": _number(0.0), "weight_decay": _number(0.0),
        "gradient_clip": _number(0.0), "epochs": _int_from(1), "batch_size": _int_from(1),
        "early_stopping_patience": _int_from(0), "optimizer": _one_of(OPTIMIZERS),
    }

    @classmethod
    def from_dict(cls, raw: Any) -> "NNParams":
        """Validate a ``params`` object; unknown keys and wrong types are errors."""
        return cls._decode(raw, "`params`", "`params`")  # type: ignore[no-any-return]


class _Request(_Record):
    command: ClassVar[str]

    @classmethod
    def from_dict(cls, raw: Any) -> Any:
        """Validate a request dict of this type; a refusal carries the readable identity fields."""
        try:
            return cls._decode(raw, "a request", f"{cls.command} request")
        except BadRequest as exc:
            raise tagged(exc, raw) from None


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

    _RULES: ClassVar[dict[str, Rule]] = {
        **_IDENTITY, "X_train_path": _PATH, "params": lambda _, v: NNParams.from_dict(v),
        "normalize_features": _FLAG, "use_leaky_relu": _FLAG, "batch_mode": _one_of(BATCH_MODES),
        "seed": _rule(lambda v: is_int(v) and 0 <= v <= MAX_INT, "a non-negative int"), "save_model_path": _PATH,
    }


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
                    raise BadRequest(f"`command` is {job.get('command')!r}; only train jobs can be fused")
                decoded.append(TrainRequest.from_dict(job))
            except BadRequest as exc:
                exc.message = f"`jobs[{i}]`: {exc.message}"
                decoded.append(tagged(exc, job))
        return cls(tuple(decoded))


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

    _RULES: ClassVar[dict[str, Rule]] = {
        "trial_number": _IDENTITY["trial_number"], "job_id": _IDENTITY["job_id"],
        "fold_paths": _rule(lambda v: isinstance(v, list) and bool(v) and all(isinstance(p, str) and p for p in v),
                            "a non-empty list of non-empty strings", tuple),
        "out_path": _PATH, "score_path": _PATH,
    }


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


def ready_problem(message: dict[str, Any]) -> str | None:
    """Why ``message`` is not a ``ready`` line of this protocol (None: it is one); the one rule for a
    worker's and a one-shot trainer's ``ready``. The version must be the integer itself: true and 1.0
    equal 1 in Python."""
    if message.get("status") != "ready":
        return "not a `ready` line"
    version = message.get("protocol")
    if type(version) is not int or version != PROTOCOL_VERSION:
        return f"`protocol` {version!r:.40} is not version {PROTOCOL_VERSION}"
    return None


class ReadyMessage(TypedDict):
    """Sent once by a worker, before it reads a request, and by a one-shot trainer started with
    ``--ready-line`` once torch is set up, before its reply (the other replies: docs/workers.md)."""
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
