"""--params -> step 5 flags: derived from the optimizer's parser, types, unknown keys,
defaults, retries, the step registry."""
from __future__ import annotations

import argparse
import json

import pytest

from step5.errors import UsageError
from step5.launch import module_command
from step5.optimizer.cli import build_parser, config_from_args
from step5.policy import WatcherPolicy
from step5.watcher.steps import (
    MANIFESTS_DIR,
    build_command,
    get_step,
    manifest_defaults,
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
    assert argv == ["--survivors=survivors_with_scores.json", "--lottery-data=train_history.json",
                    "--policy", "pol.json"]


def test_proposal_test4_params():
    argv = argv_for({"compare_models": True, "trials": 20})
    assert "--compare-models" in argv and "--trials=20" in argv


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"k_folds": 3}, ["--k-folds=3"]),
        ({"test_holdout": 0.25}, ["--test-holdout=0.25"]),
        ({"dropout": 0}, ["--dropout=0"]),  # an int is a fine float
        ({"model_type": "xgboost"}, ["--model-type=xgboost"]),
        ({"persistent_workers": True}, ["--persistent-workers"]),
        ({"persistent_workers": False}, ["--no-persistent-workers"]),
        ({"normalize_features": False}, ["--no-normalize-features"]),
        ({"use_leaky_relu": True}, ["--use-leaky-relu"]),
        ({"enable_diagnostics": True}, ["--enable-diagnostics"]),
        ({"gpus": "0,1"}, ["--gpus=0,1"]),
        ({"gpus": [0, 2]}, ["--gpus=0,2"]),
        ({"gpus": "none"}, ["--gpus=none"]),  # valid for the optimizer, so valid here
        ({"survivors": "s.json"}, ["--survivors=s.json"]),
        ({"study_name": "-nightly"}, ["--study-name=-nightly"]),  # a leading "-" stays a value
        ({"fuse_folds": False}, ["--no-fuse-folds"]),
        ({"fuse_trials": 4}, ["--fuse-trials=4"]),
        ({"nn_max_epochs": 30}, ["--nn-max-epochs=30"]),
        ({"enable_vmap": True}, ["--enable-vmap"]),
        ({"batch_size_nn": 8}, ["--batch-size-nn=8"]),
        ({"dropout_override": 0.3}, ["--dropout-override=0.3"]),
        ({"device": "cuda:1"}, ["--device=cuda:1"]),
        ({"gpus": "rocm:0,rocm:1"}, ["--gpus=rocm:0,rocm:1"]),
        ({"gpus": "all"}, ["--gpus=all"]),
        ({"cluster_config": "distributed_config.json", "storage": "postgresql+psycopg://step5@db/s5"},
         ["--cluster-config=distributed_config.json"]),  # the WATCHER's step 5 starts the helpers too
    ],
)
def test_each_kind_maps_to_its_flag(params, expected):
    argv = argv_for(params)
    i = argv.index(expected[0])
    assert argv[i:i + len(expected)] == expected


def test_store_true_false_adds_nothing():
    assert "--compare-models" not in argv_for({"compare_models": False})
    assert "--enable-diagnostics" not in argv_for({"enable_diagnostics": False})
    assert "--enable-vmap" not in argv_for({"enable_vmap": False})


@pytest.mark.parametrize(
    "params, words",
    [
        ({"trials": "twenty"}, "`trials`"),
        ({"trials": 2.5}, "expected an integer"),
        ({"trials": True}, "takes a string or a number"),
        ({"trials": 0}, "expected an integer >= 1"),
        ({"compare_models": 1}, "true or false"),
        ({"compare_models": "yes"}, "true or false"),
        ({"persistent_workers": "false"}, "true or false"),
        ({"test_holdout": 1.5}, "strictly between 0 and 1"),
        ({"test_holdout": float("nan")}, "finite number"),
        ({"model_type": "random_forest"}, "must be one of"),
        ({"gpus": "0;1"}, "comma-separated list of GPU indices"),
        ({"gpus": [0, -1]}, "comma-separated list of GPU indices"),
        ({"gpus": []}, "takes a string or a number"),
        ({"gpus": {"0": 1}}, "takes a string or a number"),
        ({"survivors": ""}, "must not be empty"),
        # JSON carries a NUL, a command line cannot: starting the step raised ValueError (a traceback)
        ({"output_dir": "models\u0000x"}, "`output_dir` (step 5 flag --output-dir) must not contain a NUL character"),
        ({"gpus": ["0", "1\u0000"]}, "must not contain a NUL character"),
        ({"log_level": "LOUD"}, "must be one of"),
        ({"device": "tpu"}, "'cpu', 'cuda' or 'cuda:N'"),
        # Checks that need the whole command are the optimizer's own (config_from_args).
        ({"k_folds": 1}, "--k-folds must be >= 2"),
        ({"fuse_trials": 2, "fuse_folds": False}, "--no-fuse-folds"),
        ({"device": "cpu", "gpus": "0"}, "give one of them"),
        # An alias and its flag must agree.
        ({"dropout": 0.2, "dropout_override": 0.3}, "`dropout` and `dropout_override`"),
        ({"enable_vmap": True, "fuse_folds": False}, "`enable_vmap` and `fuse_folds`"),
    ],
)
def test_wrong_types_are_usage_errors_naming_the_key(params, words):
    with pytest.raises(UsageError) as info:
        validate_params(STEP5, params)
    assert words in str(info.value)
    assert info.value.exit_code == 64


