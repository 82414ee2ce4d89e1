"""--fuse-folds and --fuse-trials end to end, through the CLI with the real trainers.

The same small search (600 sample survivors, 3 trials, 2 folds, --nn-max-epochs 100) runs
unfused and fused through persistent workers, and fused through one-shot subprocesses
(which cannot fuse and say so): every trial's value must be the same, to the bit, because
a fused pass trains each model exactly as it would train alone (on CPU; docs/training.md).
The epoch cap is long on purpose: any rounding difference would grow with every epoch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from step5 import artifacts

SCRIPT = "meta_prediction_optimizer_anti_overfit.py"
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

RUNS = {
    "unfused": ["--persistent-workers"],
    "fuse_folds": ["--persistent-workers", "--fuse-folds"],
    "fuse_trials": ["--persistent-workers", "--fuse-trials", "3"],
    "oneshot_fuse_folds": ["--no-persistent-workers", "--fuse-folds"],
}


def _run(sample_inputs, tmp: Path, extra: list[str]) -> dict:
    survivors, history = sample_inputs
    cmd = [
        sys.executable, str(REPO_ROOT / SCRIPT), "--survivors", str(survivors), "--lottery-data", str(history),
        "--model-type", "neural_net", "--trials", "3", "--k-folds", "2", "--nn-max-epochs", "100",
        "--cpu-workers", "2", "--seed", "5", "--output-dir", str(tmp / "out"),
        "--policy", str(REPO_ROOT / "watcher_policies.json"), *extra,
    ]
    proc = subprocess.run(cmd, cwd=tmp, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{extra}: {proc.stderr[-3000:]}"
    sidecar = json.loads((tmp / "out" / artifacts.SIDECAR_NAME).read_text())
    assert artifacts.validate_sidecar(sidecar) == [], extra
    storage = f"sqlite:///{(tmp / 'out' / 'optuna_step5.db').resolve()}"
    study = optuna.load_study(study_name=sidecar["optuna"]["study_name"], storage=storage)
    return {"proc": proc, "sidecar": sidecar, "values": [t.value for t in study.trials],
            "states": [t.state.name for t in study.trials]}


def test_fused_runs_give_the_unfused_study_and_say_how_they_fused(sample_inputs, tmp_path):
    """One test, so that a parallel test session runs these four searches once."""
    runs = {}
    for name, extra in RUNS.items():
        (tmp_path / name).mkdir()
        runs[name] = _run(sample_inputs, tmp_path / name, extra)

    reference = runs["unfused"]
    assert reference["states"] == ["COMPLETE"] * 3
    assert reference["sidecar"]["execution"]["search"]["fuse_folds"] is False
    for name in ("fuse_folds", "fuse_trials", "oneshot_fuse_folds"):
        run = runs[name]
        assert run["states"] == ["COMPLETE"] * 3, name
        assert run["values"] == reference["values"], name
        assert run["sidecar"]["optuna"]["best_value"] == reference["sidecar"]["optuna"]["best_value"], name
        assert run["sidecar"]["optuna"]["best_trial_number"] == reference["sidecar"]["optuna"]["best_trial_number"]
        execution = run["sidecar"]["execution"]
        assert execution["search"]["fuse_folds"] is True and execution["fusion"]["rerun_jobs"] == 0, name
        assert execution["fusion"]["jobs"] == 6 + 1, name  # 3 trials x 2 folds, then the final model's merge

    search = runs["fuse_trials"]["sidecar"]["execution"]["search"]
    assert (search["fuse_trials"], search["trials_in_flight"], search["batches"]) == (True, 3, 1)
    assert "batch 0: trials [0, 1, 2]" in runs["fuse_trials"]["proc"].stderr
    oneshot = runs["oneshot_fuse_folds"]
    assert oneshot["proc"].stderr.count("cannot fuse") == 1
    assert oneshot["sidecar"]["execution"]["mode"] == "subprocess"
    # The one-shot runner trains one job per process: the 3 trials' groups are not fused (the
    # final model is one merge job, a group of one).
    fusion = oneshot["sidecar"]["execution"]["fusion"]
    assert (fusion["groups"], fusion["unfused_groups"], fusion["jobs"]) == (4, 3, 7)
