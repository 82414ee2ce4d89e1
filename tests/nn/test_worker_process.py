"""nn_gpu_worker.py as a user (or the pool) runs it: a real process fed lines on stdin.

These are the proposal's acceptance tests 0-2 plus the protocol's error cases, against
the real training core on the CPU. Each test starts one worker (torch boots once each).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from step5.data.splits import write_fold_npz
from step5.jsonio import dumps, loads
from step5.protocol import MAX_REQUEST_BYTES

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "nn_gpu_worker.py"
ONESHOT = REPO_ROOT / "train_single_trial.py"
METRICS = ("r2", "val_mse", "train_mse", "train_r2", "epochs_run", "best_epoch", "n_train", "n_val")


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> dict[str, Path]:
    """Two small folds with a learnable signal, plus a NaN fold and a pickled one."""
    out = tmp_path_factory.mktemp("worker_folds")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    y = 0.8 * X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=300)
    paths = {
        "f0": write_fold_npz(out / "f0.npz", X[:240], y[:240], X[240:], y[240:]),
        "f1": write_fold_npz(out / "f1.npz", X[60:], y[60:], X[:60], y[:60]),
    }
    y_nan = y.copy()
    y_nan[5] = np.nan
    paths["nan"] = write_fold_npz(out / "nan.npz", X[:240], y_nan[:240], X[240:], y[240:])
    with open(out / "pickled.npz", "wb") as fh:
        np.savez(fh, X_train=np.array([{"evil": 1}] * 3, dtype=object), y_train=np.zeros(3),
                 X_val=np.zeros((2, 6)), y_val=np.zeros(2))
    paths["pickled"] = out / "pickled.npz"
    return paths


def train(path: Path, fold: int, *, trial: int = 0, seed: int = 5, **extra) -> dict:
    req = {"command": "train", "X_train_path": str(path),
           "params": {"hidden_layers": [16, 8], "learning_rate": 0.01, "epochs": 15, "dropout": 0.1},
           "trial_number": trial, "fold_idx": fold, "normalize_features": True, "use_leaky_relu": True,
           "batch_mode": "full", "seed": seed, "job_id": f"t{trial}-f{fold}"}
    req.update(extra)
    return req


def run_worker(lines: list[bytes | dict], env: dict[str, str] | None = None, timeout: float = 180):
    """Feed ``lines`` to a fresh worker, close stdin; returns (rc, messages, stderr)."""
    data = b"".join(line if isinstance(line, bytes) else dumps(line) + b"\n" for line in lines)
    full_env = {**os.environ, "STEP5_TORCH_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(WORKER)], input=data, capture_output=True, env=full_env,
                          timeout=timeout, cwd=REPO_ROOT)
    stderr = proc.stderr.decode(errors="replace")
    # Every stdout line must be a protocol message: nothing else may reach the wire.
    messages = [loads(line) for line in proc.stdout.splitlines()]
    assert all(isinstance(m, dict) and "status" in m for m in messages), proc.stdout[:500]
    return proc.returncode, messages, stderr


def test_acceptance_0_worker_script_parses():
    ast.parse(WORKER.read_text())


def test_acceptance_2_several_trials_then_shutdown_in_one_process(folds):
    rc, messages, stderr = run_worker(
        [train(folds["f0"], 0), train(folds["f0"], 0, trial=1, seed=6), train(folds["f1"], 1, trial=2),
         {"command": "ping"}, {"command": "shutdown"}, train(folds["f0"], 9)],
        env={"CUDA_VISIBLE_DEVICES": "0"},  # no CUDA here: must warn and train on the CPU
    )
    assert rc == 0
    statuses = [m["status"] for m in messages]
    assert statuses == ["ready", "complete", "complete", "complete", "pong", "shutdown"], messages
    ready, *jobs, pong, bye = messages
    assert ready["device"] == "cpu" and ready["protocol"] == 1 and ready["boot_s"] > 0
    assert ready["cuda_visible_devices"] == "0" and ready["torch_threads"] == 1
    assert ready["backend"] == "cpu"  # what this torch build trains on, not what the pin asked for
    assert "CUDA is not available" in stderr
    assert [(j["trial_number"], j["fold_idx"], j["job_id"]) for j in jobs] == [
        (0, 0, "t0-f0"), (1, 0, "t1-f0"), (2, 1, "t2-f1"),
    ]
    for j in jobs:
        assert j["model_type"] == "neural_net" and j["device"] == "cpu"
        assert all(np.isfinite(j[k]) for k in ("r2", "val_mse", "train_mse", "duration"))
    # One process served all of it (no re-boot), and the dataset was read once.
    assert pong["pid"] == bye["pid"] == ready["pid"] and pong["jobs_done"] == 3
    assert jobs[1]["load_s"] == 0.0  # same file again: served from the cache
    assert jobs[0]["r2"] != jobs[1]["r2"]  # a different seed is a different model


def test_a_worker_pinned_to_an_amd_gpu_names_its_backend_and_warns_when_its_torch_cannot_use_it(folds):
    rc, messages, stderr = run_worker(
        [train(folds["f0"], 0), {"command": "shutdown"}],
        env={"HIP_VISIBLE_DEVICES": "3", "CUDA_VISIBLE_DEVICES": "", "HSA_OVERRIDE_GFX_VERSION": "10.3.0"},
    )
    assert rc == 0
    ready, job, _ = messages
    assert (ready["backend"], ready["device"], ready["hip_visible_devices"]) == ("cpu", "cpu", "3")
    assert job["status"] == "complete" and job["device"] == "cpu"
    assert "HIP_VISIBLE_DEVICES='3' but ROCm is not available in torch" in stderr


BAD = [
    (b"this is not json\n", "bad_request", "not valid JSON"),
    (b"x" * (MAX_REQUEST_BYTES + 10) + b"\n", "bad_request", "exceeds"),
    (dumps({"X_train_path": "a.npz"}) + b"\n", "bad_request", "no `command`"),
    (dumps({"command": "dance"}) + b"\n", "bad_request", "unknown `command`"),
    (dumps({"command": "train", "X_train_path": 42}) + b"\n", "bad_request", "X_train_path"),
    (dumps({"command": "train", "X_train_path": "a.npz", "params": {"learning_rate": "fast"}}) + b"\n",
     "bad_request", "learning_rate"),
]


def test_acceptance_1_malformed_requests_get_errors_and_the_worker_keeps_serving(folds, tmp_path):
    lines: list[bytes | dict] = [line for line, _, _ in BAD]
    lines += [
        train(tmp_path / "missing.npz", 0, job_id="missing"),
        train(folds["nan"], 0, job_id="nan"),
        train(folds["pickled"], 0, job_id="pickled"),
        train(folds["f0"], 0, job_id="good"),
    ]  # then EOF, no shutdown: the worker must end cleanly anyway
    rc, messages, _ = run_worker(lines)
    assert rc == 0
    ready, *answers = messages
    assert ready["status"] == "ready"
    assert len(answers) == len(lines), answers
    for (_, error_type, text), answer in zip(BAD, answers):
        assert (answer["status"], answer["error_type"]) == ("error", error_type)
        assert text in answer["error"]
    missing, nan, pickled, good = answers[len(BAD):]
    for answer, job_id in ((missing, "missing"), (nan, "nan"), (pickled, "pickled")):
        assert (answer["status"], answer["error_type"], answer["job_id"]) == ("error", "data_error", job_id)
    assert "missing.npz" in missing["error"]
    assert "y_train" in nan["error"]
    assert "pickle" in pickled["error"].lower() or "object" in pickled["error"].lower()
    assert good["status"] == "complete" and good["job_id"] == "good"


def test_worker_and_one_shot_give_the_same_metrics_and_fused_folds_match(folds):
    """One training core: the same request gives the same numbers on every path."""
    request = train(folds["f1"], 1, trial=4, seed=9)
    fused_twin = train(folds["f0"], 0, trial=4, seed=9)
    rc, messages, _ = run_worker([request, fused_twin, {"command": "train_folds", "jobs": [request, fused_twin]}])
    assert rc == 0
    _, worker_result, twin_result, fused_a, fused_b = messages

    cmd = [sys.executable, str(ONESHOT), "--model-type", "neural_net", "--data-path", request["X_train_path"],
           "--params", dumps(request["params"]).decode(), "--trial-number", "4", "--fold-idx", "1",
           "--normalize-features", "--use-leaky-relu", "--batch-mode", "full", "--seed", "9"]
    proc = subprocess.run(cmd, capture_output=True, timeout=180, cwd=REPO_ROOT,
                          env={**os.environ, "STEP5_TORCH_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    (line,) = proc.stdout.splitlines()
    oneshot_result = loads(line)

    assert {k: worker_result[k] for k in METRICS} == {k: oneshot_result[k] for k in METRICS}
    # Fused folds: each equals its unfused run (within float rounding of a batched pass).
    for fused, alone in ((fused_a, worker_result), (fused_b, twin_result)):
        assert fused["status"] == "complete" and fused["job_id"] == alone["job_id"]
        for key in ("r2", "val_mse", "train_mse"):
            assert fused[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-6)


# A worker whose jobs write to stdout on purpose, from Python and from the C level (as a
# CUDA or BLAS banner would): only protocol lines may reach the parent.
NOISY_WORKER = """
import os, sys
sys.path.insert(0, {repo!r})
from step5.nn import worker

