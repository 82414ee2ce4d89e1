"""Model sets (step5.model_set): the output dir shows the complete old set or the complete new one."""
from __future__ import annotations

import os
import stat

import pytest

from step5 import model_set
from step5.errors import Step5Error


def _commit(out, files: dict[str, str]):
    with model_set.stage(out) as staged:
        for name, text in files.items():
            (staged.path / name).write_text(text)
        return staged.commit()


def _shown(out) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_commit_shows_the_new_set_under_the_fixed_names(tmp_path):
    out = tmp_path / "out"
    first = _commit(out, {"best_model.pth": "w1", "best_model.meta.json": "s1"})
    assert _shown(out) == {"best_model.meta.json": "s1", "best_model.pth": "w1"}
    assert (out / "best_model.pth").is_symlink() and model_set.current_dir(out) == first
    second = _commit(out, {"best_model.pth": "w2", "best_model.meta.json": "s2"})
    assert _shown(out) == {"best_model.meta.json": "s2", "best_model.pth": "w2"}
    # the set before is kept for a reader half-way through it; older ones are removed
    third = _commit(out, {"best_model.pth": "w3", "best_model.meta.json": "s3"})
    assert sorted(p.name for p in (out / model_set.SETS_DIRNAME).iterdir()) == sorted(
        [model_set.POINTER_NAME, model_set.LOCK_NAME, second.name, third.name])


def test_names_only_the_old_set_had_disappear(tmp_path):
    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "nn", "best_model.meta.json": "s1", "best_model.history.png": "p"})
    _commit(out, {"best_model.json": "xgb", "best_model.meta.json": "s2"})
    assert _shown(out) == {"best_model.json": "xgb", "best_model.meta.json": "s2"}
    assert not os.path.lexists(out / "best_model.pth")


def test_a_folder_of_plain_files_is_migrated_and_other_files_are_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_model.pth").write_text("old")
    (out / "best_model.meta.json").write_text("old sidecar")
    (out / "notes.txt").write_text("the user's")
    _commit(out, {"best_model.txt": "lgb", "best_model.meta.json": "new sidecar"})
    assert _shown(out) == {"best_model.meta.json": "new sidecar", "best_model.txt": "lgb", "notes.txt": "the user's"}


def test_leaving_the_block_without_commit_keeps_the_old_set(tmp_path):
    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "good", "best_model.meta.json": "good"})
    with pytest.raises(RuntimeError, match="final fit broke"):
        with model_set.stage(out) as staged:
            (staged.path / "best_model.pth").write_text("half")
            raise RuntimeError("final fit broke")
    assert _shown(out) == {"best_model.meta.json": "good", "best_model.pth": "good"}
    assert not [p for p in (out / model_set.SETS_DIRNAME).iterdir() if p.name.startswith(model_set.PARTIAL_PREFIX)]


def test_a_killed_writer_leaves_a_partial_set_that_the_next_commit_removes(tmp_path):
    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "a", "best_model.meta.json": "a"})
    dead = out / model_set.SETS_DIRNAME / f"{model_set.PARTIAL_PREFIX}{os.uname().nodename}-999999999-dead"
    dead.mkdir()
    (dead / "best_model.pth").write_text("orphan")
    _commit(out, {"best_model.pth": "b", "best_model.meta.json": "b"})
    assert not dead.exists()


def test_current_files_reads_a_set_or_a_plain_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_model.cbm").write_text("plain")
    (out / "other.txt").write_text("not a model file")
    assert sorted(model_set.current_files(out)) == ["best_model.cbm"]
    _commit(out, {"best_model.pth": "w", "best_model.meta.json": "s"})
    files = model_set.current_files(out)
    assert sorted(files) == ["best_model.meta.json", "best_model.pth"]
    assert all(p.parent == model_set.current_dir(out) for p in files.values())


