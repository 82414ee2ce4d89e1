"""Atomic output: the file is replaced whole or left as it was, and no temp file remains."""
from __future__ import annotations

import pytest

from step5.fsutil import atomic_output


def test_success_replaces_the_file_and_keeps_the_suffix_when_asked(tmp_path):
    target = tmp_path / "sub" / "model.json"
    with atomic_output(target, keep_suffix=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".json") and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["model.json"]


def test_failure_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "best_model.pth"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer broke"):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer broke")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_gives_not_the_temp_file_0600(tmp_path, umask, expected):
    import os
    import stat

    from step5.jsonio import write_json_atomic

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "sidecar.json", {"a": 1})
        with atomic_output(tmp_path / "model.bin") as tmp:
            tmp.write_bytes(b"weights")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sidecar.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "model.bin").stat().st_mode) == expected


def test_a_json_write_to_a_pipe_writes_into_it_and_leaves_it_a_pipe(tmp_path):
    # A rename over the target made `--output /dev/null` a regular file for the whole machine (as root).
    import os
    import stat
    import threading

    from step5.jsonio import write_json_atomic

    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_json_atomic(fifo, {"a": 1})
    reader.join(timeout=10)
    assert got and b'"a": 1' in got[0]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
