"""The persistent training worker (S96B; docs/workers.md): boot torch once, then answer NDJSON
requests on stdin with one reply per job on stdout (logs on stderr; fd 1 is claimed before
torch can print) until ``shutdown``, EOF or the parent's death (:mod:`step5.lifeline`).
Framing (:mod:`step5.framing`), the torch-free :class:`Dispatcher`, the :class:`TorchBackend`."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO, NoReturn, Sequence

import psutil

from step5.errors import BadRequest, DataError, FrameTooLarge, JobError
from step5.framing import LineReader, LineWriter
from step5.fsutil import os_error_reason
from step5.jsonio import loads
from step5.lifeline import expected_parent_pid, install_lifeline
from step5.protocol import (
    PROTOCOL_VERSION, AliveMessage, Heartbeat, Job, MergeRequest, Ping, PongMessage, ReadyMessage,
    Request, Shutdown, ShutdownMessage, TrainFolds, TrainRequest, decode_request, echo, error_reply,
)
from step5.stdout_guard import claim_stdout

logger = logging.getLogger("step5.nn.worker")  # not __name__: run with -m it is "__main__"


class Dispatcher:
    """Turns requests into replies; never raises for a bad request. The one-shot trainer
    answers its one request with it too. ``backend``: :class:`TorchBackend` (or a stub of
    its methods: ``device``, ``train_folds``, ``merge``, ``is_out_of_memory``, ``release_memory``);
    it raises :class:`JobError` for a job's deterministic failure."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.jobs_done = 0
        self.shutdown_requested = False
        self._started = time.monotonic()

    def handle_line(self, line: bytes) -> list[dict[str, Any]]:
        """All replies to one request line (one, except for ``train_folds``)."""
        try:
            raw = loads(line)
        except ValueError as exc:
            preview = line[:80].decode("utf-8", errors="replace")
            return [BadRequest(f"request is not valid JSON ({exc}): {preview!r}").to_dict()]
        try:
            request = decode_request(raw)
        except BadRequest as exc:
            return [exc.to_dict()]
        return self.handle(request)

    def handle(self, request: Request) -> list[dict[str, Any]]:
        """All replies to one decoded request."""
        if isinstance(request, Heartbeat):
            return [self.alive(request)]
        if isinstance(request, Ping):
            return [PongMessage(status="pong", pid=os.getpid(), device=self.backend.device, jobs_done=self.jobs_done,
                                uptime_s=round(time.monotonic() - self._started, 3), job_id=request.job_id)]
        if isinstance(request, Shutdown):
            self.shutdown_requested = True
            return [ShutdownMessage(status="shutdown", reason="command", jobs_done=self.jobs_done, pid=os.getpid())]
        return self._run(request.jobs if isinstance(request, TrainFolds) else (request,))

    def alive(self, request: Heartbeat) -> dict[str, Any]:
        """The answer to a ``heartbeat``: this process still reads its requests."""
        return AliveMessage(status="alive", pid=os.getpid(), job_id=request.job_id, jobs_done=self.jobs_done)

    def _failure(self, exc: BaseException, request: Job) -> dict[str, Any]:
        """Map an exception raised by a job to its error reply."""
        if isinstance(exc, JobError):
            return error_reply(exc, request)
        if self.backend.is_out_of_memory(exc):
            self.backend.release_memory()
            logger.warning("job %s ran out of memory on %s: %s", request.job_id, self.backend.device, exc)
            return error_reply(JobError(f"out of memory on {self.backend.device}: {exc}", "out_of_memory"), request)
        tb = traceback.format_exc()
        logger.error("job %s failed:\n%s", request.job_id, tb)
        return error_reply(JobError(f"{type(exc).__name__}: {exc}", "train_error", traceback=tb), request)

    def _run(self, jobs: Sequence[Job | BadRequest]) -> list[dict[str, Any]]:
        """One reply per job, in order. A job refused on decoding is answered in place; the
        others run together (``train`` jobs as one fused group, or one ``merge``), and fail
        alike if that raises (a fold that failed alone comes back as its error reply)."""
        replies: dict[int, dict[str, Any]] = {i: job.to_dict() for i, job in enumerate(jobs)
                                              if isinstance(job, BadRequest)}
        valid = [(i, job) for i, job in enumerate(jobs) if i not in replies]
        if valid:
            try:
                if isinstance(valid[0][1], MergeRequest):
                    results = [self.backend.merge(valid[0][1])]
                else:
                    results = list(self.backend.train_folds([job for _, job in valid]))
                if len(results) != len(valid):
                    raise RuntimeError(f"fused training returned {len(results)} results for {len(valid)} jobs")
            except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
                results = [self._failure(exc, job) for _, job in valid]
            else:
                results = [{"status": "complete", **result, **echo(job)} for (_, job), result in zip(valid, results)]
            finally:
                self.backend.release_memory()
            for (i, _), reply in zip(valid, results):
                replies[i] = reply
                self.jobs_done += reply["status"] == "complete"
        return [replies[i] for i in range(len(jobs))]


