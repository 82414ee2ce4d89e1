"""Judging one run of a step: exit code + sidecar + policy -> a decision with reasons.

PROCEED (exit 0), RETRY (never final: the step is re-run), DEGENERATE (2), SKIP_MODEL (3) or
ESCALATE (4); a model breaking an ``acceptance_rules.step5`` rule or reaching a critical
``training_diagnostics.metric_bounds`` bound is a *critical* result. docs/watcher.md
("Decisions and exit codes") has the table, the rules and the retries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from step5.artifacts import MODEL_TYPES, TRAINING_METRIC_KEYS, get_model_type, resolve_checkpoint, validate_sidecar
from step5.errors import EXIT_ESCALATE, EXIT_OK, EXIT_SKIP_MODEL, DataError, DegenerateSignalError, PolicyError, \
    UsageError
from step5.jsonio import loads
from step5.policy import METRIC_RANGES, DiagnosticsPolicy, Policy, bound_breaches, impossible_limit, \
    metric_key
from step5.values import finite_or_none
from step5.watcher.process import StepRun
from step5.watcher.steps import StepSpec


class Decision(str, Enum):
    PROCEED = "PROCEED"
    RETRY = "RETRY"
    SKIP_MODEL = "SKIP_MODEL"
    ESCALATE = "ESCALATE"
    DEGENERATE = "DEGENERATE"


EXIT_CODES: dict[Decision, int] = {
    Decision.PROCEED: EXIT_OK,
    Decision.DEGENERATE: DegenerateSignalError.exit_code,
    Decision.SKIP_MODEL: EXIT_SKIP_MODEL,
    Decision.ESCALATE: EXIT_ESCALATE,
}

# Metric names the policy may use -> key in the sidecar's ``training_metrics``. ``cv_r2`` is
# the short name the acceptance rules use (``min_cv_r2``) for the CV mean.
METRIC_KEYS: dict[str, str] = {name: metric_key(name) for name in ("cv_r2", *TRAINING_METRIC_KEYS)}
_RULE_RE = re.compile(r"^(min|max)_([a-z0-9_]+)$")

#: What identifies one version of a file: (inode, size, mtime in ns). Taken before a run and
#: compared after it, it tells whether the run wrote the file, with no clock slack to tune.
FileSignature = tuple[int, int, int]


@dataclass(frozen=True)
class Threshold:
    """One acceptance rule from the policy."""

    key: str  # as written in the policy, e.g. "min_cv_r2"
    metric: str  # e.g. "cv_r2"
    bound: str  # "min" | "max"
    value: float

    def breached(self, x: float) -> bool:
        return x < self.value if self.bound == "min" else x > self.value

    def describe(self, x: float) -> str:
        return f"{self.metric} {x:.4g} {'<' if self.bound == 'min' else '>'} {self.key} {self.value:g}"


def thresholds_for(policy: Policy, step: StepSpec) -> list[Threshold]:
    """The step's acceptance rules; a :class:`PolicyError` for a key that would otherwise
    be silently ignored (a typo in a metric name)."""
    where = f"{policy.source or '<policy>'}: acceptance_rules.{step.acceptance_key}"
    out = []
    for key, value in policy.acceptance_rules.items():
        m = _RULE_RE.match(key)
        if m is None:
            raise PolicyError(f"{where}.{key}: expected min_<metric> or max_<metric>")
        bound, metric = m.groups()
        if metric not in METRIC_KEYS:
            raise PolicyError(f"{where}.{key}: unknown metric `{metric}`; known: {sorted(METRIC_KEYS)}")
        impossible = impossible_limit(metric, float(value), rejects_below=bound == "min", at_the_limit=False)
        if impossible is not None:  # every run would be retried in vain, then skipped
            raise PolicyError(f"{where}.{key} {float(value):g}: {impossible}")
        out.append(Threshold(key, metric, bound, float(value)))
    return out


@dataclass
class ModelVerdict:
    """How one model type's metrics fare against the thresholds."""

    model_type: str
    critical: bool
    reasons: list[str] = field(default_factory=list)  # why critical, or why accepted
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # acceptance rules that could not be checked

    def summary(self) -> str:
        return "; ".join(self.reasons) or ("critical" if self.critical else "ok")


