"""Which devices the parent's workers run on, found without importing torch.

The parent must stay CUDA-clean, so GPUs are discovered from ``CUDA_VISIBLE_DEVICES`` or
``nvidia-smi``, never from ``torch.cuda``. Each worker (or one-shot trainer) is pinned to
one device through its environment: ``CUDA_VISIBLE_DEVICES=<gpu>`` for a GPU slot, and
``CUDA_VISIBLE_DEVICES=""`` for a CPU slot so that it cannot touch any GPU.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from step5.errors import UsageError
from step5.launch import child_environment
from step5.lifeline import PARENT_PID_ENV

logger = logging.getLogger(__name__)

#: Environment variable read by the worker and the one-shot trainer (torch.set_num_threads).
TORCH_THREADS_ENV = "STEP5_TORCH_THREADS"
#: Environment variable read by the training core: which epoch loop trains a pass
#: (step5.nn.device_loop.TRAIN_LOOPS). Defined here so torch-free code can set it.
TRAIN_LOOP_ENV = "STEP5_TRAIN_LOOP"


@dataclass(frozen=True)
class DeviceSlot:
    """One place a fold can train: a GPU, or a share of the CPU cores."""

    label: str  # "GPU-0" / "CPU-1": used in logs, e.g. "[S96B] Worker GPU-0 died"
    kind: str  # "cuda" or "cpu"
    cuda_visible_devices: str  # "0" pins GPU 0; "" hides every GPU (a CPU slot)
    torch_threads: int | None = None  # torch intra-op threads for the process; None = torch's default

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a process serving this slot is started with (this step5 importable)."""
        env = child_environment(base)
        env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
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
    """Parse ``--gpus 0,1`` into ``["0", "1"]``; raises :class:`UsageError` when malformed."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not item.isdigit() for item in items):
        raise UsageError(f"--gpus must be a comma-separated list of GPU indices like '0,1', got {text!r}")
    if len(set(items)) != len(items):
        raise UsageError(f"--gpus lists a GPU twice: {text!r}")
    return items


def detect_gpus(env: Mapping[str, str] | None = None, *, nvidia_smi_timeout_s: float = 10.0) -> list[str]:
    """GPU ids visible to this process, without importing torch.

    ``CUDA_VISIBLE_DEVICES`` wins when set (empty or ``-1`` means "no GPU", as CUDA reads it);
    otherwise ``nvidia-smi`` is asked for the GPU indices; no ``nvidia-smi`` means no GPU.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        # CUDA stops enumerating at the first invalid entry, such as "-1".
        usable: list[str] = []
        for ident in ids:
            if ident.startswith("-"):
                break
            usable.append(ident)
        return usable
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=nvidia_smi_timeout_s, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi failed (%s); assuming no GPU", exc)
        return []
    if proc.returncode != 0:
        logger.warning("nvidia-smi exited %d (%s); assuming no GPU", proc.returncode, proc.stderr.strip()[:200])
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().isdigit()]


def default_cpu_workers(cpu_count: int | None = None) -> int:
    """CPU workers when none are asked for: one per core, at most 8 (tiny MLPs do not
    scale with intra-op threads, so processes beat threads)."""
    cores = cpu_count or os.cpu_count() or 1
    return max(1, min(cores, 8))


def plan_slots(
    gpus: list[str] | None,
    cpu_workers: int | None,
    *,
    cpu_count: int | None = None,
) -> list[DeviceSlot]:
    """One slot per GPU; with no GPU, ``cpu_workers`` CPU slots sharing the cores.

    ``gpus=None`` means "detect"; an explicit empty list means "use no GPU".
    """
    cores = cpu_count or os.cpu_count() or 1
    if cpu_workers is not None and cpu_workers < 1:
        raise UsageError(f"--cpu-workers must be >= 1, got {cpu_workers}")
    gpu_ids = detect_gpus() if gpus is None else gpus
    if gpu_ids:
        threads = max(1, cores // len(gpu_ids))
        return [DeviceSlot(f"GPU-{g}", "cuda", g, threads) for g in gpu_ids]
    n = cpu_workers if cpu_workers is not None else default_cpu_workers(cores)
    threads = max(1, cores // n)
    return [DeviceSlot(f"CPU-{i}", "cpu", "", threads) for i in range(n)]
