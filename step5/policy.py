"""``watcher_policies.json``: loading and validation (SPEC section 8). An unreadable or invalid file
is a :class:`PolicyError`, never a silent default; which sections Step 5 owns, reads or leaves
alone: docs/compatibility.md and docs/watcher.md."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Mapping

import msgspec
from msgspec import UNSET, Meta, UnsetType

from step5.devices import device_env_problem
from step5.errors import DataError, PolicyError, SchemaError
from step5.jsonio import MAX_INT, read_json_file
from step5.schema import NonNegativeInt, NonNegativeNumber, Number, PositiveNumber, convert, \
    convert_map, one_of, present, record_schema, without_comments
from step5.values import is_number

DEFAULT_POLICY_PATH = "watcher_policies.json"
#: The project's own policy, shipped inside the package (in a checkout, a link to the repository's),
#: so an installed step5 has it in any directory.
PROJECT_POLICY_PATH = Path(__file__).resolve().with_name(DEFAULT_POLICY_PATH)


#: ``training.pruner`` / ``--pruner`` values (step5.optimizer.search makes the Optuna pruner).
PRUNER_NAMES = ("none", "median", "successive_halving")
Pruner = one_of(PRUNER_NAMES)
Fraction = Annotated[float, Meta(ge=0, lt=1, description="a number in [0, 1)")]
#: ``training.device_env``: its entries are checked one by one (step5.devices.device_env_problem).
DeviceEnv = Annotated[dict, Meta(description="an object of variable names to strings")]


@dataclass(frozen=True)
class TrainingPolicy:
    """The ``training`` section: how Step 5 runs its neural-net folds."""

    use_persistent_workers: bool = False  # the S96B kill switch; absent -> False
    worker_job_timeout_s: PositiveNumber = 600.0  # a job running longer marks its worker hung
    worker_ready_timeout_s: PositiveNumber = 120.0  # boot (import torch, init CUDA) must finish by then
    max_worker_restarts: NonNegativeInt = 1  # restarts per device before falling back to subprocesses
    worker_repromote_after_s: PositiveNumber = 60.0  # a fallen-back slot tries a fresh worker after this (x2 each time)
    max_worker_repromotions: NonNegativeInt = 3  # then the slot stays in the fallback; 0: never re-promote
    max_fault_reruns: NonNegativeInt = 50  # re-runs of jobs hit by infrastructure faults, per run (all slots)
    # ... and per job (a poisoned job spends at most a fifth of the run's); past either, its trial fails
    max_job_reruns: NonNegativeInt = 10
    max_consecutive_failed_trials: NonNegativeInt = 10  # failed trials are replaced; this many in a row stop the run
    fuse_folds: bool = False  # train a trial's K folds in one batched pass
    trials_in_flight: NonNegativeInt = 0  # trials per ask/run/tell batch; 0: two per device slot
    heartbeat_interval_s: PositiveNumber = 30.0  # a running trial's Optuna heartbeat period
    heartbeat_grace_s: PositiveNumber = 120.0  # no heartbeat this long: its process is dead; fail and re-run it
    storage_outage_s: PositiveNumber = 300.0  # how long a process waits for an unreachable study database (then exit 1)
    pruner: Pruner = "none"  # fold-level pruning of hopeless trials (PRUNER_NAMES)
    # Variables every worker and one-shot trainer is started with (e.g. a ROCm rig's
    # {"HSA_OVERRIDE_GFX_VERSION": "10.3.0", "HSA_ENABLE_SDMA": "0"}); values are literal strings.
    device_env: DeviceEnv = field(default_factory=dict)
    worker_spawn_stagger_s: NonNegativeNumber = 0.0  # seconds between a host's worker starts (restarts too); ROCm rigs: 4
    # Share of the host's available memory its workers leave free: where the slots' workers may
    # not fit, one boots first and is measured, and only as many more start as the rest holds.
    host_memory_headroom: Fraction = 0.2


@dataclass(frozen=True)
class WatcherPolicy:
    """The ``watcher`` section: how the WATCHER runs and judges a step."""

    step_timeout_s: PositiveNumber = 7200.0  # the whole step subprocess, workers included
    max_retries: NonNegativeInt = 1  # re-runs of a step that crashed (a critical model: training_diagnostics)
    retry_trials_multiplier: PositiveNumber = 1.0  # a retry runs trials * this (>= 1)
    retry_seed_increment: NonNegativeInt = 1  # a retry runs with seed + this, so it really explores anew
    kill_grace_s: PositiveNumber = 10.0  # on timeout / Ctrl-C: SIGTERM the step's group, SIGKILL after this long


#: Which way each metric is worse, for ``training_diagnostics.metric_bounds`` (a value at or beyond
#: a bound has that severity, as in the pipeline's health check): the pipeline's five names
#: (``overfit_ratio`` is its "val loss / train loss"), then the sidecar's other ``training_metrics``.
WORSE_ABOVE, WORSE_BELOW = "above", "below"
METRIC_DIRECTIONS: dict[str, str] = {
    "overfit_ratio": WORSE_ABOVE,
    "early_stop_ratio": WORSE_BELOW,
    "nn_dead_neuron_pct": WORSE_ABOVE,
    "nn_gradient_spread_ratio": WORSE_ABOVE,
    "unused_feature_pct": WORSE_ABOVE,
    **{f"{part}_r2": WORSE_BELOW for part in ("cv", "train", "val", "test")},
    **{f"{part}_mse": WORSE_ABOVE for part in ("train", "val", "test")},
}


#: The values each metric the sidecar measures can take at all (by its ``training_metrics`` key): R² is at
#: most 1; errors, their spread and the MSE ratio at least 0; ``early_stop_ratio`` is a share of the rounds.
#: A rule every possible value breaks, or a critical bound every value reaches (``min_cv_r2`` 2 for 0.2,
#: an ``overfit_ratio`` critical of 0 meant as "off"), rejects every model: each run would be retried in
#: vain and then count against its model type in the skip registry. It is a policy error instead.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **{key: (-math.inf, 1.0) for key in ("cv_r2_mean", "train_r2", "val_r2", "test_r2")},
    **{key: (0.0, math.inf) for key in ("cv_r2_std", "train_mse", "val_mse", "test_mse", "overfit_ratio")},
    "early_stop_ratio": (0.0, 1.0),
}


def impossible_limit(metric: str, limit: float, *, rejects_below: bool, at_the_limit: bool) -> str | None:
    """Why no value of ``metric`` could pass a limit (None when some can): one that rejects values below it
    (``rejects_below``) or above it, the limit itself included when ``at_the_limit``."""
    low, high = METRIC_RANGES.get(metric_key(metric), (-math.inf, math.inf))
    if rejects_below:
        if limit > high or (at_the_limit and limit == high):
            return f"{metric} is at most {high:g}, so no model can pass it"
    elif limit < low or (at_the_limit and limit == low):
        return f"{metric} is at least {low:g}, so no model can pass it"
    return None


@dataclass(frozen=True)
class MetricBound:
    """One ``training_diagnostics.metric_bounds`` entry: a metric's warning and critical levels, and which way is worse."""

    metric: str
    warning: float | None
    critical: float | None
    worse: str  # WORSE_ABOVE | WORSE_BELOW

    def severity(self, value: float) -> str:
        """``ok`` | ``warning`` | ``critical`` for one measured value."""
        def reached(bound: float | None) -> bool:
            return bound is not None and (value >= bound if self.worse == WORSE_ABOVE else value <= bound)

        return "critical" if reached(self.critical) else "warning" if reached(self.warning) else "ok"