def assess_metrics(model_type: str, metrics: Any, thresholds: list[Threshold],
                   diagnostics: DiagnosticsPolicy) -> ModelVerdict:
    """Apply the acceptance rules and the diagnostics' metric bounds to one model's ``training_metrics``."""
    verdict = ModelVerdict(model_type, critical=False)
    passed = []
    for t in thresholds:
        x = finite_or_none(metrics.get(METRIC_KEYS[t.metric])) if isinstance(metrics, dict) else None
        if x is None:
            verdict.missing.append(f"cannot check {t.key}: training_metrics.{METRIC_KEYS[t.metric]} is not a number")
        elif t.breached(x):
            verdict.critical = True
            verdict.reasons.append(f"{model_type}: {t.describe(x)}")
        else:
            passed.append(f"{t.metric} {x:.4g} within {t.key} {t.value:g}")
    for level, description in bound_breaches(metrics, diagnostics):
        if level == "critical":
            verdict.critical = True
            verdict.reasons.append(f"{model_type}: {description}")
        else:
            verdict.warnings.append(f"{model_type}: {description}")
    if not verdict.critical:
        verdict.reasons = [f"{model_type} accepted: " + (", ".join(passed) or "no acceptance rules")]
    return verdict


@dataclass
class Judgement:
    """The decision about one run, with everything the log and the registry need."""

    decision: Decision
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)
    sidecar: dict[str, Any] | None = None
    verdicts: dict[str, ModelVerdict] = field(default_factory=dict)  # model type -> result to record
    skipped_models: list[str] = field(default_factory=list)  # left out of a compare run by the registry

    @property
    def final(self) -> bool:
        return self.decision is not Decision.RETRY


def file_signature(path: Path) -> FileSignature | None:
    """The file's current version, or None when there is no file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_fresh(path: Path, before: FileSignature | None, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object *this* run wrote at ``path`` (its signature is not ``before``), or why there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, f"no {what} at {path}"
    except OSError as exc:
        return None, f"cannot read {what} {path}: {exc}"
    if file_signature(path) == before:
        return None, f"the {what} {path} is the one from before this run: the step did not write one"
    try:
        obj = loads(raw)
    except ValueError as exc:
        return None, f"{what} {path} is not valid JSON: {exc}"
    if not isinstance(obj, dict):
        return None, f"{what} {path} must be a JSON object, got {type(obj).__name__}"
    return obj, None


def _entry_metrics(model_type: str, entry: dict[str, Any], run_id: str | None) -> tuple[Any, str | None]:
    """A compare entry's ``training_metrics``: inline, or from the sidecar it points to (the
    winner's, or the archived one of a model that lost), and why a sidecar's are not this model's
    from this run (None when they are). A sidecar of another model type, or one written for
    another ``--parent-run-id``, would give this model type a verdict it never earned."""
    if isinstance(entry.get("training_metrics"), dict):
        return entry["training_metrics"], None
    path = entry.get("sidecar_path")
    sidecar, _ = _read_fresh(Path(path), None, "sidecar") if isinstance(path, str) and path else (None, None)
    if sidecar is None:
        return None, None
    if sidecar.get("model_type") != model_type:
        return None, f"its sidecar {path} is of model type {sidecar.get('model_type')!r}"
    provenance = sidecar.get("provenance")
    written_for = provenance.get("parent_run_id") if isinstance(provenance, dict) else None
    if run_id is not None and written_for is not None and written_for != run_id:
        return None, f"its sidecar {path} belongs to run {written_for!r}, not this run {run_id!r}"
    return sidecar.get("training_metrics"), None


def compare_verdicts(
    summary_path: Path, before: FileSignature | None, thresholds: list[Threshold], diagnostics: DiagnosticsPolicy,
    promoted: str | None = None, run_id: str | None = None,
) -> tuple[dict[str, ModelVerdict], list[str], list[str]]:
    """(verdicts, skipped model types, notes) for every model a compare run trained, from its
    fresh summary file: ``{"models": {type: {...}}}`` (what :mod:`step5.optimizer.compare`
    writes) or ``{"models": [{"model_type": type, ...}]}``. A model the run skipped has no
    new result, and a degenerate one is the data's fault: neither is recorded. A failed one is critical.
    ``promoted``: the model type of the run's sidecar; a summary naming another ``winner`` is not this
    run's comparison (another run's, sharing the working directory's summary) and records nothing.
    ``run_id``: the run's ``--parent-run-id``, which an archived sidecar must carry."""
    summary, why = _read_fresh(summary_path, before, "compare summary")
    if summary is None:
        return {}, [], [f"{why}; only the best model's result is recorded"]
    winner = summary.get("winner")
    if promoted is not None and isinstance(winner, str) and winner != promoted:
        return {}, [], [f"compare summary {summary_path} names winner {winner!r} but the run's sidecar is of "
                         f"model type {promoted!r}: it is not this run's comparison; only the best model's "
                         "result is recorded"]
    models = summary.get("models")
    if isinstance(models, list):
        models = {e["model_type"]: e for e in models if isinstance(e, dict) and isinstance(e.get("model_type"), str)}
    entries = {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}
    verdicts: dict[str, ModelVerdict] = {}
    skipped: list[str] = []
    notes: list[str] = []
    for model_type, entry in sorted(entries.items()):
        if model_type not in MODEL_TYPES:  # a registry entry for it would be junk ("" raised in record_result)
            notes.append(f"compare summary {summary_path}: {model_type!r} is not a model type; its entry is ignored")
            continue
        status = str(entry.get("status", "SUCCESS")).upper()
        if status == "SKIPPED":
            skipped.append(model_type)
        elif status in ("FAILED", "ERROR"):
            why = entry.get("error") or status
            verdicts[model_type] = ModelVerdict(model_type, True, [f"{model_type} failed in the compare run: {why}"])
        elif status == "SUCCESS":
            metrics, foreign = _entry_metrics(model_type, entry, run_id)
            verdict = assess_metrics(model_type, metrics, thresholds, diagnostics)
            if foreign is not None:
                notes.append(f"{model_type}: {foreign}; its result is not recorded")
            elif verdict.missing:
                notes.append(f"{model_type}: no metrics in {summary_path}; its result is not recorded")
            else:
                verdicts[model_type] = verdict
    return verdicts, skipped, notes


