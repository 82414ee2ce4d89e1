"""Judging one run: exit code, sidecar (SPEC section 4), acceptance rules, diagnostics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from step5.errors import PolicyError
from step5.policy import parse_policy
from step5.testing.fake_step5 import BAD_METRICS, GOOD_METRICS, make_sidecar
from step5.watcher.judge import Decision, file_signature, judge, thresholds_for
from step5.watcher.process import StepRun
from step5.watcher.steps import get_step

STEP5 = get_step(5)

POLICY = {
    "watcher": {"step_timeout_s": 60},
    "training_diagnostics": {"metric_bounds": {"overfit_ratio": {"warning": 1.3, "critical": 2.0},
                                               "test_r2": {"warning": 0.0, "critical": -0.5}}},
    "acceptance_rules": {"step5": {"min_cv_r2": 0.0, "max_overfit_ratio": 1.5}},
}


def policy(**overrides):
    raw = json.loads(json.dumps(POLICY))
    for section, values in overrides.items():
        raw[section] = values
    return parse_policy(raw, "test-policy.json")


def step_run(returncode=0, **kw) -> StepRun:
    return StepRun(command=["step"], pid=1, returncode=returncode, duration_s=1.0, **kw)


def write_sidecar(out: Path, sidecar: dict, checkpoint: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "best_model.meta.json"
    path.write_text(json.dumps(sidecar))
    if checkpoint and sidecar.get("checkpoint_path"):
        (out / sidecar["checkpoint_path"]).write_bytes(b"ckpt")
    return path


def run_judge(tmp_path, run, sidecar=None, *, pol=None, can_retry=True, before=None, checkpoint=True,
              run_id=None, summary=None):
    out = tmp_path / "out"
    path = out / "best_model.meta.json"
    if sidecar is not None:
        write_sidecar(out, sidecar, checkpoint)
    summary_path = None
    if summary is not None:
        summary_path = tmp_path / "compare_models_summary.json"
        summary_path.write_text(json.dumps(summary))
    return judge(run, step=STEP5, policy=pol or policy(), sidecar_path=path, summary_path=summary_path,
                 can_retry=can_retry, sidecar_before=before, run_id=run_id)


def metrics(**changes):
    return {**GOOD_METRICS, **changes}


def test_good_run_proceeds(tmp_path):
    j = run_judge(tmp_path, step_run(0), make_sidecar())
    assert j.decision is Decision.PROCEED and j.final
    assert "neural_net accepted" in j.reasons[0] and j.warnings == []
    assert j.verdicts["neural_net"].critical is False


@pytest.mark.parametrize("can_retry, decision", [(True, Decision.RETRY), (False, Decision.SKIP_MODEL)])
def test_below_acceptance_rules(tmp_path, can_retry, decision):
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(cv_r2_mean=-0.02)), can_retry=can_retry)
    assert j.decision is decision
    assert j.reasons == ["neural_net: cv_r2 -0.02 < min_cv_r2 0"]
    assert j.verdicts["neural_net"].critical


def test_slots_retired_or_left_idle_are_noted(tmp_path):
    """A run that went on without a GPU (it could not start torch, or the host's memory held no
    worker for it) is still a good model, but the operator should hear about the GPU."""
    sidecar = make_sidecar()
    sidecar["execution"]["faults"] = [
        {"slot": "ROCm-3", "kind": "startup", "status": None, "error": "no training process can start on ROCm-3"},
        {"slot": "ROCm-6", "kind": "memory", "status": None, "error": "ROCm-6 left idle: room for 5 more worker(s)"},
        {"slot": "ROCm-7", "kind": "memory", "status": None, "error": "ROCm-7 left idle: room for 5 more worker(s)"},
    ]
    j = run_judge(tmp_path, step_run(0), sidecar)
    assert j.decision is Decision.PROCEED
    assert j.warnings == [
        "slot(s) retired: no trainer could set up torch or its device there: ROCm-3 (no training process can "
        "start on ROCm-3)",
        "slot(s) left idle: the host's memory held no worker for them: ROCm-6 (ROCm-6 left idle: room for 5 more "
        "worker(s)); ROCm-7 (ROCm-7 left idle: room for 5 more worker(s))"]


def test_critical_diagnostic_rejects_and_warning_only_notes(tmp_path):
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(test_r2=-0.7)))
    assert j.decision is Decision.RETRY
    assert "neural_net: test_r2 -0.7 <= critical bound -0.5" in j.reasons
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(test_r2=-0.1, overfit_ratio=1.4)))
    assert j.decision is Decision.PROCEED
    assert "neural_net: test_r2 -0.1 <= warning bound 0" in j.warnings
    assert "neural_net: overfit_ratio 1.4 >= warning bound 1.3" in j.warnings


def test_a_bound_is_reached_at_its_value_as_in_the_pipelines_health_check(tmp_path):
    """training_health_check.py::_evaluate_metrics: `overfit_ratio >= critical`, `early_stop_ratio <= critical`."""
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(overfit_ratio=2.0)))
    assert j.decision is Decision.RETRY and "neural_net: overfit_ratio 2 >= critical bound 2" in j.reasons
    pol = policy(training_diagnostics={"metric_bounds": {"early_stop_ratio": {"warning": 0.3, "critical": 0.15}}})
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(early_stop_ratio=0.15)), pol=pol)
    assert j.decision is Decision.RETRY and "early_stop_ratio 0.15 <= critical bound 0.15" in j.reasons[0]


def test_bounds_on_metrics_step5_does_not_measure_and_disabled_diagnostics_judge_nothing(tmp_path):
    pol = policy(training_diagnostics={"metric_bounds": {"nn_dead_neuron_pct": {"warning": 0, "critical": 0}}})
    assert run_judge(tmp_path, step_run(0), make_sidecar(), pol=pol).decision is Decision.PROCEED
    pol = policy(training_diagnostics={"enabled": False, "metric_bounds": {"overfit_ratio": {"critical": 1.0}}})
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(overfit_ratio=1.45)), pol=pol)
    assert j.decision is Decision.PROCEED and j.warnings == []


def test_undefined_overfit_ratio_is_noted_not_fatal(tmp_path):
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(overfit_ratio=None)))
    assert j.decision is Decision.PROCEED
    assert any("cannot check max_overfit_ratio" in w for w in j.warnings)


@pytest.mark.parametrize("can_retry, decision", [(True, Decision.RETRY), (False, Decision.ESCALATE)])
@pytest.mark.parametrize("returncode, status", [(1, "EXIT(1)"), (-9, "SIGKILL(-9)"), (3, "EXIT(3)")])
def test_failed_step(tmp_path, returncode, status, can_retry, decision):
    run = step_run(returncode, output_tail=["loading", "error: survivors record 3: key `features` missing"])
    j = run_judge(tmp_path, run, can_retry=can_retry)
    assert j.decision is decision
    assert status in j.reasons[0] and "record 3" in j.reasons[0]
    assert j.verdicts == {}  # a crash is not held against the model type


def test_usage_error_timeout_and_interrupt_escalate_without_retry(tmp_path):
    assert run_judge(tmp_path, step_run(64)).decision is Decision.ESCALATE
    j = run_judge(tmp_path, step_run(None, timed_out=True))
    assert j.decision is Decision.ESCALATE and "timed out after 60s" in j.reasons[0]
    j = run_judge(tmp_path, step_run(-15, interrupted="SIGTERM"))
    assert j.decision is Decision.ESCALATE and "SIGTERM" in j.reasons[0]


def test_missing_sidecar(tmp_path):
    j = run_judge(tmp_path, step_run(0))
    assert j.decision is Decision.ESCALATE and "no sidecar" in j.reasons[0]


def test_invalid_sidecar_lists_the_problems(tmp_path):
    sidecar = make_sidecar()
    del sidecar["feature_schema"]
    sidecar["outcome"] = "MAYBE"
    j = run_judge(tmp_path, step_run(0), sidecar)
    assert j.decision is Decision.ESCALATE
    text = " ".join(j.reasons)
    assert "feature_schema" in text and "MAYBE" in text


def test_sidecar_not_json(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_model.meta.json").write_text("{oops")
    j = judge(step_run(0), step=STEP5, policy=policy(), sidecar_path=out / "best_model.meta.json",
              summary_path=None, can_retry=True)
    assert j.decision is Decision.ESCALATE and "not valid JSON" in j.reasons[0]


def test_sidecar_from_an_earlier_run_is_not_judged(tmp_path):
    path = write_sidecar(tmp_path / "out", make_sidecar())
    j = run_judge(tmp_path, step_run(0), before=file_signature(path))
    assert j.decision is Decision.ESCALATE and "from before this run" in j.reasons[0]


def test_sidecar_of_another_run_is_not_judged(tmp_path):
    j = run_judge(tmp_path, step_run(0), make_sidecar(parent_run_id="other"), run_id="mine")
    assert j.decision is Decision.ESCALATE and "'other'" in j.reasons[0]


def test_missing_checkpoint(tmp_path):
    j = run_judge(tmp_path, step_run(0), make_sidecar(), checkpoint=False)
    assert j.decision is Decision.ESCALATE and "best_model.pth" in j.reasons[0]


def test_degenerate(tmp_path):
    j = run_judge(tmp_path, step_run(2), make_sidecar(outcome="DEGENERATE_SIGNAL"))
    assert j.decision is Decision.DEGENERATE and "no usable signal" in j.reasons[0]
    assert j.verdicts == {}  # the data's fault, not the model type's


def test_exit_2_without_a_degenerate_sidecar_escalates(tmp_path):
    assert run_judge(tmp_path / "a", step_run(2)).decision is Decision.ESCALATE
    j = run_judge(tmp_path / "b", step_run(2), make_sidecar())
    assert j.decision is Decision.ESCALATE and "SUCCESS" in j.reasons[0]
    j = run_judge(tmp_path / "c", step_run(0), make_sidecar(outcome="DEGENERATE_SIGNAL"))
    assert j.decision is Decision.ESCALATE


def test_compare_summary_gives_every_model_a_verdict(tmp_path):
    archived = write_sidecar(tmp_path / "archive" / "xgboost", make_sidecar("xgboost", metrics=BAD_METRICS))
    summary = {"winner": "neural_net", "models": {
        "neural_net": {"status": "SUCCESS", "training_metrics": GOOD_METRICS},
        "xgboost": {"status": "SUCCESS", "sidecar_path": str(archived)},
        "lightgbm": {"status": "FAILED", "error": "boom"},
        "catboost": {"status": "SKIPPED", "error": "registry"},
    }}
    j = run_judge(tmp_path, step_run(0), make_sidecar(), summary=summary)
    assert j.decision is Decision.PROCEED
    assert {m: v.critical for m, v in j.verdicts.items()} == {"neural_net": False, "xgboost": True, "lightgbm": True}
    assert "boom" in j.verdicts["lightgbm"].summary()
    assert j.skipped_models == ["catboost"]


def test_compare_summary_as_a_list_and_degenerate_entries(tmp_path):
    summary = {"models": [{"model_type": "xgboost", "training_metrics": BAD_METRICS},
                          {"model_type": "catboost", "status": "DEGENERATE_SIGNAL"},
                          {"model_type": "lightgbm", "status": "SUCCESS", "sidecar_path": "gone.json"}]}
    j = run_judge(tmp_path, step_run(0), make_sidecar(), summary=summary)
    assert j.verdicts["xgboost"].critical
    assert "catboost" not in j.verdicts  # the data's fault
    assert "lightgbm" not in j.verdicts and any("lightgbm: no metrics" in w for w in j.warnings)


def test_stale_compare_summary_is_ignored(tmp_path):
    path = tmp_path / "compare_models_summary.json"
    path.write_text(json.dumps({"models": {"xgboost": {"status": "FAILED"}}}))
    out = tmp_path / "out"
    write_sidecar(out, make_sidecar())
    j = judge(step_run(0), step=STEP5, policy=policy(), sidecar_path=out / "best_model.meta.json",
              summary_path=path, summary_before=file_signature(path), can_retry=True)
    assert j.decision is Decision.PROCEED and set(j.verdicts) == {"neural_net"}
    assert any("from before this run" in w for w in j.warnings)


@pytest.mark.parametrize(
    "section, rules, words",
    [
        ("acceptance_rules", {"step5": {"min_cv_r3": 0.0}}, "unknown metric `cv_r3`"),
        ("acceptance_rules", {"step5": {"at_least_cv_r2": 0.0}}, "expected min_<metric>"),
        ("acceptance_rules", {"step5": {"min_cv_r2_warning": 0.0}}, "unknown metric `cv_r2_warning`"),
        ("training_diagnostics", {"max_overfit_ratio": 2.0}, "flat threshold keys are no longer read"),
        ("training_diagnostics", {"max_overfit_ratio_severe": 2.0}, "flat threshold keys are no longer read"),
        # Rules and critical bounds no model can pass: every run was retried in vain, then counted
        # against its model type in the skip registry.
        ("acceptance_rules", {"step5": {"min_cv_r2": 2}}, "min_cv_r2 2: cv_r2 is at most 1, so no model can pass"),
        ("acceptance_rules", {"step5": {"max_val_mse": -0.5}}, "val_mse is at least 0, so no model can pass"),
        ("acceptance_rules", {"step5": {"min_early_stop_ratio": 1.5}}, "early_stop_ratio is at most 1"),
        ("training_diagnostics", {"metric_bounds": {"overfit_ratio": {"critical": 0}}},
         "metric_bounds.overfit_ratio.critical 0 is reached by every value"),
        ("training_diagnostics", {"metric_bounds": {"cv_r2": {"warning": 1, "critical": 1}}},
         "metric_bounds.cv_r2.critical 1 is reached by every value: cv_r2 is at most 1"),
        ("training_diagnostics", {"metric_bounds": {"early_stop_ratio": {"critical": 1}}},
         "early_stop_ratio is at most 1"),
    ],
)
def test_policy_rules_are_validated(section, rules, words):
    with pytest.raises(PolicyError) as info:
        thresholds_for(policy(**{section: rules}), STEP5)
    assert words in str(info.value) and "test-policy.json" in str(info.value)


def test_shipped_policy_rules_are_valid(repo_root):
    from step5.policy import load_policy

    shipped = load_policy(repo_root / "watcher_policies.json")
    assert {t.key for t in thresholds_for(shipped, STEP5)} == {"min_cv_r2"}
    assert {"overfit_ratio", "early_stop_ratio"} <= set(shipped.training_diagnostics.metric_bounds)


def test_rules_at_the_edge_of_what_a_metric_can_be_are_kept(tmp_path):
    # A rule some model can still pass is the user's to set, however strict: the limit itself passes a
    # rule, and only a critical bound is reached at its value.
    pol = policy(acceptance_rules={"step5": {"min_cv_r2": 1, "max_val_mse": 0, "max_overfit_ratio": 0}},
                 training_diagnostics={"metric_bounds": {"cv_r2": {"warning": 1, "critical": 0.99},
                                                         "overfit_ratio": {"warning": 0, "critical": 1e-9},
                                                         "nn_dead_neuron_pct": {"critical": 0}}})
    assert len(thresholds_for(pol, STEP5)) == 3
    j = run_judge(tmp_path, step_run(0), make_sidecar(metrics=metrics(cv_r2_mean=1.0, val_mse=0.0, overfit_ratio=0.0)),
                  pol=pol)
    assert j.decision is Decision.PROCEED


def test_compare_results_of_another_model_or_run_are_not_recorded(tmp_path):
    # A loser's entry pointing at another model type's sidecar, or at one another run wrote, gave
    # that model type a critical verdict in the skip registry it never earned.
    catboost = write_sidecar(tmp_path / "a" / "catboost", make_sidecar("catboost", metrics=BAD_METRICS,
                                                                         parent_run_id="r1"))
    other_run = write_sidecar(tmp_path / "a" / "xgboost",
                              make_sidecar("xgboost", metrics=BAD_METRICS, parent_run_id="another"))
    summary = {"winner": "neural_net", "models": {
        "lightgbm": {"status": "SUCCESS", "sidecar_path": str(catboost)},
        "xgboost": {"status": "SUCCESS", "sidecar_path": str(other_run)},
        "catboost": {"status": "SUCCESS", "sidecar_path": str(catboost)},
    }}
    j = run_judge(tmp_path, step_run(0), make_sidecar(parent_run_id="r1"), summary=summary, run_id="r1")
    assert j.decision is Decision.PROCEED
    assert {m: v.critical for m, v in j.verdicts.items()} == {"neural_net": False, "catboost": True}
    assert any("lightgbm: its sidecar" in w and "model type 'catboost'" in w for w in j.warnings)
    assert any("xgboost: its sidecar" in w and "belongs to run 'another'" in w for w in j.warnings)


def test_compare_summary_naming_another_winner_records_nothing(tmp_path):
    # Another compare run in the same working directory rewrote the summary: its verdicts are not this run's.
    summary = {"winner": "catboost", "models": {"catboost": {"status": "SUCCESS", "training_metrics": GOOD_METRICS},
                                                "xgboost": {"status": "FAILED", "error": "boom"}}}
    j = run_judge(tmp_path, step_run(0), make_sidecar(), summary=summary)
    assert j.decision is Decision.PROCEED and set(j.verdicts) == {"neural_net"}
    assert any("names winner 'catboost'" in w and "'neural_net'" in w for w in j.warnings)


@pytest.mark.parametrize("changes, words", [
    ({"cv_r2_mean": 5.0}, "`training_metrics.cv_r2_mean` is 5, which no model can have (cv_r2_mean is at most 1)"),
    ({"test_r2": 1.5}, "`training_metrics.test_r2` is 1.5"),
    ({"val_mse": -1.0}, "`training_metrics.val_mse` is -1, which no model can have (val_mse is at least 0)"),
    ({"overfit_ratio": -0.5}, "`training_metrics.overfit_ratio` is -0.5"),
    ({"early_stop_ratio": 1.5}, "`training_metrics.early_stop_ratio` is 1.5"),
])
def test_metrics_no_model_can_have_escalate(tmp_path, changes, words):
    # A damaged sidecar's R² of 5 or negative MSE passed every rule: PROCEED on a model nothing was known about.
    sidecar = make_sidecar(metrics=metrics(**changes))
    j = run_judge(tmp_path, step_run(0), sidecar)
    assert j.decision is Decision.ESCALATE and any(words in r for r in j.reasons), j.reasons


def test_compare_entries_that_are_no_model_type_are_ignored(tmp_path):
    # An entry keyed "" reached record_result, whose ValueError ended the WATCHER in a traceback with the
    # run's decision never logged; "svm" would have been a junk registry entry.
    summary = {"winner": "neural_net", "models": {"": {"status": "FAILED"}, "svm": {"status": "FAILED"},
                                                  "xgboost": {"status": "FAILED", "error": "boom"}}}
    j = run_judge(tmp_path, step_run(0), make_sidecar(), summary=summary)
    assert j.decision is Decision.PROCEED and set(j.verdicts) == {"neural_net", "xgboost"}
    assert any("'' is not a model type" in w for w in j.warnings)
    assert any("'svm' is not a model type" in w for w in j.warnings)