def metric_key(metric: str) -> str:
    """The sidecar's ``training_metrics`` key of a policy metric name (``cv_r2`` is the CV mean)."""
    return "cv_r2_mean" if metric == "cv_r2" else metric


def bound_breaches(metrics: Mapping[str, Any], diagnostics: "DiagnosticsPolicy") -> list[tuple[str, str]]:
    """``(severity, description)`` of every bound a model's ``training_metrics`` reach (warning or
    critical); bounds on metrics it does not carry are not judged, nor any when ``enabled`` is false."""
    if not diagnostics.enabled or not isinstance(metrics, Mapping):
        return []
    out = []
    for bound in diagnostics.metric_bounds.values():
        value = metrics.get(metric_key(bound.metric))
        level = bound.severity(float(value)) if is_number(value) else "ok"
        if level != "ok":
            op = ">=" if bound.worse == WORSE_ABOVE else "<="
            limit = bound.critical if level == "critical" else bound.warning
            out.append((level, f"{bound.metric} {float(value):.4g} {op} {level} bound {limit:g}"))
    return out


#: The pipeline's default bounds, used when the file has no ``metric_bounds``.
DEFAULT_METRIC_BOUNDS: dict[str, MetricBound] = {
    b.metric: b for b in (
        MetricBound("nn_dead_neuron_pct", 25.0, 50.0, WORSE_ABOVE),
        MetricBound("nn_gradient_spread_ratio", 100.0, 1000.0, WORSE_ABOVE),
        MetricBound("overfit_ratio", 1.3, 1.5, WORSE_ABOVE),
        MetricBound("early_stop_ratio", 0.3, 0.15, WORSE_BELOW),
        MetricBound("unused_feature_pct", 40.0, 70.0, WORSE_ABOVE),
    )
}