def serve(reader: LineReader, writer: LineWriter, dispatcher: Dispatcher) -> int:
    """Answer requests until ``shutdown`` or end of input; returns the exit status (0). A reader
    thread takes every line off stdin as it arrives, answers ``heartbeat`` at once (so the parent
    can tell a long job from a hung worker) and queues the rest, which this thread answers in order."""
    lines: queue.Queue[bytes | FrameTooLarge | None] = queue.Queue()  # None: end of input

    def read() -> None:
        try:
            while True:
                try:
                    line = reader.read_line()
                except FrameTooLarge as exc:
                    lines.put(exc)
                    if exc.at_eof:
                        break
                    continue
                if line is None:
                    break
                if not line.strip():
                    continue  # blank lines are keep-alives, not requests
                beat = _heartbeat(line)
                if beat is not None:
                    writer.write_message(dispatcher.alive(beat))
                    continue
                lines.put(line)
        except (OSError, ValueError) as exc:  # stdin closed under us: same as EOF
            logger.debug("stdin reader stopped: %s", exc)
        finally:
            lines.put(None)

    threading.Thread(target=read, name="step5-worker-stdin", daemon=True).start()
    while (line := lines.get()) is not None:
        if isinstance(line, FrameTooLarge):
            logger.warning("discarded an oversize request line (%d bytes)", line.seen)
            writer.write_message(BadRequest(
                f"request line of {line.seen} bytes exceeds the {line.limit}-byte limit; it was discarded"
            ).to_dict())
            continue  # never fall through to a previous message
        for response in dispatcher.handle_line(line):
            writer.write_message(response)
        if dispatcher.shutdown_requested:
            logger.info("shutdown requested after %d job(s)", dispatcher.jobs_done)
            return 0
    logger.info("stdin closed after %d job(s); exiting", dispatcher.jobs_done)
    return 0


def _heartbeat(line: bytes) -> Heartbeat | None:
    """The ``heartbeat`` a request line holds, if it is one (cheap check first: most lines are jobs)."""
    if b"heartbeat" not in line or len(line) > 1024:
        return None
    try:
        request = decode_request(loads(line))
    except (ValueError, BadRequest):
        return None
    return request if isinstance(request, Heartbeat) else None


