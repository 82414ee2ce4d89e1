"""The real optimizer CLI with a fake fold runner whose jobs sleep, for the shared-study
tests and the cluster simulation (``bench/cluster_sim.py``); docs/workers.md "The fakes"::

    python -m step5.testing.fake_search --job-sleep-s 1.0 [--timings-out F.json] \
        [--fault-at ask:3 --fault 'SHELL COMMAND'] -- <optimizer flags>
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from step5.jsonio import write_json_atomic


def _instrument(timings: dict[str, list[list[float]]]) -> None:
    from step5.optimizer import search

    import optuna

    real_lock, real_tell, real_ask = search.study_lock, search.tell, optuna.Study.ask
    asked = [0]

    @contextlib.contextmanager
    def timed_lock(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start, before = time.perf_counter(), asked[0]
        with real_lock(*args, **kwargs) as held:
            yield held
        timings["ask" if asked[0] > before else "poll"].append([time.perf_counter() - start, time.time()])

    def counted_ask(self: Any, *args: Any, **kwargs: Any) -> Any:
        asked[0] += 1
        return real_ask(self, *args, **kwargs)

    def timed_tell(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        frozen = real_tell(*args, **kwargs)
        timings["tell"].append([time.perf_counter() - start, time.time()])
        return frozen

    search.study_lock, search.tell = timed_lock, timed_tell  # type: ignore[assignment]
    optuna.Study.ask = counted_ask  # type: ignore[method-assign]


def _install_fault(point: str, command: str) -> None:
    import subprocess

    import optuna

    from step5 import model_set
    from step5.optimizer import search
    from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

    name, _, nth = point.partition(":")
    targets = {"ask": (optuna.Study, "ask"), "tell": (search, "tell"),
               "final": (AntiOverfitMetaOptimizer, "_train_final"), "commit": (model_set.StagedSet, "commit")}
    if name not in targets:
        raise SystemExit(f"--fault-at: unknown point {point!r}; expected one of {sorted(targets)} (ask/tell take :N)")
    owner, attribute = targets[name]
    real = getattr(owner, attribute)
    calls = [0]

    def disturbed(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == int(nth or 1):
            print(f"fake_search: fault at {point}: {command}", file=sys.stderr, flush=True)
            done = subprocess.run(command, shell=True, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            print(f"fake_search: fault at {point} exited {done.returncode}", file=sys.stderr, flush=True)
        return real(*args, **kwargs)

    setattr(owner, attribute, disturbed)


def _wait_at_barrier_once_the_study_is_open(optimizer_module: Any, ready: Path, go: str | None) -> None:
    """Touch ``ready`` once the run has opened its study, then wait for ``go``.

    Many processes on a few cores start searching together, so throughput is measured on the
    search; and each has joined the study's round before any searches: one that opened the
    study late (slow to start, or held up by a database fault) could find the round already
    finished, and start a new one."""
    real_open = optimizer_module.open_study

    def open_then_wait(*args: Any, **kwargs: Any) -> Any:
        opened = real_open(*args, **kwargs)
        ready.touch()
        while go and not Path(go).exists():
            time.sleep(0.05)
        return opened

    optimizer_module.open_study = open_then_wait


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m step5.testing.fake_search")
    parser.add_argument("--job-sleep-s", type=float, default=0.0, help="how long each fake fold job sleeps")
    parser.add_argument("--timings-out", default=None,
                        help="write the loop's coordination timings here (JSON); {pid} becomes this process's pid")
    parser.add_argument("--ready-file", default=None,
                        help="touch this file once the study is open, then wait for --go-file")
    parser.add_argument("--go-file", default=None, help="start the run when this file exists")
    parser.add_argument("--fault-at", default=None, help="ask:N, tell:N, final or commit: when --fault runs")
    parser.add_argument("--fault", default=None, help="a shell command run once at --fault-at")
    parser.add_argument("optimizer_args", nargs=argparse.REMAINDER, help="-- then the optimizer's flags")
    args = parser.parse_args(argv)
    rest = args.optimizer_args[1:] if args.optimizer_args[:1] == ["--"] else args.optimizer_args

    from step5.optimizer import cli
    from step5.optimizer import optimizer as optimizer_module
    from step5.testing.fake_runner import FakeFoldRunner

    def factory(slots: Any, policy: Any, *, persistent: bool, wait: bool = True) -> FakeFoldRunner:
        return FakeFoldRunner(capacity=len(slots), job_sleep_s=args.job_sleep_s)

    optimizer_module.WorkerPool = factory  # type: ignore[assignment]
    timings: dict[str, list[list[float]]] = {"ask": [], "poll": [], "tell": []}
    _instrument(timings)
    if args.fault_at and args.fault:
        _install_fault(args.fault_at, args.fault)
    if args.ready_file:
        _wait_at_barrier_once_the_study_is_open(optimizer_module, Path(args.ready_file), args.go_file)
    started = time.time()
    try:
        return cli.main(rest, prog="fake_search")
    finally:
        if args.timings_out:
            write_json_atomic(args.timings_out.replace("{pid}", str(os.getpid())),
                              {"started": started, "ended": time.time(), **timings})


if __name__ == "__main__":
    sys.exit(main())
