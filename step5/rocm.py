"""AMD (ROCm) GPUs found without importing torch (the parent stays free of any GPU runtime).

Sources, the first that answers wins (docs/cluster.md): ``HIP_VISIBLE_DEVICES``, then
``ROCR_VISIBLE_DEVICES``, then ``amd-smi`` / ``rocm-smi``, then the kernel's KFD topology. The ids
are HIP ordinals in this process's numbering: what a child is given in ``HIP_VISIBLE_DEVICES``
to see exactly that GPU (it inherits ``ROCR_VISIBLE_DEVICES``, so the numbering is the same).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

HIP_VISIBLE_DEVICES = "HIP_VISIBLE_DEVICES"
ROCR_VISIBLE_DEVICES = "ROCR_VISIBLE_DEVICES"
#: What a process that must see no AMD GPU is given in HIP_VISIBLE_DEVICES (HIP reads an
#: invalid first entry as "no device", as CUDA reads "-1").
HIDE_AMD_GPUS = "-1"
#: Under the sysfs root: one folder per agent (CPU or GPU) of the kernel's KFD driver.
KFD_NODES = Path("class/kfd/kfd/topology/nodes")

#: (tool, arguments) asked in this order when no variable says which GPUs to use.
SMI_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (("amd-smi", ("list", "--json")), ("rocm-smi", ("--showid", "--json")))


@dataclass(frozen=True)
class AmdGpus:
    """The AMD GPUs this process can hand to its children, and how that was found out."""

    ids: tuple[str, ...]  # HIP ordinals ("0", "1", ...): a child's HIP_VISIBLE_DEVICES
    source: str  # "HIP_VISIBLE_DEVICES=0,1", "amd-smi", "rocm-smi", "/sys/class/kfd" or "none"
    targets: tuple[str, ...] = ()  # gfx targets when the source names them ("gfx1032"), for the log

    def describe(self) -> str:
        """``8 AMD GPU(s) (ids 0-7, gfx1032) from rocm-smi`` for the log."""
        if not self.ids:
            return f"no AMD GPU ({self.source})"
        ids = ",".join(self.ids)
        if len(self.ids) > 2 and self.ids == tuple(str(i) for i in range(len(self.ids))):
            ids = f"0-{len(self.ids) - 1}"
        targets = sorted(set(self.targets))
        extra = f", {'/'.join(targets)}" if targets else ""
        return f"{len(self.ids)} AMD GPU(s) (ids {ids}{extra}) from {self.source}"


def read_hip_visible(value: str) -> list[str]:
    """The ordinals a ``*_VISIBLE_DEVICES`` value lists, as HIP and CUDA read them: up to the first
    entry that is not a non-negative index (``-1`` hides every GPU). UUID entries are kept."""
    usable: list[str] = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        if entry.startswith("-"):
            break
        usable.append(entry)
    return usable


def _ordinals(n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def count_smi_gpus(tool: str, text: str) -> int:
    """How many GPUs ``amd-smi list --json`` / ``rocm-smi --showid --json`` listed: JSON first
    (amd-smi: a list of ``{"gpu": N, ...}``; rocm-smi: ``{"card0": {...}, ...}``), else the text
    forms (``GPU: 0`` lines of amd-smi, ``GPU[0]`` lines of rocm-smi)."""
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]  # warnings may come before the JSON
    try:
        payload = json.loads(text[min(starts):]) if starts else None
    except ValueError:
        payload = None
    if isinstance(payload, list):
        return sum(1 for item in payload if isinstance(item, dict) and "gpu" in item)
    if isinstance(payload, dict):
        return sum(1 for key in payload if re.fullmatch(r"(card|gpu_?)\d+", str(key), flags=re.IGNORECASE))
    pattern = r"^\s*GPU:\s*(\d+)\s*$" if tool == "amd-smi" else r"^\s*GPU\[(\d+)\]"
    return len({m.group(1) for line in text.splitlines() if (m := re.match(pattern, line))})


def _ask_tool(tool: str, path: str, args: tuple[str, ...], timeout_s: float) -> int | None:
    """The GPU count a ROCm tool reports; None (logged) when it fails or says nothing usable."""
    try:
        proc = subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("%s failed (%s); trying the next source of AMD GPUs", tool, exc)
        return None
    if proc.returncode != 0:
        logger.warning("%s exited %d (%s); trying the next source of AMD GPUs", tool, proc.returncode,
                       (proc.stderr.strip() or proc.stdout.strip())[:200])
        return None
    return count_smi_gpus(tool, proc.stdout)


def _gfx_target(version: int) -> str:
    """KFD's ``gfx_target_version`` (100302) as the target name (``gfx1032``)."""
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def read_kfd_gpus(sysfs_root: Path) -> list[str] | None:
    """The gfx target of each GPU node of the KFD topology, in node order (HIP's order);
    None when there is no topology to read."""
    nodes = Path(sysfs_root) / KFD_NODES
    if not nodes.is_dir():
        return None
    targets: list[tuple[int, str]] = []
    for node in nodes.iterdir():
        if not node.name.isdigit():
            continue
        try:
            text = (node / "properties").read_text()
        except OSError:
            continue
        props: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.strip().partition(" ")
            if value.strip().lstrip("-").isdigit():
                props[key] = int(value)
        if props.get("simd_count", 0) > 0:  # CPU agents have no SIMD units
            version = props.get("gfx_target_version", 0)
            targets.append((int(node.name), _gfx_target(version) if version else "gfx?"))
    return [target for _, target in sorted(targets)]


def detect_amd_gpus(env: Mapping[str, str] | None = None, *, which: Callable[[str], str | None] = shutil.which,
                    sysfs_root: str | Path = "/sys", tool_timeout_s: float = 10.0) -> AmdGpus:
    """The AMD GPUs of this host, from the first source that answers (module doc); logged."""
    found = _detect(os.environ if env is None else env, which, Path(sysfs_root), tool_timeout_s)
    if found.ids:
        logger.info("found %s", found.describe())
    else:
        logger.debug("no AMD GPU: %s", found.source)
    return found


def _detect(env: Mapping[str, str], which: Callable[[str], str | None], sysfs_root: Path,
            timeout_s: float) -> AmdGpus:
    hip = env.get(HIP_VISIBLE_DEVICES)
    if hip is not None and hip.strip():
        return AmdGpus(tuple(read_hip_visible(hip)), f"{HIP_VISIBLE_DEVICES}={hip.strip()}")
    rocr = env.get(ROCR_VISIBLE_DEVICES)
    if rocr is not None:
        listed = read_hip_visible(rocr)
        return AmdGpus(_ordinals(len(listed)), f"{ROCR_VISIBLE_DEVICES}={rocr.strip()}")
    for tool, args in SMI_TOOLS:
        path = which(tool)
        if path is None:
            continue
        count = _ask_tool(tool, path, args, timeout_s)
        if count is not None:
            return AmdGpus(_ordinals(count), tool)
    kfd = read_kfd_gpus(sysfs_root)
    if kfd is not None:
        return AmdGpus(_ordinals(len(kfd)), str(sysfs_root / "class/kfd"), tuple(kfd))
    return AmdGpus((), "none: HIP_VISIBLE_DEVICES and ROCR_VISIBLE_DEVICES unset, no amd-smi or rocm-smi, "
                       "no /sys/class/kfd")
