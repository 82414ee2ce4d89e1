"""Several optimizer processes on one study (docs/cluster.md): exactly --trials complete,
no duplicate configurations, dead processes' trials re-run, other data refused.

The SQLite tests run the real CLI with a fake fold runner whose jobs sleep
(``python -m step5.testing.fake_search``); the PostgreSQL test runs the real CLI with real
workers against a throwaway server (the ``postgres_url`` fixture).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from optuna.trial import FrozenTrial, TrialState

from step5 import artifacts
from step5.data.splits import FoldFiles
from step5.owner import OWNER_FILE
from step5.errors import StudyMismatchError, UsageError
from step5.jsonio import write_json_atomic
from step5.optimizer.study import (
    DATA_ATTR,
    OWNER_ATTR,
    open_storage,
    open_study,
    reclaim_dead_trials,
    study_lock,
)
from step5.owner import ProcessIdentity, is_local, this_process
from step5.policy import TrainingPolicy
from step5.testing import stored_trials

SCRIPT = "meta_prediction_optimizer_anti_overfit.py"
SETUP = {"model_type": "neural_net", "seed": 1, "k_folds": 2}
DATA = {"fingerprint_hash": "abc", "survivor_count": 10, "training_window_draws": 5}


def _dead_identity() -> ProcessIdentity:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = int(psutil.Process(child.pid).create_time())
    child.wait()
    me = this_process()
    return ProcessIdentity(me.host, me.pid_namespace, child.pid, started)


def _states(trials: list[FrozenTrial]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _complete_params(trials: list[FrozenTrial]) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE]


# ---------------------------------------------------------------- study level (in-process)


def test_a_dead_local_owners_trial_is_failed_at_once_and_rerun_with_the_same_params(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    trial = opened.study.ask()
    lr = trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
    trial.set_user_attr(OWNER_ATTR, _dead_identity().to_dict())
    assert reclaim_dead_trials(opened.study) == 1  # no waiting for a grace period
    (failed, queued) = opened.study.trials
    assert failed.state == TrialState.FAIL and "died" in failed.user_attrs["fail_reason"]
    assert queued.state == TrialState.WAITING and queued.params == {"learning_rate": lr}
    assert OWNER_ATTR not in queued.user_attrs and "fail_reason" not in queued.user_attrs
    retry = opened.study.ask()  # a later ask takes the queued re-run first
    assert retry.number == queued.number
    assert retry.suggest_float("learning_rate", 1e-5, 1e-1, log=True) == lr
    # A live owner's trial is left alone.
    retry.set_user_attr(OWNER_ATTR, this_process().to_dict())
    assert reclaim_dead_trials(opened.study) == 0


def test_a_trial_of_another_machine_with_this_hosts_name_is_judged_by_heartbeats_not_by_pid(tmp_path):
    # Rigs cloned from one image share a host name, and every host's first PID namespace is named
    # alike: another rig's live trial looked like a dead local process's (its pid does not run here)
    # and was failed at once, again and again, its result dropped.
    url = f"sqlite:///{tmp_path / 's.db'}"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    me = this_process()
    this_boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    trial = opened.study.ask()
    assert trial.user_attrs[OWNER_ATTR].get("boot") == this_boot  # an ask records this machine's boot
    trial.suggest_int("n", 1, 100)
    twin_rig = {**_dead_identity().to_dict(), "host": me.host, "pid_namespace": me.pid_namespace,
                "boot": "another-machine"}
    trial.set_user_attr(OWNER_ATTR, twin_rig)
    opened.storage.record_heartbeat(trial._trial_id)
    assert reclaim_dead_trials(opened.study) == 0
    assert _states(opened.study.trials) == {"RUNNING": 1}
    # The same dead pid on this machine is failed at once, as before; so is a record from before boot ids.
    trial.set_user_attr(OWNER_ATTR, {**twin_rig, "boot": this_boot})
    assert reclaim_dead_trials(opened.study) == 1
    old_record = {k: v for k, v in twin_rig.items() if k != "boot"}
    assert is_local(ProcessIdentity.from_dict(old_record))  # type: ignore[arg-type]


def test_a_stale_heartbeat_fails_a_trial_of_another_host_and_queues_its_rerun(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    policy = TrainingPolicy(heartbeat_interval_s=1.0, heartbeat_grace_s=2.0)
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1, training=policy)
    trial = opened.study.ask()
    trial.suggest_int("n", 1, 100)
    other_host = {**_dead_identity().to_dict(), "host": "elsewhere"}
    trial.set_user_attr(OWNER_ATTR, other_host)
    opened.storage.record_heartbeat(trial._trial_id)
    assert reclaim_dead_trials(opened.study) == 0  # not stale yet, and not ours to judge
    time.sleep(3.2)
    assert reclaim_dead_trials(opened.study) == 1
    assert _states(opened.study.trials) == {"FAIL": 1, "WAITING": 1}


def test_a_trial_of_another_host_left_without_any_heartbeat_is_failed_after_the_grace_period(tmp_path):
    # Its process died between asking it and its first heartbeat (a SIGKILL, a crash, giving up on the
    # database): Optuna's stale rule never judges a trial without a heartbeat, so it stayed RUNNING for
    # good and every process waited for it, the study one trial short of --trials.
    url = f"sqlite:///{tmp_path / 's.db'}"
    policy = TrainingPolicy(heartbeat_interval_s=1.0, heartbeat_grace_s=2.0)
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1, training=policy)
    other_host = {**_dead_identity().to_dict(), "host": "elsewhere"}
    dead, slow = opened.study.ask(), opened.study.ask()
    n = dead.suggest_int("n", 1, 100)
    for trial in (dead, slow):
        trial.set_user_attr(OWNER_ATTR, other_host)
    assert reclaim_dead_trials(opened.study) == 0  # seen without a heartbeat: the grace period starts
    time.sleep(1.2)
    opened.storage.record_heartbeat(slow._trial_id)  # its process claims it, late but within the grace period
    time.sleep(1.2)
    opened.storage.record_heartbeat(slow._trial_id)
    assert reclaim_dead_trials(opened.study) == 1
    states = {t.number: t for t in opened.study.trials}
    assert states[slow.number].state == TrialState.RUNNING
    assert states[dead.number].state == TrialState.FAIL
    assert "without a heartbeat" in states[dead.number].user_attrs["fail_reason"]
    (rerun,) = [t for t in opened.study.trials if t.state == TrialState.WAITING]
    assert rerun.params == {"n": n}


def test_other_data_or_setup_is_refused_naming_the_difference(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    assert first.study.user_attrs[DATA_ATTR] == DATA and first.process_index == 0
    with pytest.raises(StudyMismatchError, match="fingerprint_hash: study has 'abc', this run 'xyz'") as info:
        open_study(study_name="s", storage_url=url, setup=SETUP, data={**DATA, "fingerprint_hash": "xyz"}, seed=1)
    assert info.value.exit_code == 1
    with pytest.raises(StudyMismatchError, match="k_folds: study has 2, this run 3"):
        open_study(study_name="s", storage_url=url, setup={**SETUP, "k_folds": 3}, data=DATA, seed=1)
    # Each process that joins gets its own index and, from the second on, its own sampler stream.
    second = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    assert second.process_index == 1 and second.sampler_seed != first.sampler_seed


def test_first_trials_are_enqueued_once_in_a_fresh_study_and_asked_before_any_sampled_one(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    firsts = [{"x": 0.25}, {"x": 0.75}]
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1, first_trials=firsts)
    assert opened.trials_before == 0 and _states(opened.study.trials) == {"WAITING": 2}
    asked = [opened.study.ask() for _ in range(3)]
    assert [t.suggest_float("x", 0.0, 1.0) for t in asked[:2]] == [0.25, 0.75]
    for t in asked:
        opened.study.tell(t, 0.0)
    # A resumed study (or another host joining it) does not queue them again.
    again = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1, first_trials=firsts)
    assert _states(again.study.trials) == {"COMPLETE": 3}


def test_a_sqlite_file_uri_study_takes_its_lock_beside_the_file(tmp_path, monkeypatch):
    # The URL's database is "file:/.../s.db" here, no path: the lock once opened "file:/.../s.db.lock"
    # relative to the working dir and every run ended in a FileNotFoundError traceback.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    url = f"sqlite:///file:{tmp_path / 's.db'}?mode=rwc&uri=true"
    opened = open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    assert opened.process_index == 0 and (tmp_path / "s.db.lock").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_two_names_of_one_sqlite_file_take_one_study_lock(tmp_path):
    # A symlink to the study file: both processes must wait for each other, or both count the same room.
    url = f"sqlite:///{tmp_path / 's.db'}"
    open_study(study_name="s", storage_url=url, setup=SETUP, data=DATA, seed=1)
    (tmp_path / "link.db").symlink_to(tmp_path / "s.db")
    policy = TrainingPolicy()
    first, second = open_storage(url, policy), open_storage(f"sqlite:///{tmp_path / 'link.db'}", policy)
    entered = threading.Event()

    def take_second() -> None:
        with study_lock(second, "s"):
            entered.set()

    with study_lock(first, "s"):
        thread = threading.Thread(target=take_second, daemon=True)
        thread.start()
        assert not entered.wait(0.5), "the second name of the file took the lock the first one held"
    assert entered.wait(10)
    thread.join()


def test_fold_folders_of_dead_runs_are_removed_by_the_next_run(tmp_path):
    dead = tmp_path / "step5_nn_dead"
    dead.mkdir()
    (dead / "t0_f0.npz").write_bytes(b"x")
    write_json_atomic(dead / OWNER_FILE, _dead_identity().to_dict())
    foreign = tmp_path / "step5_nn_foreign"  # another host's: not ours to judge
    foreign.mkdir()
    write_json_atomic(foreign / OWNER_FILE, {**_dead_identity().to_dict(), "host": "elsewhere"})
    with FoldFiles(dir=tmp_path) as live:
        assert not dead.exists() and foreign.exists()
        with FoldFiles(dir=tmp_path):
            assert live.path.exists()  # a live run's folder stays


def test_search_only_with_compare_models_is_a_usage_error(sample_inputs):
    from step5.optimizer import OptimizerConfig
    from step5.optimizer.config import validate_config

    survivors, history = sample_inputs
    with pytest.raises(UsageError, match="--search-only helps one study"):
        validate_config(OptimizerConfig(survivors=Path(survivors), lottery_data=Path(history),
                                        compare_models=True, search_only=True))


# ---------------------------------------------------------------- processes


def _fake_search(python: str, out: Path, sample_inputs, *extra: str, sleep: float = 0.2) -> list[str]:
    survivors, history = sample_inputs
    return [python, "-m", "step5.testing.fake_search", "--job-sleep-s", str(sleep), "--",
            "--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "neural_net",
            "--k-folds", "2", "--cpu-workers", "1", "--seed", "3", "--policy", "none.json",
            "--output-dir", str(out), *extra]


def _env(tmp_path: Path, repo_root: Path) -> dict[str, str]:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(repo_root)}


def test_two_identical_runs_at_once_on_one_sqlite_study(sample_inputs, tmp_path, repo_root, python):
    out = tmp_path / "out"
    write_json_atomic(tmp_path / "none.json", {})
    cmd = _fake_search(python, out, sample_inputs, "--trials", "8")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path, repo_root), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    trials = stored_trials(f"sqlite:///{(out / 'optuna_step5.db').resolve()}")
    assert _states(trials) == {"COMPLETE": 8}
    params = _complete_params(trials)
    assert len(set(params)) == 8  # the two processes drew different configurations
    owners = {t.user_attrs[OWNER_ATTR]["pid"] for t in trials}
    assert owners == {p.pid for p in procs}  # both searched
    assert list((tmp_path / "tmpdir").iterdir()) == []


@pytest.mark.slow
def test_three_processes_on_postgres_survive_a_killed_helper_and_refuse_other_data(
    sample_inputs, tmp_path, repo_root, python, postgres_url,
):
    """The issue's acceptance run: one default process and two --search-only helpers (one CPU
    worker each, the real CLI and trainers) on one PostgreSQL study; one helper is SIGKILLed
    while it trains a trial. The study ends with exactly N complete trials, none running, no
    configuration twice, one final model; a fourth process with other data is refused."""
    from step5.data.sample import write_sample

    # Epochs enough that the victim is still training when it is found, on a quiet machine
    # too (trials of 10 epochs were over before the first look).
    n = 6
    survivors, history = sample_inputs
    policy = tmp_path / "policy.json"
    write_json_atomic(policy, {"training": {"use_persistent_workers": True, "heartbeat_interval_s": 1,
                                            "heartbeat_grace_s": 4}})
    env = _env(tmp_path, repo_root)

    def command(name: str, *extra: str, inputs=(survivors, history)) -> list[str]:
        return [python, str(repo_root / SCRIPT), "--survivors", str(inputs[0]), "--lottery-data", str(inputs[1]),
                "--model-type", "neural_net", "--trials", str(n), "--k-folds", "2", "--nn-max-epochs", "60",
                "--cpu-workers", "1", "--seed", "5", "--policy", str(policy), "--storage", postgres_url,
                "--study-name", "shared", "--output-dir", str(tmp_path / name), *extra]

    def start(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(command(name, *extra), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    # The victim starts first and the others once it trains: started together, on a busy
    # machine the victim could boot so late that the others had finished the study without it.
    victim = start("helper0", "--search-only")
    procs = [victim]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait until the victim trains a trial
            try:
                # Training, not still drawing its params (a trial killed mid-suggest is re-run
                # with the params it had, the rest drawn anew).
                running = [t for t in stored_trials(postgres_url, "shared") if t.state == TrialState.RUNNING
                           and t.user_attrs.get(OWNER_ATTR, {}).get("pid") == victim.pid and "params" in t.user_attrs]
            except KeyError:
                running = []
            if running or victim.poll() is not None:
                break
            time.sleep(0.05)
        assert victim.poll() is None, "the helper ended before it could be killed"
        main = start("main")
        procs.append(main)
        helpers = [victim, start("helper1", "--search-only")]
        procs.append(helpers[1])
        os.killpg(victim.pid, signal.SIGKILL)  # the helper and its worker, as a lost host
        victim.wait(timeout=30)
        errs = {p.pid: p.communicate(timeout=300)[1] for p in (main, helpers[1])}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            p.stderr.close()  # type: ignore[union-attr] - the victim's is never read
    assert main.returncode == 0, errs[main.pid][-3000:]
    assert helpers[1].returncode == 0, errs[helpers[1].pid][-3000:]
    trials = stored_trials(postgres_url, "shared")
    states = _states(trials)
    assert states.get("COMPLETE") == n and "RUNNING" not in states, states
    assert states.get("FAIL", 0) >= 1  # the victim's trial, failed and re-run
    params = _complete_params(trials)
    assert len(set(params)) == n
    rerun = [t for t in trials if t.state == TrialState.COMPLETE and "failed_trial" in t.system_attrs]
    assert rerun, "the killed helper's trial was re-run"
    assert rerun[0].params == trials[rerun[0].system_attrs["failed_trial"]].params
    assert (tmp_path / "main" / "best_model.pth").exists()
    assert (tmp_path / "main" / artifacts.SIDECAR_NAME).exists()
    for helper in ("helper0", "helper1"):
        assert not (tmp_path / helper / "best_model.pth").exists()
        assert not (tmp_path / helper / artifacts.SIDECAR_NAME).exists()

    other = write_sample(tmp_path / "other", n_survivors=300, n_features=24, seed=99)
    fourth = subprocess.run(command("fourth", "--search-only", inputs=other), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert fourth.returncode == 1, fourth.stderr[-2000:]
    assert "fingerprint_hash: study has" in fourth.stderr and "survivor_count" in fourth.stderr
    assert _states(stored_trials(postgres_url, "shared")).get("COMPLETE") == n


def test_a_rerun_after_sigkill_reruns_the_killed_trial_and_removes_its_fold_folder(
    sample_inputs, tmp_path, repo_root, python,
):
    """Within the heartbeat grace period: the dead run's trial is failed at once (its owner
    was a process of this host), re-run with the same params, and its fold folder removed."""
    out = tmp_path / "out"
    write_json_atomic(tmp_path / "none.json", {})
    # One trial in flight, so that one trial trains when the first run is killed (and at
    # most one more, asked ahead for the next batch, waits).
    cmd = _fake_search(python, out, sample_inputs, "--trials", "3", "--trials-in-flight", "1", sleep=1.0)
    env = _env(tmp_path, repo_root)
    storage = f"sqlite:///{(out / 'optuna_step5.db').resolve()}"
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        running = []
        while not running and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
            try:
                # Killed while it trains, with its params drawn: a trial killed mid-suggest
                # is re-run with the params it had, and the rest are drawn afresh.
                running = [t for t in stored_trials(storage)
                           if t.state == TrialState.RUNNING and OWNER_ATTR in t.user_attrs and "params" in t.user_attrs]
            except Exception:  # noqa: BLE001 - the study is not created yet
                running = []
        assert running, "the first run never had a trial running"
        first.kill()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [p.name for p in (tmp_path / "tmpdir").iterdir()]  # the dead run's fold folder is left behind
    # The re-run's folds may be quick: the 1 s folds were for finding the first run training.
    rerun_cmd = _fake_search(python, out, sample_inputs, "--trials", "3", "--trials-in-flight", "1", sleep=0.2)
    second = subprocess.run(rerun_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = stored_trials(storage)
    states = _states(trials)
    assert states["COMPLETE"] == 3 and "RUNNING" not in states and states["FAIL"] in (1, 2), states
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all("died" in t.user_attrs["fail_reason"] for t in failed)
    assert failed[0].params  # the one that trained
    (rerun,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert rerun.state == TrialState.COMPLETE and rerun.params == failed[0].params
    for dead in failed[1:]:  # asked ahead: killed before, while or after its params were drawn
        reruns = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        if dead.params:  # re-run with the params it had, the rest drawn afresh
            (rerun,) = reruns
            assert rerun.state == TrialState.COMPLETE and dead.params.items() <= rerun.params.items()
    assert list((tmp_path / "tmpdir").iterdir()) == []  # removed by the re-run