@dataclass(frozen=True)
class DiagnosticsPolicy:
    """The ``training_diagnostics`` section, as far as Step 5 reads it (the pipeline's schema)."""

    enabled: bool = True  # false: the WATCHER judges no metric bounds
    metric_bounds: Mapping[str, MetricBound] = field(default_factory=lambda: dict(DEFAULT_METRIC_BOUNDS))
    max_consecutive_critical: int = 3  # model_skip_rules: this many critical results in a row skip a model type
    skip_duration_hours: float = 24.0  # model_skip_rules: ... for this long after its last critical result
    max_critical_retries: int = 2  # severity_thresholds.critical.max_retries: re-runs of a critical result


@dataclass(frozen=True)
class Policy:
    """The whole policy file, validated."""

    training: TrainingPolicy = field(default_factory=TrainingPolicy)
    watcher: WatcherPolicy = field(default_factory=WatcherPolicy)
    training_diagnostics: DiagnosticsPolicy = field(default_factory=DiagnosticsPolicy)
    acceptance_rules: dict[str, float] = field(default_factory=dict)  # acceptance_rules.step5
    source: str | None = None  # the file it was read from, for messages and the sidecar
    raw: dict[str, Any] = field(default_factory=dict)


def _check_section(raw: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: `{name}` must be an object, got {type(section).__name__}")
    return section


def _typed(raw: dict[str, Any], name: str, cls: type, source: str) -> Any:
    """Section ``name`` as its dataclass: keys typed by the fields, unknown keys an error, absent ones defaulted."""
    section = without_comments(_check_section(raw, name, source))
    values = present(convert(section, record_schema(cls, required=False), source=source, at=name, quote=False))
    if "device_env" in values:
        for var, value in values["device_env"].items():
            problem = device_env_problem(var, value)
            if problem is not None:
                raise PolicyError(f"{source}: {name}.device_env.{var} {problem}")
    return cls(**values)


#: The longest duration a ``training`` or ``watcher`` key may give, in seconds (about 31 years). Step 5
#: waits on these with threading and queue calls, which raise OverflowError past ``threading.TIMEOUT_MAX``
#: (about 292 years): a policy that says "never time out" with 1e10 would end the run in a traceback
#: (and the WATCHER logged a ``kill_grace_s`` of 1e300 as a 300-digit number).
MAX_DURATION_S = 1e9


def _check_durations(section: TrainingPolicy | WatcherPolicy, name: str, source: str) -> None:
    for f in fields(section):
        value = getattr(section, f.name)
        if f.name.endswith("_s") and value > MAX_DURATION_S:
            raise PolicyError(f"{source}: {name}.{f.name} must be at most {MAX_DURATION_S:g} seconds (about 31 "
                              f"years), got {value:g}")


#: The most trials one batch asks (``training.trials_in_flight``, ``--trials-in-flight``, ``--fuse-trials``):
#: they are all asked from the study before any of them trains, so a count far past any use hung the run.
MAX_BATCH_TRIALS = 1024
BATCH_TRIALS_REASON = "a batch's trials are all asked from the study before any of them trains"


#: The largest ``watcher.retry_trials_multiplier``: step 5 takes at most MAX_INT trials, which a retry
#: never passes; a bigger multiplier could only ever run that many, until ``watcher.step_timeout_s`` stops it.
MAX_RETRY_TRIALS_MULTIPLIER = float(MAX_INT)


#: The top-level sections Step 5 reads; the pipeline's file holds many others.
POLICY_SECTIONS = ("training", "watcher", "training_diagnostics", "acceptance_rules")
#: The part of ``acceptance_rules`` that is Step 5's.
ACCEPTANCE_KEY = "step5"
_FLAT_DIAGNOSTICS_KEY = re.compile(r"^(min|max)_[a-z0-9_]+$")


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


#: Where each :class:`DiagnosticsPolicy` value is in the pipeline's ``training_diagnostics``, and its
#: type; every other key there (descriptions, log levels, actions) is the pipeline's and left alone.
_DIAGNOSTICS_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "enabled": (("enabled",), bool),
    "max_consecutive_critical": (("model_skip_rules", "max_consecutive_critical"),
                                 Annotated[int, Meta(ge=1, description="an int >= 1")]),
    "skip_duration_hours": (("model_skip_rules", "skip_duration_hours"), PositiveNumber),
    "max_critical_retries": (("severity_thresholds", "critical", "max_retries"), NonNegativeInt),
}


