"""``agents/watcher_agent.py``: the WATCHER's command line.

Exit codes: 0 PROCEED (or a successful --status / --dry-run), 1 error (bad policy, missing
step script, damaged registry), 2 DEGENERATE, 3 SKIP_MODEL, 4 ESCALATE, 64 usage error
(bad flags, unknown step, unknown or mistyped --params key), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import IO, Any, Sequence

from step5.cliutil import UsageErrorParser, add_log_level
from step5.errors import EXIT_INTERRUPTED, EXIT_OK, Step5Error, UsageError
from step5.jsonio import loads
from step5.policy import DEFAULT_POLICY_PATH, find_policy, load_policy
from step5.watcher.decision_log import DEFAULT_DECISION_LOG, read_decisions
from step5.watcher.pipeline import run_pipeline
from step5.watcher.process import install_termination_as_interrupt
from step5.watcher.registry import DEFAULT_REGISTRY_PATH, load_skip_registry, skipped_model_types

logger = logging.getLogger("step5.watcher")


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
    p.add_argument("--policy", default=None,
                   help=f"policy file, also passed to the step [./{DEFAULT_POLICY_PATH} if there is one, "
                        "else the project's own]")
    p.add_argument("--dry-run", action="store_true", help="print each step's command and exit")
    p.add_argument("--decision-log", default=DEFAULT_DECISION_LOG, help=f"JSONL decision log [{DEFAULT_DECISION_LOG}]")
    p.add_argument("--last", type=int, default=10, help="--status: how many decisions to show [10]")
    p.add_argument("--quiet-step", action="store_true", help="do not echo the step's output to stderr")
    add_log_level(p)
    # Tests replace the real step with a fake script (step5/testing/fake_step5*.py).
    p.add_argument("--step-command", default=None, help=argparse.SUPPRESS)
    return p


def _parse_params(text: str) -> Any:
    try:
        return loads(text)
    except ValueError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from None


def print_status(*, decision_log: str, policy_path: str, last: int, out: IO[str]) -> None:
    """Human-readable: the last decisions, then each model type's registry entry."""
    policy = load_policy(policy_path)
    records, bad = read_decisions(decision_log, last=last)
    print(f"decision log {decision_log}: last {len(records)} decision(s)"
          + (f", {bad} unreadable line(s) skipped" if bad else ""), file=out)
    for r in records:
        reasons = "; ".join(str(x) for x in r.get("reasons") or [])
        print(f"  {r.get('timestamp')}  run {r.get('run_id')}  step {r.get('step')}  "
              f"attempt {r.get('attempt')}/{r.get('max_attempts')}  {r.get('decision'):<10}  "
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
        end = args.end_step if args.end_step is not None else args.start_step
        return run_pipeline(
            args.start_step, end, _parse_params(args.params),
            policy_path=args.policy, decision_log=args.decision_log, script=args.step_command,
            dry_run=args.dry_run, echo=not args.quiet_step,
        )
    except Step5Error as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED
