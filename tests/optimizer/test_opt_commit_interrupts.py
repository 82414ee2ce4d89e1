"""Issue 13's "Done when": a run killed at any point of its final commit leaves a matching,
loadable model pair. step5.testing.crash_at signals the real CLI right after its N-th change
to the output dir (the checkpoint landing in the new set, the sidecar, the picture, the
rename, each link, the pointer swap, the clean-up), for every N, with SIGKILL and SIGTERM.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from step5 import artifacts, model_set
from step5.predictor import load_predictor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _argv(sample_inputs, out: Path) -> list[str]:
    survivors, history = sample_inputs
    return ["--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "xgboost",
            "--trials", "2", "--k-folds", "2", "--cv-repeats", "1", "--seed", "9", "--cpu-workers", "1",
            "--output-dir", str(out), "--log-level", "WARNING"]


def _run(argv: list[str], repo_root: Path, *, at: int | None = None, sig: str = "KILL") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    prefix = ["-m", "step5.testing.crash_at", "--watch", argv[argv.index("--output-dir") + 1],
              "--at", str(at), "--signal", sig, "--"] if at is not None else [str(repo_root / "meta_prediction_optimizer_anti_overfit.py")]
    return subprocess.run([sys.executable, *prefix, *argv], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=300)


def _matching_pair(out: Path) -> str:
    """Load the pair the output dir shows (the predictor checks the SHA-256 and the schema) and
    check that every file comes from one set; returns the run id that wrote it."""
    predictor = load_predictor(out)
    sets = {Path(os.path.realpath(out / name)).parent
            for name in (artifacts.SIDECAR_NAME, "best_model.json", artifacts.HISTORY_PNG_NAME)}
    assert len(sets) == 1, sets
    assert predictor.predict(np.zeros((2, len(predictor.feature_names)))).shape == (2,)
    return predictor.sidecar["provenance"]["run_id"]


def test_a_run_interrupted_anywhere_in_its_final_commit_leaves_a_matching_pair(sample_inputs, tmp_path, repo_root):
    out, base = tmp_path / "out", tmp_path / "base"
    argv = _argv(sample_inputs, out)
    for _ in range(2):  # a search, then a rebuild: the folder holds a set and the one before it
        first = _run(argv, repo_root)
        assert first.returncode == 0, first.stderr[-2000:]
    before = _matching_pair(out)
    shutil.copytree(out, base, symlinks=True)

    def restore() -> None:  # every run below starts from the same folder, so point N is the same step
        shutil.rmtree(out)
        shutil.copytree(base, out, symlinks=True)

    # The study holds its 2 trials: each run below trains only the final model and commits it.
    at, shown = 1, []
    while True:
        restore()
        proc = _run(argv, repo_root, at=at, sig="KILL")
        if proc.returncode == 0:
            assert "crash_at: only" in proc.stderr, proc.stderr[-2000:]
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        shown.append(_matching_pair(out))
        at += 1
    # preflight, stage, checkpoint, sidecar, picture, rename, pointer swap, removing the oldest set
    assert len(shown) >= 12, shown
    assert shown[0] == before and shown[-1] != before  # old set before the swap, new set after it
    assert _matching_pair(out) not in (before, *shown)

    # A killed run's partial set is collected by the next commit.
    restore()
    assert _run(argv, repo_root, at=6, sig="KILL").returncode == -signal.SIGKILL
    assert _run(argv, repo_root).returncode == 0
    assert not [p for p in (out / model_set.SETS_DIRNAME).iterdir() if p.name.startswith(model_set.PARTIAL_PREFIX)]

    # SIGTERM runs the CLI's interrupt path (every `finally`): the same guarantee, and one line.
    for at in range(2, len(shown) + 1, 3):
        restore()
        proc = _run(argv, repo_root, at=at, sig="TERM")
        assert proc.returncode in (0, 128 + signal.SIGTERM), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        _matching_pair(out)