def test_null_means_not_set_and_compare_models_takes_a_model_type_as_the_existing_optimizer_does():
    """The pipeline's manifest declares `dropout_override` with default null, and its default
    params pass compare_models together with model_type (agent_manifests/reinforcement.json;
    meta_prediction_optimizer_anti_overfit.py::main runs the comparison and ignores the type)."""
    assert validate_params(STEP5, {"dropout_override": None, "trials": None, "dropout": 0.2}) == {"dropout": 0.2}
    params = validate_params(STEP5, {"compare_models": True, "model_type": "catboost"})
    assert params == {"compare_models": True, "model_type": "catboost"}


def test_the_pipelines_manifest_gives_the_default_params(tmp_path):
    """agents/watcher_agent.py::run_step merges the manifest's default_params under the
    caller's params and passes a false boolean as no flag at all."""
    folder = tmp_path / MANIFESTS_DIR
    folder.mkdir()
    (folder / "reinforcement.json").write_text(json.dumps({"default_params": {
        "compare_models": True, "trials": 20, "model_type": "catboost", "persistent_workers": False,
        "enable_vmap": True, "k_folds": 20, "enable_diagnostics": True, "output_dir": "models/reinforcement",
        "dropout_override": None}}))
    defaults, path = manifest_defaults(STEP5, tmp_path)
    assert path == folder / "reinforcement.json"
    assert defaults == {"compare_models": True, "trials": 20, "model_type": "catboost", "enable_vmap": True,
                        "k_folds": 20, "enable_diagnostics": True, "output_dir": "models/reinforcement"}
    validate_params(STEP5, defaults)  # all together, as the manifest gives them
    (folder / "reinforcement.json").write_text("{broken")
    with pytest.raises(UsageError, match="reinforcement.json"):
        manifest_defaults(STEP5, tmp_path)
    assert manifest_defaults(STEP5, tmp_path / "elsewhere") == ({}, None)


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
    first = retry_params(STEP5, params, 1, WatcherPolicy(retry_trials_multiplier=1.5, retry_seed_increment=1))
    second = retry_params(STEP5, params, 2, WatcherPolicy(retry_trials_multiplier=1.5, retry_seed_increment=1))
    assert (first["trials"], first["seed"]) == (30, 8)
    assert (second["trials"], second["seed"]) == (45, 9)
    assert params == {"trials": 20, "seed": 7}  # the original is untouched


def test_retry_of_a_named_study_uses_a_new_study():
    params = validate_params(STEP5, {"study_name": "nightly"})
    retried = retry_params(STEP5, params, 2, WatcherPolicy(retry_trials_multiplier=1.0, retry_seed_increment=1))
    assert retried["study_name"] == "nightly_retry2"


def test_retry_starts_from_the_step_defaults_when_absent():
    retried = retry_params(STEP5, {}, 1, WatcherPolicy(retry_trials_multiplier=1.0, retry_seed_increment=3))
    assert retried == {"trials": 50, "seed": 45}


def test_retry_trials_stop_at_the_most_step_5_takes_whatever_the_retry():
    """A float past 1.8e308 raised OverflowError (a traceback at the second retry of a 1e300 multiplier), and
    a retry past 2**63 - 1 trials was refused by the step (exit 64) or crashed the decision log's JSON."""
    most = 2**63 - 1
    assert retry_params(STEP5, {"trials": 2}, 2, WatcherPolicy(retry_trials_multiplier=1e18))["trials"] == most
    assert retry_params(STEP5, {"trials": 2}, 10**18, WatcherPolicy(retry_trials_multiplier=1.5))["trials"] == most
    # a float near 2**63 rounds past it: the step's own largest count, retried unchanged, stays what it takes
    assert retry_params(STEP5, {"trials": most}, 1, WatcherPolicy())["trials"] == most


