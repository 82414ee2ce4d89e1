"""What Step 5 leaves for Step 6 and the WATCHER: file names, model types, and :func:`validate_sidecar`,
the one definition of a valid sidecar (docs/optimizer.md, "The sidecar"). Torch-free and light."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import msgspec
import numpy as np
from msgspec import Meta

from step5.errors import DataError, SchemaError
from step5.execution.summary import EXECUTION_SCHEMA
from step5.jsonio import dumps, read_json_file, write_json_atomic
from step5.schema import Number, convert, one_of

SCHEMA_VERSION = "1.0"

# Every file name Step 5 reads or writes, in one place.
#: The pipeline's inputs (SPEC section 2), as its earlier steps name them.
SURVIVORS_FILENAME = "survivors_with_scores.json"
HISTORY_FILENAME = "train_history.json"
#: A model set's files besides the checkpoint (SPEC section 4).
SIDECAR_NAME = "best_model.meta.json"
HISTORY_PNG_NAME = "best_model.history.png"
#: Relative to the working directory (the pipeline's root), where the existing pipeline's
#: health check and optimizer look for diagnostics, the compare summary and the skip registry.
DIAGNOSTICS_DIRNAME = "diagnostics_outputs"
COMPARE_SUMMARY_NAME = "compare_models_summary.json"
REGISTRY_NAME = "model_skip_registry.json"


@dataclass(frozen=True)
class ModelType:
    """One model family Step 5 trains: the facts every part of Step 5 asks about it."""

    name: str  # the --model-type value and the sidecar's model_type
    checkpoint_name: str  # best_model.<ext> (SPEC section 4)
    checkpoint_format: str  # the sidecar's checkpoint_format: what is inside the file
    # Trained by torch in worker / one-shot processes (the parent never imports torch);
    # otherwise in-process by its tree library (step5.models).
    torch: bool = False


#: Every model family, in the order ``--compare-models`` runs them: the one definition of a model type.
MODEL_REGISTRY: dict[str, ModelType] = {m.name: m for m in (
    ModelType("neural_net", "best_model.pth", "pytorch_tensors", torch=True),  # weights_only=True loads it
    ModelType("xgboost", "best_model.json", "xgboost_json"),
    ModelType("lightgbm", "best_model.txt", "lightgbm_text"),
    ModelType("catboost", "best_model.cbm", "catboost_cbm"),
)}
MODEL_TYPES = tuple(MODEL_REGISTRY)
#: Every file a model set may hold (see :mod:`step5.model_set`).
MODEL_SET_NAMES = frozenset({*(m.checkpoint_name for m in MODEL_REGISTRY.values()), SIDECAR_NAME, HISTORY_PNG_NAME})


def get_model_type(name: str) -> ModelType:
    """The registry entry of ``name``; a ``ValueError`` naming the model types otherwise."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"`model_type` must be one of {list(MODEL_TYPES)}, got {name!r}") from None


def checkpoint_filename(name: str) -> str:
    """``best_model.pth`` / ``.json`` / ``.txt`` / ``.cbm`` for model type ``name``."""
    return get_model_type(name).checkpoint_name


#: ``signal_quality.confidence`` of each status: how sure the signal gate is that there is something to learn.
SIGNAL_CONFIDENCE = {"healthy": 1.0, "weak": 0.5, "degenerate": 0.0}
#: This step's number and name in the pipeline (``agent_metadata``; the WATCHER's step 5).
PIPELINE_STEP = 5
PIPELINE_STEP_NAME = "anti_overfit_training"


def feature_schema_hash(feature_names: Sequence[str]) -> str:
    """sha256 of the comma-joined feature names, first 16 hex characters (SPEC section 4)."""
    return hashlib.sha256(",".join(feature_names).encode("utf-8")).hexdigest()[:16]


