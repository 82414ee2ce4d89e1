"""``agents/watcher_agent.py``: the WATCHER's command line and its loop (docs/watcher.md).

For each step in range: validate the params -> run the step in its own process group ->
judge -> log the decision (every attempt) -> RETRY (a real re-run: more trials, new seed),
stop, or go on. Only a final decision updates the skip registry: retries are the WATCHER's
own attempt to fix a run, and process failures and degenerate data are not the model type's fault.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import IO, Any, Sequence

from step5.artifacts import SIDECAR_NAME, compare_summary_path
from step5.cliutil import UsageErrorParser, add_log_level, non_empty_path, non_negative_int
from step5.errors import EXIT_INTERRUPTED, EXIT_OK, Step5Error, UsageError
from step5.jsonio import dumps, loads
from step5.launch import child_environment
from step5.lifeline import SUPERVISOR_PID_ENV
from step5.policy import DEFAULT_POLICY_PATH, Policy, find_policy, load_policy
from step5.values import utc_timestamp
from step5.watcher.judge import EXIT_CODES, Decision, Judgement, file_signature, judge, thresholds_for
from step5.watcher.process import install_termination_as_interrupt, run_in_group
from step5.watcher.registry import (
    DEFAULT_DECISION_LOG, DEFAULT_REGISTRY_PATH, append_decision, check_writable, load_skip_registry, read_decisions,
    record_result, skipped_model_types,
)
from step5.watcher.steps import (
    StepSpec, build_command, effective, manifest_defaults, merge_manifest_defaults, retry_params, steps_in_range,
    validate_params,
)

logger = logging.getLogger("step5.watcher")


def step_env() -> dict[str, str]:
    """Ours, with this step5 importable and our pid as the step's supervisor (it stops if we die)."""
    env = child_environment()
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


def run_step(step: StepSpec, params: dict[str, Any], *, policy: Policy, policy_path: str, decision_log: Path,
             run_id: str, script: str | None, echo: bool) -> tuple[Judgement, int, bool]:
    """Run one step with the policy's retries (crashes and rejected models counted apart),
    every attempt a new process; returns the final judgement, the attempts made and whether
    the WATCHER was interrupted."""
    watcher = policy.watcher
    crash_retries_max = watcher.max_retries
    critical_retries_max = policy.training_diagnostics.max_critical_retries
    max_attempts = 1 + crash_retries_max + critical_retries_max
    params = dict(params)
    params.setdefault("parent_run_id", run_id)
    persistent = bool(params.get("persistent_workers", policy.training.use_persistent_workers))
    sidecar_path = Path(str(effective(step, params, "output_dir"))) / SIDECAR_NAME
    summary_path = compare_summary_path() if params.get("compare_models") else None
    attempt_params = params
    crash_retries = critical_retries = 0
    for attempt in range(1, max_attempts + 1):
        if attempt > 1:
            attempt_params = retry_params(step, params, attempt - 1, watcher)
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
                entry = record_result(DEFAULT_REGISTRY_PATH, model_type, verdict.critical, verdict.summary(),
                                      policy.training_diagnostics)
                registry[model_type] = {"critical": verdict.critical,
                                        "consecutive_critical": entry["consecutive_critical"],
                                        "skipped": entry["skipped"]}
        sidecar = judgement.sidecar or {}
        execution = sidecar.get("execution") if isinstance(sidecar.get("execution"), dict) else {}
        record: dict[str, Any] = {
            "timestamp": utc_timestamp(milliseconds=True), "run_id": run_id, "step": step.number,
            "step_name": step.name, "attempt": attempt, "max_attempts": max_attempts,
            "decision": judgement.decision.value, "final": judgement.final, "reasons": judgement.reasons,
            "warnings": judgement.warnings, "exit_code": run.returncode, "exit_status": run.exit_status,
            "timed_out": run.timed_out, "duration_s": run.duration_s, "leftover_processes": run.leftovers,
            "command": run.command, "params": attempt_params, "policy": policy_path,
            "use_persistent_workers": persistent, "sidecar": str(sidecar_path),
            "model_type": sidecar.get("model_type"), "outcome": sidecar.get("outcome"),
            "training_metrics": sidecar.get("training_metrics"), "execution_mode": execution.get("mode"),
            "skipped_models": judgement.skipped_models, "registry": registry,
        }
        if judgement.decision in (Decision.ESCALATE, Decision.RETRY) and run.output_tail:
            record["output_tail"] = run.output_tail[-15:]
        append_decision(decision_log, record)
        log = logger.info if judgement.decision is Decision.PROCEED else logger.warning
        log("step %d attempt %d: %s (%s) - %s", step.number, attempt,
            judgement.decision.value, run.exit_status, "; ".join(judgement.reasons))
        for warning in judgement.warnings:
            logger.warning("step %d: %s", step.number, warning)
        if judgement.final:
            return judgement, attempt, bool(run.interrupted)
    raise AssertionError("the last attempt always gives a final decision")  # pragma: no cover


