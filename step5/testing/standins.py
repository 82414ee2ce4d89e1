"""Stand-in hosts for tests and the cluster simulation: an ``ssh`` that runs the remote
command on this host (``sh -c``, as sshd runs it; settings from ``STEP5_FAKE_SSH_*``), ROCm
tools that report AMD GPUs, a ``/sys/class/kfd`` tree, and a host's ``python_env``
(docs/workers.md "The fakes"). Each writer puts an executable script (or a folder tree)
where it is told and returns its path.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

UNREACHABLE_ENV = "STEP5_FAKE_SSH_UNREACHABLE"
LOG_ENV = "STEP5_FAKE_SSH_LOG"
REQUIRE_ENV = "STEP5_FAKE_SSH_REQUIRE"
HOST_ENV = "STEP5_FAKE_SSH_HOST"


def fake_ssh(argv: Sequence[str] | None = None) -> int:
    """The stand-in ``ssh`` (run as ``python -m step5.testing.standins``), called as
    :func:`step5.cluster.ssh_command` calls ssh: options, ``--``, the destination, the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    if split + 1 >= len(argv):
        raise SystemExit("usage: ssh [options] -- destination command")
    options = [argv[i + 1] for i in range(split - 1) if argv[i] == "-o"]
    destination, command = argv[split + 1], " ".join(argv[split + 2:])
    host = destination.rsplit("@", 1)[-1]
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"argv": argv, "host": host, "options": options}) + "\n")
    missing = [o for o in os.environ.get(REQUIRE_ENV, "").split(",") if o and o not in options]
    if missing:
        print(f"fake ssh: missing required options {missing}", file=sys.stderr)
        return 255
    if host in os.environ.get(UNREACHABLE_ENV, "").split(","):
        time.sleep(0.2)
        print(f"ssh: connect to host {host} port 22: Connection timed out", file=sys.stderr)
        return 255
    # A session of its own, as sshd gives each command: hang_up can end all of it.
    proc = subprocess.Popen(["sh", "-c", command], env={**os.environ, HOST_ENV: host}, start_new_session=True)

    def hang_up(signum: int, frame: object) -> None:
        # A real ssh that is terminated drops the connection and the remote side tears the
        # session down. Here the "remote" command shares our stdin, so end its whole
        # process group instead: SIGTERM, and SIGKILL for whatever is left 2 s later.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(2.0)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, hang_up)
    signal.signal(signal.SIGINT, hang_up)
    returncode = proc.wait()
    return 255 if returncode < 0 else returncode


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body.rstrip() + "\n")
    path.chmod(0o755)
    return path


def write_fake_ssh(
    folder: Path, *, unreachable: Iterable[str] = (), log: Path | None = None,
    require: Sequence[str] = (), python: str = sys.executable,
) -> Path:
    """``folder/ssh``: :func:`fake_ssh` with its settings baked in."""
    settings = {UNREACHABLE_ENV: ",".join(unreachable), REQUIRE_ENV: ",".join(require)}
    if log is not None:
        settings[LOG_ENV] = str(log)
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    return _script(Path(folder) / "ssh", f'{assignments} exec {shlex.quote(python)} -m step5.testing.standins "$@"')


def write_rocm_smi(folder: Path, gpus: int, *, exit_code: int = 0) -> Path:
    """``folder/rocm-smi`` answering ``--showid --json`` with ``gpus`` cards (after a warning
    line, as the real tool sometimes prints)."""
    cards = {f"card{i}": {"Device ID": "0x73ff", "Device Rev": "0xc7"} for i in range(gpus)}
    body = (f"echo 'WARNING: AMD GPU device(s) is/are in a low-power state' >&2\n"
            f"echo {shlex.quote(json.dumps(cards))}\nexit {exit_code}")
    return _script(Path(folder) / "rocm-smi", body)


def write_amd_smi(folder: Path, gpus: int, *, exit_code: int = 0) -> Path:
    """``folder/amd-smi`` answering ``list --json`` with ``gpus`` GPUs."""
    listing = [{"gpu": i, "bdf": f"0000:0{i + 1}:00.0", "uuid": f"ff00-{i:04x}"} for i in range(gpus)]
    return _script(Path(folder) / "amd-smi", f"echo {shlex.quote(json.dumps(listing))}\nexit {exit_code}")


def write_kfd_tree(root: Path, gpu_versions: Sequence[int], *, cpu_nodes: int = 1) -> Path:
    """A sysfs root whose KFD topology has ``cpu_nodes`` CPU agents, then one GPU agent per
    ``gfx_target_version`` (100302: gfx1032, the RX 6600); returns ``root``."""
    nodes = Path(root) / "class/kfd/kfd/topology/nodes"
    for n in range(cpu_nodes):
        (nodes / str(n)).mkdir(parents=True, exist_ok=True)
        (nodes / str(n) / "properties").write_text("cpu_cores_count 8\nsimd_count 0\ngfx_target_version 0\n")
    for i, version in enumerate(gpu_versions):
        node = nodes / str(cpu_nodes + i)
        node.mkdir(parents=True, exist_ok=True)
        (node / "properties").write_text(f"cpu_cores_count 0\nsimd_count 112\ngfx_target_version {version}\n")
    return Path(root)


def write_host_python(
    path: Path, *, module_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
    unset: Sequence[str] = (), path_first: Sequence[Path] = (), pid_dir: Path | None = None,
    python: str = sys.executable,
) -> Path:
    """A host's stand-in ``python_env``: called as ``python_env <script> <flags>``, it runs
    ``python <module_args> <flags>`` (``module_args`` e.g. ``-m step5.testing.fake_search
    --job-sleep-s 2 --``; empty: the script itself) with ``env`` set, ``unset`` removed and
    ``path_first`` ahead on PATH. With ``pid_dir``, the process writes its pid to
    ``<pid_dir>/<host>.pid`` (the host from the stand-in ssh) so a test can kill it."""
    lines = [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    lines += [f"unset {name}" for name in unset]
    if path_first:
        lines.append("export PATH=" + ":".join(shlex.quote(str(p)) for p in path_first) + ':"$PATH"')
    if pid_dir is not None:
        lines.append(f'echo $$ > {shlex.quote(str(pid_dir))}/"${{STEP5_FAKE_SSH_HOST:-local}}".pid')
    if module_args:
        lines.append("shift")  # the entry script's name: the module stands in for it
        lines.append(f'exec {shlex.quote(python)} {" ".join(map(shlex.quote, module_args))} "$@"')
    else:
        lines.append(f'exec {shlex.quote(python)} "$@"')
    return _script(Path(path), "\n".join(lines))


if __name__ == "__main__":
    sys.exit(fake_ssh())
