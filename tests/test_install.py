"""A user's install, for real: a clean copy of this checkout is pip-installed (not editable,
with the lock as constraints, no extras) into a fresh venv, and its console scripts run a
persistent-worker study from a directory that holds no part of the repository.

Nothing here can fall back to the checkout: the commands run from another folder, without
PYTHONPATH, and the workers start as ``python -P -m step5.nn.worker`` (no working
directory on their path), so every process imports the installed copy. The dependencies
are installed by pip from the index as a user gets them (about a minute with pip's cache
warm, as it is after scripts/setup.sh).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _clean_copy(dest: Path) -> Path:
    """What a fresh clone of this working tree holds: tracked and new files, nothing ignored
    (no .venv, no build/ or *.egg-info of an earlier build). Links stay links."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO_ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout, so there is no clean copy to install: {exc}")
    for rel in sorted({p for p in listed.decode().split("\0") if p}):
        src = REPO_ROOT / rel
        if not os.path.lexists(src):  # deleted in the working tree, not yet committed
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
    return dest


def _user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=_user_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_pip_install_then_a_persistent_worker_study_from_another_directory(tmp_path: Path):
    source = _clean_copy(tmp_path / "clone")
    venv = tmp_path / "venv"
    try:
        # sys.executable is the test venv's python; venv builds on its base interpreter.
        _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=300)
        bin_ = venv / "bin"
        # --no-compile: byte-compiling torch's thousands of files was most of the install's CPU
        # time, and it changes nothing about what is installed.
        _run([bin_ / "python", "-m", "pip", "install", "--quiet", "--no-compile", "-c", source / "requirements.txt",
              source], cwd=tmp_path, timeout=840)

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        where = _run([bin_ / "python", "-c", "import step5, step5.policy as p; "
                      "print(step5.__file__); print(p.PROJECT_POLICY_PATH)"], cwd=elsewhere).stdout.split()
        package, policy = Path(where[0]), Path(where[1])
        assert package.is_relative_to(venv), f"step5 imported from {package}, not from the venv"
        assert policy.is_file() and not policy.is_symlink() and policy.is_relative_to(venv)
        assert policy.read_bytes() == (REPO_ROOT / "watcher_policies.json").read_bytes()

        _run([bin_ / "step5-sample-data", "--out", "data", "--survivors", "300", "--features", "12", "--seed", "3"],
             cwd=elsewhere)
        inputs = ["--survivors", "data/survivors_with_scores.json", "--lottery-data", "data/train_history.json",
                  "--policy", policy]
        _run([bin_ / "step5-optimize", *inputs, "--trials", "2", "--k-folds", "3", "--nn-max-epochs", "3",
              "--persistent-workers", "--cpu-workers", "2", "--output-dir", "out"], cwd=elsewhere)
        sidecar = json.loads((elsewhere / "out" / "best_model.meta.json").read_text())
        execution = sidecar["execution"]
        assert sidecar["outcome"] == "SUCCESS"
        assert execution["mode"] == "persistent_workers" and execution["fallbacks"] == []
        # Each slot takes jobs once its own worker is ready: which one trained how many is the race's.
        # (one may even still be booting when the run ends: its device is then null).
        assert not any(w["fallback"] for w in execution["workers"]), execution["workers"]
        assert sum(w["jobs"] for w in execution["workers"] if w["device"] == "cpu") > 0, execution["workers"]

        _run([bin_ / "step5-predict", "--model-dir", "out", "--survivors", "data/survivors_with_scores.json",
              "--output", "predictions.json"], cwd=elsewhere)
        assert len(json.loads((elsewhere / "predictions.json").read_text())) == 300

        # The worker's own console script speaks the protocol.
        served = _run([bin_ / "step5-worker"], cwd=elsewhere, input='{"command": "ping"}\n').stdout.splitlines()
        assert [json.loads(line)["status"] for line in served] == ["ready", "pong"]

        # Console scripts name themselves in their usage line.
        for script in ("step5-train-fold", "step5-optimize"):
            shown = _run([bin_ / script, "--help"], cwd=elsewhere)
            # The one-shot trainer keeps stdout for its result line, so its help goes to stderr.
            assert (shown.stdout or shown.stderr).startswith(f"usage: {script} ")

        # The WATCHER starts its step from the package too: its command runs here.
        dry = _run([bin_ / "step5-watcher", "--run-pipeline", "--dry-run", "--policy", policy,
                    "--params", json.dumps({"survivors": "data/survivors_with_scores.json",
                                            "lottery_data": "data/train_history.json"})], cwd=elsewhere)
        step_command = shlex.split(dry.stdout)
        assert step_command[1:4] == ["-P", "-m", "step5.optimizer"]
        assert "usage:" in _run([*step_command, "--help"], cwd=elsewhere).stdout

        # No `trees` extra was installed: a tree model type says which extra it needs.
        tree = subprocess.run([bin_ / "step5-optimize", *map(str, inputs), "--model-type", "xgboost"],
                              cwd=elsewhere, env=_user_env(), capture_output=True, text=True, timeout=120)
        assert tree.returncode == 1
        assert "xgboost is not installed" in tree.stderr and "step5[trees]" in tree.stderr
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1 GB with torch; pytest keeps old tmp dirs
