"""Which devices the parent's workers run on, found without importing torch.

NVIDIA GPUs come from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi`` (:func:`detect_gpus`), AMD GPUs
from :mod:`step5.rocm`. Each worker (or one-shot trainer) is pinned to one device through its
environment, every other GPU hidden (:meth:`DeviceSlot.environment`); ``--gpus``
(:func:`parse_gpu_list`) chooses, and without it a host uses its NVIDIA GPUs, else its AMD GPUs,
else CPU workers (docs/cluster.md).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

from step5.errors import UsageError
from step5.launch import child_environment
from step5.lifeline import PARENT_PID_ENV
from step5.rocm import HIDE_AMD_GPUS, HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES, AmdGpus, detect_amd_gpus, \
    read_hip_visible

logger = logging.getLogger(__name__)

#: Environment variable read by the worker and the one-shot trainer (torch.set_num_threads).
TORCH_THREADS_ENV = "STEP5_TORCH_THREADS"
#: Environment variable read by the training core: which epoch loop trains a pass
#: (step5.nn.device_loop.TRAIN_LOOPS). Defined here so torch-free code can set it.
TRAIN_LOOP_ENV = "STEP5_TRAIN_LOOP"


#: Variables the slot sets itself (pinning, threads, imports, the lifeline): a policy's
#: ``training.device_env`` may not set them, or it would undo what keeps each worker on its device.
SLOT_OWNED_ENV = frozenset((
    "CUDA_VISIBLE_DEVICES", HIP_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES, "GPU_DEVICE_ORDINAL",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH",
))
#: ... nor any variable of Step 5's own.
STEP5_ENV_PREFIX = "STEP5_"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Slot kinds: an NVIDIA GPU, an AMD GPU, a share of the CPU cores.
SLOT_KINDS = ("cuda", "rocm", "cpu")
#: --gpus words that choose every GPU of a kind found here ("all": both kinds).
GPU_SELECTORS = ("all", "cuda", "rocm")
ROCM_PREFIX = "rocm:"


def device_env_problem(name: str, value: object) -> str | None:
    """Why ``name=value`` cannot be in ``training.device_env`` (None: it can)."""
    if not _ENV_NAME.fullmatch(name):
        return "is not an environment variable name (letters, digits and _, not starting with a digit)"
    if name in SLOT_OWNED_ENV or name.startswith(STEP5_ENV_PREFIX):
        return "is set by Step 5 itself for each worker (it pins the worker to its device); remove it"
    if not isinstance(value, str) or "\0" in value:
        return f"must be a string, got {value!r}"
    return None


@dataclass(frozen=True)
class DeviceSlot:
    """One place a fold can train: a GPU (NVIDIA or AMD), or a share of the CPU cores.

    ==========  ========================  ========================
    slot        ``CUDA_VISIBLE_DEVICES``  ``HIP_VISIBLE_DEVICES``
    ==========  ========================  ========================
    ``GPU-N``   ``N``                     ``-1`` (no AMD GPU)
    ``ROCm-N``  ``""`` (no NVIDIA GPU)    ``N``
    ``CPU-i``   ``""``                    ``-1``
    ==========  ========================  ========================
    """

    label: str  # "GPU-0" / "ROCm-3" / "CPU-1": used in logs, e.g. "[S96B] Worker GPU-0 died"
    kind: str  # SLOT_KINDS: "cuda", "rocm" or "cpu"
    cuda_visible_devices: str
    torch_threads: int | None = None  # torch intra-op threads for the process; None = torch's default
    hip_visible_devices: str = HIDE_AMD_GPUS
    device_env: tuple[tuple[str, str], ...] = ()  # the policy's training.device_env, for every process

    @classmethod
    def cuda(cls, gpu: str, threads: int | None = None) -> "DeviceSlot":
        return cls(f"GPU-{gpu}", "cuda", gpu, threads)

    @classmethod
    def rocm(cls, gpu: str, threads: int | None = None) -> "DeviceSlot":
        return cls(f"ROCm-{gpu}", "rocm", "", threads, hip_visible_devices=gpu)

    @classmethod
    def cpu(cls, index: int, threads: int | None = None) -> "DeviceSlot":
        return cls(f"CPU-{index}", "cpu", "", threads)

    def describe(self) -> str:
        """``NVIDIA GPU 0`` / ``AMD GPU 3`` / ``the CPU``: what the slot was given, for messages."""
        if self.kind == "cuda":
            return f"NVIDIA GPU {self.cuda_visible_devices} (CUDA_VISIBLE_DEVICES={self.cuda_visible_devices})"
        if self.kind == "rocm":
            return f"AMD GPU {self.hip_visible_devices} ({HIP_VISIBLE_DEVICES}={self.hip_visible_devices})"
        return "the CPU"

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a process serving this slot is started with (this step5 importable):
        ``base`` (default ours), then the policy's device variables, then the slot's pins."""
        env = child_environment(base)
        env.update(self.device_env)
        env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        env[HIP_VISIBLE_DEVICES] = self.hip_visible_devices
        # Lets the child watch this process and exit when it dies (step5.lifeline).
        env[PARENT_PID_ENV] = str(os.getpid())
        if self.torch_threads is not None:
            env[TORCH_THREADS_ENV] = str(self.torch_threads)
            # OpenMP/MKL pools are sized at import time; keep them in line with torch's.
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
            env["MKL_NUM_THREADS"] = str(self.torch_threads)
        else:
            env.pop(TORCH_THREADS_ENV, None)
        return env