def test_folders_and_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        folder = _commit(out, {"best_model.pth": "w"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_an_unwritable_output_dir_is_a_step5_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Step5Error, match="cannot write the model to output dir"):
        with model_set.stage(blocker / "out"):
            pass


def test_a_migration_interrupted_half_way_is_finished_by_the_next_commit(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_model.pth").write_text("old nn")
    (out / "best_model.meta.json").write_text("old sidecar")
    real = model_set._replace_with_link
    calls = []

    def die_after_the_pointer(path, target):  # the pointer swap, then one name, then "killed"
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(path, target)

    monkeypatch.setattr(model_set, "_replace_with_link", die_after_the_pointer)
    with pytest.raises(KeyboardInterrupt):
        _commit(out, {"best_model.json": "xgb", "best_model.meta.json": "new sidecar"})
    monkeypatch.setattr(model_set, "_replace_with_link", real)
    assert _shown(out) == {"best_model.meta.json": "old sidecar", "best_model.pth": "old nn"}  # still the old set
    _commit(out, {"best_model.json": "xgb", "best_model.meta.json": "new sidecar"})
    assert _shown(out) == {"best_model.json": "xgb", "best_model.meta.json": "new sidecar"}


_OTHER_RUN = """
import fcntl, sys
from pathlib import Path
from step5 import model_set
real_flock = fcntl.flock
def flock(fd, op):  # tell the test this run now waits for (or takes) the commit lock
    print("locking", flush=True)
    return real_flock(fd, op)
fcntl.flock = flock
with model_set.stage(sys.argv[1]) as staged:
    (staged.path / "best_model.pth").write_text("nn")
    (staged.path / "best_model.meta.json").write_text("nn sidecar")
    staged.commit()
print("done", flush=True)
"""


def test_two_runs_committing_at_once_leave_the_last_set_shown(tmp_path, monkeypatch):
    # Another run commits while this one is between its pointer swap and its clean-up: this one's
    # garbage collection removed the other's set, which `current` showed, so no model was left.
    import subprocess
    import sys

    out = tmp_path / "out"
    _commit(out, {"best_model.json": "x0", "best_model.meta.json": "s0"})
    real_gc = model_set._collect_garbage
    other = []

    def another_run_commits(*args, **kwargs):
        proc = subprocess.Popen([sys.executable, "-c", _OTHER_RUN, str(out)], stdout=subprocess.PIPE, text=True)
        other.append(proc)
        first = proc.stdout.readline().strip()  # "locking": it waits for this commit; "done": it did not
        assert first in ("locking", "done"), first
        real_gc(*args, **kwargs)

    monkeypatch.setattr(model_set, "_collect_garbage", another_run_commits)
    _commit(out, {"best_model.json": "xa", "best_model.meta.json": "sa"})
    monkeypatch.setattr(model_set, "_collect_garbage", real_gc)
    out_text, _ = other[0].communicate(timeout=60)
    assert other[0].returncode == 0
    assert model_set.current_dir(out).is_dir()
    assert _shown(out) == {"best_model.meta.json": "nn sidecar", "best_model.pth": "nn"}


def test_a_partial_set_whose_pid_another_process_took_over_is_removed(tmp_path):
    # A run killed long ago left its partial set; its PID now belongs to a process that started
    # later. pid_alive alone took that process for the writer and kept the set forever.
    import subprocess
    import time

    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "a", "best_model.meta.json": "a"})
    newcomer = subprocess.Popen(["sleep", "60"])
    try:
        dead = out / model_set.SETS_DIRNAME / f"{model_set.PARTIAL_PREFIX}{os.uname().nodename}-{newcomer.pid}-dead"
        dead.mkdir()
        (dead / "best_model.pth").write_text("orphan")
        an_hour_ago = time.time() - 3600
        os.utime(dead, (an_hour_ago, an_hour_ago))  # last written an hour before the newcomer started
        alive = out / model_set.SETS_DIRNAME / f"{model_set.PARTIAL_PREFIX}{os.uname().nodename}-{newcomer.pid}-live"
        alive.mkdir()  # written since the newcomer started: it may be the newcomer's, so it stays
        _commit(out, {"best_model.pth": "b", "best_model.meta.json": "b"})
        assert not dead.exists() and alive.is_dir()
    finally:
        newcomer.kill()
        newcomer.wait()


