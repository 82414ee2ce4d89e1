"""Issue 13's "Done when": a run killed at any point of its final commit leaves a matching,
loadable model pair. step5.testing.crash_at signals the real CLI right after its N-th change
to the output dir (the checkpoint landing in the new set, the sidecar, the picture, the
rename, each link, the pointer swap, the clean-up), for every N, with SIGKILL and SIGTERM.

The walk runs the CLI about twenty times. The first two runs start the entry script as a
user does; the walk's runs are forked from one process that has already imported the CLI
and its libraries (:class:`_ForkedRuns`), so each is a real process, killed for real, that
skips the two seconds of interpreter start and imports a run spends before its first step.
"""
from __future__ import annotations

import json
import os
import select
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

_PROG = "meta_prediction_optimizer_anti_overfit.py"

#: The fork server: imports what a run imports, then per request line ``[argv, stderr path]``
#: forks a child that runs crash_at's main (or the CLI's, when argv has no ``--at``) with its
#: stderr in the file and its stdout discarded, and answers the child's exit status as
#: subprocess reports it.
_SERVER = f"""
import json, os, sys
import matplotlib.pyplot, sklearn.model_selection, xgboost
import step5.optimizer.cli, step5.optimizer.optimizer, step5.testing.crash_at
for line in sys.stdin:
    argv, err = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            # stdin and stdout are the server's channel to the test: a run must not touch them.
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            sys.argv = [{_PROG!r}]
            if "--at" in argv:
                code = step5.testing.crash_at.main(argv)
            else:
                code = step5.optimizer.cli.main(argv, prog={_PROG!r})
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


def _env(repo_root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


class _ForkedRuns:
    """Runs of the CLI forked from one warm process (see the module docstring)."""

    def __init__(self, repo_root: Path, tmp_path: Path) -> None:
        self._err = tmp_path / "forked-run.stderr"
        self._server = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=repo_root, env=_env(repo_root),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], *, at: int | None = None, sig: str = "KILL") -> subprocess.CompletedProcess:
        watched = ["--watch", argv[argv.index("--output-dir") + 1], "--at", str(at), "--signal", sig, "--"]
        full = [*watched, *argv] if at is not None else argv
        assert self._server.stdin is not None and self._server.stdout is not None
        self._server.stdin.write(json.dumps([full, str(self._err)]) + "\n")
        self._server.stdin.flush()
        ready, _, _ = select.select([self._server.stdout], [], [], 300)
        assert ready, f"a forked run took over 300 s: {self._err.read_text()[-2000:]}"
        answer = self._server.stdout.readline()
        assert answer, f"the fork server ended: {self._err.read_text()[-2000:] if self._err.exists() else ''}"
        return subprocess.CompletedProcess(full, int(answer), "", self._err.read_text())

    def close(self) -> None:
        assert self._server.stdin is not None
        self._server.stdin.close()
        assert self._server.wait(timeout=60) == 0


def _argv(sample_inputs, out: Path) -> list[str]:
    survivors, history = sample_inputs
    return ["--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "xgboost",
            "--trials", "1", "--k-folds", "2", "--cv-repeats", "1", "--seed", "1", "--cpu-workers", "1",
            "--output-dir", str(out), "--log-level", "WARNING"]


def _matching_pair(out: Path) -> str:
    """Load the pair the output dir shows (the predictor checks the SHA-256 and the schema) and
    check that every file comes from one set; returns the run id that wrote it."""
    predictor = load_predictor(out)
    sets = {Path(os.path.realpath(out / name)).parent
            for name in (artifacts.SIDECAR_NAME, "best_model.json", artifacts.HISTORY_PNG_NAME)}
    assert len(sets) == 1, sets
    assert predictor.predict(np.zeros((2, len(predictor.feature_names)))).shape == (2,)
    return predictor.sidecar["provenance"]["run_id"]


@pytest.fixture
def forked(repo_root, tmp_path):
    runs = _ForkedRuns(repo_root, tmp_path)
    yield runs
    runs.close()


def test_a_run_interrupted_anywhere_in_its_final_commit_leaves_a_matching_pair(sample_inputs, tmp_path, repo_root,
                                                                                forked):
    out, base = tmp_path / "out", tmp_path / "base"
    argv = _argv(sample_inputs, out)
    for _ in range(2):  # two runs: the folder holds a set and the one before it
        first = subprocess.run([sys.executable, str(repo_root / _PROG), *argv], cwd=repo_root, env=_env(repo_root),
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
    before = _matching_pair(out)
    shutil.copytree(out, base, symlinks=True)

    def restore() -> None:  # every run below starts from the same folder, so point N is the same step
        shutil.rmtree(out)
        shutil.copytree(base, out, symlinks=True)

    # Each run below adds one quick trial to the study (seed 1 makes it a quick one), then
    # trains the final model and commits it.
    at, shown = 1, []
    while True:
        restore()
        proc = forked.run(argv, at=at, sig="KILL")
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
    assert forked.run(argv, at=6, sig="KILL").returncode == -signal.SIGKILL
    assert forked.run(argv).returncode == 0
    assert not [p for p in (out / model_set.SETS_DIRNAME).iterdir() if p.name.startswith(model_set.PARTIAL_PREFIX)]

    # SIGTERM runs the CLI's interrupt path (every `finally`): the same guarantee, and one line.
    for at in range(2, len(shown) + 1, 3):
        restore()
        proc = forked.run(argv, at=at, sig="TERM")
        assert proc.returncode in (0, 128 + signal.SIGTERM), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        _matching_pair(out)
