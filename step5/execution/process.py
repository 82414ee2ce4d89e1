"""Training processes as the parent sees them (docs/workers.md, "Lifecycle" and "Fault
handling"): the protocol's endpoint, one attempt of a one-shot job, the thread that forks
every worker, and the kill/reap/exit-status helpers the WATCHER shares. Every failure kills
the process before it is raised: the caller only decides what comes next.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

from step5.devices import DeviceSlot
from step5.errors import JOB_ERROR_TYPES, FrameTooLarge, JobError, JobTimedOut, WorkerCrashed, WorkerFault
from step5.framing import LineReader, LineWriter
from step5.jsonio import loads
from step5.launch import ONESHOT_MODULE, module_command
from step5.protocol import Heartbeat, Job, Request, Shutdown, TrainRequest, echo, ready_problem
from step5.values import is_number

logger = logging.getLogger(__name__)

#: How long to wait for a SIGKILLed process (and its pipes) before giving up on it, logged.
REAP_TIMEOUT_S = 5.0
#: Lines of a process's stderr kept for crash reports.
STDERR_TAIL_LINES = 20


def describe_exit(returncode: int | None) -> str:
    """``SIGKILL(-9)`` for a signal death, ``EXIT(1)`` for an exit code, ``RUNNING`` for none."""
    if returncode is None:
        return "RUNNING"
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name}({returncode})"
        except ValueError:
            return f"SIGNAL({returncode})"
    return f"EXIT({returncode})"


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it is still running; never waits."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process it started; never waits. The descendants are
    listed first: once ``proc`` is dead they are out of reach, and one holding its
    stdout/stderr would keep its pipes open."""
    if proc.poll() is not None:
        return
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    sigkill(proc)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


def reap_killed(proc: subprocess.Popen[bytes], what: str, timeout_s: float = REAP_TIMEOUT_S) -> bool:
    """Wait for a SIGKILLed process, but not forever (one stuck in a GPU driver; logged);
    whether it was reaped."""
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        logger.error("%s (pid %d) did not die %gs after SIGKILL", what, proc.pid, timeout_s)
        return False


#: Responses are small; a longer line from a worker is garbage, not a result.
MAX_RESPONSE_BYTES = 16 << 20
#: How long the pipe threads of a process that is gone may take to deliver the last lines.
_PIPES_SETTLE_S = 1.0
#: After EOF on stdout, how long to wait for the process itself to exit before it counts as
#: hung. Generous: on a loaded machine the kernel's teardown of a torch process that already
#: called exit can take seconds, and a reply that arrived whole must not become a crash.
_EXIT_AFTER_EOF_S = 10.0

_probe_ids = itertools.count()

#: The scores the parent reads from a ``complete`` reply to a ``train`` (the objective, the trial's fold
#: records): each a finite number, as every trainer sends them (it fails a job whose scores are not).
TRAIN_SCORES = ("r2", "train_r2", "val_mse", "train_mse")


def reply_problem(reply: dict[str, Any], job_id: Any, request: Job, *, ready: bool = True) -> str | None:
    """Why ``reply`` is no answer to ``request`` sent as ``job_id`` (None: it is one). The one check of a
    worker's and a one-shot trainer's replies, so that a reply means the same from either: one it fails
    is a protocol fault, re-run, never the trial's verdict (docs/workers.md, "Fault handling").
    ``ready``: the process said ``ready`` before this reply (a one-shot trainer that cannot set up torch
    answers ``startup_error`` in its place; after it, torch is set up and no process may say otherwise)."""
    status = reply.get("status")
    if reply.get("job_id") != job_id:
        return f"it answers job_id {reply.get('job_id')!r:.80}, not {job_id!r}"
    if status == "error":
        error_type = reply.get("error_type")
        if error_type == "timeout" or (error_type == "startup_error" and ready):
            # The parent's own verdicts (it alone measures a deadline; a `ready` said torch is set up): a
            # child's claim to them would get their handling (a timeout's retry, a slot retired).
            return f"`error_type` {error_type!r} is not a trainer's to give" + (
                " after `ready`" if error_type == "startup_error" else "")
        return None if error_type in JOB_ERROR_TYPES else \
            f"`error_type` {error_type!r:.80} is not one of {list(JOB_ERROR_TYPES)}"
    if status != "complete":
        return f"`status` {status!r:.80} is neither 'complete' nor 'error'"
    scores = TRAIN_SCORES if isinstance(request, TrainRequest) else ()  # a merge's may be null (under two rows)
    bad = [f"`{k}` {reply.get(k)!r:.40}" for k in scores if not is_number(reply.get(k))]
    return f"{', '.join(bad)}: not a finite number" if bad else None


