"""``--cluster-config``: the flag's checks, a bad cluster file found before any data is
read, and one command on the coordinator running a study across stand-in hosts."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from step5.errors import UsageError
from step5.optimizer.cli import build_parser, config_from_args

PG = "postgresql+psycopg://step5@db.lan/s5"


def _config(*flags: str):
    argv = ["--survivors", "s.json", "--lottery-data", "h.json", "--cluster-config", "distributed_config.json", *flags]
    return config_from_args(build_parser().parse_args(argv), argv)


def test_the_flag_is_read_with_a_shared_storage():
    assert str(_config("--storage", PG).cluster_config) == "distributed_config.json"


@pytest.mark.parametrize("flags, message", [
    ((), "--storage must be a database server every host reaches"),
    (("--storage", "sqlite:///out/optuna.db"), "a SQLite file is local"),
    (("--storage", PG, "--search-only"), "a --search-only helper starts none"),
    (("--storage", PG, "--compare-models"), "--compare-models runs four"),
])
def test_combinations_no_cluster_run_could_honour_are_usage_errors(flags, message):
    with pytest.raises(UsageError, match=message):
        _config(*flags)


def test_a_bad_cluster_file_fails_the_run_before_any_data_is_read(repo_root, python, tmp_path):
    cluster = tmp_path / "distributed_config.json"
    cluster.write_text(json.dumps({"nodes": [{"hostname": "-oProxyCommand=x", "script_path": "/p", "python_env": "py"}]}))
    proc = subprocess.run(
        [python, str(repo_root / "meta_prediction_optimizer_anti_overfit.py"), "--survivors", str(tmp_path / "none.json"),
         "--lottery-data", str(tmp_path / "none.json"), "--storage", "postgresql+psycopg://u@127.0.0.1:1/x",
         "--cluster-config", str(cluster), "--output-dir", str(tmp_path / "out"),
         "--policy", str(repo_root / "watcher_policies.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"{cluster}: nodes[0].hostname '-oProxyCommand=x' is not a host name" in proc.stderr
    assert "survivors" not in proc.stderr.split("error:")[-1]  # the data was never reached


def test_a_helper_whose_ssh_channel_closes_stops_as_on_sigterm_and_fails_its_trials(sample_inputs, tmp_path, python):
    import os

    import optuna

    from step5.lifeline import STDIN_LIFELINE_ENV
    from step5.testing.processes import signal_after_line

    survivors, history = sample_inputs
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    (tmp_path / "policy.json").write_text("{}")
    env = {**os.environ, STDIN_LIFELINE_ENV: "1"}
    helper = subprocess.Popen(
        [python, "-m", "step5.testing.fake_search", "--job-sleep-s", "60", "--",
         "--survivors", str(survivors), "--lottery-data", str(history), "--trials", "4", "--k-folds", "2",
         "--cpu-workers", "1", "--search-only", "--storage", storage, "--study-name", "helped",
         "--policy", str(tmp_path / "policy.json"), "--output-dir", str(tmp_path / "out")],
        env=env, cwd=tmp_path, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    def hang_up() -> None:  # once its first batch is asked and training (a 60 s fold)
        time.sleep(4.0)
        helper.stdin.close()

    _, after, code = signal_after_line(helper, "new trial(s)", hang_up, exit_timeout_s=60)
    assert code == 143, after  # SIGTERM's path: trials failed, workers and temp files cleaned up
    assert "stdin closed: the process that started this helper stopped it or is gone; stopping" in after
    study = optuna.load_study(study_name="helped", storage=storage)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs["fail_reason"] == "interrupted by SIGTERM" for t in failed)
    assert not any(t.state.name == "RUNNING" for t in study.trials)