def parse_gpu_list(text: str) -> list[str]:
    """``--gpus`` as tokens (a :class:`UsageError` when malformed): ``0,1`` and ``cuda:0,cuda:1`` ->
    ``["0", "1"]``; ``rocm:0,rocm:1`` -> ``["rocm:0", "rocm:1"]`` (a list may mix both); ``all``,
    ``cuda``, ``rocm`` -> ``["all"]`` etc., resolved by :func:`plan_slots`. ``none`` is the CLI's."""
    word = text.strip().lower()
    if word in GPU_SELECTORS:
        return [word]
    items: list[str] = []
    for part in text.split(","):
        kind, _, index = part.strip().lower().rpartition(":")
        if not index.isdigit() or kind not in ("", "cuda", "rocm"):
            raise UsageError(
                "--gpus must be a comma-separated list of GPU indices like '0,1' (NVIDIA; also 'cuda:0') or "
                f"'rocm:0,rocm:1' (AMD), or one of {', '.join(GPU_SELECTORS)}, none; got {text!r}"
            )
        items.append(ROCM_PREFIX + index if kind == "rocm" else index)
    if len(set(items)) != len(items):
        raise UsageError(f"--gpus lists a GPU twice: {text!r}")
    return items


def cuda_ids(gpus: list[str] | None) -> list[str] | None:
    """The NVIDIA part of a ``--gpus`` list (None: detect); for code that only drives NVIDIA
    GPUs (the tree libraries): ``rocm:N`` entries are dropped, ``all``/``cuda`` mean detect."""
    if gpus is None or any(g in ("all", "cuda") for g in gpus):
        return None
    return [g for g in gpus if g.isdigit()]


def detect_gpus(env: Mapping[str, str] | None = None, *, nvidia_smi_timeout_s: float = 10.0) -> list[str]:
    """NVIDIA GPU ids visible to this process, without importing torch: ``CUDA_VISIBLE_DEVICES``
    when set, read as CUDA reads it (empty or ``-1``: no GPU), else ``nvidia-smi``'s indices."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return read_hip_visible(visible)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=nvidia_smi_timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi failed (%s); assuming no GPU", exc)
        return []
    if proc.returncode != 0:
        logger.warning("nvidia-smi exited %d (%s); assuming no GPU", proc.returncode, proc.stderr.strip()[:200])
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().isdigit()]


@dataclass(frozen=True)
class TorchBuild:
    """What this interpreter's torch was built for, read from ``torch/version.py`` as text
    (importing torch would defeat the point)."""

    version: str
    cuda: str | None  # torch.version.cuda
    hip: str | None  # torch.version.hip: set in a ROCm build


def installed_torch_build() -> TorchBuild | None:
    """The torch build the workers of this interpreter will import; None when unknown."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return None

    def field(name: str) -> str | None:
        match = re.search(rf"^{name}\s*(?::[^=\n]*)?=\s*['\"]([^'\"]*)['\"]", text, flags=re.MULTILINE)
        return match.group(1) if match else None

    return TorchBuild(field("__version__") or "?", field("cuda"), field("hip"))