def close_pipes(proc: subprocess.Popen[bytes], *, stdout_free: bool, stderr_free: bool) -> None:
    """Close our ends of a finished process's pipes: stdin always, stdout and stderr only when
    the thread reading each has let go of it (closing a stream another thread still reads can
    block). Closing a stream twice (another thread closing it too) is harmless."""
    for stream, free in ((proc.stdin, True), (proc.stdout, stdout_free), (proc.stderr, stderr_free)):
        if stream is not None and free:
            with contextlib.suppress(OSError, ValueError):
                stream.close()


class WorkerProcess:
    """A running worker (or one-shot trainer), with two threads that keep its pipes moving:
    a stdout reader feeding a queue, so the parent waits on "a line, EOF or a timeout" in
    one place, and a stderr drain into a bounded tail (logged at DEBUG), so a chatty worker
    can never fill its pipe and block."""

    def __init__(self, label: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.label = label
        self.proc = proc
        self.pid = proc.pid
        self._writer = LineWriter(proc.stdin)
        self._lines: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._reader = threading.Thread(target=self._read_stdout, name=f"step5-{label}-stdout", daemon=True)
        self._drain = threading.Thread(target=self._drain_stderr, name=f"step5-{label}-stderr", daemon=True)
        self._reader.start()
        self._drain.start()

    def _read_stdout(self) -> None:
        reader = LineReader(self.proc.stdout, MAX_RESPONSE_BYTES)  # type: ignore[arg-type]
        try:
            while True:
                try:
                    line = reader.read_line()
                except FrameTooLarge as exc:
                    self._lines.put(("oversize", exc.seen))
                    continue
                if line is None:
                    break
                if line.strip():
                    self._lines.put(("line", line))
        except (OSError, ValueError):
            pass  # the pipe was closed under us (kill / close): same as EOF
        finally:
            self._lines.put(("eof", None))

    def _drain_stderr(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(lambda: self.proc.stderr.readline(1 << 16), b""):  # type: ignore[union-attr]
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self._stderr.append(text)
                logger.debug("[%s pid %d] %s", self.label, self.pid, text)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def send(self, request: Request, doing: str) -> None:
        """Write one request; a dead reader is a crash."""
        try:
            self._writer.write_message(request.to_dict())
        except (OSError, ValueError):
            raise self._fault("crash", f"broken pipe while {doing}") from None

    def close_stdin(self) -> None:
        """No more requests (EOF ends a worker; a one-shot trainer reads its one request to EOF)."""
        with contextlib.suppress(OSError, ValueError):
            self._writer.close()

    def _next(self, timeout_s: float) -> tuple[str, Any] | None:
        try:
            return self._lines.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def receive(self, timeout_s: float, doing: str, *, hang_kind: str = "hang") -> dict[str, Any]:
        """The next message; a :class:`WorkerFault` on EOF, exit, garbage or silence."""
        got = self._next(timeout_s)
        if got is None:
            raise self._fault(hang_kind, f"hung: nothing within the {timeout_s:g}s timeout while {doing}")
        return self._decode(*got, doing)

    def await_answers(
        self, count: int, *, timeout_s: float, probe_interval_s: float, probe_grace_s: float, doing: str,
    ) -> list[dict[str, Any]]:
        """The next ``count`` answers (``alive`` replies skipped), within ``timeout_s``; a
        ``heartbeat`` after ``probe_interval_s`` of silence, unanswered for ``probe_grace_s``,
        is a hang (:class:`WorkerFault`); past ``timeout_s`` the worker is killed (nothing else
        stops a running job) and :class:`JobTimedOut` is raised."""
        answers: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        probed_at: float | None = None  # a probe is outstanding since then
        while len(answers) < count:
            # What is already read off the pipe came in time: the deadline is judged only on an empty queue.
            now = time.monotonic()
            wait = probe_interval_s if probed_at is None else probed_at + probe_grace_s - now
            got = self._next(min(wait, deadline - now))
            if got is None:
                now = time.monotonic()
                if now >= deadline:
                    raise self._timed_out(timeout_s, doing)
                if probed_at is None:
                    self.send(Heartbeat(f"probe#{next(_probe_ids)}"), doing)
                    probed_at = now
                elif now >= probed_at + probe_grace_s:
                    raise self._fault("hang", f"hung: stopped answering liveness probes ({probe_grace_s:g}s) "
                                              f"while {doing}")
                continue
            message = self._decode(*got, doing)
            probed_at = None  # any message shows the worker is alive
            if message.get("status") != "alive":
                answers.append(message)
            elif now >= deadline:  # past it, only answers already in count; liveness no longer does
                raise self._timed_out(timeout_s, doing)
        return answers

    def expect_exit(self, timeout_s: float, doing: str) -> int:
        """After a one-shot trainer's reply: it must write nothing more and exit within
        ``timeout_s``; its exit code. Anything else is a :class:`WorkerFault` (``hang`` when
        it outlives ``timeout_s``)."""
        got = self._next(timeout_s)
        if got is None:
            raise self._fault("hang", f"replied but did not exit within the {timeout_s:g}s timeout while {doing}")
        kind, payload = got
        if kind != "eof":
            shown = payload[:120].decode("utf-8", errors="replace") if kind == "line" else f"{payload} bytes"
            raise self._fault("protocol", f"broke the protocol: wrote {shown!r} after its one reply while {doing}")
        self._after_eof(doing)
        self._close_pipes()
        return self.proc.returncode

    def _after_eof(self, doing: str) -> None:
        """Keep the EOF for any later reader and wait for the process to exit (a crash when it does not)."""
        self._lines.put(("eof", None))
        try:
            self.proc.wait(timeout=_EXIT_AFTER_EOF_S)
        except subprocess.TimeoutExpired:
            raise self._fault("crash", f"closed its stdout but kept running while {doing}") from None

    def _decode(self, kind: str, payload: Any, doing: str) -> dict[str, Any]:
        if kind == "eof":
            self._after_eof(doing)
            raise self._fault("crash", f"died with {describe_exit(self.proc.returncode)} while {doing}")
        if kind == "oversize":
            raise self._fault("protocol", f"broke the protocol: sent a {payload}-byte line while {doing}")
        try:
            message = loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            preview = payload[:120].decode("utf-8", errors="replace")
            raise self._fault("protocol", f"broke the protocol: sent {preview!r} while {doing}")
        return message

    def violation(self, message: dict[str, Any], doing: str, why: str | None = None) -> WorkerFault:
        """A protocol fault for a well-formed but unexpected ``message`` (``why``: what is wrong with it);
        kills the worker."""
        shown = {k: message.get(k) for k in ("status", "job_id", "error") if k in message}
        because = f" ({why})" if why else ""
        return self._fault("protocol", f"broke the protocol: unexpected answer {shown!r:.300}{because} while {doing}")

    def check_reply(self, reply: dict[str, Any], job_id: Any, request: Job, doing: str, *, ready: bool = True) -> None:
        """A protocol fault (:meth:`violation`) unless ``reply`` answers ``request`` (:func:`reply_problem`)."""
        why = reply_problem(reply, job_id, request, ready=ready)
        if why is not None:
            raise self.violation(reply, doing, why)

    def _fault(self, kind: str, what: str) -> WorkerFault:
        """Kill the worker (if still running), reap it, and describe what happened."""
        self.kill()  # also lets the stderr drain deliver the last lines
        status = describe_exit(self.proc.returncode)
        message = f"worker {self.label} (pid {self.pid}) {what}" + ("" if kind == "crash" else f"; killed ({status})")
        return WorkerFault(message, kind=kind, exit_status=status, stderr_tail=self.stderr_tail())

    def _timed_out(self, timeout_s: float, doing: str) -> JobTimedOut:
        self.kill()
        return JobTimedOut(
            f"worker {self.label} (pid {self.pid}) answered liveness probes but did not finish within the "
            f"{timeout_s:g}s job timeout while {doing}; killed to stop the job",
            timeout_s=timeout_s, stderr_tail=self.stderr_tail(),
        )

    def kill(self) -> None:
        """SIGKILL it and what it started (:func:`kill_tree`), reap it (bounded) and close the pipes; idempotent."""
        kill_tree(self.proc)
        reap_killed(self.proc, f"worker {self.label}")
        self._close_pipes()

    def request_shutdown(self) -> None:
        """Say goodbye: ``shutdown``, then close stdin (EOF ends the worker too)."""
        with contextlib.suppress(OSError, ValueError):
            self._writer.write_message(Shutdown().to_dict())
        self.close_stdin()

    def finish_shutdown(self, deadline: float) -> None:
        """Wait for the worker to exit by ``deadline``; then terminate, then kill. Reaps."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker %s (pid %d) ignored shutdown; terminating it", self.label, self.pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.kill()
        # Did its last words include the `shutdown` reply? EOF goes back in the queue: the slot's
        # holder may be waiting on this worker and must see it rather than wait out its job timeout.
        self._reader.join(timeout=_PIPES_SETTLE_S)
        goodbye = False
        while (got := self._next(0.0)) is not None:
            kind, payload = got
            if kind == "eof":
                self._lines.put(("eof", None))
                break
            if kind == "line":
                with contextlib.suppress(ValueError, AttributeError):
                    goodbye = goodbye or loads(payload).get("status") == "shutdown"
        if self.proc.returncode != 0 or not goodbye:
            logger.warning("worker %s (pid %d) ended with %s%s", self.label, self.pid,
                           describe_exit(self.proc.returncode), "" if goodbye else " without a shutdown reply")
        self._close_pipes()

    def _close_pipes(self) -> None:
        """Once the process is gone (reaped): give its pipe threads time to hit EOF, close what they let go of."""
        self._reader.join(timeout=_PIPES_SETTLE_S)
        self._drain.join(timeout=_PIPES_SETTLE_S)
        close_pipes(self.proc, stdout_free=not self._reader.is_alive(), stderr_free=not self._drain.is_alive())


def popen_worker(command: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a training process with its three pipes."""
    return subprocess.Popen(list(command), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def oneshot_command(python: str = sys.executable, *, script: str | Path | None = None) -> list[str]:
    """The one-shot trainer's command line, reading its request from stdin: the package's
    module behind ``train_single_trial.py`` (``script`` replaces it: tests pass the fake worker)."""
    program = module_command(ONESHOT_MODULE, python) if script is None else [python, str(script)]
    return [*program, "--request", "-", "--ready-line"]


def run_oneshot_job(
    request: Job, slot: DeviceSlot, *, timeout_s: float, ready_timeout_s: float = float("inf"),
    command: Sequence[str] | None = None,
    start: Callable[[list[str], dict[str, str]], subprocess.Popen[bytes]] = popen_worker,
) -> dict[str, Any]:
    """One attempt of a one-shot job: a fresh trainer (``command``, default
    :func:`oneshot_command`) pinned to ``slot`` and started by ``start`` (which registers it),
    the same request and reply as a worker's; the reply (``job_id`` attached). Raises
    :class:`JobError` for a job failure (``startup_error`` also when the trainer's ``ready``
    does not come within ``ready_timeout_s``: torch or the device hangs setting up),
    :class:`JobTimedOut` past ``timeout_s`` (the trainer and its children killed),
    :class:`WorkerCrashed` when it cannot be started, dies, breaks the protocol (a reply that is
    no answer to ``request``, :func:`reply_problem`, or more than its reply), or exits with a code that
    does not match it."""
    deadline = time.monotonic() + timeout_s
    try:
        proc = start(list(command or oneshot_command()), slot.environment())
    except OSError as exc:  # fork or exec failed (no memory, the process limit): this attempt's, like a crash
        raise WorkerCrashed(f"one-shot trainer on {slot.label} could not be started: {exc}") from None
    trainer = WorkerProcess(f"{slot.label} one-shot", proc)
    doing = f"running job {request.job_id!r} (trial {request.trial_number}, fold {request.fold_idx})"
    try:
        trainer.send(request, doing)
        trainer.close_stdin()
        # First `ready` (or, when the request was refused before torch was set up, the reply).
        remaining_s = deadline - time.monotonic()
        setup_bounded = ready_timeout_s < remaining_s  # else the job's own timeout ends the wait first
        try:
            reply = trainer.receive(min(ready_timeout_s, remaining_s), f"{doing}: setting up torch", hang_kind="boot")
        except WorkerFault as fault:
            if fault.kind != "boot" or not setup_bounded:
                raise
            raise JobError(f"its one-shot trainer did not set up torch and {slot.describe()} within "
                           f"{ready_timeout_s:g}s (training.worker_ready_timeout_s)", "startup_error",
                           **echo(request)) from None
        ready = reply.get("status") == "ready"
        if ready:
            why = ready_problem(reply)
            if why is not None:
                raise trainer.violation(reply, f"{doing}: setting up torch", why)
            reply = trainer.receive(deadline - time.monotonic(), doing)
        trainer.check_reply(reply, request.job_id, request, doing, ready=ready)
        # The reply came in time; what is left is the exit, and the pipes close only once the kernel
        # has torn the process down (seconds, for a torch process on a loaded machine). A reply just
        # before the deadline must not become a timeout for that: the same allowance as after EOF.
        code = trainer.expect_exit(max(deadline - time.monotonic(), _EXIT_AFTER_EOF_S), doing)
    except WorkerFault as fault:
        if fault.kind not in ("hang", "boot"):
            raise
        raise JobTimedOut(f"one-shot trainer on {slot.label} exceeded the {timeout_s:g}s job timeout",
                          timeout_s=timeout_s, stderr_tail=fault.stderr_tail) from None
    except BaseException:  # Ctrl-C while waiting: do not leave the trainer behind
        trainer.kill()
        raise
    status = reply.get("status")
    if code == 0 and status == "complete":
        return {**reply, "job_id": request.job_id}
    if code == JobError.exit_code and status == "error":
        raise JobError.from_dict({**reply, "job_id": request.job_id})
    raise WorkerCrashed(f"one-shot trainer on {slot.label} ended with {describe_exit(code)} after a {status!r} reply",
                        exit_status=describe_exit(code), stderr_tail=trainer.stderr_tail())


class Spawner:
    """One long-lived daemon thread that performs every ``Popen`` of a pool, ``stagger_s``
    apart (first starts, restarts and re-promotions alike); docs/workers.md ("Lifecycle")
    says why a daemon thread and not an executor's."""

    def __init__(self, name: str, stagger_s: float = 0.0) -> None:
        if not stagger_s >= 0:
            raise ValueError(f"`stagger_s` must be >= 0, got {stagger_s!r}")
        self.stagger_s = float(stagger_s)
        self._last_start: float | None = None
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the spawner thread; raises RuntimeError once shut down."""
        future: Future[Any] = Future()
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the spawner is shut down")
            self._calls.put((lambda: fn(*args), future))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue
            if self.stagger_s > 0 and self._last_start is not None:
                wait = self._last_start + self.stagger_s - time.monotonic()
                if wait > 0:
                    logger.debug("next worker start in %.2fs (worker_spawn_stagger_s %g)", wait, self.stagger_s)
                    self._stopping.wait(wait)  # shutdown() cuts it short
            self._last_start = time.monotonic()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Run what was already submitted (without waiting out the stagger), then end the
        thread (and wait for it); idempotent."""
        with self._lock:
            if not self._stopping.is_set():
                self._stopping.set()
                self._calls.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
