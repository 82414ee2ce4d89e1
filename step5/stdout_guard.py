"""Keep the process's stdout for protocol lines only (run it before ``import torch``).

The worker and the one-shot trainer answer on stdout, one JSON object per line; a stray
``print``, a Python warning or a C library's banner written straight to fd 1 (CUDA, a BLAS)
would corrupt that stream. :func:`claim_stdout` keeps a private duplicate of fd 1 as the
wire and points fd 1 and ``sys.stdout`` at stderr, so everything else lands in the log.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import BinaryIO

_lock = threading.Lock()
_claimed: BinaryIO | None = None


def claim_stdout() -> BinaryIO:
    """The wire: a buffered binary file on a private duplicate of the original fd 1 (write
    one whole line and flush per message). Idempotent: a worker and a library it imports
    may both ask."""
    global _claimed
    with _lock:
        if _claimed is None:
            with contextlib.suppress(AttributeError, ValueError, OSError):  # stdout may be closed or None
                sys.stdout.flush()
            # os.dup() makes a non-inheritable descriptor: this process's children cannot write on the wire.
            wire_fd = os.dup(1)
            os.dup2(2, 1)
            sys.stdout = sys.stderr
            _claimed = os.fdopen(wire_fd, "wb", buffering=1 << 16)
        return _claimed