def default_cpu_workers(cpu_count: int | None = None) -> int:
    """CPU workers when none are asked for: one per core, at most 8 (tiny MLPs do not
    scale with intra-op threads, so processes beat threads)."""
    cores = cpu_count or os.cpu_count() or 1
    return max(1, min(cores, 8))


def _resolve_gpus(gpus: list[str] | None, detect_nvidia: Callable[[], list[str]],
                  detect_amd: Callable[[], AmdGpus]) -> tuple[list[str], list[str]]:
    """(NVIDIA ids, AMD ids) to plan one slot each for."""
    if gpus is None:
        nvidia = detect_nvidia()
        amd = detect_amd()
        if nvidia:
            if amd.ids:
                logger.info("this host also has %s; they are not used unless asked: --gpus all (both kinds) "
                            "or --gpus rocm (AMD only)", amd.describe())
            return nvidia, []
        return [], list(amd.ids)
    if gpus[:1] and gpus[0] in GPU_SELECTORS:
        word = gpus[0]
        nvidia = detect_nvidia() if word in ("all", "cuda") else []
        amd = list(detect_amd().ids) if word in ("all", "rocm") else []
        if word != "all" and not (nvidia or amd):
            where = ("CUDA_VISIBLE_DEVICES / nvidia-smi" if word == "cuda" else
                     "HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES, amd-smi / rocm-smi, /sys/class/kfd")
            raise UsageError(f"--gpus {word}: no {'NVIDIA' if word == 'cuda' else 'AMD'} GPU found here ({where})")
        if not (nvidia or amd):
            logger.warning("--gpus all: no GPU found here; training on CPU workers")
        return nvidia, amd
    return ([g for g in gpus if not g.startswith(ROCM_PREFIX)],
            [g[len(ROCM_PREFIX):] for g in gpus if g.startswith(ROCM_PREFIX)])


def plan_slots(gpus: list[str] | None, cpu_workers: int | None, *, cpu_count: int | None = None,
               device_env: Mapping[str, str] | None = None, detect_nvidia: Callable[[], list[str]] | None = None,
               detect_amd: Callable[[], AmdGpus] | None = None,
               torch_build: Callable[[], TorchBuild | None] = installed_torch_build) -> list[DeviceSlot]:
    """One slot per GPU; with no GPU, ``cpu_workers`` CPU slots sharing the cores.

    ``gpus``: None detects (NVIDIA GPUs if any, else AMD GPUs), ``[]`` uses no GPU, else
    :func:`parse_gpu_list`'s tokens. ``device_env`` (the policy's) goes to every slot's processes.
    """
    cores = cpu_count or os.cpu_count() or 1
    if cpu_workers is not None and cpu_workers < 1:
        raise UsageError(f"--cpu-workers must be >= 1, got {cpu_workers}")
    env = tuple(sorted((device_env or {}).items()))
    nvidia, amd = _resolve_gpus(gpus, detect_nvidia or detect_gpus, detect_amd or detect_amd_gpus)
    if nvidia or amd:
        build = torch_build() if amd else None
        if build is not None and build.hip is None:
            logger.warning(
                "%d AMD GPU(s) are planned, but this interpreter's torch %s is not a ROCm build (torch.version.hip "
                "is None): its workers will train on the CPU. Install a ROCm build of torch, or use --gpus none",
                len(amd), build.version,
            )
        threads = max(1, cores // (len(nvidia) + len(amd)))
        slots = [DeviceSlot.cuda(g, threads) for g in nvidia] + [DeviceSlot.rocm(g, threads) for g in amd]
    else:
        n = cpu_workers if cpu_workers is not None else default_cpu_workers(cores)
        threads = max(1, cores // n)
        slots = [DeviceSlot.cpu(i, threads) for i in range(n)]
    return [replace(s, device_env=env) for s in slots]