class _BoundLevels(msgspec.Struct):
    warning: Number | UnsetType = UNSET
    critical: Number | UnsetType = UNSET


_Bound = Annotated[_BoundLevels, Meta(description='an object like {"warning": 1.3, "critical": 1.5}')]


def _metric_bounds(section: dict[str, Any], source: str) -> dict[str, MetricBound]:
    bounds: dict[str, MetricBound] = {}
    at = "training_diagnostics.metric_bounds"
    for metric, levels in convert_map(section, _Bound, source=source, at=at, quote=False).items():
        warning, critical = (None if v is UNSET else v for v in (levels.warning, levels.critical))
        if warning is None and critical is None:
            raise PolicyError(f"{source}: {at}.{metric} needs a `warning` or a `critical` bound (or both)")
        worse = METRIC_DIRECTIONS.get(metric)
        if worse is None:  # a metric of the pipeline's that Step 5 does not know: its bounds say which way
            worse = WORSE_BELOW if warning is not None and critical is not None and critical < warning else WORSE_ABOVE
        elif warning is not None and critical is not None and (
                critical < warning if worse == WORSE_ABOVE else critical > warning):
            raise PolicyError(
                f"{source}: {at}.{metric}: `critical` {critical:g} is less severe than `warning` {warning:g} "
                f"({metric} is worse {'higher' if worse == WORSE_ABOVE else 'lower'})"
            )
        if critical is not None:
            impossible = impossible_limit(metric, critical, rejects_below=worse == WORSE_BELOW, at_the_limit=True)
            if impossible is not None:
                raise PolicyError(f"{source}: {at}.{metric}.critical {critical:g} is reached by every value: "
                                  f"{impossible}")
        bounds[metric] = MetricBound(metric, warning, critical, worse)
    return bounds


