"""The model directory: a model set (checkpoint, sidecar, pictures) committed as one unit, by one
``rename`` of the ``.model_sets/current`` pointer. Layout and reasons: docs/optimizer.md ("The model set")."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

from step5.artifacts import MODEL_SET_NAMES
from step5.errors import Step5Error
from step5.fsutil import DIR_MODE, FILE_MODE, fsync_dir, os_error_reason, write_all
from step5.owner import pid_alive_since
from step5.values import utc_timestamp

logger = logging.getLogger(__name__)

SETS_DIRNAME = ".model_sets"
POINTER_NAME = "current"
PARTIAL_PREFIX = ".partial-"
#: Held (``flock``) by the run committing a set into the output dir, from its rename to its garbage collection.
LOCK_NAME = ".commit.lock"
#: A commit waiting for another's says so after LOCK_NOTICE_S (and every minute), and gives up after
#: LOCK_TIMEOUT_S: commits take seconds (minutes to copy a big model where hard links fail), so a lock
#: held for half an hour belongs to a run that is stopped (Ctrl-Z, SIGSTOP) or hung (a dead NFS server).
LOCK_NOTICE_S = 5.0
LOCK_TIMEOUT_S = 1800.0
#: What a top-level name links to: the file of the same name in the current set.
LINK_PREFIX = f"{SETS_DIRNAME}/{POINTER_NAME}/"
#: In the name of the temporary link a swap renames over a name (``.<name>.link-<token>``).
LINK_TEMP_INFIX = ".link-"


def _version_name() -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def _partial_name() -> str:
    return f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _is_our_link(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path).startswith(LINK_PREFIX)


def _pointer_target(sets_dir: Path) -> str | None:
    try:
        return os.readlink(sets_dir / POINTER_NAME)
    except OSError:
        return None


def _replace_with_link(path: Path, target: str) -> None:
    """Make ``path`` a symlink to ``target`` in one rename (whatever was there before)."""
    tmp = path.with_name(f".{path.name}{LINK_TEMP_INFIX}{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _commit_lock(sets_dir: Path) -> Iterator[None]:
    """Hold the output dir's commit lock. Two runs committing into one output dir at once each took
    the other's just-committed set for garbage: ``current`` was left pointing at a removed folder
    (no model at all, both runs reporting success). Commits take milliseconds; the kernel lets go
    of the lock when its holder dies, however it dies, but not while it is stopped or hung: see LOCK_TIMEOUT_S."""
    path = sets_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        _wait_for_lock(fd, path)
        with contextlib.suppress(OSError):  # who holds it, for a waiting run's message; a full disk costs only that
            os.ftruncate(fd, 0)
            write_all(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {utc_timestamp()}".encode())
        yield
    finally:
        os.close(fd)


def _wait_for_lock(fd: int, path: Path) -> None:
    """Take the commit lock; a run waiting for it used to wait forever without a word."""
    start = time.monotonic()
    notice = start + LOCK_NOTICE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:  # a filesystem without locks (some NFS mounts): a guard lost, not a stop
            return
        now = time.monotonic()
        waited = now - start
        if waited >= LOCK_TIMEOUT_S or now >= notice:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            holder = f"another run ({holder or 'it did not say which'})"
            if waited >= LOCK_TIMEOUT_S:
                raise Step5Error(
                    f"waited {waited / 60:.0f} minutes for {holder} to finish its commit (lock {path}): it is stopped "
                    "(Ctrl-Z, SIGSTOP) or hung; this run's model is not saved. End or resume that run, then run again")
            logger.warning("waiting %.0fs so far for %s to finish its commit (lock %s); if it is stopped (Ctrl-Z, "
                           "SIGSTOP), resume or end it; this run gives up after %.0f minutes",
                           waited, holder, path, LOCK_TIMEOUT_S / 60)
            notice += 60.0
        time.sleep(0.05)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


@dataclass
class StagedSet:
    """A model set being written: put its files in :attr:`path`, then :meth:`commit`."""

    output_dir: Path
    path: Path  # the hidden folder the set's files are written to
    version_name: str = field(default_factory=_version_name)  # chosen up front: files may name it
    version: Path | None = field(default=None, init=False)  # set once renamed to its version name
    committed: bool = field(default=False, init=False)

    @property
    def sets_dir(self) -> Path:
        return self.output_dir / SETS_DIRNAME

    @property
    def final_dir(self) -> Path:
        """The folder the set will have once committed (absolute): a path to its files that later commits keep true."""
        return (self.sets_dir / self.version_name).absolute()

    def commit(self) -> Path:
        """Make this set the one the output dir shows; returns the committed set's folder."""
        with writing(self.output_dir), _commit_lock(self.sets_dir):
            names = sorted(p.name for p in self.path.iterdir())
            if not names:
                raise ValueError(f"refusing to commit an empty model set from {self.path}")
            _fsync_files(self.path)
            self.version = self.sets_dir / self.version_name
            os.rename(self.path, self.version)
            fsync_dir(self.sets_dir)
            pointer = self.sets_dir / POINTER_NAME
            if pointer.is_dir() and not pointer.is_symlink():
                # A copy that followed the links (cp -rL, scp -r, rsync -L): the pointer became a folder,
                # the names beside it plain files. The pointer's swap cannot replace a folder (the run
                # failed after all its training): set it aside as an old set, and migrate the plain files.
                os.rename(pointer, self.sets_dir / _version_name())
            previous = _pointer_target(self.sets_dir)
            if previous is None:
                previous = _migrate_plain_files(self.output_dir)
            else:  # a migration that was interrupted half-way: finish it (same bytes behind each name)
                for name in MODEL_SET_NAMES:
                    plain = self.output_dir / name
                    if plain.is_file() and not plain.is_symlink() and (self.sets_dir / previous / name).is_file():
                        _replace_with_link(plain, LINK_PREFIX + name)
            for name in names:  # the fixed names (a new one dangles until the swap below)
                link = self.output_dir / name
                if not _is_our_link(link):
                    _replace_with_link(link, LINK_PREFIX + name)
            # THE commit: one rename swaps what every fixed name shows.
            _replace_with_link(self.sets_dir / POINTER_NAME, self.version.name)
            self.committed = True
            # Committed: what follows tidies up, and a filesystem that fails it now (full,
            # read-only) leaves a few stale names behind, for the next commit to remove.
            with contextlib.suppress(OSError):
                fsync_dir(self.sets_dir)
                for p in self.output_dir.iterdir():  # names only the old set had now dangle: remove them
                    if p.name not in names and _is_our_link(p):
                        p.unlink()
                for folder in (self.output_dir, self.sets_dir):
                    _remove_link_temps(folder)
                fsync_dir(self.output_dir)
                _collect_garbage(self.sets_dir, keep={self.version.name, previous or ""})
            return self.version


