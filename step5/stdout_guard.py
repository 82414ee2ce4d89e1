"""Keep the process's stdout for protocol lines only.

The worker and the one-shot trainer talk to their parent through stdout, one JSON object
per line. Anything else that reaches file descriptor 1 -- a stray ``print``, a Python
warning, a C library's banner written straight to fd 1 by CUDA or a BLAS -- would
corrupt that stream. So, before anything noisy is imported, :func:`claim_stdout`:

1. duplicates fd 1 to a private, non-inheritable descriptor and returns it as a binary
   file: this handle is the wire;
2. points fd 1 at whatever fd 2 (stderr) is, so C-level writes to "stdout" land in the
   log instead of on the wire;
3. points ``sys.stdout`` at ``sys.stderr``, so Python-level prints do the same.

Torch-free on purpose: it must run before ``import torch``.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import BinaryIO

_lock = threading.Lock()
_claimed: BinaryIO | None = None


def claim_stdout() -> BinaryIO:
    """Take the real stdout for protocol output and send every other write to stderr.

    Returns a buffered binary file on a private duplicate of the original fd 1; callers
    write one whole line and flush per message. Idempotent: later calls return the same
    handle (a worker and a library it imports may both ask).
    """
    global _claimed
    with _lock:
        if _claimed is not None:
            return _claimed
        try:
            sys.stdout.flush()
        except (AttributeError, ValueError, OSError):
            pass  # stdout may already be closed or None; nothing to flush
        # os.dup() makes a non-inheritable descriptor, so child processes of this one
        # (a compiler, a helper tool) cannot write onto the wire either.
        wire_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _claimed = os.fdopen(wire_fd, "wb", buffering=1 << 16)
        return _claimed
