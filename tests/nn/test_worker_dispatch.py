"""The worker's dispatcher and serve loop, in-process with a stub backend (no torch).

The real backend is exercised by test_worker_process.py; here every protocol rule is
checked quickly: one response per line, in order, errors for every kind of bad request,
and the loop keeps serving after each of them.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import pytest

from step5.errors import JobError, is_out_of_memory
from step5.framing import LineReader, LineWriter
from step5.jsonio import dumps, loads
from step5.nn.worker import Dispatcher, serve
from step5.protocol import TrainRequest
from step5.testing import train_line


class StubBackend:
    device = "stub"

    def __init__(self) -> None:
        self.trained: list[TrainRequest] = []
        self.released = 0
        self.fused_calls = 0

    def train(self, request: TrainRequest) -> dict[str, Any]:
        if request.data_path == "bad.npz":
            raise JobError("X_train contains NaN", "data_error")
        if request.data_path == "boom.npz":
            raise ZeroDivisionError("boom")
        if request.data_path == "oom.npz":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.trained.append(request)
        return {"status": "complete", "model_type": "neural_net", "r2": 0.5, "val_mse": 1.0, "train_mse": 0.9,
                "duration": 0.01, "device": self.device, "trial_number": request.trial_number,
                "fold_idx": request.fold_idx}

    def train_folds(self, requests: Sequence[TrainRequest]) -> list[dict[str, Any]]:
        self.fused_calls += 1
        return [self.train(r) for r in requests]

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    def release_memory(self) -> None:
        self.released += 1


def run(lines: list[bytes], *, max_bytes: int = 4096) -> tuple[int, list[dict[str, Any]], StubBackend]:
    backend = StubBackend()
    out = io.BytesIO()
    rc = serve(LineReader(io.BytesIO(b"".join(lines)), max_bytes), LineWriter(out), Dispatcher(backend))
    return rc, [loads(line) for line in out.getvalue().splitlines()], backend


def frame(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


def test_train_ping_shutdown_in_order_and_nothing_after_shutdown():
    rc, responses, backend = run([
        frame(train_line()),
        frame({"command": "ping", "job_id": 7}),
        frame({"command": "shutdown"}),
        frame(train_line(job_id="never")),
    ])
    assert rc == 0
    assert [r["status"] for r in responses] == ["complete", "pong", "shutdown"]
    assert responses[0]["job_id"] == "t3-f1" and responses[0]["trial_number"] == 3
    assert responses[1]["job_id"] == 7 and responses[1]["jobs_done"] == 1
    assert responses[2] == {**responses[2], "reason": "command", "jobs_done": 1}
    assert len(backend.trained) == 1
    assert backend.released == 1  # memory cleaned after the job


def test_eof_ends_cleanly():
    rc, responses, _ = run([frame(train_line())])
    assert rc == 0 and [r["status"] for r in responses] == ["complete"]


# Each row: a request line and what the error must say. After every one the worker must
# still answer a good request.
BAD_REQUESTS = [
    pytest.param(b"{not json", "bad_request", "not valid JSON", id="garbage"),
    pytest.param(b'"a string"', "bad_request", "JSON object", id="not-an-object"),
    pytest.param(b"[1, 2]", "bad_request", "JSON object", id="array"),
    pytest.param(frame({"X_train_path": "ok.npz"}), "bad_request", "no `command`", id="missing-command"),
    pytest.param(frame({"command": "fly"}), "bad_request", "unknown `command`", id="unknown-command"),
    pytest.param(frame(train_line(X_train_path=5)), "bad_request", "X_train_path", id="wrong-type-path"),
    pytest.param(frame(train_line(params={"hidden_layers": "big"})), "bad_request", "hidden_layers", id="wrong-type-params"),
    pytest.param(frame(train_line(params={"epochs": 0})), "bad_request", "epochs", id="bad-epochs"),
    pytest.param(frame(train_line(extra=1)), "bad_request", "unknown key", id="unknown-key"),
    pytest.param(frame(train_line(X_train_path="bad.npz")), "data_error", "NaN", id="data-error"),
    pytest.param(frame(train_line(X_train_path="boom.npz")), "train_error", "ZeroDivisionError", id="exception"),
    pytest.param(frame(train_line(X_train_path="oom.npz")), "out_of_memory", "out of memory", id="oom"),
    pytest.param(b"x" * 5000 + b"\n", "bad_request", "exceeds", id="oversize"),
]


@pytest.mark.parametrize("line, error_type, message", BAD_REQUESTS)
def test_bad_request_gets_an_error_and_the_worker_keeps_serving(line, error_type, message):
    if not line.endswith(b"\n"):
        line += b"\n"
    rc, responses, backend = run([line, frame(train_line(job_id="after"))])
    assert rc == 0
    assert len(responses) == 2, responses
    err, ok = responses
    assert err["status"] == "error" and err["error_type"] == error_type
    assert message in err["error"]
    assert ok["status"] == "complete" and ok["job_id"] == "after"
    # A failure of a readable request echoes its identity back.
    if b'"trial_number"' in line:
        assert err["trial_number"] == 3 and err["fold_idx"] == 1 and err["job_id"] == "t3-f1"


def test_unexpected_exception_carries_the_traceback():
    _, responses, _ = run([frame(train_line(X_train_path="boom.npz"))])
    assert "ZeroDivisionError" in responses[0]["traceback"]


def test_blank_lines_are_ignored_not_answered():
    _, responses, _ = run([b"\n", b"   \n", frame({"command": "ping"})])
    assert [r["status"] for r in responses] == ["pong"]


def test_train_folds_answers_one_line_per_job_in_order():
    jobs = [train_line(fold_idx=i, job_id=f"f{i}") for i in range(3)]
    jobs[1]["params"] = {"epochs": -1}  # invalid: answered in place, others still run fused
    _, responses, backend = run([frame({"command": "train_folds", "jobs": jobs}), frame({"command": "ping"})])
    assert [r["status"] for r in responses] == ["complete", "error", "complete", "pong"]
    assert [r.get("job_id") for r in responses[:3]] == ["f0", "f1", "f2"]
    assert responses[1]["error_type"] == "bad_request" and "jobs[1]" in responses[1]["error"]
    assert backend.fused_calls == 1 and len(backend.trained) == 2


def test_train_folds_group_failure_fails_every_job_with_its_own_identity():
    jobs = [train_line(fold_idx=0, job_id="a"), train_line(fold_idx=1, job_id="b", X_train_path="bad.npz")]
    _, responses, _ = run([frame({"command": "train_folds", "jobs": jobs})])
    assert [(r["status"], r["error_type"], r["job_id"]) for r in responses] == [
        ("error", "data_error", "a"), ("error", "data_error", "b"),
    ]


@pytest.mark.parametrize("request_obj", [
    {"command": "train_folds"},
    {"command": "train_folds", "jobs": []},
    {"command": "train_folds", "jobs": "x"},
    {"command": "train_folds", "jobs": [{}], "extra": 1},
])
def test_malformed_train_folds_gets_one_error_line(request_obj):
    _, responses, _ = run([frame(request_obj), frame({"command": "ping"})])
    assert [r["status"] for r in responses] == ["error", "pong"]
    assert responses[0]["error_type"] == "bad_request"


def test_heartbeat_is_answered_at_once_while_a_job_trains():
    """The reader thread answers a heartbeat before the job it arrived behind finishes:
    how the parent tells a long job from a hung worker."""
    import threading

    release = threading.Event()
    backend = StubBackend()
    real_train = backend.train

    def slow_train(request):
        assert release.wait(10), "the heartbeat was not answered while the job ran"
        return real_train(request)

    backend.train = slow_train  # type: ignore[method-assign]
    out = io.BytesIO()
    writer = LineWriter(out)
    real_write = writer.write_message

    def write_message(message):
        real_write(message)
        if message.get("status") == "alive":
            release.set()

    writer.write_message = write_message  # type: ignore[method-assign]
    lines = [frame(train_line()), frame({"command": "heartbeat", "job_id": "beat#1"}), frame({"command": "ping"})]
    rc = serve(LineReader(io.BytesIO(b"".join(lines)), 4096), writer, Dispatcher(backend))
    responses = [loads(line) for line in out.getvalue().splitlines()]
    assert rc == 0
    # The heartbeat jumps the queue; every other request keeps its order.
    assert [r["status"] for r in responses] == ["alive", "complete", "pong"]
    assert responses[0]["job_id"] == "beat#1"
