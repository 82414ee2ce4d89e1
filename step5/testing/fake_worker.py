"""A torch-free fake of ``nn_gpu_worker.py`` (and, started with ``--request -``, of
``train_single_trial.py``) for tests: the real protocol, framing, dispatcher and serve loop
(:mod:`step5.nn.worker`) around a fake training backend, told by its
flags to misbehave on a chosen job (``--fault``, ``--boot``, ``--after``, ``--faulty-starts``)
and by ``STEP5_FAKE_*`` variables; docs/workers.md ("The fakes") lists them. Results are
a pure function of the request (minus ``job_id`` and where it saves its model), so a job
retried anywhere gives exactly the same numbers; a missing data file is a ``data_error``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Sequence

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from step5.devices import TORCH_THREADS_ENV  # noqa: E402
from step5.errors import BadRequest, JobError  # noqa: E402
from step5.framing import LineReader, LineWriter  # noqa: E402
from step5.jsonio import dumps, loads  # noqa: E402
from step5.nn.worker import Dispatcher, exit_now, serve  # noqa: E402 - torch-free until a TorchBackend is made
from step5.protocol import (  # noqa: E402
    MAX_REQUEST_BYTES, PROTOCOL_VERSION, Heartbeat, Job, MergeRequest, ReadyMessage, TrainRequest, decode_request,
    echo, error_reply,
)

FAULTS = ("none", "hang", "garbage", "exit", "sigkill", "oversize", "wrong_job_id", "close_stdout", "pass_error")
BOOT_FAULTS = ("none", "hang", "exit", "garbage")
ONESHOT_ENV = "STEP5_FAKE_ONESHOT"
ONESHOT_FAULTS = ("crash", "hang_at_setup", "hang")
POISON_ENV = "STEP5_FAKE_POISON_TRIAL"
BOOT_ENV = "STEP5_FAKE_BOOT"  # one of BOOT_FAULTS: as --boot, for every launch
#: A JSON object whose keys replace those of every ``train`` job's reply, worker or one-shot trainer alike (a
#: null removes one): a malformed but well-formed reply, e.g. ``{"status": "error", "error_type": "gpu_melted"}``.
REPLY_ENV = "STEP5_FAKE_REPLY"
#: Comma-separated variable names whose values each result echoes (``environment``), so
#: tests can see what a slot's process was started with.
ECHO_ENV = "STEP5_FAKE_ECHO_ENV"
#: What a fake checkpoint holds, and the test R² a fake ``merge`` reports for the merged model.
FAKE_CHECKPOINT = b"fake checkpoint"
FAKE_ENSEMBLE_TEST_R2 = 0.55


def kill_self_if_poisoned(trial_number: int | None) -> None:
    poison = os.environ.get(POISON_ENV)
    if poison is not None and trial_number is not None and int(poison) == trial_number:
        sys.stderr.write(f"fake trainer: trial {trial_number} is poisoned, killing myself\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def fake_metrics(request: TrainRequest) -> dict[str, Any]:
    """Pseudo-metrics hashed from the request without its ``job_id`` and save path, and
    with only the data file's name (runs in different temp dirs agree)."""
    wire = request.to_dict()
    wire.pop("job_id", None)
    wire.pop("save_model_path", None)
    wire["X_train_path"] = os.path.basename(wire["X_train_path"])
    digest = hashlib.sha256(dumps(wire)).digest()
    u = [int.from_bytes(digest[i:i + 4], "big") / 2**32 for i in (0, 4, 8)]
    return {"status": "complete", "model_type": "neural_net", "r2": round(u[0] * 0.8 - 0.1, 6),
            "val_mse": round(0.5 + u[1], 6), "train_mse": round(0.4 + u[2], 6),
            "train_r2": round(u[0] * 0.8 - 0.1 + 0.3 * u[2], 6), "epochs_run": request.params.epochs,
            "trial_number": request.trial_number, "fold_idx": request.fold_idx, "job_id": request.job_id}


