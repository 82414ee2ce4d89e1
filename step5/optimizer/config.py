"""The optimizer's settings and outcome; compare runs derive one config per model type with
:func:`dataclasses.replace`, so every accepted flag reaches every sub-run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step5.artifacts import DIAGNOSTICS_DIRNAME, MODEL_TYPES, REGISTRY_NAME, get_model_type
from step5.data.survivors import DEFAULT_TARGET
from step5.devices import MAX_CPU_WORKERS
from step5.errors import UsageError
from step5.jsonio import MAX_INT
from step5.policy import BATCH_TRIALS_REASON, MAX_BATCH_TRIALS, PRUNER_NAMES, find_policy
from step5.models.trees import require_libraries


#: What data_context records when neither a flag nor the survivors' metadata says: the
#: existing optimizer's defaults.
DEFAULT_PRNG_TYPE = "java_lcg"
DEFAULT_MOD = 1000

#: Field metadata of the settings that configure neural-net training only: a tree model
#: type's run accepts them (compare runs share one command line) and logs them as not applying.
NN_ONLY = {"nn_only": True}


@dataclass(frozen=True)
class OptimizerConfig:
    """Everything one Step 5 run needs; field names follow the CLI flags."""

    survivors: Path  # survivors_with_scores.json
    lottery_data: Path  # train_history.json
    model_type: str = "neural_net"  # one of MODEL_TYPES
    compare_models: bool = False  # run all four model types, keep the best
    trials: int = 50  # Optuna trials to have completed in the study (a resumed study runs the rest)
    k_folds: int = 5  # CV folds per trial
    test_holdout: float = 0.2  # fraction of rows held out as the test set no trial sees
    output_dir: Path = Path("models/reinforcement")
    study_name: str | None = None  # default derived from model type and data fingerprint
    storage: str | None = None  # Optuna storage URL; default a SQLite file (resumable)
    seed: int = 42  # splits, sampler and training seeds derive from it
    target: str = DEFAULT_TARGET  # features[NAME], else the record's own NAME
    persistent_workers: bool | None = field(default=None, metadata=NN_ONLY)  # None: the policy's kill switch decides
    # Default: step5.policy.find_policy; None: no policy file, every default applies.
    policy_path: Path | None = field(default_factory=lambda: find_policy()[0])
    gpus: list[str] | None = None  # None: detect without torch
    cpu_workers: int | None = None  # workers when there is no GPU; None: one per core
    normalize_features: bool = field(default=True, metadata=NN_ONLY)
    use_leaky_relu: bool = field(default=True, metadata=NN_ONLY)
    dropout: float | None = field(default=None, metadata=NN_ONLY)  # fixes the NN dropout instead of searching it
    enable_diagnostics: bool = False
    prng_type: str | None = None  # recorded in data_context; None: the survivors' metadata, else DEFAULT_PRNG_TYPE
    mod: int | None = None  # likewise (DEFAULT_MOD)
    holdout_draws: int | None = 1000  # draws held out upstream, recorded in data_context (the existing default)
    parent_run_id: str | None = None  # provenance link to the pipeline run
    log_level: str = "INFO"
    # Diagnostics, the compare summary and the skip registry, where the health check and WATCHER read them.
    diagnostics_dir: Path = Path(DIAGNOSTICS_DIRNAME)
    skip_registry: Path | None = None  # None: model_skip_registry.json in diagnostics_dir
    fuse_folds: bool | None = field(default=None, metadata=NN_ONLY)  # None: the policy's training.fuse_folds decides
    # > 1: fuse same-shape trials, this many in flight (implies fuse_folds)
    fuse_trials: int = field(default=1, metadata=NN_ONLY)
    trials_in_flight: int | None = None  # trials per ask/run/tell batch; None: the policy decides
    search_only: bool = False  # helper role of a shared study: search until it holds `trials` complete, no model
    pruner: str | None = None  # --pruner (step5.policy.PRUNER_NAMES); None: the policy decides
    # NN search space: the epoch cap every trial trains under (early stopping ends sooner)
    nn_max_epochs: int = field(default=200, metadata=NN_ONLY)
    # Fresh K-fold partitions the best trial is scored on after the search (compare-models chooses by it).
    # None: COMPARE_RESCORE_PARTITIONS in a compare run, 0 in a single run.
    rescore_partitions: int | None = None
    # Repeated CV: K-fold partitions every trial is scored on. None: cv_repeats() by model type and rows.
    cv_repeats: int | None = None
    # The pipeline's distributed_config.json: a --search-only helper over ssh on each other host (step5.cluster).
    cluster_config: Path | None = None
    command_line: list[str] | None = None  # argv as the user typed it, for the sidecar's provenance

    @property
    def diagnostics_folder(self) -> Path:
        return Path(self.diagnostics_dir)

    @property
    def skip_registry_path(self) -> Path:
        return Path(self.skip_registry) if self.skip_registry is not None else self.diagnostics_folder / REGISTRY_NAME


#: Fresh partitions a compare run rescores each best trial on by default (docs/models.md: why three).
COMPARE_RESCORE_PARTITIONS = 3


def rescore_partitions(config: OptimizerConfig) -> int:
    if config.rescore_partitions is not None:
        return config.rescore_partitions
    return COMPARE_RESCORE_PARTITIONS if config.compare_models else 0


#: Validation rows a tree model type's trial is scored on in all by default: ceil(CV_VALIDATION_ROWS / n_dev)
#: partitions, at most TREE_CV_REPEATS_MAX; the net keeps one (docs/optimizer.md, "Repeated CV", says why).
CV_VALIDATION_ROWS = 1000
TREE_CV_REPEATS_MAX = 3


def cv_repeats(config: OptimizerConfig, n_dev: int) -> int:
    if config.cv_repeats is not None:
        return config.cv_repeats
    if get_model_type(config.model_type).torch:
        return 1
    return max(1, min(TREE_CV_REPEATS_MAX, math.ceil(CV_VALIDATION_ROWS / max(n_dev, 1))))


#: The largest seed: numpy's and scikit-learn's seeds are 32-bit, and the run adds to it (docs/optimizer.md).
MAX_SEED = 2**31 - 1
#: The most K-fold partitions (--cv-repeats, --rescore-partitions): the run builds them all before any trial
#: trains, so a count far past any use hung it (docs/optimizer.md); MAX_BATCH_TRIALS bounds a batch so.
MAX_PARTITIONS = 100
#: The least value of each numeric setting (None: not given, the default decides), checked in this order.
_MINIMUMS = {"trials": 1, "k_folds": 2, "seed": 0, "cpu_workers": 1, "mod": 1, "holdout_draws": 0, "fuse_trials": 1,
             "trials_in_flight": 1, "rescore_partitions": 0, "cv_repeats": 1, "nn_max_epochs": 1}
#: The largest value of the settings bounded below MAX_INT, and why.
_MAXIMUMS = {
    "seed": (MAX_SEED, "numpy and scikit-learn take 32-bit seeds, and the run derives seed + 1, seed + 2 and its "
                       "sampler's seed + trials from it"),
    "cpu_workers": (MAX_CPU_WORKERS, "a neural net's CPU workers are processes that each import torch, all started "
                                     "before the first trial; a tree model's, its library's threads"),
    "trials_in_flight": (MAX_BATCH_TRIALS, BATCH_TRIALS_REASON),
    "fuse_trials": (MAX_BATCH_TRIALS, BATCH_TRIALS_REASON),
    "cv_repeats": (MAX_PARTITIONS, "every partition's folds are built before the search, and each adds K fits "
                                   "to every trial"),
    "rescore_partitions": (MAX_PARTITIONS, "every partition's folds are built before the search, and each adds K "
                                           "fits to the rescore"),
}


def validate_config(config: OptimizerConfig) -> None:
    """Reject settings no run could honour, naming the flag: :class:`UsageError` (``MissingDependency`` for
    a tree model type without its library). Ranges and combinations, so a config built in code (compare
    runs, tests) gets the checks argparse gives a command line."""
    if config.model_type not in MODEL_TYPES:
        raise UsageError(f"--model-type must be one of {list(MODEL_TYPES)}, got {config.model_type!r}")
    for name, least in _MINIMUMS.items():
        value = getattr(config, name)
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        most, why = _MAXIMUMS.get(name, (MAX_INT, ""))
        if value is not None and value > most:
            raise UsageError(f"--{name.replace('_', '-')} must be <= {most}{f' ({why})' if why else ''}, got {value}")
    if not 0.0 < config.test_holdout < 1.0:
        raise UsageError(f"--test-holdout must be a fraction strictly between 0 and 1, got {config.test_holdout}")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"--dropout must be a dropout probability in [0, 1), got {config.dropout}")
    if config.fuse_trials > 1 and config.fuse_folds is False:
        raise UsageError(f"--fuse-trials {config.fuse_trials} trains the folds of several trials in one fused "
                         "pass, which --no-fuse-folds forbids; drop one of them")
    if config.pruner is not None and config.pruner not in PRUNER_NAMES:
        raise UsageError(f"--pruner must be one of {', '.join(PRUNER_NAMES)}, got {config.pruner!r}")
    if config.fuse_trials > 1 and config.trials_in_flight not in (None, config.fuse_trials):
        raise UsageError(f"--fuse-trials {config.fuse_trials} runs {config.fuse_trials} trials in flight, but "
                         f"--trials-in-flight is {config.trials_in_flight}; drop one of them")
    if config.search_only and config.rescore_partitions:
        raise UsageError("--rescore-partitions rescores the best trial of the run that builds the model; a "
                         "--search-only helper builds none. Give it to the process without --search-only")
    if config.search_only and config.compare_models:
        raise UsageError("--search-only helps one study; --compare-models runs four. Start a helper per model "
                         "type with --model-type and the main run's --storage and --study-name")
    if config.cluster_config is not None:
        if config.search_only:
            raise UsageError("--cluster-config starts helpers from the main process; a --search-only helper "
                             "starts none")
        if config.compare_models:
            raise UsageError("--cluster-config helps one study; --compare-models runs four. Run one model type "
                             "with --model-type")
        if config.storage is None or config.storage.lower().startswith("sqlite"):
            raise UsageError("--cluster-config shares the study with other hosts, so --storage must be a database "
                             "server every host reaches, such as postgresql+psycopg://step5@dbhost/step5 (a SQLite "
                             f"file is local), got {config.storage!r}")
    for flag in ("study_name", "target", "prng_type", "parent_run_id"):  # recorded or looked up by name
        value = getattr(config, flag)
        if value is not None and not value.strip():
            raise UsageError(f"--{flag.replace('_', '-')} must not be empty")
    if config.storage is not None and "://" not in config.storage:
        raise UsageError(f"--storage must be an Optuna storage URL such as sqlite:///path/optuna.db, got "
                         f"{config.storage!r}")
    database = None if config.storage is None else sqlite_database(config.storage)
    if database is not None and (database in ("", ":memory:") or "mode=memory" in config.storage):
        raise UsageError(f"--storage {config.storage} keeps the study in memory, where the run's own threads "
                         "cannot share it (each gets an empty database) and no later run can resume it: give a "
                         "file, such as sqlite:///path/optuna.db")
    # SQLAlchemy reads what follows a SQLite URL's first '?' as name=value options and drops a part without
    # '=': 'sqlite:////d/what?.db' silently opened the file /d/what.
    dropped = [] if database is None else [p for p in config.storage.partition("?")[2].split("&") if p and "=" not in p]
    if dropped:
        raise UsageError(f"--storage {config.storage} opens the database file {database}: SQLAlchemy reads what "
                         f"follows '?' as name=value options and drops {', '.join(map(repr, dropped))}. Write a '?' "
                         "in the file's name as %3F; options look like ?timeout=30")
    # Before any data is loaded: a missing optional library is not found an hour into a run.
    require_libraries(MODEL_TYPES if config.compare_models else (config.model_type,))


def sqlite_database(storage: str) -> str | None:
    """The database a SQLite storage URL names ("" or ":memory:" for an in-memory one); None for another
    database's URL, or one too malformed to parse (Optuna reports that when it opens it)."""
    if not storage.lower().startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url  # Optuna's own dependency; parses every URL form

    try:
        return make_url(storage).database or ""
    except Exception:  # noqa: BLE001 - a malformed URL is Optuna's to report
        return None


@dataclass
class RunOutcome:
    """What one model type's run produced; compare runs collect one per model type."""

    model_type: str
    status: str  # "SUCCESS" | "DEGENERATE_SIGNAL" | "FAILED" | "SEARCH_ONLY" (a helper: no model)
    sidecar: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: Path | None = None
    sidecar_path: Path | None = None
    cv_score: float | None = None  # best trial's objective value
    cv_rescored: float | None = None  # best trial's mean objective on fresh partitions (None: not rescored)
    test_r2: float | None = None  # final model on the held-out test set
    trials_run: int = 0
    wall_s: float = 0.0
    error: str | None = None