def test_a_retry_seed_past_the_steps_largest_wraps_around():
    """The step refuses --seed above 2**31 - 1: the retry that reached it ended the run with the step's exit 64
    naming --seed, after the first attempt's hours; a seed past 64 bits crashed the decision log's JSON."""
    assert retry_params(STEP5, {"seed": 2**31 - 1}, 1, WatcherPolicy())["seed"] == 0
    assert retry_params(STEP5, {"seed": 2**31 - 6}, 2, WatcherPolicy(retry_seed_increment=5))["seed"] == 4
    assert retry_params(STEP5, {}, 3, WatcherPolicy(retry_seed_increment=2**64))["seed"] == 42  # 2**64 is 0 mod 2**31
    assert retry_params(STEP5, {"seed": 7}, 1, WatcherPolicy())["seed"] == 8  # below the largest: seed + increment


def test_only_step_5_is_shipped():
    assert [s.number for s in steps_in_range(5, 5)] == [5]
    with pytest.raises(UsageError, match=r"step 4 is not shipped.*\[5\]"):
        steps_in_range(4, 5)
    with pytest.raises(UsageError, match="step 6"):
        steps_in_range(5, 6)
    with pytest.raises(UsageError, match="before"):
        steps_in_range(5, 4)


def test_an_alias_that_agrees_with_its_flag_is_fine():
    argv = argv_for({"dropout": 0.2, "dropout_override": 0.2, "enable_vmap": True, "fuse_folds": True})
    assert "--dropout=0.2" in argv and "--enable-vmap" in argv and "--fuse-folds" in argv


def _value_for(action: argparse.Action):
    """A valid JSON value for one optimizer flag (what a manifest would pass)."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return True
    if action.choices:
        return list(action.choices)[-1]
    special = {"gpus": [0], "device": "cuda:0", "storage": "sqlite:///x.db", "test_holdout": 0.3,
               "dropout": 0.1, "k_folds": 3}
    return special.get(action.dest, 2 if action.type is not None and action.type not in (str,) else "text")


#: Flags that only make sense with another one: the other one, given along.
_COMPANIONS = {"cluster_config": {"storage": "postgresql+psycopg://step5@db/s5"}}


def test_every_optimizer_flag_is_reachable_through_the_watcher():
    """Walks the optimizer's own parser: every long option (aliases included) is a key, and
    the key's flag reaches the optimizer with the value the key gave."""
    parser = build_parser()
    reached = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for flag in action.option_strings:
            if flag.startswith("--no-") or flag == "--policy":
                continue
            key = flag[2:].replace("-", "_")
            value = _value_for(action)
            argv = argv_for({key: value, **_COMPANIONS.get(key, {})})
            expected = flag if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction) else (
                f"{flag}={','.join(map(str, value)) if isinstance(value, list) else value}")
            assert expected in argv, (key, argv)
            args = parser.parse_args(argv[:-2])  # without --policy
            config_from_args(args, argv)  # the optimizer's own checks accept it
            reached += 1
    assert reached >= 30  # every SPEC flag, the extras and the compatibility aliases
    assert get_step(5).spec("policy") is None  # the watcher's own --policy is passed through


def test_keys_are_exactly_the_optimizer_flags():
    parser = build_parser()
    flags = {f[2:].replace("-", "_") for a in parser._actions for f in a.option_strings
             if f.startswith("--") and not f.startswith("--no-") and f not in ("--help", "--policy")}
    assert {p.name for p in STEP5.params} == flags


def test_a_flag_added_to_the_optimizer_later_is_a_key_by_itself():
    from step5.watcher.steps import params_from_parser

    parser = build_parser()
    parser.add_argument("--brand-new-knob", type=int, default=3)
    specs = {p.name: p for p in params_from_parser(parser, reserved={"policy": "x"},
                                                   required_defaults={"survivors": "s", "lottery_data": "h"})}
    assert specs["brand_new_knob"].to_argv(-4) == ["--brand-new-knob=-4"]
    assert specs["brand_new_knob"].default == 3 and "policy" not in specs
