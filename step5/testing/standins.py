"""Stand-in hosts for tests and the cluster simulation: an ``ssh`` that runs commands here,
ROCm tools that report AMD GPUs, a ``/sys/class/kfd`` tree, and a host's ``python_env``.
Each writer puts an executable script (or a folder tree) where it is told and returns its path."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from step5.testing.fake_ssh import LOG_ENV, REQUIRE_ENV, UNREACHABLE_ENV


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body.rstrip() + "\n")
    path.chmod(0o755)
    return path


def write_fake_ssh(
    folder: Path, *, unreachable: Iterable[str] = (), log: Path | None = None,
    require: Sequence[str] = (), python: str = sys.executable,
) -> Path:
    """``folder/ssh``: :mod:`step5.testing.fake_ssh` with its settings baked in."""
    settings = {UNREACHABLE_ENV: ",".join(unreachable), REQUIRE_ENV: ",".join(require)}
    if log is not None:
        settings[LOG_ENV] = str(log)
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    return _script(Path(folder) / "ssh", f'{assignments} exec {shlex.quote(python)} -m step5.testing.fake_ssh "$@"')


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
