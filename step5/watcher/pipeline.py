"""The WATCHER's loop: for each step in range, run -> judge -> log -> (retry | stop | go on).

::

    params ──validate──> argv ──run_in_group──> StepRun ──judge──> Judgement
                          ^                                          │
                          └── RETRY: trials * multiplier, seed + inc ┤ (a real re-run)
                                                                     ├─> decision log (every attempt)
                                                                     └─> skip registry (final only)

Only a final decision updates the skip registry: retries are the WATCHER's own attempt to
fix a run, the registry counts what a pipeline run finally got from a model type. Process
failures (crash, timeout, usage error) and degenerate data are not the model type's fault
and are not recorded there.
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from step5.artifacts import compare_summary_path
from step5.errors import EXIT_INTERRUPTED, Step5Error, UsageError
from step5.lifeline import SUPERVISOR_PID_ENV
from step5.jsonio import dumps
from step5.launch import child_environment
from step5.policy import Policy, load_policy
from step5.values import utc_timestamp
from step5.watcher.decision_log import append_decision
from step5.watcher.judge import (
    EXIT_CODES,
    Decision,
    Judgement,
    file_signature,
    judge,
    thresholds_for,
)
from step5.watcher.process import StepRun, run_in_group
from step5.watcher.registry import DEFAULT_REGISTRY_PATH, load_skip_registry, record_result
from step5.watcher.steps import (
    StepSpec,
    build_command,
    effective,
    manifest_defaults,
    retry_params,
    steps_in_range,
    validate_params,
)

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """The final word on one step."""

    step: int
    decision: Decision
    attempts: int
    judgement: Judgement
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else EXIT_CODES[self.decision]


def step_env() -> dict[str, str]:
    """The step's environment: ours, with this step5 importable (:mod:`step5.launch`) and
    our pid as its supervisor, so the step stops if the WATCHER dies without stopping it."""
    env = child_environment()
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


def load_checked_policy(path: str, steps: list[StepSpec]) -> Policy:
    """Load the policy and check the thresholds every step in range will be judged by, so a
    typo in a rule fails now rather than being ignored after an hour of training."""
    policy = load_policy(path)
    for step in steps:
        thresholds_for(policy, step)
    return policy


def _record(
    *,
    run_id: str,
    step: StepSpec,
    attempt: int,
    max_attempts: int,
    params: dict[str, Any],
    policy_path: str,
    persistent_workers: bool,
    run: StepRun,
    judgement: Judgement,
    registry: dict[str, Any],
    sidecar_path: Path,
) -> dict[str, Any]:
    sidecar = judgement.sidecar or {}
    execution = sidecar.get("execution") if isinstance(sidecar.get("execution"), dict) else {}
    record: dict[str, Any] = {
        "timestamp": utc_timestamp(milliseconds=True),
        "run_id": run_id,
        "step": step.number,
        "step_name": step.name,
        "attempt": attempt,
        "max_attempts": max_attempts,
        "decision": judgement.decision.value,
        "final": judgement.final,
        "reasons": judgement.reasons,
        "warnings": judgement.warnings,
        "exit_code": run.returncode,
        "exit_status": run.exit_status,
        "timed_out": run.timed_out,
        "duration_s": run.duration_s,
        "leftover_processes": run.leftovers,
        "command": run.command,
        "params": params,
        "policy": policy_path,
        "use_persistent_workers": persistent_workers,
        "sidecar": str(sidecar_path),
        "model_type": sidecar.get("model_type"),
        "outcome": sidecar.get("outcome"),
        "training_metrics": sidecar.get("training_metrics"),
        "execution_mode": execution.get("mode"),
        "skipped_models": judgement.skipped_models,
        "registry": registry,
    }
    if judgement.decision in (Decision.ESCALATE, Decision.RETRY) and run.output_tail:
        record["output_tail"] = run.output_tail[-15:]
    return record


def run_step(
    step: StepSpec,
    params: dict[str, Any],
    *,
    policy: Policy,
    policy_path: str,
    decision_log: Path,
    registry_path: Path,
    run_id: str,
    script: str | None = None,
    echo: bool = True,
) -> StepResult:
    """Run one step with the policy's retries; every attempt is a real new process.

    A crash is re-run up to ``watcher.max_retries`` times, a model the rules reject up to
    ``training_diagnostics.severity_thresholds.critical.max_retries`` times (the pipeline's
    own limit on training retries); the two are counted apart.
    """
    watcher = policy.watcher
    crash_retries_max = watcher.max_retries
    critical_retries_max = policy.training_diagnostics.max_critical_retries
    max_attempts = 1 + crash_retries_max + critical_retries_max
    params = dict(params)
    params.setdefault("parent_run_id", run_id)
    persistent = bool(params.get("persistent_workers", policy.training.use_persistent_workers))
    output_dir = Path(str(effective(step, params, "output_dir")))
    sidecar_path = output_dir / step.sidecar_name
    summary_path = compare_summary_path() if params.get("compare_models") else None
    attempt_params = params
    crash_retries = critical_retries = 0
    for attempt in range(1, max_attempts + 1):
        if attempt > 1:
            attempt_params = retry_params(
                step, params, attempt - 1,
                trials_multiplier=watcher.retry_trials_multiplier,
                seed_increment=watcher.retry_seed_increment,
            )
            logger.warning("step %d: retry %d with trials=%s seed=%s", step.number, attempt - 1,
                           attempt_params.get("trials"), attempt_params.get("seed"))
        command = build_command(step, attempt_params, policy_path=policy_path, script=script)
        logger.info("step %d attempt %d: %s", step.number, attempt, shlex.join(command))
        sidecar_before = file_signature(sidecar_path)
        summary_before = file_signature(summary_path) if summary_path is not None else None
        run = run_in_group(command, timeout_s=watcher.step_timeout_s, grace_s=watcher.kill_grace_s,
                           env=step_env(), echo=echo)
        judgement = judge(
            run, step=step, policy=policy, sidecar_path=sidecar_path, summary_path=summary_path,
            can_retry=crash_retries < crash_retries_max and not run.interrupted,
            can_retry_critical=critical_retries < critical_retries_max and not run.interrupted,
            run_id=params["parent_run_id"], sidecar_before=sidecar_before, summary_before=summary_before,
            expect_persistent_workers=persistent,
        )
        if judgement.decision is Decision.RETRY:
            if judgement.verdicts:
                critical_retries += 1
            else:
                crash_retries += 1
        registry: dict[str, Any] = {}
        if judgement.final:
            for model_type, verdict in judgement.verdicts.items():
                entry = record_result(registry_path, model_type, verdict.critical, verdict.summary(),
                                      policy.training_diagnostics)
                registry[model_type] = {
                    "critical": verdict.critical,
                    "consecutive_critical": entry["consecutive_critical"],
                    "skipped": entry["skipped"],
                }
        append_decision(decision_log, _record(
            run_id=run_id, step=step, attempt=attempt, max_attempts=max_attempts, params=attempt_params,
            policy_path=policy_path, persistent_workers=persistent, run=run, judgement=judgement,
            registry=registry, sidecar_path=sidecar_path,
        ))
        log = logger.info if judgement.decision is Decision.PROCEED else logger.warning
        log("step %d attempt %d: %s (%s) - %s", step.number, attempt,
            judgement.decision.value, run.exit_status, "; ".join(judgement.reasons))
        for warning in judgement.warnings:
            logger.warning("step %d: %s", step.number, warning)
        if judgement.final:
            return StepResult(step.number, judgement.decision, attempt, judgement, bool(run.interrupted))
    raise AssertionError("the last attempt always gives a final decision")  # pragma: no cover


def _with_manifest_defaults(step: StepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline manifest's default params for ``step`` (when the working directory has
    one), overridden key by key by ``params``."""
    defaults, path = manifest_defaults(step)
    if path is None:
        return params
    overridden = sorted(k for k in defaults if k in params)
    logger.info("step %d: default params from %s: %s%s", step.number, path, dumps(defaults).decode(),
                f" (--params override {', '.join(overridden)})" if overridden else "")
    return {**defaults, **params}


def run_pipeline(
    start: int,
    end: int,
    raw_params: Any,
    *,
    policy_path: str,
    decision_log: str | os.PathLike[str],
    registry_path: str | os.PathLike[str] = DEFAULT_REGISTRY_PATH,
    script: str | None = None,
    dry_run: bool = False,
    out: IO[str] | None = None,
    echo: bool = True,
) -> int:
    """Run steps ``start``..``end``; returns the exit code stating the decision.

    Everything that can be checked before running is: the steps exist, the params map, the
    policy is valid, a replacement ``script`` exists. Stops at the first step that does not PROCEED.
    ``out`` receives the CLI output: the commands (dry run) or one JSON line per step.
    """
    out = out or sys.stdout
    steps = steps_in_range(start, end)
    if not isinstance(raw_params, dict):
        raise UsageError(f"--params must be a JSON object, got {type(raw_params).__name__}")
    params_by_step = {s.number: validate_params(s, _with_manifest_defaults(s, raw_params), policy_path=policy_path)
                      for s in steps}
    policy = load_checked_policy(policy_path, steps)
    if script is not None and not Path(script).is_file():
        if not dry_run:
            raise Step5Error(f"step script not found: {script}")
        logger.warning("step script not found: %s", script)
    if dry_run:
        for s in steps:
            print(shlex.join(build_command(s, params_by_step[s.number], policy_path=policy_path, script=script)),
                  file=out, flush=True)
        return 0
    load_skip_registry(registry_path)  # a damaged registry is an error now, not after the run
    run_id = uuid.uuid4().hex[:12]
    logger.info("pipeline run %s: steps %d..%d, policy %s, decision log %s", run_id, start, end,
                policy_path, decision_log)
    for s in steps:
        result = run_step(s, params_by_step[s.number], policy=policy, policy_path=policy_path,
                          decision_log=Path(decision_log), registry_path=Path(registry_path),
                          run_id=run_id, script=script, echo=echo)
        j = result.judgement
        out.write(dumps({
            "run_id": run_id, "step": s.number, "decision": result.decision.value,
            "exit_code": result.exit_code, "attempts": result.attempts, "reasons": j.reasons,
            "warnings": j.warnings, "skipped_models": j.skipped_models, "decision_log": str(decision_log),
        }).decode() + "\n")
        out.flush()
        if result.interrupted or result.decision is not Decision.PROCEED:
            return result.exit_code
    return 0