class TorchBackend:
    """Runs jobs with the shared training core on this process's one device."""

    def __init__(self) -> None:
        import torch

        from step5.nn import job
        from step5.nn.device_loop import device_backend
        from step5.nn.trainer import configure_torch_threads

        self._job = job
        self.torch_version = str(torch.__version__)
        self.threads = configure_torch_threads()  # STEP5_TORCH_THREADS: the pool splits the cores
        # cuda:0 is the one GPU the pool's pin leaves us (CUDA_VISIBLE_DEVICES for NVIDIA,
        # HIP_VISIBLE_DEVICES for AMD: torch calls both ``cuda``).
        self.torch_device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        build = f"torch {torch.__version__} (CUDA {torch.version.cuda}, HIP {torch.version.hip})"
        for name, runtime in (("CUDA_VISIBLE_DEVICES", "CUDA"), ("HIP_VISIBLE_DEVICES", "ROCm")):
            visible = os.environ.get(name)
            if self.torch_device.type == "cpu" and visible and not visible.strip().startswith("-"):
                logger.warning("%s=%r but %s is not available in %s; this worker trains on the CPU",
                               name, visible, runtime, build)
        if self.torch_device.type == "cuda":
            # Create the CUDA context now, once, so that the first job does not pay for it.
            torch.zeros(1, device=self.torch_device)
            torch.cuda.synchronize(self.torch_device)
        self.device = job.describe_device(self.torch_device)
        self.torch_backend = device_backend(self.torch_device)  # cuda | rocm | cpu, from the build
        self.cache = job.DataCache()

    def train_folds(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        try:
            return self._job.run_fold_group(list(requests), device=self.torch_device, cache=self.cache)
        except ValueError as exc:  # the group disagrees on a shape-fixing field: the sender's mistake
            raise BadRequest(f"`train_folds` jobs cannot be fused: {exc}") from None

    def merge(self, request: MergeRequest) -> dict[str, Any]:
        from step5.nn.ensemble import build_ensemble

        try:
            return build_ensemble(request.fold_paths, request.out_path, score_path=request.score_path)
        except DataError as exc:  # a fold checkpoint missing or unreadable
            raise JobError(str(exc), "data_error") from None
        except OSError as exc:  # the merged model cannot be written (a full disk, no permission)
            raise JobError(f"cannot write the merged model {request.out_path}: {os_error_reason(exc)}",
                           "train_error") from None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return self._job.is_out_of_memory(exc)

    def release_memory(self) -> None:
        # The core already empties the CUDA cache after each job; this covers jobs that failed before.
        self._job.release_memory(self.torch_device)


def ready_message(backend: TorchBackend) -> ReadyMessage:
    """What a worker (or a one-shot trainer asked for it) says once torch and its device are set up."""
    return ReadyMessage(
        status="ready", device=backend.device, backend=backend.torch_backend, pid=os.getpid(),
        protocol=PROTOCOL_VERSION, torch_version=backend.torch_version, torch_threads=backend.threads,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        hip_visible_devices=os.environ.get("HIP_VISIBLE_DEVICES"),
        boot_s=round(max(0.0, time.time() - psutil.Process().create_time()), 4),  # since the interpreter started
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nn_gpu_worker.py``: serve, then exit (0 after ``shutdown`` or EOF)."""
    wire = claim_stdout()  # first of all: fd 1 is for protocol lines, before torch/CUDA can print
    parser = argparse.ArgumentParser(description="Persistent Step 5 neural-net worker (NDJSON on stdin/stdout).")
    parser.add_argument("--log-level", default=os.environ.get("STEP5_WORKER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s")
    if expected_parent_pid() is not None:
        # Started by the pool: Ctrl-C in the terminal, or its hangup, reaches the whole process
        # group, but stopping workers is the parent's job (it sends `shutdown` or kills them).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    install_lifeline()

    writer = LineWriter(wire)
    reader = LineReader(sys.stdin.buffer)
    backend = TorchBackend()
    ready = ready_message(backend)
    try:
        writer.write_message(ready)
        logger.info("ready on %s (%s) after %.2fs", backend.device, backend.torch_backend, ready["boot_s"])
        rc = serve(reader, writer, Dispatcher(backend))
    except BrokenPipeError:
        # The parent closed our stdout: nobody is listening any more.
        logger.warning("stdout closed by the parent; exiting")
        rc = 0
    exit_now(rc, wire)


def exit_now(rc: int, wire: BinaryIO) -> NoReturn:
    """Leave without interpreter teardown once every answer is flushed: tearing down torch
    takes a second or more (several on a loaded machine), which the parent would wait for
    after every reply, and the OS reclaims everything (the CUDA context included)."""
    logging.shutdown()
    for stream in (wire, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to flush to
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":  # python -m step5.nn.worker (what the pool starts)
    raise SystemExit(main())