def tampered(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` as :data:`REPLY_ENV` changes it; a value that is no JSON object stops the fake."""
    raw = os.environ.get(REPLY_ENV)
    if not raw:
        return reply
    try:
        changes = loads(raw)
    except ValueError:
        changes = None
    if not isinstance(changes, dict):
        sys.exit(f"fake worker: {REPLY_ENV}={raw!r} is not a JSON object")
    return {k: v for k, v in {**reply, **changes}.items() if not (k in changes and v is None)}


def train(request: Job, device: str, job_s: float) -> dict[str, Any]:
    """Pretend to train: sleep ``job_s``, write a fake checkpoint where the job saves its
    model, return fake metrics and where it ran (so tests see each slot's environment)."""
    if isinstance(request, MergeRequest):
        return merge(request)
    start = time.perf_counter()
    if not os.path.exists(request.data_path):
        raise JobError(f"NPZ file not found: {request.data_path}", "data_error")
    time.sleep(job_s)
    result = fake_metrics(request)
    if request.save_model_path is not None:
        Path(request.save_model_path).write_bytes(FAKE_CHECKPOINT)
        result["model_path"] = request.save_model_path
    result.update(
        device=device, duration=round(time.perf_counter() - start, 6), worker_pid=os.getpid(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        hip_visible_devices=os.environ.get("HIP_VISIBLE_DEVICES"),
        torch_threads=os.environ.get(TORCH_THREADS_ENV),
        environment={name: os.environ.get(name) for name in os.environ.get(ECHO_ENV, "").split(",") if name},
    )
    return tampered(result)


def merge(request: MergeRequest) -> dict[str, Any]:
    """Every fold checkpoint must exist; writes a fake merged checkpoint."""
    missing = [p for p in (*request.fold_paths, request.score_path) if not os.path.isfile(p)]
    if missing:
        raise JobError(f"checkpoint not found: {missing[0]}", "data_error")
    Path(request.out_path).write_bytes(FAKE_CHECKPOINT)
    return {"status": "complete", "model_type": "neural_net", **echo(request), "model_path": request.out_path,
            "models": len(request.fold_paths), "train_r2": 0.7, "train_mse": 0.3, "test_r2": FAKE_ENSEMBLE_TEST_R2,
            "test_mse": 1.0 - FAKE_ENSEMBLE_TEST_R2}


def _launch_number(state_dir: str | None) -> int:
    """1 for the first launch that shares ``state_dir``, 2 for the next, ... (0 without one)."""
    if not state_dir:
        return 0
    # An O_APPEND write of one byte is atomic and leaves this descriptor's offset just past
    # *our* byte, so concurrent launches each read their own count (the file's size would not).
    fd = os.open(Path(state_dir) / "launches", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b".")
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


class FakeBackend:
    """The worker's training backend (what :class:`step5.nn.worker.TorchBackend` offers its
    :class:`~step5.nn.worker.Dispatcher`), faked: :func:`train` answers, and the configured
    fault strikes the chosen job. The real dispatcher and ``serve`` loop do everything else."""

    def __init__(self, args: argparse.Namespace, writer: LineWriter, wire: BinaryIO, faulty: bool) -> None:
        self.args = args
        self.writer = writer
        self.wire = wire
        self.device = args.device
        self.faulty = faulty  # whether this launch misbehaves (--faulty-starts)
        self.jobs_seen = 0
        self.hung = False

    def log(self, msg: str) -> None:
        sys.stderr.write(f"fake-worker[{os.getpid()}] {msg}\n")
        sys.stderr.flush()

    def _before(self, request: Job) -> None:
        """Apply the configured fault if this job is the one. A fault that writes a bad line
        instead of the answer lets the answer follow: the parent kills the worker at the bad line."""
        self.jobs_seen += 1
        for _ in range(self.args.stderr_lines):
            self.log(f"chatter for job {request.job_id!r} " + "." * 200)
        kill_self_if_poisoned(request.trial_number)
        fault = self.args.fault if self.faulty else "none"
        if fault in ("none", "pass_error") or self.jobs_seen <= self.args.after:  # pass_error: see train_folds
            return
        self.log(f"fault {fault!r} on job {request.job_id!r}")
        if fault == "hang":
            self.hung = True  # a hung process: no answers, not even to heartbeats
            while True:
                time.sleep(3600)
        elif fault == "garbage":
            self.writer.write_line(b"Traceback (most recent call last): <this is not JSON>")
        elif fault == "exit":
            sys.stderr.flush()
            os._exit(self.args.exit_code)
        elif fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "oversize":
            self.writer.write_line(b"{" + b" " * (self.args.oversize_bytes) + b"}")
        elif fault == "wrong_job_id":
            self.writer.write_message({"status": "complete", "model_type": "neural_net", "job_id": "not-yours"})
        elif fault == "close_stdout":
            self.wire.close()
            while True:  # alive but mute: the parent sees EOF on a live process
                time.sleep(3600)

    def merge(self, request: MergeRequest) -> dict[str, Any]:
        self._before(request)
        return merge(request)

    def train_folds(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        if len(requests) > 1 and self.faulty and self.args.fault == "pass_error":
            raise RuntimeError("the fused pass broke")  # the real dispatcher fails every job of the pass
        replies = []
        for request in requests:
            try:
                self._before(request)
                replies.append(train(request, self.device, self.args.job_s))
            except JobError as exc:
                replies.append(error_reply(exc, request))
        return replies

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return False

    def release_memory(self) -> None:
        pass


class FakeDispatcher(Dispatcher):
    def alive(self, request: Heartbeat) -> dict[str, Any]:
        while self.backend.hung:  # answered on the stdin reader thread, which a hung process blocks too
            time.sleep(3600)
        return super().alive(request)


def fault_switch(name: str, choices: Sequence[str]) -> str | None:
    """A ``STEP5_FAKE_*`` fault's value; a misspelt one stops the fake, so that a test cannot pass
    by injecting nothing."""
    value = os.environ.get(name) or None
    if value is not None and value not in choices:
        sys.exit(f"fake worker: {name}={value!r} is not one of {list(choices)}")
    return value


def boot(args: argparse.Namespace, writer: LineWriter, faulty: bool) -> bool:
    """Pretend to boot, then say ``ready``; False when the boot fault is an exit."""
    # A slot's own environment (its device_env) may make just its workers misbehave.
    boot_fault = fault_switch(BOOT_ENV, BOOT_FAULTS) or (args.boot if faulty else "none")
    time.sleep(args.boot_s)
    if boot_fault == "hang":
        while True:
            time.sleep(3600)
    if boot_fault == "exit":
        sys.stderr.write(f"fake-worker[{os.getpid()}] failing at boot\n")
        return False
    if boot_fault == "garbage":
        writer.write_line(b"CUDA banner on the wire")
    ready = ReadyMessage(
        status="ready", device=args.device, pid=os.getpid(), protocol=PROTOCOL_VERSION, boot_s=args.boot_s,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        hip_visible_devices=os.environ.get("HIP_VISIBLE_DEVICES"),
    )
    if args.backend is not None:  # else the pool reads it from the device
        ready["backend"] = args.backend
    writer.write_message(ready)
    return True


def _hang(why: str) -> None:
    sys.stderr.write(f"fake one-shot trainer {why}\n")
    sys.stderr.flush()
    while True:
        time.sleep(60)


def oneshot_main() -> int:
    """Behave like ``train_single_trial.py --request -``: one request in, one reply out, exit 0 / 1."""
    fault = fault_switch(ONESHOT_ENV, ONESHOT_FAULTS)
    if fault == "crash":
        sys.stderr.write("fake one-shot trainer crashing on purpose\n")
        return 7
    if fault == "hang_at_setup":  # before `ready`, as a wedged GPU's CUDA init
        _hang("hanging on purpose before `ready`")
    try:
        request = decode_request(loads(sys.stdin.buffer.read()))
        if not isinstance(request, (TrainRequest, MergeRequest)):
            raise BadRequest(f"the one-shot trainer runs one `train` or `merge` job, got `{request.command}`")
        if "--ready-line" in sys.argv:
            ready = ReadyMessage(status="ready", device="fake-oneshot", pid=os.getpid(), protocol=PROTOCOL_VERSION)
            sys.stdout.write(dumps(ready).decode() + "\n")
            sys.stdout.flush()
        if fault == "hang":  # in the job, once set up
            _hang("hanging on purpose")
        kill_self_if_poisoned(request.trial_number)
        reply = train(request, "fake-oneshot", 0.0)
    except ValueError:
        reply = BadRequest("request is not valid JSON").to_dict()
    except JobError as exc:
        reply = exc.to_dict() if isinstance(exc, BadRequest) else error_reply(exc, request)
    sys.stdout.write(dumps(reply).decode() + "\n")
    return 0 if reply["status"] == "complete" else JobError.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--request" in argv:
        return oneshot_main()
    p = argparse.ArgumentParser(description="Fake Step 5 worker for tests.")
    p.add_argument("--fault", choices=FAULTS, default="none", help="what to do instead of answering a job")
    p.add_argument("--after", type=int, default=0, help="answer this many jobs normally before the fault")
    p.add_argument("--exit-code", type=int, default=42)
    p.add_argument("--boot", choices=BOOT_FAULTS, default="none", help="misbehave before `ready`")
    p.add_argument("--boot-s", type=float, default=0.0, help="pretend boot time before `ready`")
    p.add_argument("--job-s", type=float, default=0.01, help="pretend training time per job")
    p.add_argument("--faulty-starts", type=int, default=None,
                   help="only the first N launches sharing --state-dir misbehave (default: all)")
    p.add_argument("--state-dir", default=None)
    p.add_argument("--stderr-lines", type=int, default=0, help="lines of stderr chatter per job")
    p.add_argument("--oversize-bytes", type=int, default=2 * MAX_REQUEST_BYTES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, choices=("cpu", "cuda", "rocm"),
                   help="the backend `ready` reports [none: the pool reads it from --device]")
    args = p.parse_args(argv)

    from step5.lifeline import install_lifeline
    from step5.stdout_guard import claim_stdout

    wire = claim_stdout()
    if os.environ.get("STEP5_PARENT_PID"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_lifeline(poll_s=0.2)
    writer = LineWriter(wire)
    faulty = args.faulty_starts is None or _launch_number(args.state_dir) <= args.faulty_starts
    dispatcher = FakeDispatcher(FakeBackend(args, writer, wire, faulty))
    try:
        rc = serve(LineReader(sys.stdin.buffer), writer, dispatcher) if boot(args, writer, faulty) else 1
    except BrokenPipeError:
        rc = 0
    # Like the real worker: no interpreter teardown, which aborts (SIGABRT) when the daemon
    # stdin reader thread still holds stdin's buffer lock.
    exit_now(rc, wire)


if __name__ == "__main__":
    raise SystemExit(main())
