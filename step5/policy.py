"""``watcher_policies.json``: loading and validation (SPEC section 8).

An unreadable or invalid policy file is a :class:`PolicyError`, never a silent default.
Absent *keys* do have defaults; notably ``training.use_persistent_workers`` absent means
``False`` (backward compatible with the S96A subprocess-per-fold path).

Which file (SPEC section 10): an explicit ``--policy`` must exist; without it,
``watcher_policies.json`` in the working directory when there is one, else the project's own
(:data:`PROJECT_POLICY_PATH`, found from this package's location, so a run started from any
directory gets the same policy).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step5.errors import DataError, PolicyError
from step5.jsonio import read_json_file
from step5.values import is_int, is_number

DEFAULT_POLICY_PATH = "watcher_policies.json"
#: The project's own policy, shipped inside the package (in a checkout, a link to the
#: repository's watcher_policies.json), so an installed step5 has it in any directory.
PROJECT_POLICY_PATH = Path(__file__).resolve().with_name(DEFAULT_POLICY_PATH)


#: ``training.pruner`` / ``--pruner`` values (step5.optimizer.pruning makes the Optuna pruner).
PRUNER_NAMES = ("none", "median", "successive_halving")

#: String keys and the values each accepts.
_CHOICES = {"pruner": PRUNER_NAMES}


@dataclass(frozen=True)
class TrainingPolicy:
    """The ``training`` section: how Step 5 runs its neural-net folds."""

    use_persistent_workers: bool = False  # the S96B kill switch; absent -> False
    worker_job_timeout_s: float = 600.0  # a job running longer marks its worker hung
    worker_ready_timeout_s: float = 120.0  # boot (import torch, init CUDA) must finish by then
    max_worker_restarts: int = 1  # restarts per device before falling back to subprocesses
    worker_repromote_after_s: float = 60.0  # a fallen-back slot tries a fresh worker after this (x2 each time)
    max_worker_repromotions: int = 3  # then the slot stays in the fallback; 0: never re-promote
    max_fault_reruns: int = 50  # re-runs of jobs hit by infrastructure faults, per run (all slots)
    max_job_reruns: int = 10  # ... and per job (a poisoned job spends at most a fifth of the run's); past either, its trial fails
    max_consecutive_failed_trials: int = 10  # failed trials are replaced; this many in a row stop the run
    fuse_folds: bool = False  # train a trial's K folds in one batched pass
    trials_in_flight: int = 0  # trials per ask/run/tell batch; 0: two per device slot
    heartbeat_interval_s: float = 30.0  # a running trial's Optuna heartbeat period
    heartbeat_grace_s: float = 120.0  # no heartbeat this long: its process is dead, the trial is failed and re-run
    pruner: str = "none"  # fold-level pruning of hopeless trials (PRUNER_NAMES)


@dataclass(frozen=True)
class WatcherPolicy:
    """The ``watcher`` section: how the WATCHER runs and judges a step."""

    step_timeout_s: float = 7200.0  # the whole step subprocess, workers included
    max_retries: int = 1  # re-runs after a RETRY decision
    retry_trials_multiplier: float = 1.0  # a retry runs trials * this (>= 1)
    retry_seed_increment: int = 1  # a retry runs with seed + this, so it really explores anew
    max_consecutive_critical: int = 3  # a model type over this many is added to the skip registry
    kill_grace_s: float = 10.0  # on timeout / Ctrl-C: SIGTERM the step's group, SIGKILL after this long


@dataclass(frozen=True)
class Policy:
    """The whole policy file, validated."""

    training: TrainingPolicy = field(default_factory=TrainingPolicy)
    watcher: WatcherPolicy = field(default_factory=WatcherPolicy)
    training_diagnostics: dict[str, float] = field(default_factory=dict)
    acceptance_rules: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str | None = None  # the file it was read from, for messages and the sidecar
    raw: dict[str, Any] = field(default_factory=dict)


def _check_section(raw: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: `{name}` must be an object, got {type(section).__name__}")
    return section


def _typed(section: dict[str, Any], cls: type, where: str) -> Any:
    """Build a policy dataclass from ``section``, checking each key's type against the default."""
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in section.items():
        if key.startswith("_"):  # "_comment" style keys are documentation
            continue
        if not hasattr(defaults, key):
            known = sorted(k for k in vars(defaults))
            raise PolicyError(f"{where}: unknown key `{key}`; expected one of {known}")
        default = getattr(defaults, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            expected = "true or false"
        elif isinstance(default, str):
            choices = _CHOICES[key]
            ok = value in choices
            expected = "one of " + ", ".join(f'"{c}"' for c in choices)
        elif isinstance(default, int):
            ok = is_int(value) and value >= 0
            expected = "a non-negative int"
        else:
            ok = is_number(value) and value > 0
            expected = "a positive number"
        if not ok:
            raise PolicyError(f"{where}.{key} must be {expected}, got {value!r}")
        values[key] = float(value) if isinstance(default, float) else value
    return cls(**values)


def _number_map(section: dict[str, Any], where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in section.items():
        if key.startswith("_"):
            continue
        if not is_number(value):
            raise PolicyError(f"{where}.{key} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


#: The top-level sections Step 5 reads; the pipeline's file may hold others (other steps').
POLICY_SECTIONS = ("training", "watcher", "training_diagnostics", "acceptance_rules")


def _refuse_misspelt_sections(raw: dict[str, Any], source: str) -> None:
    """Another step's section is kept unread, but one spelt almost like ours (``trainng``)
    would silently leave every default in force, the kill switch included: refuse it."""
    for name in raw:
        if name in POLICY_SECTIONS or name.startswith("_"):
            continue
        close = difflib.get_close_matches(name, POLICY_SECTIONS, n=1, cutoff=0.8)
        if close:
            raise PolicyError(f"{source}: unknown section {name!r}; did you mean {close[0]!r}? "
                              f"(Step 5 reads {', '.join(POLICY_SECTIONS)})")


def parse_policy(raw: Any, source: str = "<policy>") -> Policy:
    """Validate an already-parsed policy object."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the policy must be a JSON object, got {type(raw).__name__}")
    _refuse_misspelt_sections(raw, source)
    training = _typed(_check_section(raw, "training", source), TrainingPolicy, f"{source}: training")
    watcher = _typed(_check_section(raw, "watcher", source), WatcherPolicy, f"{source}: watcher")
    if watcher.retry_trials_multiplier < 1:
        raise PolicyError(f"{source}: watcher.retry_trials_multiplier must be >= 1, got {watcher.retry_trials_multiplier}")
    if training.heartbeat_grace_s <= training.heartbeat_interval_s:
        raise PolicyError(
            f"{source}: training.heartbeat_grace_s ({training.heartbeat_grace_s}) must exceed "
            f"training.heartbeat_interval_s ({training.heartbeat_interval_s}), or a live trial would look dead"
        )
    if training.max_consecutive_failed_trials < 1:
        raise PolicyError(f"{source}: training.max_consecutive_failed_trials must be >= 1, "
                          f"got {training.max_consecutive_failed_trials}")
    diagnostics = _number_map(_check_section(raw, "training_diagnostics", source), f"{source}: training_diagnostics")
    rules_raw = _check_section(raw, "acceptance_rules", source)
    rules: dict[str, dict[str, float]] = {}
    for step, section in rules_raw.items():
        if step.startswith("_"):
            continue
        if not isinstance(section, dict):
            raise PolicyError(f"{source}: acceptance_rules.{step} must be an object, got {type(section).__name__}")
        rules[step] = _number_map(section, f"{source}: acceptance_rules.{step}")
    return Policy(training, watcher, diagnostics, rules, source, raw)


def find_policy() -> tuple[Path, str]:
    """The policy file a run without ``--policy`` uses, and why (for the log)."""
    local = Path(DEFAULT_POLICY_PATH)
    if local.is_file():
        return local, f"{DEFAULT_POLICY_PATH} in the working directory"
    return PROJECT_POLICY_PATH, f"the project's own (no {DEFAULT_POLICY_PATH} in the working directory)"


def load_policy(path: str | Path | None = DEFAULT_POLICY_PATH) -> Policy:
    """Read and validate a policy file. ``None`` means "no policy": every default applies."""
    if path is None:
        return Policy()
    try:
        raw = read_json_file(path, "policy")
    except DataError as exc:
        raise PolicyError(str(exc)) from None
    return parse_policy(raw, str(path))
