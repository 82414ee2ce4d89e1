"""Who owns a thing (a trial, a temp folder), and whether that owner is still alive.

A process is its host, PID namespace, PID, start time and the boot of the kernel it runs on, so a
reused PID is not mistaken for the owner. Whether an owner is alive can only be known on its host and
in its PID namespace (:func:`is_local`); elsewhere a dead owner shows only through its stale Optuna
heartbeats. The boot tells hosts apart that share a name (rigs cloned from one image): every host's
initial PID namespace is named alike (``pid:[4026531836]``, a kernel constant).
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import psutil

from step5.jsonio import read_json_file, write_json_atomic


@dataclass(frozen=True)
class ProcessIdentity:
    host: str  # socket.gethostname()
    pid_namespace: str  # /proc/self/ns/pid: two containers on one host do not share one
    pid: int
    started: int  # the process's start time, whole seconds since the epoch
    boot: str = ""  # /proc/sys/kernel/random/boot_id: which host (and boot) it runs on; "" unknown (older records)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProcessIdentity | None":
        """The identity recorded in ``data``, or None when it is not one."""
        try:
            return cls(str(data["host"]), str(data["pid_namespace"]), int(data["pid"]), int(data["started"]),
                       str(data.get("boot") or ""))
        except (KeyError, TypeError, ValueError):
            return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@functools.cache
def _this_process(pid: int) -> ProcessIdentity:
    return ProcessIdentity(socket.gethostname(), _pid_namespace(), pid, _start_time(pid) or 0, _boot_id())


def this_process() -> ProcessIdentity:
    """This process's identity (cached per PID, so a fork gets its own)."""
    return _this_process(os.getpid())


def is_local(owner: ProcessIdentity) -> bool:
    """Whether ``owner`` lives where this process can see whether it is alive."""
    me = this_process()
    same_boot = not owner.boot or not me.boot or owner.boot == me.boot  # a record without one: name and namespace
    return owner.host == me.host and owner.pid_namespace == me.pid_namespace and same_boot


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (the one answer to "is it alive?"): a zombie is
    dead, a process of another user alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True
    except psutil.Error:  # NoSuchProcess (ZombieProcess included)
        return False


def pid_alive_since(pid: int, since: float) -> bool:
    """Whether process ``pid`` runs on this host and already ran at ``since`` (seconds since the
    epoch): a process that took the PID over later is not the one that had it then."""
    started = _start_time(pid)
    return pid_alive(pid) and (started is None or started <= since + 1)  # start times are whole seconds


def is_alive(owner: ProcessIdentity) -> bool:
    """Whether a *local* owner still runs (a reused PID with another start time does not count)."""
    started = _start_time(owner.pid)
    return started is not None and pid_alive(owner.pid) and abs(started - owner.started) <= 1


#: The owner record a process leaves in a folder it owns (:func:`claim_folder`).
OWNER_FILE = ".owner.json"


def claim_folder(path: Path) -> None:
    """Record this process as the owner of folder ``path``."""
    write_json_atomic(path / OWNER_FILE, this_process().to_dict())


def orphaned_folders(root: Path, prefix: str) -> list[tuple[Path, ProcessIdentity]]:
    """Folders ``root/prefix*`` whose recorded owner died on this host (SIGKILL, a crash), with
    that owner; not those of live processes, of other hosts, or without a readable owner record."""
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return []
    out: list[tuple[Path, ProcessIdentity]] = []
    for path in candidates:
        try:
            owner = ProcessIdentity.from_dict(read_json_file(path / OWNER_FILE, "folder owner"))
        except Exception:  # noqa: BLE001 - no readable owner record: not ours to judge
            continue
        if owner is not None and is_local(owner) and not is_alive(owner):
            out.append((path, owner))
    return out
