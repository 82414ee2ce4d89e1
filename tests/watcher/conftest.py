"""The WATCHER's tests share one way to write a policy and one way to run ``agents/watcher_agent.py``
(with the fake step 5, or the real one) in a scratch working directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
WATCHER = REPO / "agents" / "watcher_agent.py"
FAKE_STEP5 = REPO / "step5" / "testing" / "fake_step5.py"

#: A small policy for runs of the fake step: one crash retry, one critical retry.
TEST_POLICY = {
    "training": {"use_persistent_workers": True, "worker_job_timeout_s": 120, "worker_ready_timeout_s": 120},
    "watcher": {"step_timeout_s": 60, "max_retries": 1, "retry_trials_multiplier": 1.5,
                "retry_seed_increment": 1, "kill_grace_s": 1},
    "training_diagnostics": {"metric_bounds": {"overfit_ratio": {"warning": 1.3, "critical": 2.0}},
                             "severity_thresholds": {"critical": {"max_retries": 1}},
                             "model_skip_rules": {"max_consecutive_critical": 3, "skip_duration_hours": 24}},
    "acceptance_rules": {"step5": {"min_cv_r2": 0.0, "max_overfit_ratio": 1.5}},
}


def _write_policy(folder: Path, base: dict | None = None, *, critical_retries: int | None = None,
                  max_consecutive_critical: int | None = None, **watcher: Any) -> Path:
    """``folder/policy.json``: ``base`` (the test policy; ``"shipped"``: the repository's own)
    with ``watcher`` keys and the two diagnostics limits changed."""
    policy = json.loads((REPO / "watcher_policies.json").read_text() if base == "shipped"
                        else json.dumps(base or TEST_POLICY))
    policy["watcher"].update(watcher)
    diag = policy["training_diagnostics"]
    if critical_retries is not None:
        diag["severity_thresholds"]["critical"]["max_retries"] = critical_retries
    if max_consecutive_critical is not None:
        diag["model_skip_rules"]["max_consecutive_critical"] = max_consecutive_critical
    path = folder / "policy.json"
    path.write_text(json.dumps(policy))
    return path


@pytest.fixture
def write_policy() -> Callable[..., Path]:
    return _write_policy


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A scratch working directory holding the test policy: diagnostics_outputs/ lands here."""
    monkeypatch.chdir(tmp_path)
    _write_policy(tmp_path)
    return tmp_path


def watcher_cmd(*args: str, params: dict | None = None, fake: bool = True) -> list[str]:
    """``--run-pipeline`` of step 5 under ./policy.json; ``fake``: with the fake step 5."""
    cmd = [sys.executable, str(WATCHER), "--run-pipeline", "--start-step", "5", "--end-step", "5",
           "--params", json.dumps({"trials": 2} if params is None else params), "--policy", "policy.json"]
    return cmd + (["--step-command", str(FAKE_STEP5)] if fake else []) + list(args)


def watcher_env(work: Path, mode: str | None = "ok", **extra: str) -> dict[str, str]:
    """Our environment without PYTHONPATH (the WATCHER must make step5 importable for the step
    itself); with a ``mode``, the fake step's settings, writing its calls and pids under ``work``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if mode is not None:
        env.update(FAKE_STEP5_MODE=mode, FAKE_STEP5_CALLS=str(work / "calls.jsonl"),
                   FAKE_STEP5_PIDS=str(work / "pids.json"))
    return {**env, **extra}


class WatcherRunner:
    """What the ``watcher`` fixture gives: the command, the environment, and a run."""

    cmd = staticmethod(watcher_cmd)
    env = staticmethod(watcher_env)

    @staticmethod
    def run(work: Path, mode: str | None = "ok", *args: str, params: dict | None = None, timeout: float = 60,
            cmd: list[str] | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run the WATCHER (``cmd``, or :func:`watcher_cmd`) in ``work`` and wait for it: with
        the fake step 5 in ``mode``, or the real step 5 when ``mode`` is None."""
        return subprocess.run(cmd or watcher_cmd(*args, params=params, fake=mode is not None), cwd=work,
                              env=watcher_env(work, mode, **extra), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def watcher() -> type[WatcherRunner]:
    return WatcherRunner