def _with_manifest_defaults(step: StepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline manifest's default params for ``step`` (when the working directory has
    one), overridden key by key by ``params``."""
    defaults, path = manifest_defaults(step)
    if path is None:
        return params
    merged, overridden = merge_manifest_defaults(step, defaults, params, f"manifest {path} default_params")
    logger.info("step %d: default params from %s: %s%s", step.number, path, dumps(defaults).decode(),
                f" (--params override {', '.join(overridden)})" if overridden else "")
    return merged


def run_pipeline(start: int, end: int, raw_params: Any, *, policy_path: str, decision_log: str | os.PathLike[str],
                 script: str | None = None, dry_run: bool = False, echo: bool = True) -> int:
    """Run steps ``start``..``end`` and print one JSON line per step (or, dry, the commands);
    returns the exit code stating the decision. Everything that can be checked is, before
    anything runs; stops at the first step that does not PROCEED."""
    steps = steps_in_range(start, end)
    if not isinstance(raw_params, dict):
        raise UsageError(f"--params must be a JSON object, got {type(raw_params).__name__}")
    params_by_step = {s.number: validate_params(s, _with_manifest_defaults(s, raw_params), policy_path=policy_path)
                      for s in steps}
    policy = load_policy(policy_path)
    for s in steps:  # a typo in a rule fails now, not after an hour of training
        thresholds_for(policy, s)
    if script is not None and not Path(script).is_file():
        if not dry_run:
            raise Step5Error(f"step script not found: {script}")
        logger.warning("step script not found: %s", script)
    if dry_run:
        for s in steps:
            print(shlex.join(build_command(s, params_by_step[s.number], policy_path=policy_path, script=script)),
                  flush=True)
        return EXIT_OK
    load_skip_registry(DEFAULT_REGISTRY_PATH)  # a damaged registry is an error now, not after the run
    check_writable(decision_log, DEFAULT_REGISTRY_PATH)  # as is a file the decision cannot be written to
    run_id = uuid.uuid4().hex[:12]
    logger.info("pipeline run %s: steps %d..%d, policy %s, decision log %s", run_id, start, end,
                policy_path, decision_log)
    for s in steps:
        judgement, attempts, interrupted = run_step(
            s, params_by_step[s.number], policy=policy, policy_path=policy_path, decision_log=Path(decision_log),
            run_id=run_id, script=script, echo=echo)
        exit_code = EXIT_INTERRUPTED if interrupted else EXIT_CODES[judgement.decision]
        print(dumps({
            "run_id": run_id, "step": s.number, "decision": judgement.decision.value, "exit_code": exit_code,
            "attempts": attempts, "reasons": judgement.reasons, "warnings": judgement.warnings,
            "skipped_models": judgement.skipped_models, "decision_log": str(decision_log),
        }).decode(), flush=True)
        if interrupted or judgement.decision is not Decision.PROCEED:
            return exit_code
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog="watcher_agent.py",
        description="Run pipeline steps as subprocesses, judge each run against the policy, "
                    "log the decision and keep the model skip registry.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run-pipeline", action="store_true", help="run steps --start-step..--end-step")
    mode.add_argument("--status", action="store_true", help="show the last decisions and the skip registry")
    p.add_argument("--start-step", type=int, default=5, help="first step to run [5]")
    p.add_argument("--end-step", type=int, default=None, help="last step to run [--start-step]")
    p.add_argument("--params", default="{}",
                   help='JSON object of step flags, snake_case, e.g. \'{"compare_models": true, "trials": 20}\'')
    p.add_argument("--policy", type=non_empty_path, default=None,
                   help=f"policy file, also passed to the step [./{DEFAULT_POLICY_PATH} if there is one, "
                        "else the project's own]")
    p.add_argument("--dry-run", action="store_true", help="print each step's command and exit")
    p.add_argument("--decision-log", type=non_empty_path, default=DEFAULT_DECISION_LOG, help=f"JSONL decision log [{DEFAULT_DECISION_LOG}]")
    p.add_argument("--last", type=non_negative_int, default=10, help="--status: how many decisions to show [10]")
    p.add_argument("--quiet-step", action="store_true", help="do not echo the step's output to stderr")
    add_log_level(p)
    # Tests replace the real step with a fake script (step5/testing/fake_step5.py).
    p.add_argument("--step-command", default=None, help=argparse.SUPPRESS)
    return p


def print_status(*, decision_log: str, policy_path: str, last: int, out: IO[str]) -> None:
    """Human-readable: the last decisions, then each model type's registry entry."""
    policy = load_policy(policy_path)
    records, bad = read_decisions(decision_log, last=last)
    print(f"decision log {decision_log}: last {len(records)} decision(s)"
          + (f", {bad} unreadable line(s) skipped" if bad else ""), file=out)
    for r in records:
        # A line of another writer (or a hand edit) may lack a key or give it another type: shown as it is.
        reasons = r.get("reasons")
        reasons = "; ".join(str(x) for x in reasons) if isinstance(reasons, list) else str(reasons or "")
        print(f"  {r.get('timestamp')}  run {r.get('run_id')}  step {r.get('step')}  "
              f"attempt {r.get('attempt')}/{r.get('max_attempts')}  {str(r.get('decision')):<10}  "
              f"{r.get('exit_status')}  {r.get('model_type') or '-'}  {reasons}", file=out)
    rules = policy.training_diagnostics
    registry = load_skip_registry(DEFAULT_REGISTRY_PATH)
    skipped = skipped_model_types(registry, rules)
    print(f"skip registry {DEFAULT_REGISTRY_PATH} (skip for {rules.skip_duration_hours:g} h after "
          f"{rules.max_consecutive_critical} consecutive critical): {len(registry)} model type(s); "
          f"skipped: {', '.join(sorted(skipped)) or 'none'}", file=out)
    for model_type, entry in sorted(registry.items()):
        state = "SKIPPED" if model_type in skipped else "ok"
        print(f"  {model_type:<11} {state:<8} consecutive_critical={entry.get('consecutive_critical', 0)}  "
              f"runs={entry.get('total_runs', 0)}  last={entry.get('last_result')}  "
              f"{entry.get('last_reason', '')}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s watcher: %(message)s")
    install_termination_as_interrupt()
    if args.policy is None:
        path, why = find_policy()
        logger.info("policy: %s (%s)", path, why)
        args.policy = str(path)
    try:
        if args.status:
            print_status(decision_log=args.decision_log, policy_path=args.policy, last=args.last, out=sys.stdout)
            return EXIT_OK
        try:
            params = loads(args.params)
        except ValueError as exc:
            raise UsageError(f"--params is not valid JSON: {exc}") from None
        end = args.end_step if args.end_step is not None else args.start_step
        return run_pipeline(args.start_step, end, params, policy_path=args.policy, decision_log=args.decision_log,
                            script=args.step_command, dry_run=args.dry_run, echo=not args.quiet_step)
    except Step5Error as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED
