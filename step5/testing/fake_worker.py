"""A torch-free fake of ``nn_gpu_worker.py`` (and, started with ``--request -``, of
``train_single_trial.py``) for tests: the real protocol, decoder and framing, told by its
flags to misbehave on a chosen job (``--fault``, ``--boot``, ``--after``, ``--faulty-starts``)
and by ``STEP5_FAKE_*`` variables; docs/workers.md ("The fakes") lists them. Results are
a pure function of the request (minus ``job_id`` and where it saves its model), so a job
retried anywhere gives exactly the same numbers; a missing data file is a ``data_error``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Sequence

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from step5.errors import BadRequest, FrameTooLarge, JobError  # noqa: E402
from step5.framing import LineReader, LineWriter  # noqa: E402
from step5.jsonio import dumps, loads  # noqa: E402
from step5.protocol import (  # noqa: E402
    MAX_REQUEST_BYTES, PROTOCOL_VERSION, AliveMessage, Heartbeat, Job, MergeRequest, Ping, PongMessage, ReadyMessage,
    Shutdown, ShutdownMessage, TrainFolds, TrainRequest, decode_request, echo, error_reply,
)

FAULTS = ("none", "hang", "garbage", "exit", "sigkill", "oversize", "wrong_job_id", "close_stdout", "pass_error")
BOOT_FAULTS = ("none", "hang", "exit", "garbage")
ONESHOT_ENV = "STEP5_FAKE_ONESHOT"
POISON_ENV = "STEP5_FAKE_POISON_TRIAL"
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
        torch_threads=os.environ.get("STEP5_TORCH_THREADS"),
        environment={name: os.environ.get(name) for name in os.environ.get(ECHO_ENV, "").split(",") if name},
    )
    return result


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


class FakeWorker:
    def __init__(self, args: argparse.Namespace, wire: BinaryIO) -> None:
        self.args = args
        self.wire = wire
        self.writer = LineWriter(wire)
        self.jobs_seen = 0
        launch = _launch_number(args.state_dir)
        self.faulty = args.faulty_starts is None or launch <= args.faulty_starts
        self.device = args.device
        self.hung = False

    def log(self, msg: str) -> None:
        sys.stderr.write(f"fake-worker[{os.getpid()}] {msg}\n")
        sys.stderr.flush()

    def misbehave(self, request: Job) -> bool:
        """Apply the configured fault if this job is the one; True when a fault replaced the answer."""
        kill_self_if_poisoned(request.trial_number)
        fault = self.args.fault if self.faulty else "none"
        if fault in ("none", "pass_error") or self.jobs_seen <= self.args.after:  # pass_error: see serve()
            return False
        self.log(f"fault {fault!r} on job {request.job_id!r}")
        if fault == "hang":
            self.hung = True  # a hung process: no answers, not even to heartbeats
            while True:
                time.sleep(3600)
        if fault == "garbage":
            self.writer.write_line(b"Traceback (most recent call last): <this is not JSON>")
            return True
        if fault == "exit":
            sys.stderr.flush()
            os._exit(self.args.exit_code)
        if fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "oversize":
            self.writer.write_line(b"{" + b" " * (self.args.oversize_bytes) + b"}")
            return True
        if fault == "wrong_job_id":
            self.writer.write_message({"status": "complete", "model_type": "neural_net", "job_id": "not-yours"})
            return True
        if fault == "close_stdout":
            self.wire.close()
            while True:  # alive but mute: the parent sees EOF on a live process
                time.sleep(3600)
        raise AssertionError(f"unhandled fault {fault!r}")

    def answer(self, request: Job | BadRequest) -> dict[str, Any] | None:
        if isinstance(request, BadRequest):
            return request.to_dict()
        self.jobs_seen += 1
        for _ in range(self.args.stderr_lines):
            self.log(f"chatter for job {request.job_id!r} " + "." * 200)
        if self.misbehave(request):
            return None
        try:
            return train(request, self.device, self.args.job_s)
        except JobError as exc:
            return error_reply(exc, request)

    def _start_reader(self) -> "queue.Queue[Any]":
        """Read and decode stdin on a thread that answers heartbeats at once (as the real
        worker does) unless this process plays hung; everything else is queued for
        :meth:`serve` (None: end of input)."""
        requests: queue.Queue[Any] = queue.Queue()
        reader = LineReader(sys.stdin.buffer, MAX_REQUEST_BYTES)

        def read() -> None:
            try:
                while True:
                    try:
                        line = reader.read_line()
                    except FrameTooLarge:
                        requests.put(BadRequest("request line too long; discarded"))
                        continue
                    if line is None:
                        break
                    if not line.strip():
                        continue
                    try:
                        request = decode_request(loads(line))
                    except ValueError:
                        request = BadRequest("request is not valid JSON")
                    except BadRequest as exc:
                        request = exc
                    if not isinstance(request, Heartbeat):
                        requests.put(request)
                    elif not self.hung:
                        self.writer.write_message(AliveMessage(status="alive", pid=os.getpid(),
                                                               job_id=request.job_id, jobs_done=self.jobs_seen))
            except (OSError, ValueError):
                pass
            finally:
                requests.put(None)

        threading.Thread(target=read, daemon=True).start()
        return requests

    def serve(self) -> int:
        boot = self.args.boot if self.faulty else "none"
        time.sleep(self.args.boot_s)
        if boot == "hang":
            while True:
                time.sleep(3600)
        if boot == "exit":
            self.log("failing at boot")
            return 1
        if boot == "garbage":
            self.writer.write_line(b"CUDA banner on the wire")
        ready = ReadyMessage(
            status="ready", device=self.device, pid=os.getpid(), protocol=PROTOCOL_VERSION, boot_s=self.args.boot_s,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            hip_visible_devices=os.environ.get("HIP_VISIBLE_DEVICES"),
        )
        if self.args.backend is not None:  # else the pool reads it from the device
            ready["backend"] = self.args.backend
        self.writer.write_message(ready)
        requests = self._start_reader()
        while (request := requests.get()) is not None:
            if isinstance(request, Shutdown):
                self.writer.write_message(ShutdownMessage(status="shutdown", reason="command",
                                                          jobs_done=self.jobs_seen, pid=os.getpid()))
                return 0
            if isinstance(request, Ping):
                self.writer.write_message(PongMessage(status="pong", pid=os.getpid(), device=self.device,
                                                      jobs_done=self.jobs_seen, uptime_s=0.0, job_id=request.job_id))
                continue
            jobs: list[Job | BadRequest] = list(request.jobs) if isinstance(request, TrainFolds) else [request]
            if len(jobs) > 1 and self.faulty and self.args.fault == "pass_error":
                # What the real worker answers when the shared pass itself raises.
                for job in jobs:
                    failure = JobError("RuntimeError: the fused pass broke", "train_error")
                    self.writer.write_message(error_reply(failure, job))
                continue
            for job in jobs:
                response = self.answer(job)
                if response is not None:
                    self.writer.write_message(response)
        return 0


def oneshot_main() -> int:
    """Behave like ``train_single_trial.py --request -``: one request in, one reply out, exit 0 / 1."""
    if os.environ.get(ONESHOT_ENV) == "crash":
        sys.stderr.write("fake one-shot trainer crashing on purpose\n")
        return 7
    if os.environ.get(ONESHOT_ENV) == "hang":
        sys.stderr.write("fake one-shot trainer hanging on purpose\n")
        sys.stderr.flush()
        while True:
            time.sleep(60)
    try:
        request = decode_request(loads(sys.stdin.buffer.read()))
        if not isinstance(request, (TrainRequest, MergeRequest)):
            raise BadRequest(f"the one-shot trainer runs one `train` or `merge` job, got `{request.command}`")
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
    try:
        rc = FakeWorker(args, wire).serve()
    except BrokenPipeError:
        rc = 0
    # Like the real worker: end without interpreter teardown, which aborts (SIGABRT) when the
    # daemon stdin reader thread still holds stdin's buffer lock.
    try:
        wire.flush()
    except (BrokenPipeError, ValueError):
        pass
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    raise SystemExit(main())
