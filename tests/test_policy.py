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
    assert policy.training_diagnostics == {} and policy.acceptance_rules == {}


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
    assert policy.acceptance_rules["step5"] == {"min_cv_r2": 0.0, "max_overfit_ratio": 1.5}
    # Every key the shipped file sets is a field of the dataclass it fills (nothing ignored).
    raw = json.loads(PROJECT_POLICY_PATH.read_text())
    for section, cls in (("training", TrainingPolicy), ("watcher", WatcherPolicy)):
        names = {f.name for f in dataclasses.fields(cls)}
        assert {k for k in raw[section] if not k.startswith("_")} <= names


def test_comment_keys_are_documentation_and_other_steps_sections_are_kept_unread():
    raw = {
        "_comment": "top level",
        "training": {"_comment": "why", "use_persistent_workers": True},
        "training_diagnostics": {"_note": "x", "max_overfit_ratio_warning": 1},
        "acceptance_rules": {"_comment": "per step", "step5": {"_why": "x", "min_cv_r2": 0}},
        "step3": {"anything": "the larger pipeline's file has sections for other steps"},
    }
    policy = parse_policy(raw, SOURCE)
    assert policy.training.use_persistent_workers is True
    assert policy.training_diagnostics == {"max_overfit_ratio_warning": 1.0}
    assert policy.acceptance_rules == {"step5": {"min_cv_r2": 0.0}}
    assert policy.raw["step3"] == raw["step3"]


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
    # numbers in the threshold maps
    ({"training_diagnostics": {"max_overfit_ratio_warning": "1.3"}},
     "training_diagnostics.max_overfit_ratio_warning must be a finite number, got '1.3'"),
    ({"training_diagnostics": {"max_overfit_ratio_warning": True}},
     "training_diagnostics.max_overfit_ratio_warning must be a finite number, got True"),
    ({"acceptance_rules": {"step5": {"min_cv_r2": math.nan}}}, "acceptance_rules.step5.min_cv_r2 must be a finite number, got nan"),
    ({"acceptance_rules": {"step5": {"min_cv_r2": None}}}, "acceptance_rules.step5.min_cv_r2 must be a finite number, got None"),
    # ranges that involve more than one key
    ({"watcher": {"retry_trials_multiplier": 0.5}}, "watcher.retry_trials_multiplier must be >= 1, got 0.5"),
    ({"training": {"heartbeat_interval_s": 60, "heartbeat_grace_s": 60}},
     "training.heartbeat_grace_s (60.0) must exceed training.heartbeat_interval_s (60.0)"),
    ({"training": {"heartbeat_interval_s": 200}}, "training.heartbeat_grace_s (120.0) must exceed"),
    ({"training": {"heartbeat_interval_s": 30, "heartbeat_grace_s": 10}},
     "training.heartbeat_grace_s (10.0) must exceed training.heartbeat_interval_s (30.0), or a live trial would look dead"),
    ({"training": {"max_consecutive_failed_trials": 0}}, "training.max_consecutive_failed_trials must be >= 1, got 0"),
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
                     "heartbeat_interval_s": 0.5, "heartbeat_grace_s": 0.6, "worker_job_timeout_s": 1e-3},
        "watcher": {"retry_trials_multiplier": 1, "max_retries": 0},
        "training_diagnostics": {"min_test_r2_warning": -1},
    }, SOURCE)
    assert policy.training.max_worker_restarts == 0 and policy.training.heartbeat_grace_s == 0.6
    assert policy.watcher.retry_trials_multiplier == 1.0 and policy.watcher.max_retries == 0
    assert policy.training_diagnostics == {"min_test_r2_warning": -1.0}
