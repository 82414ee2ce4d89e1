"""Code that runs *inside* benchmark child processes: the loky task and the limit process.

The benchmark's parent behaves like the Step 5 parent and never imports torch, so this
module imports torch only inside functions, after the process's thread count and GPU
pinning have been put into its environment (OpenMP sizes its pool at import time).

Both helpers call the project's one training core, :func:`step5.nn.job.run_train_job`,
with a per-process :class:`~step5.nn.job.DataCache` — exactly what a persistent worker
does — so every mode trains identical jobs the same way and only the plumbing differs.
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any

from step5.devices import TORCH_THREADS_ENV
from step5.protocol import TrainRequest

# Per-process state: set up once by the first job this process runs.
_STATE: dict[str, Any] = {}


def setup_process(threads: int | None, cuda_visible_devices: str | None) -> dict[str, Any]:
    """Pin threads and GPU for this process, import torch, pick the device (once)."""
    if _STATE:
        return _STATE
    if threads is not None:
        os.environ[TORCH_THREADS_ENV] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    import torch

    from step5.nn import job

    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.zeros(1, device=device)  # create the CUDA context before any timing
        torch.cuda.synchronize(device)
    _STATE.update(
        torch=torch,
        job=job,
        device=device,
        cache=job.DataCache(),
        pid=os.getpid(),
        torch_threads=torch.get_num_threads(),
    )
    return _STATE


def train_request(request: TrainRequest) -> dict[str, Any]:
    """Train one fold in this (already set-up) process; stamps pid and wall-clock span."""
    state = _STATE
    assert state, "setup_process() must run before train_request()"
    start = time.time()
    result = dict(state["job"].run_train_job(request, device=state["device"], cache=state["cache"]))
    result["job_id"] = request.job_id
    result["pid"] = state["pid"]
    result["t_start"] = start
    result["t_end"] = time.time()
    return result


def loky_train(request_dict: dict[str, Any], threads: int | None, cuda_visible_devices: str | None) -> dict[str, Any]:
    """The task joblib ships to its loky workers: one fold, from the request's wire form.

    The request travels as a dict (the same JSON-able form a persistent worker receives),
    pickled by loky instead of framed as a JSON line.
    """
    setup_process(threads, cuda_visible_devices)
    return train_request(TrainRequest.from_dict(request_dict))


def loky_warmup(request_dict: dict[str, Any], threads: int | None, cuda_visible_devices: str | None, hold_s: float) -> int:
    """Warm a loky worker up (torch imported, one dry job); returns its pid.

    ``hold_s`` keeps the worker busy a moment after the job, so that the other warm-up
    tasks land on the other, still idle workers rather than on this one again.
    """
    setup_process(threads, cuda_visible_devices)
    train_request(TrainRequest.from_dict(request_dict))
    time.sleep(hold_s)
    return os.getpid()


def limit_process_main(
    rank: int,
    threads: int | None,
    cuda_visible_devices: str | None,
    trials: list[list[dict[str, Any]]],
    warmup: dict[str, Any],
    counters: Any,
    trial_barrier: Any,
    start_barrier: Any,
    end_barrier: Any,
    out_queue: Any,
) -> None:
    """Body of one limit process (see :mod:`bench.limit`).

    Boot, warm up, report ready; then, between ``start_barrier`` and ``end_barrier``,
    nothing but training: jobs are claimed from a shared-memory counter per trial (the
    zero-cost version of "the next free worker takes the next fold"), and with
    ``trial_barrier`` the processes wait for each other at the end of every trial, as a
    sequential optimizer must. Results go back only after the clock has stopped.

    After the warm-up the heap is frozen (``gc.freeze``): the ~250k objects that importing
    torch leaves behind are then skipped by any full collection (one costs more than a
    small fold's training on a CPU), whether the interpreter or the training core starts
    it. A limit must not pay for what a well-kept long-lived process need not pay for.
    """
    from step5.lifeline import install_lifeline

    install_lifeline(parent_pid=os.getppid())  # never outlive the benchmark, even if it is SIGKILLed
    try:
        boot_start = time.perf_counter()
        setup_process(threads, cuda_visible_devices)
        train_request(TrainRequest.from_dict(warmup))
        requests = [[TrainRequest.from_dict(r) for r in trial] for trial in trials]  # parsed before the clock
        gc.collect()
        gc.freeze()
        out_queue.put(("ready", rank, {"pid": os.getpid(), "warm_s": time.perf_counter() - boot_start,
                                       "torch_threads": _STATE["torch_threads"]}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which aborts the mode
        out_queue.put(("error", rank, f"{type(exc).__name__}: {exc}"))
        raise
    results: list[dict[str, Any]] = []
    error: str | None = None
    start_barrier.wait()
    try:
        for t, jobs in enumerate(requests):
            while True:
                with counters.get_lock():
                    j = counters[t]
                    counters[t] = j + 1
                if j >= len(jobs):
                    break
                results.append(train_request(jobs[j]))
            if trial_barrier is not None:
                trial_barrier.wait()
    except BaseException as exc:  # noqa: BLE001 - still meet the end barrier so the parent is not stuck
        error = f"{type(exc).__name__}: {exc}"
        if trial_barrier is not None:
            trial_barrier.abort()
    end_barrier.wait()
    if error is not None:
        out_queue.put(("error", rank, error))
    else:
        out_queue.put(("done", rank, results))
