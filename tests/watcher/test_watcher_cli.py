"""The WATCHER as a user runs it: ``agents/watcher_agent.py`` in a scratch working directory.

Step 5 is replaced by ``step5/testing/fake_step5.py`` (hidden ``--step-command``), whose
behaviour is set by ``FAKE_STEP5_MODE``; test_watcher_real_step5.py runs the real optimizer.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from step5.owner import pid_alive as is_running
from step5.policy import PROJECT_POLICY_PATH, load_policy
from step5.testing.processes import result_line, watcher_decisions
from step5.watcher.process import group_members
from step5.watcher.registry import load_skip_registry, record_result

REPO = Path(__file__).resolve().parents[2]


def calls(work: Path) -> list[list[str]]:
    path = work / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in ``argv``, spelled ``--name=VALUE`` (the WATCHER's way) or ``--name VALUE``."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
        if arg == name:
            return argv[i + 1]
    return None


def test_passing_run(work, watcher):
    proc = watcher.run(work)
    assert proc.returncode == 0, proc.stderr
    out = result_line(proc)
    assert out["decision"] == "PROCEED" and out["attempts"] == 1
    [record] = watcher_decisions(work)
    assert record["decision"] == "PROCEED" and record["final"] and record["exit_status"] == "EXIT(0)"
    assert record["model_type"] == "neural_net" and record["training_metrics"]["cv_r2_mean"] > 0
    assert record["run_id"] == out["run_id"]
    [argv] = calls(work)
    assert flag(argv, "--policy") == "policy.json"  # the WATCHER's policy reaches the step
    assert flag(argv, "--survivors") == "survivors_with_scores.json"
    assert flag(argv, "--lottery-data") == "train_history.json"
    assert flag(argv, "--parent-run-id") == out["run_id"]
    assert "fake_step5: mode=ok" in proc.stderr  # the step's output is echoed to stderr
    entry = load_skip_registry()["neural_net"]
    assert entry["consecutive_critical"] == 0 and entry["total_runs"] == 1


def test_failing_step_is_retried_then_escalated(work, watcher):
    proc = watcher.run(work, "fail")
    assert proc.returncode == 4, proc.stderr
    assert [r["decision"] for r in watcher_decisions(work)] == ["RETRY", "ESCALATE"]
    assert "record 3" in watcher_decisions(work)[-1]["reasons"][0]
    assert any("record 3" in line for line in watcher_decisions(work)[-1]["output_tail"])
    assert len(calls(work)) == 2
    assert not (work / "diagnostics_outputs" / "model_skip_registry.json").exists()  # not the model's fault


@pytest.mark.parametrize("mode, words", [
    ("no_sidecar", "no sidecar"),
    ("bad_sidecar", "missing key `feature_schema`"),
    ("not_json", "not valid JSON"),
    ("usage", "exit 64"),
])
def test_missing_or_invalid_sidecar_escalates_without_retry(work, mode, words, watcher):
    proc = watcher.run(work, mode)
    assert proc.returncode == 4, proc.stderr
    [record] = watcher_decisions(work)
    assert record["decision"] == "ESCALATE" and words in " ".join(record["reasons"])
    assert len(calls(work)) == 1


def test_a_sidecar_left_by_an_earlier_run_is_not_accepted(work, watcher):
    assert watcher.run(work, "ok").returncode == 0
    proc = watcher.run(work, "no_sidecar")
    assert proc.returncode == 4
    assert "from before this run" in watcher_decisions(work)[-1]["reasons"][0]


def test_degenerate_step(work, watcher):
    proc = watcher.run(work, "degenerate")
    assert proc.returncode == 2, proc.stderr
    assert result_line(proc)["decision"] == "DEGENERATE"
    assert [r["decision"] for r in watcher_decisions(work)] == ["DEGENERATE"]


@pytest.mark.parametrize("params, words", [
    ({"trials": 2, "compare_model": True}, "did you mean `compare_models`"),
    ({"trials": "twenty"}, "`trials`"),
    ({"compare_models": "true"}, "true or false"),
    ({"policy": "x.json"}, "--policy"),
])
def test_bad_params_are_usage_errors_and_nothing_runs(work, params, words, watcher):
    proc = watcher.run(work, params=params)
    assert proc.returncode == 64
    assert words in proc.stderr
    assert calls(work) == [] and watcher_decisions(work) == []


def test_params_not_json(work, watcher):
    proc = watcher.run(work, cmd=watcher.cmd()[:5] + ["--params", "{trials: 2}", "--policy", "policy.json"])
    assert proc.returncode == 64 and "not valid JSON" in proc.stderr


def test_retry_really_reruns_with_more_trials_and_a_new_seed(work, watcher):
    proc = watcher.run(work, "reject_first", params={"trials": 4})
    assert proc.returncode == 0, proc.stderr
    first, second = calls(work)
    assert flag(first, "--trials") == "4" and flag(first, "--seed") is None  # the step's default, 42
    assert flag(second, "--trials") == "6" and flag(second, "--seed") == "43"
    retry, final = watcher_decisions(work)
    assert retry["decision"] == "RETRY" and "min_cv_r2" in retry["reasons"][0] and not retry["final"]
    assert final["decision"] == "PROCEED" and final["attempt"] == 2
    assert retry["registry"] == {}  # only the final result is recorded
    assert final["registry"]["neural_net"]["critical"] is False


def test_rejected_after_retries_skips_the_model_and_counts_it(work, watcher):
    proc = watcher.run(work, "reject")
    assert proc.returncode == 3, proc.stderr
    assert [r["decision"] for r in watcher_decisions(work)] == ["RETRY", "SKIP_MODEL"]
    assert load_skip_registry()["neural_net"]["consecutive_critical"] == 1


def test_no_retries_when_the_policy_says_none(work, watcher, write_policy):
    write_policy(work, max_retries=0, critical_retries=0)
    assert watcher.run(work, "fail").returncode == 4
    assert len(calls(work)) == 1 and watcher_decisions(work)[0]["max_attempts"] == 1


def test_crash_and_critical_retries_are_counted_apart(work, watcher, write_policy):
    """watcher.max_retries re-runs a crash; training_diagnostics' critical max_retries a rejected model."""
    write_policy(work, max_retries=0, critical_retries=2)
    assert watcher.run(work, "fail").returncode == 4
    assert len(calls(work)) == 1  # the crash: no re-run
    (work / "calls.jsonl").unlink()
    assert watcher.run(work, "reject").returncode == 3
    assert len(calls(work)) == 3  # the rejected model: two re-runs, then SKIP_MODEL