@contextlib.contextmanager
def stage(output_dir: str | os.PathLike[str]) -> Iterator[StagedSet]:
    """A fresh hidden folder for a new model set in ``output_dir``; removed unless committed in the block."""
    out = Path(output_dir)
    sets_dir = out / SETS_DIRNAME
    with writing(out):
        sets_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        path = sets_dir / _partial_name()
        path.mkdir(mode=DIR_MODE)
    staged = StagedSet(out, path)
    try:
        yield staged
    finally:
        if not staged.committed:
            # Never the folder the pointer shows: interrupted right after the swap, the set *is* committed.
            for folder in (path, staged.version):
                if folder is not None and folder.exists() and _pointer_target(sets_dir) != folder.name:
                    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def writing(output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """A filesystem error while a model set is written (full disk, read-only, no permission) as one Step5Error."""
    try:
        yield
    except OSError as exc:
        what = f" ({exc.filename})" if exc.filename else ""
        raise Step5Error(
            f"cannot write the model to output dir {output_dir}: {os_error_reason(exc)}{what}; "
            "the output dir still shows the model set it showed before"
        ) from None


def current_dir(output_dir: str | os.PathLike[str]) -> Path | None:
    """The folder of the set the output dir shows now, or None when it holds no set."""
    sets_dir = Path(output_dir) / SETS_DIRNAME
    target = _pointer_target(sets_dir)
    return sets_dir / target if target else None


def current_files(output_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``{name: file}`` of the model set ``output_dir`` shows (without a set: its plain ``best_model.*`` files)."""
    out = Path(output_dir)
    folder = current_dir(out)
    if folder is not None:
        return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}
    return _plain_files(out) if out.is_dir() else {}


def _plain_files(out: Path) -> dict[str, Path]:
    """The regular (not linked) model files of a folder written before model sets existed."""
    return {p.name: p for p in sorted(out.iterdir()) if p.name in MODEL_SET_NAMES and p.is_file() and not p.is_symlink()}


def copy_files(staged: StagedSet, files: Mapping[str, Path]) -> None:
    """Put ``files`` (name -> source) into a staged set: hard links where possible."""
    for name, src in files.items():
        _link_or_copy(Path(src), staged.path / name)


def _migrate_plain_files(out: Path) -> str | None:
    """Move a folder's plain model files into a set of their own; returns its name (None: nothing to move)."""
    plain = _plain_files(out)
    if not plain:
        return None
    sets_dir = out / SETS_DIRNAME
    partial = sets_dir / _partial_name()
    partial.mkdir(mode=DIR_MODE)
    for name, p in plain.items():
        _link_or_copy(p, partial / name)
    _fsync_files(partial)
    version = sets_dir / _version_name()
    os.rename(partial, version)
    _replace_with_link(sets_dir / POINTER_NAME, version.name)
    fsync_dir(sets_dir)
    for name in plain:  # each swap shows the same bytes as before it
        _replace_with_link(out / name, LINK_PREFIX + name)
    fsync_dir(out)
    return version.name


def _remove_link_temps(folder: Path) -> None:
    """Remove the temporary links of swaps killed between making the link and renaming it over its name
    (SIGKILL): each stayed behind for good. Called under the commit lock, when no swap is under way."""
    for p in folder.iterdir():
        if p.name.startswith(".") and LINK_TEMP_INFIX in p.name and p.is_symlink():
            p.unlink()


def _collect_garbage(sets_dir: Path, keep: set[str]) -> None:
    """Remove committed sets other than ``keep`` and partial sets of dead processes."""
    host = socket.gethostname()
    for p in sets_dir.iterdir():
        if p.name in keep or p.name == POINTER_NAME or p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(PARTIAL_PREFIX):
            if not _partial_is_orphan(p, host):
                continue  # another run on this output dir is writing it
        elif p.name.startswith("."):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _partial_is_orphan(path: Path, host: str) -> bool:
    """A partial set whose writer (this host, that pid) is gone; other hosts' are kept."""
    try:
        writer_host, pid_text, _token = path.name[len(PARTIAL_PREFIX):].rsplit("-", 2)
        pid = int(pid_text)
        changed = path.stat().st_mtime  # its writer was alive then
    except (ValueError, OSError):
        return False
    # This process commits one set at a time: any other partial set of its own is left over.
    # A process that started after the set last changed only reuses the dead writer's PID: a
    # partial set of a run killed long ago was otherwise kept for as long as that PID was taken.
    return writer_host == host and (pid == os.getpid() or not pid_alive_since(pid, changed))