def test_a_copy_that_followed_the_links_can_be_committed_into(tmp_path):
    # `cp -rL` / `scp -r` turn the pointer `current` into a folder and every name into a plain file:
    # the pointer's swap could not replace a folder, so a run into the copy failed after all its training.
    import shutil

    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "nn", "best_model.meta.json": "s1"})
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=False)
    assert (copy / model_set.SETS_DIRNAME / model_set.POINTER_NAME).is_dir()
    assert _shown(copy) == {"best_model.meta.json": "s1", "best_model.pth": "nn"}
    folder = _commit(copy, {"best_model.json": "xgb", "best_model.meta.json": "s2"})
    assert _shown(copy) == {"best_model.json": "xgb", "best_model.meta.json": "s2"}
    assert model_set.current_dir(copy) == folder and (copy / model_set.SETS_DIRNAME / model_set.POINTER_NAME).is_symlink()
    _commit(copy, {"best_model.json": "xgb3", "best_model.meta.json": "s3"})  # and the next: back to the usual
    assert _shown(copy) == {"best_model.json": "xgb3", "best_model.meta.json": "s3"}


def test_the_temporary_link_of_a_swap_killed_half_way_is_removed_by_the_next_commit(tmp_path):
    # SIGKILL between making a swap's temporary link and renaming it over its name left the link for good.
    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "a", "best_model.meta.json": "a"})
    strays = [out / ".best_model.pth.link-0badf00d", out / model_set.SETS_DIRNAME / ".current.link-0badf00d"]
    for stray in strays:
        os.symlink("anything", stray)
    (out / ".notes.link-keep").write_text("the user's")  # a file, not a link: never ours
    _commit(out, {"best_model.pth": "b", "best_model.meta.json": "b"})
    assert not [s for s in strays if os.path.lexists(s)]
    assert (out / ".notes.link-keep").read_text() == "the user's"


_HOLDER = """
import sys, time
from pathlib import Path
from step5 import model_set
with model_set._commit_lock(Path(sys.argv[1])):  # a run half-way through its commit
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_commit_waiting_for_a_stopped_run_says_so_and_gives_up(tmp_path, monkeypatch, caplog):
    # A committer stopped with SIGSTOP (Ctrl-Z) or hung on a dead NFS server holds the lock for good:
    # every later commit into the output dir waited forever, without a word.
    import signal
    import subprocess
    import sys
    import threading

    out = tmp_path / "out"
    _commit(out, {"best_model.pth": "old", "best_model.meta.json": "old"})
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out / model_set.SETS_DIRNAME)],
                              stdout=subprocess.PIPE, text=True)
    rescue = threading.Timer(60, holder.kill)  # a wait without a bound: fail, not hang the suite
    rescue.start()
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(model_set, "LOCK_NOTICE_S", 0.2, raising=False)  # raising=False: the old code fails on its wait
        monkeypatch.setattr(model_set, "LOCK_TIMEOUT_S", 1.5, raising=False)
        with pytest.raises(Step5Error, match=rf"\(pid {holder.pid} on .*\) to finish its commit .*stopped"):
            _commit(out, {"best_model.pth": "new", "best_model.meta.json": "new"})
        (warning,) = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert f"another run (pid {holder.pid} on " in warning and model_set.LOCK_NAME in warning
        assert _shown(out) == {"best_model.meta.json": "old", "best_model.pth": "old"}
        holder.send_signal(signal.SIGCONT)
        holder.kill()  # the kernel lets go of its lock
        holder.wait(timeout=30)
        _commit(out, {"best_model.pth": "new", "best_model.meta.json": "new"})
        assert _shown(out) == {"best_model.meta.json": "new", "best_model.pth": "new"}
    finally:
        rescue.cancel()
        holder.kill()
        holder.wait(timeout=30)
