"""Step 5 end to end with the real trainers, as a user runs it, then Step 6 on its output.

Small on purpose (600 sample survivors, 3 trials, 2 folds, an epoch cap of 40 via the
documented ``--nn-max-epochs`` search-space bound) so that the file runs in well under a
minute on two CPU cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from step5 import artifacts
from step5.testing.processes import signal_after_line

SCRIPT = "meta_prediction_optimizer_anti_overfit.py"

pytestmark = pytest.mark.slow


def _args(sample_inputs, out: Path, *extra: str) -> list[str]:
    survivors, history = sample_inputs
    return [
        "--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "neural_net",
        "--trials", "3", "--k-folds", "2", "--nn-max-epochs", "40", "--cpu-workers", "2", "--seed", "5",
        "--output-dir", str(out), *extra,
    ]


def _env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


@pytest.fixture(scope="module")
def s96a_run(sample_inputs, tmp_path_factory):
    """One S96A (one-shot subprocess per fold) run through the CLI; shared by the tests below."""
    repo_root = Path(__file__).resolve().parents[2]
    tmp_path = tmp_path_factory.mktemp("s96a")
    out = tmp_path / "out"
    cmd = [sys.executable, str(repo_root / SCRIPT), *_args(sample_inputs, out, "--no-persistent-workers"),
           "--policy", str(repo_root / "watcher_policies.json"), "--parent-run-id", "run-42"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    return {"proc": proc, "out": out, "cmd": cmd, "tmp": tmp_path, "wall": wall, "repo_root": repo_root}


def test_s96a_run_saves_a_model_that_predicts_the_planted_signal(s96a_run):
    proc, out = s96a_run["proc"], s96a_run["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    assert artifacts.validate_sidecar(sidecar) == []
    assert sidecar["outcome"] == "SUCCESS"
    assert sidecar["execution"]["mode"] == "subprocess"
    assert sidecar["optuna"]["trials_run"] == 3
    assert sidecar["training_metrics"]["test_r2"] > 0.2, sidecar["training_metrics"]
    assert sidecar["provenance"]["parent_run_id"] == "run-42"
    assert sidecar["provenance"]["versions"]["torch"]  # read from metadata, not by importing
    assert (out / "best_model.pth").stat().st_size > 0
    assert (out / "best_model.history.png").stat().st_size > 0
    # Progress is logged per trial, and the fold files are gone.
    assert "[3/3] trial 2" in proc.stderr
    assert list((s96a_run["tmp"] / "tmpdir").iterdir()) == []


def test_predictor_round_trip_cli_and_library(s96a_run, sample_inputs, tmp_path):
    assert s96a_run["proc"].returncode == 0
    survivors, _ = sample_inputs
    out, repo_root = s96a_run["out"], s96a_run["repo_root"]
    preds_path = tmp_path / "preds.json"
    proc = subprocess.run(
        [sys.executable, "-m", "step5.predictor", "--model-dir", str(out), "--survivors", str(survivors),
         "--output", str(preds_path)],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(preds_path.read_text())
    records = json.loads(Path(survivors).read_text())
    assert [r["seed"] for r in rows] == [r["seed"] for r in records]

    from step5.predictor import load_predictor

    predictor = load_predictor(out / artifacts.SIDECAR_NAME)
    lib = predictor.predict_file(survivors)
    np.testing.assert_allclose(lib, [r["prediction"] for r in rows], rtol=1e-6, atol=1e-9)
    y = np.array([r["holdout_quality"] for r in records])
    assert np.corrcoef(lib, y)[0, 1] > 0.5  # it learned the planted signal


def test_predictor_rejects_a_checkpoint_from_another_feature_schema(s96a_run, tmp_path):
    import shutil

    from step5.errors import DataError
    from step5.predictor import load_predictor

    assert s96a_run["proc"].returncode == 0
    model_dir = tmp_path / "model"
    shutil.copytree(s96a_run["out"], model_dir)
    sidecar = json.loads((model_dir / artifacts.SIDECAR_NAME).read_text())
    names = sorted(sidecar["feature_schema"]["feature_names"][:-1] + ["zz_renamed"])
    sidecar["feature_schema"].update(feature_names=names, feature_schema_hash=artifacts.feature_schema_hash(names))
    artifacts.write_sidecar(model_dir / artifacts.SIDECAR_NAME, sidecar)
    with pytest.raises(DataError, match="different feature schema"):
        load_predictor(model_dir)


def test_a_rerun_adds_trials_to_the_study_and_rebuilds_the_model(s96a_run):
    """--trials N adds N trials per call, as the existing optimizer's study.optimize(n_trials) does."""
    assert s96a_run["proc"].returncode == 0
    out = s96a_run["out"]
    first = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    (out / "best_model.pth").unlink()
    proc = subprocess.run(s96a_run["cmd"], cwd=s96a_run["tmp"], env=_env(s96a_run["tmp"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    assert again["optuna"]["study_name"] == first["optuna"]["study_name"]
    assert again["optuna"]["resumed"] is True and again["optuna"]["trials_new"] == 3
    assert again["optuna"]["trials_run"] == 6 and again["optuna"]["round_target"] == 6
    assert again["optuna"]["best_value"] >= first["optuna"]["best_value"]
    assert (out / "best_model.pth").exists()
    assert "this round ends at 6" in proc.stderr


def test_persistent_workers_match_the_one_shot_path_and_the_parent_never_imports_torch(
    s96a_run, sample_inputs, tmp_path
):
    """The S96B path through cli.main() in a fresh interpreter, which then reports its modules."""
    assert s96a_run["proc"].returncode == 0
    repo_root = s96a_run["repo_root"]
    out = tmp_path / "out"
    argv = _args(sample_inputs, out, "--persistent-workers", "--policy", str(repo_root / "watcher_policies.json"),
                 "--enable-diagnostics")
    code = (
        "import json, sys\n"
        "from step5.optimizer.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules,"
        " 'cuda': any(m.startswith('torch.cuda') for m in sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**_env(tmp_path), "PYTHONPATH": str(repo_root)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "torch": False, "cuda": False}

    sidecar = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    assert sidecar["execution"]["mode"] == "persistent_workers"
    assert len(sidecar["execution"]["workers"]) == 2
    first = json.loads((s96a_run["out"] / artifacts.SIDECAR_NAME).read_text())
    # Same seed, params and data through the worker as through train_single_trial.py.
    assert sidecar["optuna"]["best_value"] == pytest.approx(first["optuna"]["best_value"], abs=1e-6)
    assert sidecar["training_metrics"]["test_r2"] == pytest.approx(first["training_metrics"]["test_r2"], abs=1e-6)
    # In the working directory's diagnostics_outputs/, where the pipeline's health check reads them.
    folder = tmp_path / "diagnostics_outputs"
    (diag,) = [p for p in folder.iterdir() if p.is_dir()]
    assert not (out / "diagnostics_outputs").exists()
    assert (diag / "trials.json").exists() and (diag / "timings.png").exists()
    health = json.loads((folder / "training_diagnostics.json").read_text())
    assert health["model_type"] == "neural_net" and health["diagnosis"]["severity"] in ("ok", "warning", "critical")
    assert (folder / "neural_net_diagnostics.json").read_text() == (folder / "training_diagnostics.json").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_a_hangup_mid_search_cleans_up_and_leaves_no_trial_running(sample_inputs, tmp_path, repo_root,
                                                                              python, signum):
    out = tmp_path / "out"
    argv = _args(sample_inputs, out, "--persistent-workers", "--policy", str(repo_root / "watcher_policies.json"))
    argv[argv.index("--trials") + 1] = "200"
    proc = subprocess.Popen([python, str(repo_root / SCRIPT), *argv], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    name = signal.Signals(signum).name
    # Once the search is under way. A closed terminal hangs up its whole job, workers too (SIGHUP
    # used to kill the parent where it stood: its trials left running, its fold files behind).
    send = (lambda: proc.send_signal(signum)) if signum == signal.SIGTERM else (lambda: os.killpg(proc.pid, signum))
    seen, rest, rc = signal_after_line(proc, "[1/200]", send)
    assert rc == 128 + signum, seen[-2000:] + rest[-2000:]
    assert f"terminated by {name}" in rest
    assert "Traceback" not in rest  # one line, no traceback
    assert list((tmp_path / "tmpdir").iterdir()) == []
    storage = f"sqlite:///{(out / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    states = {t.state for t in trials}
    assert TrialState.RUNNING not in states and TrialState.COMPLETE in states
    for t in trials:  # the trial the signal stopped (if one was running) says why it failed
        if t.state == TrialState.FAIL:
            assert t.user_attrs["fail_reason"] == f"interrupted by {name}"
    assert not (out / artifacts.SIDECAR_NAME).exists()
