"""The Step 5 CLI's exit codes, as a user (or the WATCHER) sees them: 0 / 1 / 2 / 64.

None of these runs trains a model; the end-to-end training runs are in
test_opt_cli_end_to_end.py.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from step5 import artifacts
from step5.optimizer.cli import main
from step5.policy import PROJECT_POLICY_PATH

SCRIPT = "meta_prediction_optimizer_anti_overfit.py"


def _run(repo_root: Path, python: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(repo_root / SCRIPT), *args], cwd=cwd or repo_root, capture_output=True, text=True, timeout=120,
    )


def _inputs(sample_inputs) -> list[str]:
    survivors, history = sample_inputs
    return ["--survivors", str(survivors), "--lottery-data", str(history)]


def test_help_exits_0_and_lists_every_spec_flag(repo_root, python):
    proc = _run(repo_root, python, "--help")
    assert proc.returncode == 0
    for flag in (
        "--survivors", "--lottery-data", "--model-type", "--compare-models", "--trials", "--k-folds",
        "--test-holdout", "--output-dir", "--study-name", "--storage", "--seed", "--target",
        "--persistent-workers", "--no-persistent-workers", "--policy", "--gpus", "--cpu-workers",
        "--normalize-features", "--no-normalize-features", "--use-leaky-relu", "--no-use-leaky-relu",
        "--dropout", "--enable-diagnostics", "--prng-type", "--mod", "--holdout-draws", "--parent-run-id",
        "--log-level", "--fuse-folds", "--no-fuse-folds", "--fuse-trials",
    ):
        assert flag in proc.stdout, flag


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--model-type", "svm"], "invalid choice: 'svm'"),
        (["--trials", "0"], "expected an integer >= 1"),
        (["--k-folds", "1"], "--k-folds must be >= 2"),
        (["--test-holdout", "1.5"], "strictly between 0 and 1"),
        (["--dropout", "1.0"], "dropout probability in [0, 1)"),
        (["--gpus", "0,x"], "comma-separated list of GPU indices"),
        # The existing optimizer takes --compare-models with --model-type (its WATCHER manifest
        # passes both): the pair is accepted, the type logged as ignored; k-folds 1 stops the run.
        (["--compare-models", "--model-type", "xgboost", "--k-folds", "1"], "--k-folds must be >= 2"),
        (["--fuse-trials", "3", "--no-fuse-folds"], "--no-fuse-folds forbids"),
        (["--fuse-trials", "0"], "expected an integer >= 1"),
        (["--storage", "not-a-url"], "--storage must be an Optuna storage URL"),
        # An in-memory SQLite study: each of the run's threads saw an empty database (a traceback
        # after the first trial), and nothing could resume it.
        (["--storage", "sqlite:///:memory:"], "keeps the study in memory"),
        (["--storage", "sqlite://"], "keeps the study in memory"),
        (["--rescore-partitions", "-1"], "expected an integer >= 0"),
        (["--rescore-partitions", "2", "--search-only"], "a --search-only helper builds none"),
        (["--target", ""], "--target must not be empty"),  # was a ValueError traceback
        (["--prng-type", " "], "--prng-type must not be empty"),  # was recorded as the run's PRNG
        (["--parent-run-id", ""], "--parent-run-id must not be empty"),
        (["--study-name", " "], "--study-name must not be empty"),
        # Past numpy's and scikit-learn's 32-bit seeds: a ValueError traceback from the split or the sampler.
        (["--seed", "2147483648"], "--seed must be <= 2147483647 (numpy and scikit-learn take 32-bit seeds"),
        (["--seed", str(2**32)], "--seed must be <= 2147483647"),
        # Past 64 bits: "TypeError: Integer exceeds 64-bit range" from the JSON writer (study name, sidecar).
        (["--k-folds", str(10**20)], f"--k-folds must be <= {2**63 - 1}, got {10**20}"),
        (["--nn-max-epochs", str(10**20)], "--nn-max-epochs must be <="),
        (["--mod", str(10**20)], "--mod must be <="),
        (["--holdout-draws", str(10**20)], "--holdout-draws must be <="),
        (["--fuse-trials", str(10**20)], "--fuse-trials must be <="),
        # Counts the run builds before any trial trains: 10**18 CPU slots, trials asked, partitions (a hang).
        (["--cpu-workers", str(10**18)], "--cpu-workers must be <= 1024 (a neural net's CPU workers are processes"),
        (["--cpu-workers", "1025"], "--cpu-workers must be <= 1024"),
        (["--trials-in-flight", str(10**18)], "--trials-in-flight must be <= 1024 (a batch's trials are all asked"),
        (["--fuse-trials", "1025"], "--fuse-trials must be <= 1024"),
        (["--cv-repeats", str(10**18)], "--cv-repeats must be <= 100 (every partition's folds are built"),
        (["--rescore-partitions", "101"], "--rescore-partitions must be <= 100"),
        # SQLAlchemy read '.db' as a query option and dropped it: the study went to the file 'what'.
        # (A folder that does not exist: a run that got past the check makes no file here.)
        (["--storage", "sqlite:////no-such-dir/what?.db"], "--storage sqlite:////no-such-dir/what?.db opens the "
         "database file /no-such-dir/what: SQLAlchemy reads what follows '?' as name=value options and drops '.db'"),
        (["--storage", "sqlite:////no-such-dir/s.db?timeout=30&x"], "drops 'x'"),
    ],
)
def test_usage_errors_exit_64(repo_root, sample_inputs, tmp_path, capsys, extra, message):
    # In process (the script's own main): test_missing_required_flag_exits_64 runs the script.
    try:
        code = main([*_inputs(sample_inputs), "--output-dir", str(tmp_path / "out"),
                     "--policy", str(repo_root / "watcher_policies.json"), *extra])
    except SystemExit as exc:  # argparse's own errors leave through the parser's exit (64)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 64, err
    assert message in err
    assert not (tmp_path / "out" / artifacts.SIDECAR_NAME).exists()


def test_the_largest_counts_and_sqlite_url_options_pass_validation(make_config, tmp_path):
    from step5.optimizer.config import validate_config

    # More CPU workers than cores is a warning (plan_slots), not an error.
    validate_config(make_config(cpu_workers=1024, trials_in_flight=1024, cv_repeats=100, rescore_partitions=100))
    validate_config(make_config(fuse_trials=1024))
    for storage in (f"sqlite:///{tmp_path}/s.db?timeout=30", f"sqlite:///file:{tmp_path}/s.db?mode=rwc&uri=true",
                    f"sqlite:///{tmp_path}/what%3F.db"):
        validate_config(make_config(storage=storage))


def test_missing_required_flag_exits_64(repo_root, python):
    proc = _run(repo_root, python, "--trials", "3")
    assert proc.returncode == 64
    assert "--survivors" in proc.stderr


def test_missing_survivors_file_exits_1_naming_it(repo_root, python, sample_inputs, tmp_path):
    _, history = sample_inputs
    missing = tmp_path / "nope.json"
    proc = _run(repo_root, python, "--survivors", str(missing), "--lottery-data", str(history),
                "--output-dir", str(tmp_path / "out"), "--policy", str(repo_root / "watcher_policies.json"))
    assert proc.returncode == 1
    assert f"survivors file not found: {missing}" in proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"seed": 1, "features": {"a": 1.0}, "holdout_quality": 0.1', "is not valid JSON"),
        ('{"not": "an array"}', "expected a JSON array of records"),
        ('[{"seed": 1, "features": {"a": "x"}, "holdout_quality": 0.1}]', "record 0: feature 'a' must be a finite number"),
        ('[{"seed": 1, "features": {"a": 1.0}}]', "record 0 has no target 'holdout_quality'"),
    ],
)
def test_bad_survivors_json_exits_1_with_a_clear_message(repo_root, python, sample_inputs, tmp_path, content, message):
    _, history = sample_inputs
    bad = tmp_path / "survivors.json"
    bad.write_text(content)
    proc = _run(repo_root, python, "--survivors", str(bad), "--lottery-data", str(history),
                "--output-dir", str(tmp_path / "out"), "--policy", str(repo_root / "watcher_policies.json"))
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_history_and_bad_policy_exit_1(repo_root, python, sample_inputs, tmp_path):
    survivors, _ = sample_inputs
    history = tmp_path / "history.json"
    history.write_text('[978, "x"]')
    proc = _run(repo_root, python, "--survivors", str(survivors), "--lottery-data", str(history),
                "--output-dir", str(tmp_path / "out"), "--policy", str(repo_root / "watcher_policies.json"))
    assert proc.returncode == 1 and "history file" in proc.stderr and "element 1" in proc.stderr

    policy = tmp_path / "policy.json"
    policy.write_text('{"training": {"use_persistent_workers": "yes"}}')
    proc = _run(repo_root, python, *_inputs(sample_inputs), "--output-dir", str(tmp_path / "out"),
                "--policy", str(policy))
    assert proc.returncode == 1 and "use_persistent_workers must be true or false" in proc.stderr


def test_degenerate_target_exits_2_with_a_degenerate_sidecar_and_no_model(repo_root, python, degenerate_inputs, tmp_path):
    survivors, history = degenerate_inputs
    out = tmp_path / "out"
    proc = _run(repo_root, python, "--survivors", str(survivors), "--lottery-data", str(history),
                "--output-dir", str(out), "--trials", "2", "--policy", str(repo_root / "watcher_policies.json"),
                "--parent-run-id", "pipeline-7")
    assert proc.returncode == 2, proc.stderr
    assert "degenerate" in proc.stderr
    sidecar = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    assert artifacts.validate_sidecar(sidecar) == []
    assert sidecar["outcome"] == "DEGENERATE_SIGNAL"
    assert sidecar["signal_quality"]["signal_status"] == "degenerate"
    assert sidecar["provenance"]["parent_run_id"] == "pipeline-7"
    assert not any(p.name.startswith("best_model.") and p.name != artifacts.SIDECAR_NAME for p in out.iterdir())

    # Step 6 refuses to predict from it, with its own exit code 2.
    pred = subprocess.run(
        [python, "-m", "step5.predictor", "--model-dir", str(out), "--survivors", str(survivors)],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert pred.returncode == 2
    assert "prediction is not allowed" in pred.stderr


def test_without_policy_a_run_from_any_folder_uses_the_projects_own(repo_root, python, sample_inputs, tmp_path):
    _, history = sample_inputs
    missing = tmp_path / "nope.json"  # the run stops at the survivors file, after loading the policy
    proc = _run(repo_root, python, "--survivors", str(missing), "--lottery-data", str(history),
                "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"policy: {PROJECT_POLICY_PATH} (the project's own" in proc.stderr
    assert f"survivors file not found: {missing}" in proc.stderr


def test_without_policy_the_working_directorys_file_wins_and_an_explicit_missing_one_is_an_error(
        repo_root, python, sample_inputs, tmp_path):
    (tmp_path / "watcher_policies.json").write_text('{"training": {"use_persistent_workers": "yes"}}')
    proc = _run(repo_root, python, *_inputs(sample_inputs), "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "policy: watcher_policies.json (watcher_policies.json in the working directory)" in proc.stderr
    assert "use_persistent_workers must be true or false" in proc.stderr

    proc = _run(repo_root, python, *_inputs(sample_inputs), "--output-dir", str(tmp_path / "out"),
                "--policy", str(tmp_path / "missing_policy.json"), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"policy file not found: {tmp_path / 'missing_policy.json'}" in proc.stderr


# ----------------------------------------------------------------- the existing optimizer's flags


def _config(*flags: str):
    from step5.optimizer.cli import build_parser, config_from_args

    argv = ["--survivors", "s.json", "--lottery-data", "h.json", *flags]
    return config_from_args(build_parser().parse_args(argv), argv)


def test_help_says_the_existing_flags_are_for_compatibility(repo_root, python):
    out = _run(repo_root, python, "--help").stdout
    assert "compatibility" in out
    for flag in ("--device", "--enable-vmap", "--allow-inline-nn-fallback", "--dropout-override", "--batch-size-nn"):
        assert flag in out


@pytest.mark.parametrize("flags, field, value", [
    (("--device", "cpu"), "gpus", []),
    (("--device", "cuda:1"), "gpus", ["1"]),  # the ordinal; main() maps it onto the visible GPUs
    (("--device", "cuda"), "gpus", ["0"]),
    (("--enable-vmap",), "fuse_folds", True),
    ((), "fuse_folds", None),  # without it the policy decides, as before
    (("--dropout-override", "0.3"), "dropout", 0.3),
    (("--batch-size-nn", "4"), "fuse_trials", 4),
    (("--rescore-partitions", "5"), "rescore_partitions", 5),
    ((), "rescore_partitions", None),  # the mode decides: 3 with --compare-models, else 0
    (("--cv-repeats", "3"), "cv_repeats", 3),
    ((), "cv_repeats", None),  # the model type and the rows decide
])
def test_existing_flags_mean_what_they_meant(flags, field, value):
    assert getattr(_config(*flags), field) == value


def test_device_and_gpus_together_are_a_usage_error():
    from step5.errors import UsageError

    with pytest.raises(UsageError, match="give one of them"):
        _config("--device", "cpu", "--gpus", "0")


def test_device_counts_the_visible_gpus_and_falls_back_to_the_cpu(monkeypatch, caplog):
    import argparse

    import step5.devices
    from step5.optimizer.cli import apply_compatibility_flags

    monkeypatch.setattr(step5.devices, "detect_gpus", lambda: ["2", "5"])  # e.g. CUDA_VISIBLE_DEVICES=2,5
    args = argparse.Namespace(device=["1"], allow_inline_nn_fallback=False)
    apply_compatibility_flags(args)
    assert args.device == ["5"]  # cuda:1 is the second visible GPU, as CUDA counts
    args = argparse.Namespace(device=["2"], allow_inline_nn_fallback=True)
    with caplog.at_level("WARNING", logger="step5.optimizer"):
        apply_compatibility_flags(args)
    assert args.device == []  # no third GPU: the run trains on the CPU ...
    assert "cuda:2" in caplog.text and "trains on the CPU" in caplog.text  # ... with a warning
    assert "--allow-inline-nn-fallback does not apply" in caplog.text


def test_a_bad_device_is_a_usage_error(repo_root, python, sample_inputs):
    proc = _run(repo_root, python, *_inputs(sample_inputs), "--device", "tpu:0")
    assert proc.returncode == 64 and "--device" in proc.stderr