def _all_gone(info: dict) -> bool:
    return not any(is_running(pid) for pid in [info["pid"], *info["children"]]) and not group_members(info["pgid"])


def test_timeout_escalates_and_leaves_no_process(work, watcher, write_policy):
    write_policy(work, step_timeout_s=5, kill_grace_s=1)  # room for the fake step to start on a loaded machine
    t0 = time.monotonic()
    proc = watcher.run(work, "hang")
    assert proc.returncode == 4, proc.stderr
    assert time.monotonic() - t0 < 20
    [record] = watcher_decisions(work)  # a timeout is not retried: it would time out again
    assert record["decision"] == "ESCALATE" and record["timed_out"] and "timed out after 5s" in record["reasons"][0]
    info = json.loads((work / "pids.json").read_text())
    assert _all_gone(info), info  # the SIGTERM-ignoring child and the one that left the group too


# SIGHUP: the terminal closed. The step is in its own session and never sees it, so the
# WATCHER must stop the step itself rather than die and leave it running unwatched.
@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM"),
                                       (signal.SIGHUP, "SIGHUP")])
def test_interrupting_the_watcher_stops_the_step(work, sig, name, watcher):
    popen = subprocess.Popen(watcher.cmd(), cwd=work, env=watcher.env(work, "hang"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (work / "pids.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (work / "pids.json").exists()
        popen.send_signal(sig)
        _, err = popen.communicate(timeout=30)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate()
    assert popen.returncode == 130, err
    [record] = watcher_decisions(work)
    assert record["decision"] == "ESCALATE" and name in record["reasons"][0]
    assert _all_gone(json.loads((work / "pids.json").read_text()))


def test_processes_left_by_a_finished_step_are_stopped(work, watcher):
    proc = watcher.run(work, "leak")
    assert proc.returncode == 0, proc.stderr
    assert watcher_decisions(work)[0]["leftover_processes"] == 1
    assert _all_gone(json.loads((work / "pids.json").read_text()))


def test_registry_makes_compare_runs_skip_a_model(work, watcher, write_policy):
    """catboost keeps scoring below the rules; at the limit, compare runs leave it out."""
    write_policy(work, max_consecutive_critical=2, max_retries=0, critical_retries=0)
    params = {"compare_models": True, "trials": 2}
    for run in (1, 2):
        proc = watcher.run(work, "ok", params=params, FAKE_STEP5_BAD_MODELS="catboost")
        assert proc.returncode == 0, proc.stderr
        assert result_line(proc)["skipped_models"] == []
        entry = load_skip_registry()["catboost"]
        assert entry["consecutive_critical"] == run
    assert watcher_decisions(work)[-1]["registry"]["catboost"]["skipped"]  # 2 >= max_consecutive_critical 2
    assert load_skip_registry()["lightgbm"]["consecutive_critical"] == 0

    proc = watcher.run(work, "ok", params=params, FAKE_STEP5_BAD_MODELS="catboost")
    assert proc.returncode == 0, proc.stderr
    assert result_line(proc)["skipped_models"] == ["catboost"]
    # the summary and the registry lie in the working directory's diagnostics_outputs/
    summary = json.loads((work / "diagnostics_outputs" / "compare_models_summary.json").read_text())
    assert summary["models"]["catboost"]["status"] == "SKIPPED"
    assert load_skip_registry()["catboost"]["total_runs"] == 2  # a skipped model gets no new result


def test_a_registry_written_elsewhere_is_honoured(work, watcher):
    rules = load_policy(work / "policy.json").training_diagnostics
    for _ in range(3):
        record_result("diagnostics_outputs/model_skip_registry.json", "xgboost", True, "overfit", rules)
    proc = watcher.run(work, "ok", params={"compare_models": True, "trials": 2})
    assert proc.returncode == 0, proc.stderr
    assert result_line(proc)["skipped_models"] == ["xgboost"]


def test_a_registry_entry_the_pipelines_health_check_wrote_is_honoured(work, watcher):
    """training_health_check.py::_check_skip_registry writes only these two keys per model type."""
    folder = work / "diagnostics_outputs"
    folder.mkdir()
    now = datetime.now(timezone.utc).isoformat()
    (folder / "model_skip_registry.json").write_text(json.dumps(
        {"lightgbm": {"consecutive_critical": 3, "last_critical": now},
         "xgboost": {"consecutive_critical": 3, "last_critical": "2020-01-01T00:00:00+00:00"},  # its 24 h are over
         "neural_net": {"consecutive_critical": 0, "last_critical": None}}))
    proc = watcher.run(work, "ok", params={"compare_models": True, "trials": 2})
    assert proc.returncode == 0, proc.stderr
    assert result_line(proc)["skipped_models"] == ["lightgbm"]


def test_dry_run_prints_the_command_and_runs_nothing(work, watcher):
    proc = watcher.run(work, "ok", "--dry-run", params={"compare_models": True, "trials": 20,
                                                        "persistent_workers": False, "gpus": [0, 1]})
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "--compare-models" in line and "--trials=20" in line and "--no-persistent-workers" in line
    assert "--gpus=0,1" in line and "--policy policy.json" in line
    assert calls(work) == [] and watcher_decisions(work) == []


def test_status_shows_decisions_and_registry(work, watcher):
    watcher.run(work, "reject")
    proc = watcher.run(work, cmd=watcher.cmd()[:2] + ["--status", "--policy", "policy.json"])
    assert proc.returncode == 0, proc.stderr
    assert "RETRY" in proc.stdout and "SKIP_MODEL" in proc.stdout
    assert "neural_net" in proc.stdout and "consecutive_critical=1" in proc.stdout
    assert "skipped: none" in proc.stdout


def test_status_shows_a_decision_log_line_of_another_shape_as_it_is(tmp_path, monkeypatch):
    # A line another writer (or a hand edit) left, without `decision` or with other types, raised a
    # TypeError from the format spec: `--status` ended in a traceback instead of listing the decisions.
    import io

    from step5.watcher.cli import print_status

    monkeypatch.chdir(tmp_path)
    log = tmp_path / "decisions.jsonl"
    log.write_text('{"step": 5}\n{"decision": ["PROCEED"], "reasons": "one reason"}\n[1, 2]\n'
                   '{"decision": "ESCALATE", "reasons": ["a", "b"]}\n')
    out = io.StringIO()
    print_status(decision_log=str(log), policy_path=str(PROJECT_POLICY_PATH), last=10, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"decision log {log}: last 3 decision(s), 1 unreadable line(s) skipped"
    assert "None" in lines[1] and "['PROCEED']" in lines[2] and lines[2].endswith("one reason")
    assert "ESCALATE" in lines[3] and lines[3].endswith("a; b")


@pytest.mark.parametrize("args, code, words", [
    (["--start-step", "4", "--end-step", "5"], 64, "step 4 is not shipped"),
    (["--start-step", "5", "--end-step", "6"], 64, "step 6 is not shipped"),
    (["--bogus"], 64, "unrecognized arguments"),
    (["--last", "-3"], 64, "argument --last: expected an integer >= 0, got -3"),  # was a deque ValueError traceback
])
def test_usage_errors(work, args, code, words, watcher):
    proc = watcher.run(work, "ok", *args)
    assert proc.returncode == code and words in proc.stderr
    assert watcher_decisions(work) == []


@pytest.mark.parametrize("policy, words", [
    ("{broken", "not valid JSON"),
    ('{"watcher": {"step_timeout": 5}}', "unknown key `step_timeout`"),
    ('{"watcher": {"max_retries": -1}}', "max_retries"),
    # more attempts than the decision log's 64-bit integers count: found at its first record (a traceback)
    ('{"watcher": {"max_retries": 18446744073709551615}}', "more attempts than the decision log can count"),
    ('{"acceptance_rules": {"step5": {"min_cv_r3": 0}}}', "unknown metric `cv_r3`"),
])
def test_invalid_policy_is_a_clear_error_before_anything_runs(work, policy, words, watcher):
    (work / "policy.json").write_text(policy)
    proc = watcher.run(work)
    assert proc.returncode == 1 and words in proc.stderr and "policy.json" in proc.stderr
    assert calls(work) == []


def test_missing_policy_file(work, watcher):
    (work / "policy.json").unlink()
    proc = watcher.run(work)
    assert proc.returncode == 1 and "not found" in proc.stderr


def test_persistent_worker_switch_reaches_the_step(work, watcher):
    watcher.run(work, "ok", params={"trials": 2, "persistent_workers": False})
    [argv] = calls(work)
    assert "--no-persistent-workers" in argv
    assert watcher_decisions(work)[0]["use_persistent_workers"] is False


def test_without_policy_or_a_local_file_the_projects_own_policy_runs_the_step(work, watcher):
    (work / "policy.json").unlink()
    cmd = [a for a in watcher.cmd() if a not in ("--policy", "policy.json")]
    proc = watcher.run(work, cmd=cmd)
    assert proc.returncode == 0, proc.stderr
    assert "the project's own" in proc.stderr
    [argv] = calls(work)
    assert flag(argv, "--policy") == str(REPO / "step5" / "watcher_policies.json")


def test_the_pipelines_manifest_gives_the_step_its_default_params(work, watcher):
    """Run from a pipeline root with agent_manifests/reinforcement.json, a bare step-5 run gets
    the manifest's default params, as the existing WATCHER's run_step gives them; --params
    override them key by key."""
    (work / "agent_manifests").mkdir()
    (work / "agent_manifests" / "reinforcement.json").write_text(json.dumps({"default_params": {
        "survivors": "survivors_with_scores.json", "lottery_data": "train_history.json", "compare_models": True,
        "trials": 20, "output_dir": "models/reinforcement", "enable_diagnostics": True, "model_type": "catboost",
        "persistent_workers": False, "enable_vmap": True, "k_folds": 20}}))
    proc = watcher.run(work, "ok", params={"trials": 3})
    assert proc.returncode == 0, proc.stderr
    [argv] = calls(work)
    assert "--compare-models" in argv and "--enable-vmap" in argv and "--enable-diagnostics" in argv
    assert flag(argv, "--model-type") == "catboost" and flag(argv, "--k-folds") == "20"
    assert flag(argv, "--trials") == "3"  # --params win
    assert not any("persistent-workers" in a for a in argv)  # false adds no flag: the policy decides
    assert "default params from agent_manifests/reinforcement.json" in proc.stderr


def test_a_params_key_overrides_the_manifests_key_for_the_same_setting_under_another_name(work, watcher):
    """The manifest's enable_vmap and a user's fuse_folds are one step flag: the user's wins, as a
    same-named key does. It was refused as "--params keys `enable_vmap` and `fuse_folds` set the same
    step 5 setting to different values", though the user gave only one of them."""
    (work / "agent_manifests").mkdir()
    manifest = work / "agent_manifests" / "reinforcement.json"
    manifest.write_text(json.dumps({"default_params": {"trials": 2, "enable_vmap": True, "k_folds": 3}}))
    proc = watcher.run(work, "ok", params={"fuse_folds": False})
    assert proc.returncode == 0, proc.stderr
    [argv] = calls(work)
    assert "--no-fuse-folds" in argv and "--enable-vmap" not in argv and flag(argv, "--k-folds") == "3"
    assert "(--params override enable_vmap)" in proc.stderr


@pytest.mark.parametrize(("defaults", "words"), [
    ({"trials": 2, "resume_study": True}, "default_params: key `resume_study` is not a step 5 flag"),
    ({"trials": 0}, "default_params key `trials` (step 5 flag --trials)"),
])
def test_a_bad_manifest_default_is_refused_naming_the_manifest_not_params(work, watcher, defaults, words):
    (work / "agent_manifests").mkdir()
    (work / "agent_manifests" / "reinforcement.json").write_text(json.dumps({"default_params": defaults}))
    proc = watcher.run(work, "ok", params={"k_folds": 3})
    assert proc.returncode == 64 and f"manifest agent_manifests/reinforcement.json {words}" in proc.stderr
    assert "--params key" not in proc.stderr and calls(work) == []


def test_a_decision_log_that_cannot_be_written_stops_the_watcher_before_the_step(work, watcher):
    # It used to be found only when the first decision was appended, after the step had trained:
    # a traceback, and the decision lost.
    (work / "taken").mkdir()
    proc = watcher.run(work, "ok", "--decision-log", "taken")
    assert proc.returncode == 1 and "cannot open the decision log taken: Is a directory" in proc.stderr
    assert "Traceback" not in proc.stderr and calls(work) == []
    proc = watcher.run(work, cmd=watcher.cmd()[:2] + ["--status", "--policy", "policy.json", "--decision-log", "taken"])
    assert proc.returncode == 1 and "cannot read the decision log taken: Is a directory" in proc.stderr