real_train = worker.TorchBackend.train_folds

def noisy_train(self, requests):
    print("stray print from a job")
    os.write(1, b"C-level banner on fd 1\\n")
    return real_train(self, requests)

worker.TorchBackend.train_folds = noisy_train
worker.main()
"""


def test_stray_output_in_a_job_never_reaches_the_wire(folds):
    data = dumps(train(folds["f0"], 0)) + b"\n" + dumps({"command": "shutdown"}) + b"\n"
    proc = subprocess.run([sys.executable, "-c", NOISY_WORKER.format(repo=str(REPO_ROOT))], input=data,
                          capture_output=True, timeout=180, env={**os.environ, "STEP5_TORCH_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert [loads(line)["status"] for line in proc.stdout.splitlines()] == ["ready", "complete", "shutdown"]
    stderr = proc.stderr.decode()
    assert "stray print from a job" in stderr and "C-level banner on fd 1" in stderr


def test_a_fifo_as_data_path_is_a_clear_error_and_the_worker_keeps_serving(folds, tmp_path):
    """A FIFO used to block np.load, and with it the whole worker, forever."""
    fifo = tmp_path / "fold.fifo"
    os.mkfifo(fifo)
    rc, messages, _ = run_worker([train(fifo, 0), train(tmp_path, 1), train(folds["f0"], 2),
                                  {"command": "shutdown"}], timeout=120)
    assert rc == 0
    ready, fifo_error, dir_error, ok, bye = messages
    assert (fifo_error["status"], fifo_error["error_type"]) == ("error", "data_error")
    assert "is not a regular file (a FIFO)" in fifo_error["error"] and fifo_error["job_id"] == "t0-f0"
    assert "is not a regular file (a directory)" in dir_error["error"]
    assert ok["status"] == "complete" and bye["status"] == "shutdown"
