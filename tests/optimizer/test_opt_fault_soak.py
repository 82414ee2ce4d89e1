"""The fault soak: real workers and one-shot trainers SIGKILLed at random moments of a run.

An undisturbed run and a disturbed one, same seed and B, through the CLI as a user runs
it. The disturbed run's workers and fallback trainers are SIGKILLed from outside (as an
OOM killer would) at random, seeded moments. It must exit 0 with exactly ``--trials``
COMPLETE trials whose every value equals the undisturbed run's (a job hit by a fault is
re-run with the same request and seed, so the sampler's history never diverges), and no
training process may outlive it. The 40-trial / 12-kill version (docs/workers.md) is this
test with ``STEP5_SOAK_TRIALS=40 STEP5_SOAK_KILLS=12 STEP5_SOAK_EPOCHS=40`` and ``-s`` (it
prints its figures).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from step5 import artifacts

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "meta_prediction_optimizer_anti_overfit.py"
TRAINERS = {"worker": "step5.nn.worker", "oneshot": "step5.nn.oneshot"}
#: No restart: the first killed worker sends its slot to one-shot trainers (so those get
#: killed too), and a short cool-down re-promotes it within the run. The re-run budgets are
#: the shipped ones: the killer strikes every 0.5-1.5 s and prefers the one-shot trainer
#: that is running, often the same job's re-run, which the per-job limit must absorb.
POLICY = {"training": {"use_persistent_workers": True, "max_worker_restarts": 0, "worker_repromote_after_s": 4,
                       "max_worker_repromotions": 3, "worker_job_timeout_s": 300}}


def _training_processes(root: psutil.Process) -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {kind: [] for kind in TRAINERS}
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return found
    for proc in children:
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for kind, module in TRAINERS.items():
            if module in cmdline:
                found[kind].append(proc)
    return found


class Killer(threading.Thread):
    """SIGKILLs ``kills`` training processes of ``root``, alternating workers and one-shot
    trainers where both exist, at seeded random moments; remembers every pid it saw."""

    def __init__(self, root: int, kills: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(root)
        self.kills = kills
        self.rng = random.Random(seed)
        self.killed: list[str] = []
        self.seen: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        next_kill: float | None = None  # set once the first training process shows up

        while not self.stop.is_set():
            found = _training_processes(self.root)
            self.seen.update(p.pid for procs in found.values() for p in procs)
            if next_kill is None and any(found.values()):
                # The first kill comes soon after training starts, whatever the machine's speed:
                # on a quiet machine the whole undisturbed run takes only a few seconds.
                next_kill = time.monotonic() + self.rng.uniform(1.0, 2.0)
            if next_kill is not None and len(self.killed) < self.kills and time.monotonic() >= next_kill:
                wanted = ("oneshot", "worker") if len(self.killed) % 2 else ("worker", "oneshot")
                kind = next((k for k in wanted if found[k]), None)
                if kind is not None:
                    victim = self.rng.choice(found[kind])
                    try:
                        victim.kill()
                        self.killed.append(kind)
                    except psutil.Error:
                        pass
                    next_kill = time.monotonic() + self.rng.uniform(0.5, 1.5)
            time.sleep(0.05)


SOAK_TRIALS = int(os.environ.get("STEP5_SOAK_TRIALS", "6"))
SOAK_KILLS = int(os.environ.get("STEP5_SOAK_KILLS", "4"))
SOAK_EPOCHS = os.environ.get("STEP5_SOAK_EPOCHS", "40")


def _run(sample_inputs, out: Path, trials: int, kills: int = 0) -> tuple[subprocess.CompletedProcess, Killer | None]:
    survivors, history = sample_inputs
    out.mkdir(parents=True)
    policy = out.parent / f"{out.name}_policy.json"
    policy.write_text(json.dumps(POLICY))
    tmp = out.parent / f"{out.name}_tmp"
    tmp.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--survivors", str(survivors), "--lottery-data", str(history),
           "--model-type", "neural_net", "--trials", str(trials), "--k-folds", "2", "--nn-max-epochs", SOAK_EPOCHS,
           "--cpu-workers", "2", "--seed", "5", "--output-dir", str(out), "--policy", str(policy)]
    proc = subprocess.Popen(cmd, cwd=out, env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = Killer(proc.pid, kills, seed=19) if kills else None
    if killer is not None:
        killer.start()
    try:
        stdout, stderr = proc.communicate(timeout=240 + 30 * trials)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if killer is not None:
            killer.stop.set()
            killer.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), killer


def _trials(out: Path) -> list[tuple[int, TrialState, float | None]]:
    storage = f"sqlite:///{(out / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [(t.number, t.state, t.value) for t in study.trials]


def test_random_sigkills_of_workers_and_trainers_cost_no_trial(sample_inputs, tmp_path):
    trials = SOAK_TRIALS
    start = time.perf_counter()
    calm, _ = _run(sample_inputs, tmp_path / "calm", trials)
    calm_s = time.perf_counter() - start
    assert calm.returncode == 0, calm.stderr[-3000:]
    start = time.perf_counter()
    stormy, killer = _run(sample_inputs, tmp_path / "stormy", trials, kills=SOAK_KILLS)
    stormy_s = time.perf_counter() - start
    assert killer is not None
    assert stormy.returncode == 0, stormy.stderr[-3000:]
    assert len(killer.killed) >= min(3, SOAK_KILLS), (killer.killed, stormy.stderr[-3000:])  # the run outlived the kills
    assert "worker" in killer.killed and "oneshot" in killer.killed, killer.killed

    expected = _trials(tmp_path / "calm")
    assert [s for _, s, _ in expected] == [TrialState.COMPLETE] * trials
    assert _trials(tmp_path / "stormy") == expected  # same trials, same values, none failed or replaced

    sidecar = json.loads((tmp_path / "stormy" / artifacts.SIDECAR_NAME).read_text())
    assert artifacts.validate_sidecar(sidecar) == []
    recovery = sidecar["execution"]["recovery"]
    workers = sidecar["execution"]["workers"]
    print(f"\nsoak: {trials} trials, kills {killer.killed}; undisturbed {calm_s:.1f}s, disturbed {stormy_s:.1f}s; "
          f"recovery {recovery}; workers {[(w['label'], w['jobs'], w['oneshot_jobs'], w['repromotions']) for w in workers]}")
    # A worker killed after its last job (while the run writes its outputs) is never noticed.
    assert recovery["faults"] >= 1
    assert recovery["reruns"] >= 1 and recovery["refused_reruns"] == 0
    assert sidecar["execution"]["search"]["failed_trials"] == 0

    time.sleep(0.5)
    left = [pid for pid in killer.seen if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"training processes left behind: {left}"
