"""step5.execution.ensemble: the merge child failing in every way is an error naming the step.

The merge itself (real checkpoints, a real child) is tested in tests/nn/test_nn_ensemble.py
and end to end by the optimizer tests; here a stand-in "python" misbehaves.
"""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from step5.errors import Step5Error
from step5.execution.ensemble import merge_fold_models


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the interpreter: it ignores ``-P -m step5.nn.ensemble ...``."""
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _merge(tmp_path: Path, python: str, **kwargs) -> dict:
    return merge_fold_models([tmp_path / "f0.pth", tmp_path / "f1.pth"], tmp_path / "best_model.pth",
                             score_path=tmp_path / "final.npz", python=python, **kwargs)


def test_a_child_that_crashes_without_a_result_line_is_an_error_with_its_stderr(tmp_path):
    python = _fake_python(tmp_path, "echo 'Segmentation fault in libtorch' >&2; echo 'not json'; exit 139")
    with pytest.raises(Step5Error, match=r"merging the 2 fold models .* exited 139 without a result line") as info:
        _merge(tmp_path, python)
    assert "Segmentation fault in libtorch" in str(info.value)


def test_a_child_that_reports_an_error_is_an_error_with_its_message(tmp_path):
    line = '{"status": "error", "error_type": "data_error", "error": "checkpoint not found: /x/f1.pth"}'
    python = _fake_python(tmp_path, f"echo '{line}'; exit 1")
    with pytest.raises(Step5Error, match=r"failed \(data_error\): checkpoint not found: /x/f1.pth"):
        _merge(tmp_path, python)


def test_a_hung_child_is_killed_at_the_timeout(tmp_path):
    python = _fake_python(tmp_path, "exec sleep 30")
    with pytest.raises(Step5Error, match=r"did not finish in 1s \(the child was killed\)"):
        _merge(tmp_path, python, timeout_s=1.0)


def test_success_without_a_checkpoint_is_an_error(tmp_path):
    python = _fake_python(tmp_path, """echo '{"status": "complete", "test_r2": 0.5}'""")
    with pytest.raises(Step5Error, match=r"reported success but wrote no checkpoint"):
        _merge(tmp_path, python)


def test_the_result_line_comes_back_when_the_checkpoint_is_there(tmp_path):
    (tmp_path / "best_model.pth").write_bytes(b"merged")
    python = _fake_python(tmp_path, """echo 'a log line that went to stdout'; echo '{"status": "complete", "test_r2": 0.5}'""")
    assert _merge(tmp_path, python)["test_r2"] == 0.5
