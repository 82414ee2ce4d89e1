"""Merge the best trial's fold checkpoints into the final ``best_model.pth``, in a child process.

The merge reads and writes torch checkpoints, and the parent never imports torch, so it
runs as ``python -P -m step5.nn.ensemble`` (:mod:`step5.nn.ensemble` says what it
computes) and answers with one JSON line on stdout. It is seconds of CPU work, so it runs
on the parent's host whatever devices the folds trained on; a failure (a bad checkpoint, a
merge that does not reproduce the folds' mean, a crash, a hang) is an error of the run
that names the step, and no checkpoint is committed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from step5.errors import Step5Error
from step5.execution.process import tail_lines
from step5.launch import ENSEMBLE_MODULE, child_environment, module_command

logger = logging.getLogger(__name__)

#: Loading K small checkpoints, merging and predicting the dev and test rows twice.
MERGE_TIMEOUT_S = 600.0


#: What a full or read-only disk says; the merge child reports the errno of such a failure.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def merge_fold_models(
    fold_paths: Sequence[Path], out_path: Path, *, score_path: Path, timeout_s: float = MERGE_TIMEOUT_S,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Write the merged checkpoint at ``out_path`` and return its metrics (``train_r2``,
    ``test_r2``, ... on the rows of ``score_path``); raise :class:`Step5Error` on any failure,
    except a disk that refused the checkpoint (full, read-only): that is an ``OSError``, which
    the optimizer reports as the output dir's (step5.model_set.writing)."""
    cmd = [*module_command(ENSEMBLE_MODULE, python), "--out", str(out_path), "--score", str(score_path),
           *map(str, fold_paths)]
    what = f"merging the {len(fold_paths)} fold models into {out_path}"
    try:
        done = subprocess.run(cmd, capture_output=True, env=child_environment(), timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise Step5Error(f"{what} did not finish in {timeout_s:.0f}s (the child was killed)") from None
    stderr = done.stderr.decode(errors="replace")
    lines = done.stdout.decode(errors="replace").splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise Step5Error(f"{what} failed: the child exited {done.returncode} without a result line; "
                         f"its stderr ends:\n{tail_lines(stderr)}")
    if done.returncode != 0 or result.get("status") != "complete":
        if result.get("errno") in _DISK_ERRNOS:  # the disk refused the checkpoint: the caller names the output dir
            raise OSError(result["errno"], os.strerror(result["errno"]), str(out_path))
        raise Step5Error(f"{what} failed ({result.get('error_type', 'error')}): {result.get('error', result)}")
    if not out_path.is_file():
        raise Step5Error(f"{what} reported success but wrote no checkpoint at {out_path}")
    return result
