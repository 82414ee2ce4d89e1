"""The policy file (step5.policy, SPEC sections 8 and 10): defaults, which file, and every
way a file can be wrong, each a PolicyError that names the file and the key."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from step5.errors import PolicyError
from step5.policy import (
    DEFAULT_POLICY_PATH,
    WORSE_ABOVE,
    WORSE_BELOW,
    DiagnosticsPolicy,
    MetricBound,
    PROJECT_POLICY_PATH,
    PRUNER_NAMES,
    Policy,
    TrainingPolicy,
    WatcherPolicy,
    find_policy,
    load_policy,
    parse_policy,
)

SOURCE = "site/policy.json"


def write(folder: Path, content: object, name: str = "policy.json") -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def test_no_policy_means_every_default():
    policy = load_policy(None)
    assert policy == Policy()
    assert policy.source is None
    assert policy.training.use_persistent_workers is False  # SPEC 8: the kill switch absent -> off
    assert policy.training_diagnostics == DiagnosticsPolicy() and policy.acceptance_rules == {}
    # The pipeline's health check defaults (training_health_check.py DEFAULT_METRIC_BOUNDS /
    # DEFAULT_SKIP_RULES, used when its policy has no training_diagnostics section).
    bounds = policy.training_diagnostics.metric_bounds
    assert (bounds["overfit_ratio"].warning, bounds["overfit_ratio"].critical) == (1.3, 1.5)
    assert (bounds["early_stop_ratio"].warning, bounds["early_stop_ratio"].critical) == (0.3, 0.15)
    assert policy.training_diagnostics.max_consecutive_critical == 3
    assert policy.training_diagnostics.skip_duration_hours == 24.0


def test_an_empty_object_is_every_default_and_remembers_its_source(tmp_path):
    path = write(tmp_path, {})
    policy = load_policy(path)
    assert policy.training == TrainingPolicy() and policy.watcher == WatcherPolicy()
    assert policy.source == str(path)


def test_absent_kill_switch_is_false_and_present_keys_are_read(tmp_path):
    policy = load_policy(write(tmp_path, {"training": {"worker_job_timeout_s": 30, "max_worker_restarts": 2}}))
    assert policy.training.use_persistent_workers is False
    assert policy.training.worker_job_timeout_s == 30.0 and isinstance(policy.training.worker_job_timeout_s, float)
    assert policy.training.max_worker_restarts == 2
    assert policy.training.worker_ready_timeout_s == TrainingPolicy().worker_ready_timeout_s


def test_the_projects_policy_is_valid_and_turns_the_workers_on():
    policy = load_policy(PROJECT_POLICY_PATH)
    assert policy.training.use_persistent_workers is True
    assert policy.acceptance_rules == {"min_cv_r2": 0.0}
    assert policy.training_diagnostics.metric_bounds["overfit_ratio"].critical == 1.5
    # Every key the shipped file sets is a field of the dataclass it fills (nothing ignored).
    raw = json.loads(PROJECT_POLICY_PATH.read_text())
    for section, cls in (("training", TrainingPolicy), ("watcher", WatcherPolicy)):
        names = {f.name for f in dataclasses.fields(cls)}
        assert {k for k in raw[section] if not k.startswith("_")} <= names


def test_comment_keys_are_documentation_and_other_steps_sections_are_kept_unread():
    raw = {
        "_comment": "top level",
        "training": {"_comment": "why", "use_persistent_workers": True},
        "training_diagnostics": {"_note": "x", "metric_bounds": {"_why": "x", "overfit_ratio": {"critical": 2}}},
        "acceptance_rules": {"_comment": "per step", "step5": {"_why": "x", "min_cv_r2": 0}},
        "step3": {"anything": "the larger pipeline's file has sections for other steps"},
    }
    policy = parse_policy(raw, SOURCE)
    assert policy.training.use_persistent_workers is True
    assert list(policy.training_diagnostics.metric_bounds) == ["overfit_ratio"]
    assert policy.training_diagnostics.metric_bounds["overfit_ratio"] == MetricBound("overfit_ratio", None, 2.0, WORSE_ABOVE)
    assert policy.acceptance_rules == {"min_cv_r2": 0.0}
    assert policy.raw["step3"] == raw["step3"]


#: A governance file shaped like the existing pipeline's watcher_policies.json (read from its
#: training_health_check.py::_load_policies / _evaluate_metrics / _check_skip_registry,
#: agents/watcher_agent.py::_get_max_training_retries and the file itself): sections for
#: other parts of the pipeline, `acceptance_rules` holding another agent's scalar rules,
#: `training_diagnostics` in its own schema, and no `training` section at all.
PIPELINE_SHAPED = {
    "schema_version": "1.0.0",
    "_note": "governance thresholds",
    "test_mode": False,
    "retrain_triggers": {"retrain_after_n_draws": 10, "_note": "x"},
    "acceptance_rules": {"_description": "rules for proposed parameter changes", "max_parameter_delta": 0.3,
                         "max_parameters_per_proposal": 3, "cooldown_runs": 3},
    "escalation": {"escalate_on_divergence": True},
    "parameter_bounds": {"search_strategy": {"type": "choice", "choices": ["a", "b"]}},
    "strategy_change_cooldown_episodes": 5,
    "training_diagnostics": {
        "enabled": True,
        "description": "post step 5 health check",
        "severity_thresholds": {
            "ok": {"action": "PROCEED", "log_level": "info", "description": "x"},
            "warning": {"action": "PROCEED_WITH_NOTE", "log_level": "warning"},
            "critical": {"action": "RETRY_OR_SKIP", "log_level": "error", "max_retries": 2},
        },
        "metric_bounds": {
            "nn_dead_neuron_pct": {"warning": 25.0, "critical": 50.0, "description": "x"},
            "nn_gradient_spread_ratio": {"warning": 100.0, "critical": 1000.0},
            "overfit_ratio": {"warning": 1.3, "critical": 1.5, "description": "val loss / train loss"},
            "early_stop_ratio": {"warning": 0.3, "critical": 0.15},
            "unused_feature_pct": {"warning": 40.0, "critical": 70.0},
        },
        "model_skip_rules": {"max_consecutive_critical": 3, "skip_duration_hours": 24, "description": "x"},
    },
    "notifications": {"telegram_enabled": True, "classes": {"critical": {"enabled": True}}},
    "approval_route": "orchestrator",
}


def test_the_pipelines_own_governance_file_is_read_as_it_is():
    policy = parse_policy(PIPELINE_SHAPED, SOURCE)
    assert policy.training == TrainingPolicy()  # no training section: every default, kill switch off
    assert policy.acceptance_rules == {}  # the section's scalar rules are another agent's
    diag = policy.training_diagnostics
    assert diag.enabled and diag.max_critical_retries == 2
    assert diag.max_consecutive_critical == 3 and diag.skip_duration_hours == 24.0
    assert diag.metric_bounds["early_stop_ratio"] == MetricBound("early_stop_ratio", 0.3, 0.15, WORSE_BELOW)
    assert diag.metric_bounds["overfit_ratio"].severity(1.3) == "warning"  # reached, as the health check's >=
    assert diag.metric_bounds["overfit_ratio"].severity(1.5) == "critical"
    assert diag.metric_bounds["early_stop_ratio"].severity(0.15) == "critical"
    assert diag.metric_bounds["early_stop_ratio"].severity(0.31) == "ok"


def test_step5s_keys_live_beside_the_pipelines_sections():
    raw = {**PIPELINE_SHAPED, "training": {"use_persistent_workers": True},
           "acceptance_rules": {**PIPELINE_SHAPED["acceptance_rules"], "step5": {"min_cv_r2": 0.1}}}
    policy = parse_policy(raw, SOURCE)
    assert policy.training.use_persistent_workers is True
    assert policy.acceptance_rules == {"min_cv_r2": 0.1}


def test_the_shipped_policy_has_the_pipelines_shape_for_the_sections_it_shares():
    raw = json.loads(PROJECT_POLICY_PATH.read_text())
    ours, theirs = raw["training_diagnostics"], PIPELINE_SHAPED["training_diagnostics"]
    assert set(theirs) <= set(ours)
    assert set(ours["metric_bounds"]) == set(theirs["metric_bounds"])
    assert set(ours["model_skip_rules"]) == set(theirs["model_skip_rules"])
    assert ours["severity_thresholds"]["critical"]["max_retries"] == 2


def test_a_metric_the_pipeline_adds_later_takes_its_direction_from_its_bounds():
    raw = {"training_diagnostics": {"metric_bounds": {"new_ratio": {"warning": 0.5, "critical": 0.2}}}}
    bound = parse_policy(raw, SOURCE).training_diagnostics.metric_bounds["new_ratio"]
    assert bound.worse == WORSE_BELOW and bound.severity(0.1) == "critical"


@pytest.mark.parametrize("misspelt, meant", [("trainng", "training"), ("Training", "training"),
                                             ("wacher", "watcher"), ("acceptance_rule", "acceptance_rules")])
def test_a_section_spelt_almost_like_ours_is_refused_not_silently_ignored(misspelt, meant):
    with pytest.raises(PolicyError) as info:
        parse_policy({misspelt: {"use_persistent_workers": False}}, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: unknown section {misspelt!r}; did you mean {meant!r}?")


# --- which file -------------------------------------------------------------------------


def test_without_policy_the_working_directorys_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {}, DEFAULT_POLICY_PATH)
    path, why = find_policy()
    assert path == Path(DEFAULT_POLICY_PATH) and "working directory" in why
    assert path.resolve() == (tmp_path / DEFAULT_POLICY_PATH).resolve()


def test_without_policy_or_a_local_file_the_projects_own_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, why = find_policy()
    assert path == PROJECT_POLICY_PATH and "project's own" in why
    assert path.is_file()


def test_a_directory_named_like_the_policy_is_not_a_policy_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_POLICY_PATH).mkdir()
    assert find_policy()[0] == PROJECT_POLICY_PATH


# --- unreadable files ---------------------------------------------------------------------


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(PolicyError, match=f"policy file not found: {missing}"):
        load_policy(missing)


def test_a_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(PolicyError, match=f"cannot read policy file {tmp_path}"):
        load_policy(tmp_path)


@pytest.mark.parametrize("content", [b"", b"{", b'{"training": {"fuse_folds": tru}}', b"\xff\xfe", b"{'a': 1}"])
def test_malformed_json_is_an_error_naming_the_file(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(PolicyError, match=f"policy file {path} is not valid JSON"):
        load_policy(path)


@pytest.mark.parametrize("raw, kind", [([], "list"), ("x", "str"), (3, "int"), (None, "NoneType")])
def test_the_top_level_must_be_an_object(tmp_path, raw, kind):
    path = write(tmp_path, raw)
    with pytest.raises(PolicyError, match=f"{path}: the policy must be a JSON object, got {kind}"):
        load_policy(path)


# --- invalid values: each names the file and the key ---------------------------------------

BAD = [
    # sections
    ({"training": []}, "`training` must be an object, got list"),
    ({"watcher": None}, "`watcher` must be an object, got NoneType"),
    ({"training_diagnostics": 1.5}, "`training_diagnostics` must be an object, got float"),
    ({"acceptance_rules": "strict"}, "`acceptance_rules` must be an object, got str"),
    ({"acceptance_rules": {"step5": [1]}}, "acceptance_rules.step5 must be an object, got list"),
    # training_diagnostics, in the pipeline's schema: the values Step 5 reads
    ({"training_diagnostics": {"enabled": "yes"}}, "training_diagnostics.enabled must be true or false, got 'yes'"),
    ({"training_diagnostics": {"metric_bounds": []}}, "training_diagnostics.metric_bounds must be an object, got list"),
    ({"training_diagnostics": {"metric_bounds": {"overfit_ratio": 1.5}}},
     "training_diagnostics.metric_bounds.overfit_ratio must be an object like"),
    ({"training_diagnostics": {"metric_bounds": {"overfit_ratio": {"warning": "1.3"}}}},
     "training_diagnostics.metric_bounds.overfit_ratio.warning must be a finite number, got '1.3'"),
    ({"training_diagnostics": {"metric_bounds": {"overfit_ratio": {"description": "x"}}}},
     "training_diagnostics.metric_bounds.overfit_ratio needs a `warning` or a `critical` bound"),
    ({"training_diagnostics": {"metric_bounds": {"overfit_ratio": {"warning": 2, "critical": 1.5}}}},
     "training_diagnostics.metric_bounds.overfit_ratio: `critical` 1.5 is less severe than `warning` 2"),
    ({"training_diagnostics": {"metric_bounds": {"early_stop_ratio": {"warning": 0.1, "critical": 0.3}}}},
     "early_stop_ratio is worse lower"),
    ({"training_diagnostics": {"model_skip_rules": {"max_consecutive_critical": 0}}},
     "training_diagnostics.model_skip_rules.max_consecutive_critical must be an int >= 1, got 0"),
    ({"training_diagnostics": {"model_skip_rules": {"skip_duration_hours": "1d"}}},
     "training_diagnostics.model_skip_rules.skip_duration_hours must be a positive number, got '1d'"),
    ({"training_diagnostics": {"severity_thresholds": {"critical": {"max_retries": -1}}}},
     "training_diagnostics.severity_thresholds.critical.max_retries must be a non-negative int, got -1"),
    ({"training_diagnostics": {"max_overfit_ratio_warning": 1.3}},
     "max_overfit_ratio_warning: flat threshold keys are no longer read; write them as metric_bounds entries"),
    # unknown keys
    ({"training": {"use_persistant_workers": True}}, "training: unknown key `use_persistant_workers`; expected one of"),
    ({"watcher": {"timeout": 5}}, "watcher: unknown key `timeout`"),
    # booleans
    ({"training": {"use_persistent_workers": "yes"}}, "training.use_persistent_workers must be true or false, got 'yes'"),
    ({"training": {"fuse_folds": 1}}, "training.fuse_folds must be true or false, got 1"),
    # non-negative ints
    ({"training": {"max_worker_restarts": -1}}, "training.max_worker_restarts must be a non-negative int, got -1"),
    ({"training": {"max_worker_restarts": 1.5}}, "training.max_worker_restarts must be a non-negative int, got 1.5"),
    ({"training": {"max_worker_restarts": True}}, "training.max_worker_restarts must be a non-negative int, got True"),
    ({"training": {"trials_in_flight": "4"}}, "training.trials_in_flight must be a non-negative int, got '4'"),
    # a batch's trials are all asked before any trains: 10**18 asked without end and trained none
    ({"training": {"trials_in_flight": 10**18}}, "training.trials_in_flight must be at most 1024 (a batch's trials"),
    ({"watcher": {"max_retries": None}}, "watcher.max_retries must be a non-negative int, got None"),
    # positive numbers
    ({"training": {"worker_job_timeout_s": 0}}, "training.worker_job_timeout_s must be a positive number, got 0"),
    ({"training": {"worker_ready_timeout_s": -5}}, "training.worker_ready_timeout_s must be a positive number, got -5"),
    ({"training": {"worker_job_timeout_s": "600"}}, "training.worker_job_timeout_s must be a positive number, got '600'"),
    ({"training": {"worker_job_timeout_s": False}}, "training.worker_job_timeout_s must be a positive number, got False"),
    ({"watcher": {"step_timeout_s": math.inf}}, "watcher.step_timeout_s must be a positive number, got inf"),
    ({"watcher": {"kill_grace_s": math.nan}}, "watcher.kill_grace_s must be a positive number, got nan"),
    # choices
    ({"training": {"pruner": "hyperband"}}, 'training.pruner must be one of "none", "median", "successive_halving"'),
    ({"training": {"pruner": None}}, "training.pruner must be one of"),
    # numbers in the acceptance rules
    ({"acceptance_rules": {"step5": {"min_cv_r2": math.nan}}}, "acceptance_rules.step5.min_cv_r2 must be a finite number, got nan"),
    ({"acceptance_rules": {"step5": {"min_cv_r2": None}}}, "acceptance_rules.step5.min_cv_r2 must be a finite number, got None"),
    # ranges that involve more than one key
    ({"watcher": {"retry_trials_multiplier": 0.5}}, "watcher.retry_trials_multiplier must be >= 1, got 0.5"),
    # a bigger multiplier overflowed the WATCHER's float arithmetic at a retry (a traceback), or gave even a
    # 1-trial run's first retry more trials than step 5 takes
    ({"watcher": {"retry_trials_multiplier": 1e300}},
     "watcher.retry_trials_multiplier must be at most 9.22337e+18 (step 5's largest --trials"),
    # the attempt count past 64 bits crashed the decision log's JSON writer after the first attempt (a traceback)
    ({"watcher": {"max_retries": 2**64 - 1}, "training_diagnostics": {"severity_thresholds": {"critical": {"max_retries": 1}}}},
     "the policy allows 18446744073709551616 retries (watcher.max_retries 18446744073709551615 + "
     "training_diagnostics.severity_thresholds.critical.max_retries 1), more attempts than the decision log can count"),
    ({"training": {"heartbeat_interval_s": 60, "heartbeat_grace_s": 60}},
     "training.heartbeat_grace_s (60.0) must exceed training.heartbeat_interval_s (60.0)"),
    ({"training": {"heartbeat_interval_s": 200}}, "training.heartbeat_grace_s (120.0) must exceed"),
    ({"training": {"heartbeat_interval_s": 30, "heartbeat_grace_s": 10}},
     "training.heartbeat_grace_s (10.0) must exceed training.heartbeat_interval_s (30.0), or a live trial would look dead"),
    ({"training": {"max_consecutive_failed_trials": 0}}, "training.max_consecutive_failed_trials must be >= 1, got 0"),
    # durations Step 5 waits on: past threading.TIMEOUT_MAX they raised OverflowError in the run (a traceback)
    ({"training": {"worker_job_timeout_s": 1e10}},
     "training.worker_job_timeout_s must be at most 1e+09 seconds (about 31 years), got 1e+10"),
    ({"training": {"worker_ready_timeout_s": 1e300}}, "training.worker_ready_timeout_s must be at most 1e+09 seconds"),
    ({"training": {"heartbeat_interval_s": 1e10, "heartbeat_grace_s": 1e11}},
     "training.heartbeat_interval_s must be at most 1e+09 seconds"),
    ({"training": {"storage_outage_s": 1e12}}, "training.storage_outage_s must be at most 1e+09 seconds"),
    ({"training": {"worker_spawn_stagger_s": 1e12}}, "training.worker_spawn_stagger_s must be at most 1e+09 seconds"),
    # ... and the WATCHER's: a kill_grace_s of 1e300 was logged as a 300-digit number
    ({"watcher": {"kill_grace_s": 1e300}}, "watcher.kill_grace_s must be at most 1e+09 seconds (about 31 years), "
                                           "got 1e+300"),
    ({"watcher": {"step_timeout_s": 1e10}}, "watcher.step_timeout_s must be at most 1e+09 seconds"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:48] for _, m in BAD])
def test_an_invalid_value_is_an_error_naming_the_file_and_the_key(raw, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(raw, SOURCE)
    text = str(info.value)
    assert text.startswith(f"{SOURCE}: "), text
    assert message in text, text


def test_an_invalid_file_on_disk_names_its_path(tmp_path):
    path = write(tmp_path, {"training": {"use_persistent_workers": "yes"}})
    with pytest.raises(PolicyError, match=f"^{path}: training.use_persistent_workers must be true or false"):
        load_policy(path)


def test_an_unknown_key_lists_the_keys_that_exist():
    with pytest.raises(PolicyError) as info:
        parse_policy({"training": {"fuse": True}}, SOURCE)
    expected = sorted(f.name for f in dataclasses.fields(TrainingPolicy))
    assert str(expected) in str(info.value)


@pytest.mark.parametrize("name", PRUNER_NAMES)
def test_every_pruner_name_is_accepted(name):
    assert parse_policy({"training": {"pruner": name}}, SOURCE).training.pruner == name


def test_boundary_values_are_accepted():
    policy = parse_policy({
        "training": {"max_worker_restarts": 0, "trials_in_flight": 0, "max_consecutive_failed_trials": 1,
                     "heartbeat_interval_s": 0.5, "heartbeat_grace_s": 0.6, "worker_job_timeout_s": 1e-3,
                     "worker_ready_timeout_s": 1e9, "storage_outage_s": 1e9},
        "watcher": {"retry_trials_multiplier": 1, "max_retries": 0},
        "training_diagnostics": {"metric_bounds": {"test_r2": {"warning": -1}},
                                 "severity_thresholds": {"critical": {"max_retries": 0}}},
    }, SOURCE)
    # the most retries the decision log counts
    assert parse_policy({"watcher": {"max_retries": 2**63 - 2}, "training_diagnostics": {
        "severity_thresholds": {"critical": {"max_retries": 0}}}}, SOURCE).watcher.max_retries == 2**63 - 2
    assert policy.training.max_worker_restarts == 0 and policy.training.heartbeat_grace_s == 0.6
    assert policy.training.worker_ready_timeout_s == policy.training.storage_outage_s == 1e9
    assert policy.watcher.retry_trials_multiplier == 1.0 and policy.watcher.max_retries == 0
    assert policy.training_diagnostics.metric_bounds == {"test_r2": MetricBound("test_r2", -1.0, None, WORSE_BELOW)}
    assert policy.training_diagnostics.max_critical_retries == 0


# --- the device environment and the spawn stagger (ROCm rigs) --------------------------------


def test_a_rigs_device_environment_and_stagger_are_read():
    policy = parse_policy({"training": {
        "device_env": {"HSA_OVERRIDE_GFX_VERSION": "10.3.0", "HSA_ENABLE_SDMA": "0", "_comment": "RX 6600"},
        "worker_spawn_stagger_s": 4,
    }}, SOURCE)
    assert policy.training.device_env == {"HSA_OVERRIDE_GFX_VERSION": "10.3.0", "HSA_ENABLE_SDMA": "0"}
    assert policy.training.worker_spawn_stagger_s == 4.0


def test_a_cuda_host_leaves_them_at_their_defaults():
    training = parse_policy({"training": {"worker_spawn_stagger_s": 0}}, SOURCE).training
    assert training.device_env == {} and training.worker_spawn_stagger_s == 0.0
    assert TrainingPolicy().device_env == {} and TrainingPolicy().worker_spawn_stagger_s == 0.0


@pytest.mark.parametrize("training, message", [
    ({"device_env": ["HSA_ENABLE_SDMA=0"]}, "training.device_env must be an object of variable names to strings"),
    ({"device_env": {"HSA_ENABLE_SDMA": 0}}, "training.device_env.HSA_ENABLE_SDMA must be a string, got 0"),
    ({"device_env": {"HIP_VISIBLE_DEVICES": "0"}}, "training.device_env.HIP_VISIBLE_DEVICES is set by Step 5 itself"),
    ({"device_env": {"A B": "1"}}, "training.device_env.A B is not an environment variable name"),
    ({"worker_spawn_stagger_s": -4}, "training.worker_spawn_stagger_s must be a non-negative number, got -4"),
    ({"worker_spawn_stagger_s": "4s"}, "training.worker_spawn_stagger_s must be a non-negative number"),
    ({"worker_spawn_stagger_s": float("nan")}, "training.worker_spawn_stagger_s must be a non-negative number"),
    ({"host_memory_headroom": 1}, "training.host_memory_headroom must be a number in [0, 1), got 1"),
    ({"host_memory_headroom": -0.1}, "training.host_memory_headroom must be a number in [0, 1), got -0.1"),
    ({"host_memory_headroom": "20%"}, "training.host_memory_headroom must be a number in [0, 1), got '20%'"),
])
def test_a_bad_device_environment_or_stagger_is_a_policy_error_naming_the_key(training, message):
    with pytest.raises(PolicyError) as info:
        parse_policy({"training": training}, SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: ") and message in str(info.value)


def test_the_shipped_policy_holds_the_new_keys_at_their_cuda_defaults(repo_root):
    training = load_policy(repo_root / "watcher_policies.json").training
    assert training.device_env == {} and training.worker_spawn_stagger_s == 0.0
