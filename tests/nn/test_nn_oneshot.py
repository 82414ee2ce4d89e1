"""The one-shot trainer as a user runs it, and the stdout guard it stands on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from step5.errors import BadRequest, UsageError
from step5.nn.job import run_train_job
from step5.nn.oneshot import build_parser, request_from_args

CPU = torch.device("cpu")
PARAMS = {"hidden_layers": [16, 8], "epochs": 10, "learning_rate": 1e-2, "dropout": 0.1, "batch_size": 32}


@pytest.fixture(scope="module")
def fold(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 6)).astype(np.float32)
    y = (X[:, 0] + np.sin(X[:, 1]) + 0.1 * rng.normal(size=160)).astype(np.float32)
    path = tmp_path_factory.mktemp("oneshot") / "fold.npz"
    with open(path, "wb") as fh:
        np.savez(fh, X_train=X[:120], y_train=y[:120], X_val=X[120:], y_val=y[120:])
    return str(path)


def run_cli(repo_root: Path, *args: str, stdin: str | None = None) -> tuple[int, list[str], str]:
    env = dict(os.environ, STEP5_TORCH_THREADS="1", PYTHONPATH=str(repo_root))
    proc = subprocess.run(
        [sys.executable, str(repo_root / "train_single_trial.py"), *args],
        capture_output=True, text=True, env=env, cwd=repo_root, timeout=120, check=False, input=stdin,
    )
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def test_cli_prints_one_result_line_equal_to_the_in_process_job(repo_root, fold, tmp_path):
    out_dir = tmp_path / "model"
    code, lines, stderr = run_cli(
        repo_root, "--model-type", "neural_net", "--data-path", fold, "--params", json.dumps(PARAMS),
        "--trial-number", "4", "--fold-idx", "1", "--normalize-features", "--use-leaky-relu", "--batch-mode", "mini",
        "--seed", "9", "--save-model", "--model-output-dir", str(out_dir), "--output-path", str(tmp_path / "r.json"),
    )
    assert code == 0, stderr
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["status"] == "complete" and (result["trial_number"], result["fold_idx"]) == (4, 1)
    assert result["model_path"] == str(out_dir / "best_model.pth") and (out_dir / "best_model.pth").is_file()
    assert "1 torch threads" in stderr  # logs go to stderr

    from step5.protocol import TrainRequest

    request = TrainRequest.from_dict({
        "X_train_path": fold, "params": PARAMS, "trial_number": 4, "fold_idx": 1, "normalize_features": True,
        "use_leaky_relu": True, "batch_mode": "mini", "seed": 9,
    })
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the subprocess: bit-identical metrics
    try:
        here = run_train_job(request, device=CPU)
    finally:
        torch.set_num_threads(before)
    for key in ("r2", "val_mse", "train_mse", "train_r2", "epochs_run", "best_epoch", "n_train", "n_val"):
        assert result[key] == here[key], key

    # The worker's JSON request (what the fold runner sends on stdin) is the same job: the same reply.
    wire = {**request.to_dict(), "job_id": "t4-f1", "save_model_path": str(tmp_path / "again.pth")}
    code, lines, stderr = run_cli(repo_root, "--request", "-", stdin=json.dumps(wire))
    assert code == 0, stderr
    (line,) = lines
    again = json.loads(line)
    assert again["job_id"] == "t4-f1" and again["model_path"] == str(tmp_path / "again.pth")
    for key in ("r2", "val_mse", "train_mse", "train_r2", "epochs_run", "best_epoch", "n_train", "n_val"):
        assert again[key] == result[key], key

    # As the pool starts it (--ready-line): the worker's `ready` once torch is set up, then the same reply.
    code, lines, stderr = run_cli(repo_root, "--request", "-", "--ready-line", stdin=json.dumps(wire))
    assert code == 0, stderr
    ready, reply = (json.loads(line) for line in lines)
    assert ready["status"] == "ready" and ready["device"] == "cpu" and ready["backend"] == "cpu"
    assert ready["protocol"] == 1 and ready["torch_threads"] == 1
    assert {key: reply[key] for key in ("status", "r2", "epochs_run")} == \
        {key: again[key] for key in ("status", "r2", "epochs_run")}


def test_a_request_refused_before_torch_is_set_up_gets_its_reply_and_no_ready(repo_root):
    code, lines, _ = run_cli(repo_root, "--request", "-", "--ready-line", stdin='{"command": "train"}')
    assert code == 1
    (line,) = lines
    assert json.loads(line)["error_type"] == "bad_request"


def test_cli_job_failure_exits_1_with_an_error_line(repo_root, tmp_path):
    code, lines, _ = run_cli(
        repo_root, "--model-type", "neural_net", "--data-path", str(tmp_path / "missing.npz"), "--params", "{}",
        "--trial-number", "3", "--fold-idx", "0",
    )
    assert code == 1 and len(lines) == 1
    err = json.loads(lines[0])
    assert (err["status"], err["error_type"], err["trial_number"], err["fold_idx"]) == ("error", "data_error", 3, 0)
    assert "missing.npz" in err["error"]


@pytest.mark.parametrize("args, fragment", [
    (["--model-type", "neural_net", "--data-path", "x.npz"], "--params"),
    (["--model-type", "neural_net", "--data-path", "x.npz", "--params", "{}", "--bogus"], "--bogus"),
    (["--model-type", "xgboost", "--data-path", "x.npz", "--params", "{}"], "only neural_net"),
    (["--model-type", "neural_net", "--data-path", "x.npz", "--params", "{not json"], "not valid JSON"),
    (["--model-type", "neural_net", "--data-path", "x.npz", "--params", '{"epochs": 0}'], "epochs"),
    (["--model-type", "neural_net", "--data-path", "x.npz", "--params", "{}", "--save-model"], "--model-output-dir"),
    (["--request", "-", "--data-path", "x.npz"], "--request replaces --data-path"),
    (["--request", "/nonexistent/request.json"], "cannot read --request"),
])
def test_cli_usage_errors_exit_1_with_a_bad_request_line(repo_root, args, fragment):
    code, lines, _ = run_cli(repo_root, *args)
    assert code == 1 and len(lines) == 1, lines
    err = json.loads(lines[0])
    assert err["status"] == "error" and err["error_type"] == "bad_request"
    assert fragment in err["error"], err["error"]


def test_dropout_flag_overrides_params():
    args = build_parser().parse_args([
        "--model-type", "neural_net", "--data-path", "f.npz", "--params", '{"dropout": 0.5}', "--dropout", "0.25",
    ])
    req = request_from_args(args)
    # --normalize-features / --use-leaky-relu are store_true flags: absent means off.
    assert req.params.dropout == 0.25 and not req.normalize_features and not req.use_leaky_relu
    with pytest.raises(BadRequest, match="dropout"):
        request_from_args(build_parser().parse_args([
            "--model-type", "neural_net", "--data-path", "f.npz", "--params", "{}", "--dropout", "1.5"]))
    with pytest.raises(UsageError):
        build_parser().parse_args(["--model-type"])


@pytest.mark.parametrize("request_, fragment", [
    ("{not json", "--request is not valid JSON"),
    ('{"command": "train", "X_train_path": "x.npz", "params": {"epochs": 0}, "job_id": "j1"}', "`epochs`"),
    ('{"command": "ping"}', "runs one `train` or `merge` job, got `ping`"),
])
def test_a_bad_json_request_exits_1_with_a_bad_request_line(repo_root, request_, fragment):
    code, lines, _ = run_cli(repo_root, "--request", "-", stdin=request_)
    assert code == 1 and len(lines) == 1, lines
    err = json.loads(lines[0])
    assert err["status"] == "error" and err["error_type"] == "bad_request"
    assert fragment in err["error"], err["error"]


def test_stdout_guard_keeps_stray_output_off_the_wire(repo_root):
    script = textwrap.dedent("""
        import ctypes, os, subprocess, sys, warnings
        from step5.stdout_guard import claim_stdout
        wire = claim_stdout()
        print("stray print")
        os.write(1, b"raw fd-1 write\\n")
        libc = ctypes.CDLL(None)
        libc.puts(b"libc banner")
        libc.fflush(None)
        warnings.warn("a warning")
        subprocess.run(["sh", "-c", "echo child output"], check=True)
        assert claim_stdout() is wire
        wire.write(b'{"status": "ready"}\\n')
        wire.flush()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(repo_root)), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == '{"status": "ready"}\n'
    for noise in ("stray print", "raw fd-1 write", "libc banner", "a warning", "child output"):
        assert noise in proc.stderr


def test_a_trainer_started_by_step5_exits_when_its_parent_is_gone(repo_root, fold):
    """A fallback one-shot trainer must not outlive a SIGKILLed optimizer: given a parent
    pid (as DeviceSlot.environment records it) that no longer exists, it exits promptly
    instead of training a long fold nobody will read."""
    from step5.lifeline import EXIT_ORPHANED, PARENT_PID_ENV

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = dict(os.environ, STEP5_TORCH_THREADS="1", PYTHONPATH=str(repo_root), **{PARENT_PID_ENV: str(gone.pid)})
    long_fold = dict(PARAMS, epochs=100_000, early_stopping_patience=0)
    proc = subprocess.run(
        [sys.executable, str(repo_root / "train_single_trial.py"), "--model-type", "neural_net",
         "--data-path", fold, "--params", json.dumps(long_fold), "--batch-mode", "mini"],
        capture_output=True, text=True, env=env, cwd=repo_root, timeout=60, check=False,
    )
    assert proc.returncode == EXIT_ORPHANED, (proc.returncode, proc.stderr[-2000:])
