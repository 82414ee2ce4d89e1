"""--params -> step 5 flags: types, unknown keys, defaults, retries, the step registry."""
from __future__ import annotations

import subprocess

import pytest

from step5.errors import UsageError
from step5.launch import child_environment, module_command
from step5.testing.fake_step5 import _parser as fake_step5_parser
from step5.watcher.steps import (
    MODEL_TYPES,
    build_command,
    get_step,
    retry_params,
    steps_in_range,
    validate_params,
)

STEP5 = get_step(5)


def argv_for(params: dict, policy: str = "pol.json") -> list[str]:
    argv = build_command(STEP5, validate_params(STEP5, params), policy_path=policy, python="py")
    program = module_command(STEP5.module, "py")
    assert argv[:len(program)] == program
    return argv[len(program):]


def test_defaults_and_policy_pass_through():
    argv = argv_for({})
    assert argv == ["--survivors", "survivors_with_scores.json", "--lottery-data", "train_history.json",
                    "--policy", "pol.json"]


def test_proposal_test4_params():
    argv = argv_for({"compare_models": True, "trials": 20})
    assert "--compare-models" in argv
    assert argv[argv.index("--trials") + 1] == "20"


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"k_folds": 3}, ["--k-folds", "3"]),
        ({"test_holdout": 0.25}, ["--test-holdout", "0.25"]),
        ({"dropout": 0}, ["--dropout", "0.0"]),  # an int is a fine float
        ({"model_type": "xgboost"}, ["--model-type", "xgboost"]),
        ({"persistent_workers": True}, ["--persistent-workers"]),
        ({"persistent_workers": False}, ["--no-persistent-workers"]),
        ({"normalize_features": False}, ["--no-normalize-features"]),
        ({"use_leaky_relu": True}, ["--use-leaky-relu"]),
        ({"enable_diagnostics": True}, ["--enable-diagnostics"]),
        ({"gpus": "0,1"}, ["--gpus", "0,1"]),
        ({"gpus": [0, 2]}, ["--gpus", "0,2"]),
        ({"survivors": "s.json"}, ["--survivors", "s.json"]),
    ],
)
def test_each_kind_maps_to_its_flag(params, expected):
    argv = argv_for(params)
    i = argv.index(expected[0])
    assert argv[i:i + len(expected)] == expected


def test_store_true_false_adds_nothing():
    assert "--compare-models" not in argv_for({"compare_models": False})
    assert "--enable-diagnostics" not in argv_for({"enable_diagnostics": False})


@pytest.mark.parametrize(
    "params, words",
    [
        ({"trials": "20"}, "`trials`"),
        ({"trials": 2.5}, "must be an int"),
        ({"trials": True}, "must be an int"),
        ({"trials": 0}, "an int >= 1"),
        ({"compare_models": 1}, "true or false"),
        ({"compare_models": "yes"}, "true or false"),
        ({"persistent_workers": "false"}, "true or false"),
        ({"test_holdout": 1.5}, "(0, 1)"),
        ({"test_holdout": float("nan")}, "finite number"),
        ({"model_type": "random_forest"}, "must be one of"),
        ({"gpus": "0;1"}, "GPU list"),
        ({"gpus": [0, -1]}, "GPU list"),
        ({"gpus": []}, "GPU list"),
        ({"survivors": ""}, "non-empty string"),
        ({"log_level": "LOUD"}, "must be one of"),
    ],
)
def test_wrong_types_are_usage_errors_naming_the_key(params, words):
    with pytest.raises(UsageError) as info:
        validate_params(STEP5, params)
    assert words in str(info.value)
    assert info.value.exit_code == 64


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(UsageError, match=r"unknown --params key `compare_model`.*did you mean `compare_models`"):
        validate_params(STEP5, {"compare_model": True})
    with pytest.raises(UsageError, match=r"did you mean `k_folds`"):
        validate_params(STEP5, {"k-folds": 3})
    with pytest.raises(UsageError, match=r"unknown --params key `banana`"):
        validate_params(STEP5, {"banana": 1})


def test_policy_is_not_a_params_key():
    with pytest.raises(UsageError, match="--policy"):
        validate_params(STEP5, {"policy": "other.json"})


def test_params_must_be_an_object():
    with pytest.raises(UsageError, match="JSON object"):
        validate_params(STEP5, [1, 2])


def test_retry_changes_trials_and_seed():
    params = validate_params(STEP5, {"trials": 20, "seed": 7})
    first = retry_params(STEP5, params, 1, trials_multiplier=1.5, seed_increment=1)
    second = retry_params(STEP5, params, 2, trials_multiplier=1.5, seed_increment=1)
    assert (first["trials"], first["seed"]) == (30, 8)
    assert (second["trials"], second["seed"]) == (45, 9)
    assert params == {"trials": 20, "seed": 7}  # the original is untouched


def test_retry_of_a_named_study_uses_a_new_study():
    params = validate_params(STEP5, {"study_name": "nightly"})
    assert retry_params(STEP5, params, 2, trials_multiplier=1.0, seed_increment=1)["study_name"] == "nightly_retry2"


def test_retry_starts_from_the_step_defaults_when_absent():
    retried = retry_params(STEP5, {}, 1, trials_multiplier=1.0, seed_increment=3)
    assert retried == {"trials": 50, "seed": 45}


def test_only_step_5_is_shipped():
    assert [s.number for s in steps_in_range(5, 5)] == [5]
    with pytest.raises(UsageError, match=r"step 4 is not shipped.*\[5\]"):
        steps_in_range(4, 5)
    with pytest.raises(UsageError, match="step 6"):
        steps_in_range(5, 6)
    with pytest.raises(UsageError, match="before"):
        steps_in_range(5, 4)


def _every_key() -> dict:
    return {
        "survivors": "s.json", "lottery_data": "h.json", "model_type": "lightgbm", "compare_models": True,
        "trials": 3, "k_folds": 2, "test_holdout": 0.3, "output_dir": "out", "study_name": "st",
        "storage": "sqlite:///x.db", "seed": 1, "target": "holdout_quality", "persistent_workers": False,
        "gpus": [0], "cpu_workers": 2, "normalize_features": True, "use_leaky_relu": False, "dropout": 0.1,
        "enable_diagnostics": True, "prng_type": "java_lcg", "mod": 1000, "holdout_draws": 50,
        "parent_run_id": "abc", "log_level": "DEBUG",
    }


def test_every_key_is_covered_and_accepted_by_a_spec_cli():
    params = _every_key()
    assert set(params) == {p.name for p in STEP5.params}
    args = fake_step5_parser().parse_args(argv_for(params))
    assert args.model_type in MODEL_TYPES
    assert args.persistent_workers is False and args.use_leaky_relu is False
    assert args.gpus == "0" and args.policy == "pol.json" and args.holdout_draws == 50


def test_every_flag_exists_in_the_real_step5():
    """The mapping must not produce a flag the real optimizer does not have."""
    help_text = subprocess.run(
        [*module_command(STEP5.module), "--help"], capture_output=True, text=True, timeout=120,
        env=child_environment(),
    ).stdout
    for flag in argv_for(_every_key()):
        if flag.startswith("--"):
            assert flag in help_text, f"step 5 --help does not mention {flag}"
