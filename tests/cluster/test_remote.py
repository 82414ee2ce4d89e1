"""The helper's command line: what it is given by the main process, quoted so that no value
from the config file or the flags reaches a shell as code, inside an ssh that never waits."""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from step5.cluster import ClusterNode
from step5.cluster import (
    CONNECTED_MARKER,
    ENTRY_SCRIPT,
    FORWARDED_FIELDS,
    HOST_FIELDS,
    helper_arguments,
    remote_command,
    ssh_command,
)
from step5.optimizer.cli import config_from_args
from step5.optimizer.config import OptimizerConfig

URL = "postgresql+psycopg://step5@db.lan/s5"


def config(**overrides) -> OptimizerConfig:
    base = dict(survivors=Path("survivors_with_scores.json"), lottery_data=Path("train_history.json"), trials=500,
                seed=7, k_folds=5, storage=URL, study_name="s5_run7", policy_path=Path("watcher_policies.json"),
                gpus=["0", "1"], cpu_workers=4, trials_in_flight=8, output_dir=Path("/data/out"),
                cluster_config=Path("distributed_config.json"))
    base.update(overrides)
    return OptimizerConfig(**base)


def test_every_config_field_is_either_given_to_helpers_or_kept_by_each_host():
    names = {f.name for f in dataclasses.fields(OptimizerConfig)}
    forwarded = set(FORWARDED_FIELDS)
    assert forwarded | HOST_FIELDS == names and not forwarded & HOST_FIELDS


def test_a_helper_gets_the_setup_the_resolved_study_and_its_role_and_keeps_its_own_devices():
    argv = helper_arguments(config(dropout=0.2, pruner="median"), study_name="s5_run7", storage=URL,
                            policy_given=False)
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--survivors"] == "survivors_with_scores.json" and flags["--lottery-data"] == "train_history.json"
    assert (flags["--trials"], flags["--seed"], flags["--k-folds"], flags["--test-holdout"]) == ("500", "7", "5", "0.2")
    assert (flags["--model-type"], flags["--dropout"], flags["--pruner"]) == ("neural_net", "0.2", "median")
    assert argv[-5:] == ["--storage", URL, "--study-name", "s5_run7", "--search-only"]
    for own in ("--gpus", "--cpu-workers", "--trials-in-flight", "--output-dir", "--cluster-config", "--policy",
                "--rescore-partitions", "--enable-diagnostics"):
        assert own not in argv
    assert "--normalize-features" in argv and "--use-leaky-relu" in argv


def test_values_that_start_with_a_dash_reach_the_helper_as_values():
    """The main process takes --survivors=-s.json; its helpers must get the same, not a
    command line their parser refuses (exit 64: every helper quarantined at once)."""
    from step5.optimizer.cli import build_parser

    main_argv = ["--survivors=-s.json", "--lottery-data=-h.json", "--storage", URL, "--study-name=-run7",
                 "--policy=-policy.json", "--parent-run-id=-abc", "--cluster-config", "distributed_config.json"]
    main = config_from_args(build_parser().parse_args(main_argv), main_argv)
    argv = helper_arguments(main, study_name=main.study_name, storage=main.storage, policy_given=True)
    helper = build_parser().parse_args(argv)
    assert (str(helper.survivors), str(helper.lottery_data), helper.study_name, str(helper.policy),
            helper.parent_run_id) == ("-s.json", "-h.json", "-run7", "-policy.json", "-abc")
    assert helper.search_only and helper.storage == URL


def test_switched_off_flags_and_an_explicit_policy_are_passed_on():
    argv = helper_arguments(config(normalize_features=False, persistent_workers=False, fuse_folds=True, fuse_trials=4),
                            study_name="x", storage=URL, policy_given=True)
    assert {"--no-normalize-features", "--no-persistent-workers", "--fuse-folds"} <= set(argv)
    assert argv[argv.index("--fuse-trials") + 1] == "4"
    assert argv[argv.index("--policy") + 1] == "watcher_policies.json"


def test_the_helper_command_line_is_one_the_optimizer_accepts():
    """Each forwarded field becomes the flag of its name: the optimizer's parser must know it."""
    from step5.optimizer.cli import build_parser

    argv = helper_arguments(config(normalize_features=False, fuse_folds=True, fuse_trials=4, dropout=0.2,
                                   cv_repeats=2, mod=97, parent_run_id="p1"), study_name="x", storage=URL,
                            policy_given=True)
    args = build_parser().parse_args(argv)
    assert (args.fuse_trials, args.dropout, args.normalize_features, args.fuse_folds) == (4, 0.2, False, True)
    assert (args.cv_repeats, args.mod, args.parent_run_id, args.search_only) == (2, 97, "p1", True)


NASTY = ClusterNode("rig-1", "michael", 8, "RX 6600", "/home/m/it's here; $(touch /tmp/pwned) `id`",
                    "/opt/rocm env/bin/python")


def test_the_remote_command_survives_two_shells_word_for_word():
    args = ["--survivors", "a b.json", "--study-name", "x'; rm -rf ~; '", "--storage", "postgresql://u:p$w@h/db"]
    command = remote_command(NASTY, args, {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"})
    outer = shlex.split(command)  # the login shell's words
    assert outer[:2] == ["sh", "-c"] and len(outer) == 3
    words = shlex.split(outer[2])  # sh's words
    assert words[:14] == ["echo", CONNECTED_MARKER, "&&", "cd", NASTY.script_path, "&&", "test", "-f", ENTRY_SCRIPT,
                          "||", "exit", "127", "&&", "exec"]
    assert words[14:17] == ["env", "STEP5_STDIN_LIFELINE=1", "HSA_OVERRIDE_GFX_VERSION=10.3.0"]
    assert words[17:19] == [NASTY.python_env, ENTRY_SCRIPT] and words[19:] == args


def test_ssh_never_waits_for_a_human_or_a_dead_host_and_no_name_passes_for_an_option():
    argv = ssh_command(NASTY, "true", ssh="/usr/bin/ssh", connect_timeout_s=7)
    options = argv[argv.index("-T") + 1: argv.index("--")]
    assert {"BatchMode=yes", "ConnectTimeout=7", "ServerAliveInterval=15", "StrictHostKeyChecking=accept-new"} <= set(
        options)
    assert argv[0] == "/usr/bin/ssh" and argv[-3:] == ["--", "michael@rig-1", "true"]


@pytest.mark.parametrize("field", ["survivors", "lottery_data"])
def test_paths_are_passed_as_given_so_a_relative_one_is_read_in_the_hosts_checkout(field):
    argv = helper_arguments(config(**{field: Path("/abs/data.json")}), study_name="x", storage=URL, policy_given=False)
    assert "/abs/data.json" in argv
