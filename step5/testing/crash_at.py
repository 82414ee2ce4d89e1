"""Run the Step 5 CLI and signal this process right after its N-th change under a folder
(fault injection for the model-set commit tests; docs/workers.md "The fakes")::

    python -m step5.testing.crash_at --watch OUT --at N --signal KILL -- <optimizer flags>
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from typing import Any, Callable

_WRAPPED = ("replace", "rename", "symlink", "link", "unlink", "remove", "mkdir", "rmdir")


def _under(path: Any, root: str, dir_fd: int | None) -> bool:
    try:
        text = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(text):
            text = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), text)
        full = os.path.abspath(text)
    except (TypeError, ValueError, OSError):
        return False
    return full == root or full.startswith(root + os.sep)


def install(root: str, at: int, sig: signal.Signals) -> Callable[[], int]:
    """Wrap the ``os`` functions; returns a function giving the number of changes counted."""
    root = os.path.abspath(root)
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if count == at:
            os.kill(os.getpid(), sig)

    def wrap(name: str) -> None:
        real = getattr(os, name)

        @functools.wraps(real)
        def changed(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            paths = args[:2] if name in ("replace", "rename", "link") else args[1:2] if name == "symlink" else args[:1]
            dir_fd = kwargs.get("dir_fd", kwargs.get("dst_dir_fd"))
            if any(_under(p, root, dir_fd) for p in paths):
                tick()
            return result

        setattr(os, name, changed)

    for name in _WRAPPED:
        wrap(name)
    real_open = os.open

    @functools.wraps(real_open)
    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT and _under(path, root, kwargs.get("dir_fd")):
            tick()
        return fd

    os.open = open_  # type: ignore[assignment]
    return lambda: count


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="crash_at")
    p.add_argument("--watch", required=True, help="the folder whose changes are counted")
    p.add_argument("--at", type=int, required=True, help="signal right after this change (1-based)")
    p.add_argument("--signal", choices=("KILL", "TERM", "INT"), default="KILL")
    args = p.parse_args(argv[:split])
    counted = install(args.watch, args.at, signal.Signals[f"SIG{args.signal}"])
    from step5.optimizer.cli import main as step5_main

    code = step5_main(argv[split + 1:], prog="meta_prediction_optimizer_anti_overfit.py")
    print(f"crash_at: only {counted()} changes", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