def _diagnostics(raw: dict[str, Any], source: str) -> DiagnosticsPolicy:
    section = _check_section(raw, "training_diagnostics", source)
    flat = sorted(k for k in section if _FLAT_DIAGNOSTICS_KEY.match(k))
    if flat:
        raise PolicyError(
            f"{source}: training_diagnostics: {', '.join(flat)}: flat threshold keys are no longer read; write "
            f"them as metric_bounds entries, e.g. \"metric_bounds\": {{\"overfit_ratio\": {{\"warning\": 1.3, "
            f"\"critical\": 1.5}}}} (docs/compatibility.md)"
        )
    values: dict[str, Any] = {}
    for name, (path, kind) in _DIAGNOSTICS_KEYS.items():
        node, at = section, "training_diagnostics"
        for key in path[:-1]:
            at = f"{at}.{key}"
            node = convert(node.get(key, {}), dict, source=source, at=at, quote=False)
        if path[-1] in node:
            values[name] = convert(node[path[-1]], kind, source=source, at=f"{at}.{path[-1]}", quote=False)
    if "metric_bounds" in section:
        values["metric_bounds"] = _metric_bounds(section["metric_bounds"], source)
    return DiagnosticsPolicy(**values)


def parse_policy(raw: Any, source: str = "<policy>") -> Policy:
    """Validate an already-parsed policy object."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the policy must be a JSON object, got {type(raw).__name__}")
    _refuse_misspelt_sections(raw, source)
    try:  # a SchemaError is a key of the wrong type, named by step5.schema in the policy's words
        training = _typed(raw, "training", TrainingPolicy, source)
        watcher = _typed(raw, "watcher", WatcherPolicy, source)
        if watcher.retry_trials_multiplier < 1:
            raise PolicyError(f"{source}: watcher.retry_trials_multiplier must be >= 1, "
                              f"got {watcher.retry_trials_multiplier}")
        if watcher.retry_trials_multiplier > MAX_RETRY_TRIALS_MULTIPLIER:
            raise PolicyError(f"{source}: watcher.retry_trials_multiplier must be at most "
                              f"{MAX_RETRY_TRIALS_MULTIPLIER:g} (step 5's largest --trials: a bigger one gives even "
                              f"a 1-trial run's first retry more), got {watcher.retry_trials_multiplier:g}")
        if training.heartbeat_grace_s <= training.heartbeat_interval_s:
            raise PolicyError(
                f"{source}: training.heartbeat_grace_s ({training.heartbeat_grace_s}) must exceed "
                f"training.heartbeat_interval_s ({training.heartbeat_interval_s}), or a live trial would look dead"
            )
        _check_durations(training, "training", source)
        _check_durations(watcher, "watcher", source)
        if training.trials_in_flight > MAX_BATCH_TRIALS:
            raise PolicyError(f"{source}: training.trials_in_flight must be at most {MAX_BATCH_TRIALS} "
                              f"({BATCH_TRIALS_REASON}), got {training.trials_in_flight}")
        if training.max_consecutive_failed_trials < 1:
            raise PolicyError(f"{source}: training.max_consecutive_failed_trials must be >= 1, "
                              f"got {training.max_consecutive_failed_trials}")
        rules = _check_section(raw, "acceptance_rules", source).get(ACCEPTANCE_KEY, {})
        acceptance = convert_map(rules, Number, source=source, at=f"acceptance_rules.{ACCEPTANCE_KEY}", quote=False)
        diagnostics = _diagnostics(raw, source)
        retries = watcher.max_retries + diagnostics.max_critical_retries
        if retries >= MAX_INT:  # the decision log records each attempt's number (a traceback at its first record)
            raise PolicyError(f"{source}: the policy allows {retries} retries (watcher.max_retries "
                              f"{watcher.max_retries} + training_diagnostics.severity_thresholds.critical.max_retries "
                              f"{diagnostics.max_critical_retries}), more attempts than the decision log can count "
                              f"({MAX_INT})")
        return Policy(training, watcher, diagnostics, acceptance, source, raw)
    except SchemaError as exc:
        raise PolicyError(str(exc)) from None


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
