"""An output dir that fills up or turns read-only when the model is saved: exit 1, one line,
and the model set it showed before stays intact and loadable (step5.model_set).

The output dir is a real filesystem that runs out of space: a 16 MiB tmpfs mounted for the
test (as root; elsewhere the test skips, saying so). The first run trains a real neural net
and commits it; the filesystem is then filled to the last byte (empty files still fit, so
the run's start-up check passes) and a second run, which searches one more trial, fails
when it writes the new model (ENOSPC). Space freed, a third run meets the filesystem
remounted read-only as its commit starts (EROFS). Through both, the first model set is
what the output dir shows, byte for byte, and Step 6's loader predicts with it.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from step5 import model_set
from step5.artifacts import file_sha256

SCRIPT = "meta_prediction_optimizer_anti_overfit.py"


@pytest.fixture
def small_filesystem(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(folder)], capture_output=True)
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Write a file until the filesystem has no byte left; returns it."""
    filler = folder / "filler"
    chunk = b"\0" * (64 * 1024)
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:  # the last partial page
            while True:
                fh.write(b"\0")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _snapshot(out: Path) -> dict[str, str]:
    return {name: file_sha256(path) for name, path in model_set.current_files(out).items()}


@pytest.mark.slow
def test_a_full_or_read_only_output_dir_at_save_time_keeps_the_previous_model(
    small_filesystem, sample_inputs, tmp_path, repo_root, python,
):
    from step5.predictor import load_predictor

    out = small_filesystem
    survivors, history = sample_inputs
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"training": {"use_persistent_workers": True}}))
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    flags = ["--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "neural_net",
             "--k-folds", "2", "--nn-max-epochs", "5", "--cpu-workers", "1", "--seed", "4",
             "--policy", str(policy), "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--output-dir", str(out)]

    def real_run(trials: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, str(repo_root / SCRIPT), *flags, "--trials", str(trials)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    first = real_run(2)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert "best_model.pth" in before and "best_model.meta.json" in before
    X = np.random.default_rng(0).normal(size=(5, load_predictor(out).sidecar["feature_schema"]["feature_count"]))
    predicted = load_predictor(out).predict(X)

    def fake_run(trials: int, *extra: str) -> subprocess.CompletedProcess[str]:
        # The fake trainer (the search and the save are the real ones, the folds only sleep),
        # for its --fault-at hook.
        cmd = [python, "-m", "step5.testing.fake_search", *extra, "--", *flags, "--trials", str(trials)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    def assert_refused(done: subprocess.CompletedProcess[str], reason: str) -> None:
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: cannot write the model to output dir {out}: {reason}"), line
        assert line.endswith("the output dir still shows the model set it showed before")
        assert _snapshot(out) == before
        np.testing.assert_array_equal(load_predictor(out).predict(X), predicted)

    filler = _fill(out)
    assert_refused(real_run(3), "no space left on the device")  # the merged checkpoint is refused
    assert not [p for p in (out / model_set.SETS_DIRNAME).iterdir() if p.name.startswith(model_set.PARTIAL_PREFIX)]

    filler.unlink()
    read_only = shlex.join(["mount", "-o", "remount,ro", str(out)])
    assert_refused(fake_run(4, "--fault-at", "commit", "--fault", read_only), "the filesystem is read-only")

    subprocess.run(["mount", "-o", "remount,rw", str(out)], check=True)
    last = fake_run(5)  # space and write access back: the next run commits, and tidies up
    assert last.returncode == 0, last.stderr[-3000:]
    assert _snapshot(out) != before
    assert not [p for p in (out / model_set.SETS_DIRNAME).iterdir() if p.name.startswith(model_set.PARTIAL_PREFIX)]


@pytest.mark.slow
def test_a_disk_that_fills_under_the_search_ends_the_run_in_one_line_and_a_rerun_resumes(
    small_filesystem, sample_inputs, tmp_path, repo_root, python,
):
    """The study's SQLite file, and then the fold files (TMPDIR), on a filesystem that fills up
    mid-search: one line saying the disk is full (not "check the --storage URL", not torch's or
    Optuna's noise); space freed, the same command resumes the study."""
    from step5.testing import stored_trials

    disk = small_filesystem
    survivors, history = sample_inputs
    storage = f"sqlite:///{disk / 'study.db'}"
    flags = ["--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "neural_net",
             "--k-folds", "2", "--seed", "4", "--output-dir", str(tmp_path / "out")]
    filler = disk / "filler"

    def run(storage: str, tmpdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [python, "-m", "step5.testing.fake_search", *extra, "--", *flags, "--trials", "6", "--storage", storage]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(repo_root), "TMPDIR": str(tmpdir)})

    def error_line(done: subprocess.CompletedProcess[str]) -> str:
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "reported value is ignored" not in done.stderr, done.stderr[-3000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        return line

    fill = shlex.join(["dd", "if=/dev/zero", f"of={filler}", "bs=4096"])
    line = error_line(run(storage, tmp_path, "--fault-at", "tell:2", "--fault", fill))
    assert line.startswith(f"error: the study database {storage} failed while "), line
    assert line.endswith("database or disk is full. Waiting cannot fix this: the disk holding the database file is "
                         "full: free room there, then run the same command again to resume the study (its finished "
                         "trials are kept)"), line
    kept = sum(t.state.name == "COMPLETE" for t in stored_trials(storage))
    assert kept >= 1

    # A few pages left: Python still takes the folder as TMPDIR (it falls back to /tmp only from
    # one where it cannot write 4 bytes), and the fold files do not fit.
    os.truncate(filler, filler.stat().st_size - 8192)
    line = error_line(run(f"sqlite:///{tmp_path / 'other.db'}", disk))
    assert line.startswith(f"error: cannot write fold files to {disk}/step5_nn_"), line
    assert line.endswith(": no space left on the device; the workers read each fold from there: free room in that "
                         "folder or point TMPDIR at one that has it"), line
    assert [p.name for p in disk.iterdir() if p.name.startswith("step5_nn_")] == []

    filler.unlink()
    done = run(storage, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sum(t.state.name == "COMPLETE" for t in stored_trials(storage)) == 6  # the round the first run began