#: Slack for float rounding when a metric is checked against the range it can take.
_RANGE_SLACK = 1e-9


def _impossible_metrics(metrics: dict[str, Any]) -> list[str]:
    """The metrics a model cannot have (an R² above 1, a negative MSE or ratio, an early-stop ratio past 1):
    the sidecar's shape check takes any finite number, and such a value passed every rule (PROCEED)."""
    out = []
    for key, (low, high) in METRIC_RANGES.items():
        x = finite_or_none(metrics.get(key))
        if x is not None and not low - _RANGE_SLACK <= x <= high + _RANGE_SLACK:
            out.append(f"`training_metrics.{key}` is {x:g}, which no model can have ({key} is "
                       + (f"at most {high:g})" if x > high else f"at least {low:g})"))
    return out


def judge(run: StepRun, *, step: StepSpec, policy: Policy, sidecar_path: Path, summary_path: Path | None,
          can_retry: bool, can_retry_critical: bool | None = None, sidecar_before: FileSignature | None = None,
          summary_before: FileSignature | None = None, run_id: str | None = None,
          expect_persistent_workers: bool | None = None) -> Judgement:
    """Decide about one run. ``can_retry``: a crashed step may still be re-run;
    ``can_retry_critical`` (default: the same): a rejected model may; when not, the problem
    is final (ESCALATE for a crash, SKIP_MODEL for a model below the rules). ``*_before``:
    the files' signatures just before the run, so a file left by an earlier run is never
    judged as this run's. ``run_id``: what the step was given as ``--parent-run-id``."""
    if run.interrupted:
        return Judgement(Decision.ESCALATE, [f"interrupted by {run.interrupted}; the step's process group was stopped"])
    if run.timed_out:
        return Judgement(Decision.ESCALATE, [f"step {step.number} timed out after {policy.watcher.step_timeout_s:g}s "
                                             "(watcher.step_timeout_s); its process group was stopped"])
    rc = run.returncode
    degenerate = DegenerateSignalError.exit_code
    lines = [line for line in run.output_tail if line.strip()]
    tail_hint = f": {lines[-1]}" if lines else ""
    if rc == UsageError.exit_code:
        return Judgement(Decision.ESCALATE, [f"step {step.number} rejected its command line (exit {rc}){tail_hint}"])
    if rc not in (EXIT_OK, degenerate):
        reason = f"step {step.number} failed with {run.exit_status}{tail_hint}"
        return Judgement(Decision.RETRY if can_retry else Decision.ESCALATE, [reason])

    sidecar, why = _read_fresh(sidecar_path, sidecar_before, "sidecar")
    if sidecar is None:
        return Judgement(Decision.ESCALATE, [f"step {step.number} exited {rc} but {why}"])

    def escalate(*reasons: str) -> Judgement:
        return Judgement(Decision.ESCALATE, list(reasons), sidecar=sidecar)

    problems = validate_sidecar(sidecar)  # the optimizer's own definition: the two cannot drift
    if problems:
        return escalate(*(f"invalid sidecar {sidecar_path}: {p}" for p in problems))
    # Valid from here on: every block below is there with its type.
    written_for = sidecar["provenance"]["parent_run_id"]
    if run_id is not None and written_for is not None and written_for != run_id:
        return escalate(f"sidecar {sidecar_path} belongs to run {written_for!r}, not this run {run_id!r}")
    outcome, sq, execution = sidecar["outcome"], sidecar["signal_quality"], sidecar["execution"]
    if rc == degenerate:
        if outcome != "DEGENERATE_SIGNAL":
            return escalate(f"step {step.number} exited {rc} (degenerate) but the sidecar's outcome is {outcome!r}")
        return Judgement(Decision.DEGENERATE, [
            f"target has no usable signal (signal_status={sq.get('signal_status')!r}, "
            f"unique_target_values={sq.get('unique_target_values')!r}); no model was trained"
        ], sidecar=sidecar)
    if outcome != "SUCCESS":
        return escalate(f"step {step.number} exited 0 but the sidecar's outcome is {outcome!r}")
    impossible = _impossible_metrics(sidecar["training_metrics"])
    if impossible:  # a damaged sidecar (or a broken step): its metrics say nothing about the model
        return escalate(*(f"invalid sidecar {sidecar_path}: {p}" for p in impossible))
    try:
        checkpoint_exists = resolve_checkpoint(sidecar_path, sidecar).is_file()
    except DataError:
        checkpoint_exists = False
    if not checkpoint_exists:
        return escalate(f"sidecar {sidecar_path} names checkpoint {sidecar.get('checkpoint_path')!r}, "
                        "which does not exist")

    thresholds = thresholds_for(policy, step)
    model_type = str(sidecar["model_type"])
    verdict = assess_metrics(model_type, sidecar["training_metrics"], thresholds, policy.training_diagnostics)
    # A valid SUCCESS sidecar has every metric but ``overfit_ratio`` (null when the train MSE
    # is 0): a rule on an undefined metric is noted, not a reason to stop the pipeline.
    warnings = verdict.missing + verdict.warnings
    if sq.get("signal_status") == "weak":
        warnings.append("signal_quality.signal_status is 'weak'")
    mode = execution.get("mode")
    if expect_persistent_workers and get_model_type(model_type).torch and mode != "persistent_workers":
        warnings.append(f"persistent workers were asked for but the step ran in mode {mode!r}")
    if execution.get("fallbacks"):
        warnings.append(f"worker fallbacks during the run: {execution.get('fallbacks')!r}")
    for kind, what in (("startup", "retired: no trainer could set up torch or its device there"),
                       ("memory", "left idle: the host's memory held no worker for them")):
        slots = [f"{f['slot']} ({f['error']})" for f in execution["faults"] if f["kind"] == kind]
        if slots:
            warnings.append(f"slot(s) {what}: {'; '.join(slots)}")

    verdicts = {model_type: verdict}
    skipped: list[str] = []
    if summary_path is not None:
        others, skipped, notes = compare_verdicts(summary_path, summary_before, thresholds,
                                                 policy.training_diagnostics, model_type, run_id)
        warnings += notes
        for other_type, other in others.items():
            if other_type != model_type:
                verdicts[other_type] = other
                warnings += other.warnings
    decision = Decision.PROCEED
    if verdict.critical:
        retry = can_retry if can_retry_critical is None else can_retry_critical
        decision = Decision.RETRY if retry else Decision.SKIP_MODEL
    return Judgement(decision, verdict.reasons, warnings, sidecar, verdicts, skipped)