def build_feature_schema(feature_names: Sequence[str], excluded_features: Sequence[str],
                         source_file: str) -> dict[str, Any]:
    """The sidecar's ``feature_schema`` block."""
    names = list(feature_names)
    return {
        "feature_names": names,
        "feature_count": len(names),
        "ordering": "lexicographic",
        "feature_schema_hash": feature_schema_hash(names),
        "excluded_features": list(excluded_features),
        "source_file": str(source_file),
    }


def data_fingerprint(X: np.ndarray, y: np.ndarray, feature_names: Sequence[str], draws: Sequence[int], *,
                     target: str, extra: Mapping[str, Any] | None = None) -> str:
    """A 16-hex fingerprint of exactly the data a model was trained on.

    Hashes the feature and target bytes (any changed value changes it), the feature schema,
    the target name, the history draws and ``extra`` (prng type / mod / holdout draws).
    Same inputs, same fingerprint: that is what lets the default study name resume a study.
    """
    h = hashlib.sha256()
    header = {
        "n": int(X.shape[0]),
        "d": int(X.shape[1]) if X.ndim == 2 else None,
        "features": feature_schema_hash(feature_names),
        "target": target,
        "extra": dict(extra or {}),
    }
    h.update(dumps(header))
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.float64).tobytes())
    h.update(np.asarray(list(draws), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def compare_summary_path(diagnostics_dir: str | os.PathLike[str] = DIAGNOSTICS_DIRNAME) -> Path:
    """Where a ``--compare-models`` run writes its summary."""
    return Path(diagnostics_dir) / COMPARE_SUMMARY_NAME


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def beats_mean(test_r2: float | None) -> bool | None:
    """Whether a test R² is better than predicting the mean (R² > 0); None when unknown."""
    if test_r2 is None or not math.isfinite(test_r2):
        return None
    return bool(test_r2 > 0.0)


def write_sidecar(path: str | os.PathLike[str], sidecar: Mapping[str, Any]) -> Path:
    """Validate and atomically write a sidecar; a ``ValueError`` listing the problems (a bug here must
    not become a confusing error in Step 6 or a wrong WATCHER decision)."""
    problems = validate_sidecar(dict(sidecar))
    if problems:
        raise ValueError("refusing to write an invalid sidecar:\n  " + "\n  ".join(problems))
    return write_json_atomic(path, sidecar)


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a sidecar; a missing, unparsable or invalid file is a :class:`DataError`."""
    obj = read_json_file(path, "sidecar")
    problems = validate_sidecar(obj)
    if problems:
        raise DataError(f"sidecar {path} is invalid:\n  " + "\n  ".join(problems))
    return obj


def resolve_checkpoint(sidecar_path: str | os.PathLike[str], sidecar: Mapping[str, Any]) -> Path:
    """The checkpoint a sidecar names: its file name, beside the sidecar's real path.

    In an output dir the sidecar is a link into the current model set, so the checkpoint
    comes from the sidecar's own set; a moved or copied model directory still finds its own.
    """
    ckpt = sidecar.get("checkpoint_path")
    if not isinstance(ckpt, str) or not ckpt:
        raise DataError(f"sidecar {sidecar_path} names no checkpoint (outcome {sidecar.get('outcome')!r})")
    return Path(os.path.realpath(sidecar_path)).parent / Path(ckpt).name


Hex16 = Annotated[str, Meta(pattern="^[0-9a-f]{16}$", description="16 lowercase hex characters")]
Sha256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$", description="64 lowercase hex characters (a SHA-256)")]
OptNumber = Number | None
SignalStatus = one_of(tuple(SIGNAL_CONFIDENCE))
ModelTypeName = one_of(MODEL_TYPES)
Outcome = one_of(("SUCCESS", "DEGENERATE_SIGNAL"))


# The sidecar's schema (SPEC section 4). A block may carry more keys than these (the existing
# pipeline's, this project's extras); ``execution`` may not (step5.execution.summary).
class _FeatureSchema(msgspec.Struct):
    feature_names: list[str]
    feature_count: int
    ordering: str
    feature_schema_hash: Hex16
    excluded_features: list[str]
    source_file: str


class _SignalQuality(msgspec.Struct):
    signal_status: SignalStatus
    quality: str  # = signal_status: the name the existing WATCHER's metrics extractor reads
    confidence: Number  # SIGNAL_CONFIDENCE of the status: the extractor's other field
    prediction_allowed: bool
    target_mean: OptNumber
    target_std: OptNumber
    target_variance: OptNumber
    unique_target_values: int
    sample_size: int


class _Window(msgspec.Struct):
    start_draw: int
    end_draw: int
    draw_count: int


class _HoldoutWindow(msgspec.Struct):
    start_draw: int | None
    end_draw: int | None
    draw_count: int | None


class _SurvivorSource(msgspec.Struct):
    file: str
    file_path: str
    survivor_count: int


class _PrngHypothesis(msgspec.Struct):
    prng_type: str | None
    mod: int | None


class _DataContext(msgspec.Struct):
    """The existing WATCHER's metrics extractor reads ``fingerprint_version``, the windows'
    ``draw_count`` and ``prng_hypothesis.prng_type``."""

    fingerprint_hash: Hex16
    fingerprint_version: str
    training_window: _Window  # the history's draws
    holdout_window: _HoldoutWindow
    survivor_source: _SurvivorSource
    prng_hypothesis: _PrngHypothesis
    target: str


#: Metrics every sidecar carries; null in a degenerate sidecar, numbers in a SUCCESS one
#: (``overfit_ratio`` may be null when the train MSE is 0, ``early_stop_ratio`` for a model
#: that trains no rounds).
TRAINING_METRIC_KEYS: tuple[str, ...] = (
    "cv_r2_mean", "cv_r2_std", "train_r2", "val_r2", "test_r2", "train_mse", "val_mse", "test_mse",
    "overfit_ratio", "early_stop_ratio",
)
_NULLABLE_ON_SUCCESS = frozenset({"overfit_ratio", "early_stop_ratio"})
_TrainingMetrics = msgspec.defstruct(
    "_TrainingMetrics", [*((key, OptNumber) for key in TRAINING_METRIC_KEYS), ("beats_mean", bool | None, None)],
)


class _Optuna(msgspec.Struct):
    study_name: str | None
    storage: str | None
    trials_run: int
    best_trial_number: int | None
    best_value: OptNumber


class _Provenance(msgspec.Struct):
    run_id: str
    parent_run_id: str | None
    command_line: list[str]
    created_at: str
    versions: dict


class _AgentMetadata(msgspec.Struct):
    pipeline_step: Literal[PIPELINE_STEP]  # type: ignore[valid-type]
    pipeline_step_name: Literal[PIPELINE_STEP_NAME]  # type: ignore[valid-type]
    run_id: str
    parent_run_id: str | None


class _Sidecar(msgspec.Struct):
    schema_version: str
    model_type: ModelTypeName
    checkpoint_path: str | None
    checkpoint_format: str | None
    feature_schema: _FeatureSchema
    signal_quality: _SignalQuality
    data_context: _DataContext
    training_metrics: _TrainingMetrics  # type: ignore[valid-type]
    hyperparameters: dict
    optuna: _Optuna
    execution: EXECUTION_SCHEMA  # type: ignore[valid-type]
    outcome: Outcome
    provenance: _Provenance
    agent_metadata: _AgentMetadata
    checkpoint_sha256: Sha256 | None = None  # required in a SUCCESS sidecar (a rule below)


def validate_sidecar(obj: dict[str, Any]) -> list[str]:
    """Every problem with a sidecar, as readable lines; an empty list means it is valid.

    First its shape (:class:`_Sidecar`; the first misfit of each top-level key), then, on a
    well-shaped sidecar, the rules across fields that make it usable (or safely unusable) by Step 6.
    """
    if not isinstance(obj, dict):
        return [f"the sidecar must be a JSON object, got {type(obj).__name__}"]
    problems: list[str] = []
    for f in msgspec.structs.fields(_Sidecar):
        if f.name not in obj:
            if f.required:
                problems.append(f"missing key `{f.name}`")
            continue
        try:
            convert(obj[f.name], f.type, at=f.name)
        except SchemaError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    outcome, fs, sq, tm, pv, am = (obj[k] for k in (
        "outcome", "feature_schema", "signal_quality", "training_metrics", "provenance", "agent_metadata"))
    names = fs["feature_names"]
    if fs["feature_count"] != len(names):
        problems.append(f"`feature_schema.feature_count` is {fs['feature_count']} but "
                        f"`feature_schema.feature_names` has {len(names)} names")
    if fs["feature_schema_hash"] != feature_schema_hash(names):
        problems.append(f"`feature_schema.feature_schema_hash` {fs['feature_schema_hash']!r} does not match the "
                        f"feature names (expected {feature_schema_hash(names)!r})")
    status = sq["signal_status"]
    if sq["quality"] != status or sq["confidence"] != SIGNAL_CONFIDENCE[status]:
        problems.append(f"`signal_quality.quality` / `confidence` must be {status!r} / {SIGNAL_CONFIDENCE[status]} "
                        f"for signal_status {status!r}, got {sq['quality']!r} / {sq['confidence']!r}")
    for key in ("run_id", "parent_run_id"):
        if am[key] != pv[key]:
            problems.append(f"`agent_metadata.{key}` {am[key]!r} differs from `provenance.{key}` {pv[key]!r}")
    if outcome == "SUCCESS":
        if not names:
            problems.append("`feature_schema.feature_names` is empty in a SUCCESS sidecar")
        for key in TRAINING_METRIC_KEYS:
            if key not in _NULLABLE_ON_SUCCESS and tm[key] is None:
                problems.append(f"`training_metrics.{key}` must be a finite number in a SUCCESS sidecar, got None")
        if obj.get("checkpoint_sha256") is None:
            problems.append("`checkpoint_sha256` must be 64 lowercase hex characters (a SHA-256) in a SUCCESS "
                            "sidecar, got None")
        if tm["test_r2"] is not None:
            expected_flag = beats_mean(tm["test_r2"])
            if "beats_mean" not in tm:
                problems.append("missing key `training_metrics.beats_mean` in a SUCCESS sidecar")
            elif tm["beats_mean"] is not expected_flag:
                problems.append(f"`training_metrics.beats_mean` must be {str(expected_flag).lower()} for test R² "
                                f"{tm['test_r2']!r} (true only above 0), got {tm['beats_mean']!r}")
        spec = MODEL_REGISTRY[obj["model_type"]]
        if obj["checkpoint_format"] != spec.checkpoint_format:
            problems.append(f"`checkpoint_format` must be {spec.checkpoint_format!r} for model type "
                            f"{spec.name!r}, got {obj['checkpoint_format']!r}")
        if obj["checkpoint_path"] is None or Path(obj["checkpoint_path"]).name != spec.checkpoint_name:
            problems.append(f"`checkpoint_path` must name {spec.checkpoint_name!r} for model type "
                            f"{spec.name!r}, got {obj['checkpoint_path']!r}")
        if not sq["prediction_allowed"]:
            problems.append("`signal_quality.prediction_allowed` is false in a SUCCESS sidecar")
        if obj["optuna"]["best_trial_number"] is None:
            problems.append("`optuna.best_trial_number` is null in a SUCCESS sidecar")
    else:  # DEGENERATE_SIGNAL
        if sq["prediction_allowed"]:
            problems.append("`signal_quality.prediction_allowed` must be false in a DEGENERATE_SIGNAL sidecar")
        for key in ("checkpoint_path", "checkpoint_sha256"):
            if obj.get(key) is not None:
                problems.append(f"`{key}` must be null in a DEGENERATE_SIGNAL sidecar (no model is saved)")
    return problems
