"""Which devices the parent's workers run on, found without importing torch (nor any GPU runtime).

NVIDIA GPUs come from ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi`` (:func:`detect_gpus`), AMD GPUs
from the first of ``HIP_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``, ``amd-smi`` / ``rocm-smi``
and the kernel's KFD topology that answers (:func:`detect_amd_gpus`). Each worker (or one-shot
trainer) is pinned to one device through its environment, every other GPU hidden
(:meth:`DeviceSlot.environment`); ``--gpus`` (:func:`parse_gpu_list`) chooses, and without it a
host uses its NVIDIA GPUs, else its AMD GPUs, else CPU workers (docs/cluster.md).
"""
from __future__ import annotations

import importlib.util
import json
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

logger = logging.getLogger(__name__)

HIP_VISIBLE_DEVICES = "HIP_VISIBLE_DEVICES"
ROCR_VISIBLE_DEVICES = "ROCR_VISIBLE_DEVICES"
#: What a process that must see no AMD GPU is given in HIP_VISIBLE_DEVICES (HIP reads an
#: invalid first entry as "no device", as CUDA reads "-1").
HIDE_AMD_GPUS = "-1"

#: (tool, arguments) asked in this order when no variable says which GPUs to use.
SMI_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (("amd-smi", ("list", "--json")), ("rocm-smi", ("--showid", "--json")))

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
    """One place a fold can train: a GPU (NVIDIA or AMD), or a share of the CPU cores; each sees
    only its own GPU (docs/cluster.md: ``GPU-N``, ``ROCm-N``, ``CPU-i`` and their variables)."""

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
        if not (index.isascii() and index.isdigit()) or kind not in ("", "cuda", "rocm"):
            raise UsageError(
                "--gpus must be a comma-separated list of GPU indices like '0,1' (NVIDIA; also 'cuda:0') or "
                f"'rocm:0,rocm:1' (AMD), or one of {', '.join(GPU_SELECTORS)}, none; got {text!r}"
            )
        index = str(int(index))  # "01" is GPU 1: "1,01" lists it twice
        items.append(ROCM_PREFIX + index if kind == "rocm" else index)
    if len(set(items)) != len(items):
        raise UsageError(f"--gpus lists a GPU twice: {text!r}")
    return items


def cuda_ids(gpus: list[str] | None) -> list[str] | None:
    """The NVIDIA part of a ``--gpus`` list (None: detect); for code that only drives NVIDIA
    GPUs (the tree libraries): ``rocm:N`` entries are dropped, ``all``/``cuda`` mean detect."""
    if gpus is None or any(g in ("all", "cuda") for g in gpus):
        return None
    # Not only indices: --device cuda:N under CUDA_VISIBLE_DEVICES=GPU-<uuid>,... names the GPU by its UUID.
    return [g for g in gpus if not g.startswith(ROCM_PREFIX) and g not in GPU_SELECTORS]


def detect_gpus(env: Mapping[str, str] | None = None, *, nvidia_smi_timeout_s: float = 10.0) -> list[str]:
    """NVIDIA GPU ids visible to this process, without importing torch: ``CUDA_VISIBLE_DEVICES``
    when set, read as CUDA reads it (empty or ``-1``: no GPU), else ``nvidia-smi``'s indices."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return read_hip_visible(visible)
    smi = shutil.which("nvidia-smi")
    out = None if smi is None else _run_tool("nvidia-smi", [smi, "--query-gpu=index", "--format=csv,noheader"],
                                             nvidia_smi_timeout_s, "assuming no GPU")
    return [line.strip() for line in (out or "").splitlines() if line.strip().isdigit()]


def _run_tool(tool: str, argv: list[str], timeout_s: float, fallback: str) -> str | None:
    """What a GPU tool printed; None (logged, saying what happens instead: ``fallback``) when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("%s failed (%s); %s", tool, exc, fallback)
        return None
    if proc.returncode != 0:
        logger.warning("%s exited %d (%s); %s", tool, proc.returncode,
                       (proc.stderr.strip() or proc.stdout.strip())[:200], fallback)
        return None
    return proc.stdout


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
        if len(self.ids) > 2 and self.ids == _ordinals(len(self.ids)):
            ids = f"0-{len(self.ids) - 1}"
        targets = sorted(set(self.targets))
        extra = f", {'/'.join(targets)}" if targets else ""
        return f"{len(self.ids)} AMD GPU(s) (ids {ids}{extra}) from {self.source}"


#: An entry of a ``*_VISIBLE_DEVICES`` list that names a GPU: an index, or a UUID (``GPU-...``; a MIG
#: instance ``MIG-...``).
_VISIBLE_ENTRY = re.compile(r"[0-9]+|(?:GPU|MIG)-[0-9A-Za-z/._-]+")


def read_hip_visible(value: str) -> list[str]:
    """The ordinals a ``*_VISIBLE_DEVICES`` value lists, as HIP and CUDA read them: up to the first
    entry that is not a non-negative index (``-1`` hides every GPU, and so does Slurm's ``NoDevFiles``)
    or a UUID, which is kept; ``01`` is ``1``. A GPU listed again ends the list too: one GPU is one slot."""
    usable: list[str] = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        if not _VISIBLE_ENTRY.fullmatch(entry):
            break
        entry = str(int(entry)) if entry.isdigit() else entry
        if entry in usable:
            break  # "0,0" is GPU 0 once: two slots would train on one GPU
        usable.append(entry)
    return usable


def _ordinals(n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def count_smi_gpus(tool: str, text: str) -> int:
    """How many GPUs ``amd-smi list --json`` / ``rocm-smi --showid --json`` listed: JSON first
    (amd-smi: a list of ``{"gpu": N, ...}``; rocm-smi: ``{"card0": {...}, ...}``), else the text
    forms (``GPU: 0`` lines of amd-smi, ``GPU[0]`` lines of rocm-smi)."""
    # Warnings may come before the JSON or after it, and may hold brackets themselves ("[WARN] ..."):
    # the first JSON value at a bracket that lists GPUs is the answer.
    decoder = json.JSONDecoder()
    for start in re.finditer(r"[\[{]", text):
        try:
            payload, _ = decoder.raw_decode(text, start.start())
        except ValueError:
            continue
        count = 0
        if isinstance(payload, list):
            count = sum(1 for item in payload if isinstance(item, dict) and "gpu" in item)
        elif isinstance(payload, dict):
            count = sum(1 for key in payload if re.fullmatch(r"(card|gpu_?)\d+", str(key), flags=re.IGNORECASE))
        if count:
            return count
    pattern = r"^\s*GPU:\s*(\d+)\s*$" if tool == "amd-smi" else r"^\s*GPU\[(\d+)\]"
    return len({m.group(1) for line in text.splitlines() if (m := re.match(pattern, line))})


def _gfx_target(version: int) -> str:
    """KFD's ``gfx_target_version`` (100302) as the target name (``gfx1032``)."""
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def read_kfd_gpus(sysfs_root: Path) -> list[str] | None:
    """The gfx target of each GPU node of the KFD topology, in node order (HIP's order);
    None when there is no topology to read."""
    nodes = Path(sysfs_root) / "class/kfd/kfd/topology/nodes"  # a folder per agent (CPU or GPU) of the KFD driver
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
    hip = env.get(HIP_VISIBLE_DEVICES, "")
    if hip.strip():
        return AmdGpus(tuple(read_hip_visible(hip)), f"{HIP_VISIBLE_DEVICES}={hip.strip()}")
    rocr = env.get(ROCR_VISIBLE_DEVICES)
    if rocr is not None:  # HIP numbers the GPUs ROCR leaves visible from 0
        return AmdGpus(_ordinals(len(read_hip_visible(rocr))), f"{ROCR_VISIBLE_DEVICES}={rocr.strip()}")
    listed_none: list[str] = []
    for tool, args in SMI_TOOLS:
        path = which(tool)
        if path is None:
            continue
        out = _run_tool(tool, [path, *args], timeout_s, "trying the next source of AMD GPUs")
        if out is not None:
            count = count_smi_gpus(tool, out)
            if count:
                return AmdGpus(_ordinals(count), tool)
            # Nothing printed, or a form not read here: the next tool or the topology can still
            # tell (a rig's 8 GPUs must not become CPU workers because one tool said nothing).
            logger.info("%s listed no AMD GPU%s; trying the next source", tool, "" if out.strip() else " (no output)")
            listed_none.append(tool)
    kfd = read_kfd_gpus(sysfs_root)
    if kfd is not None:
        return AmdGpus(_ordinals(len(kfd)), str(sysfs_root / "class/kfd"), tuple(kfd))
    tools = f"{' and '.join(listed_none)} listed none" if listed_none else "no amd-smi or rocm-smi"
    return AmdGpus((), f"none: HIP_VISIBLE_DEVICES and ROCR_VISIBLE_DEVICES unset, {tools}, no /sys/class/kfd")


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
        if spec is None or not spec.submodule_search_locations:
            return None
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except (ImportError, ValueError, OSError):
        return None

    def field(name: str) -> str | None:
        match = re.search(rf"^{name}\s*(?::[^=\n]*)?=\s*['\"]([^'\"]*)['\"]", text, flags=re.MULTILINE)
        return match.group(1) if match else None

    return TorchBuild(field("__version__") or "?", field("cuda"), field("hip"))


#: The most CPU workers (--cpu-workers): past the cores of the largest hosts (a few hundred), so only a count
#: no host could start (10**18 hung building its slots) is refused; more than this host's cores is a warning.
MAX_CPU_WORKERS = 1024


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
    nvidia = [g for g in gpus if not g.startswith(ROCM_PREFIX)]
    amd = [g[len(ROCM_PREFIX):] for g in gpus if g.startswith(ROCM_PREFIX)]
    # A GPU the environment hides (a scheduler's CUDA_VISIBLE_DEVICES=0,1) is not this run's: pinning a
    # worker to it would train on another job's GPU (the tree models' device_for_gpus refuses it too).
    if nvidia and "CUDA_VISIBLE_DEVICES" in os.environ:
        _refuse_hidden(nvidia, detect_nvidia(), "NVIDIA", f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    hiding = HIP_VISIBLE_DEVICES if os.environ.get(HIP_VISIBLE_DEVICES, "").strip() else ROCR_VISIBLE_DEVICES
    if amd and hiding in os.environ:
        _refuse_hidden(amd, list(detect_amd().ids), "AMD", f"{hiding}={os.environ[hiding]!r}", prefix=ROCM_PREFIX)
    return nvidia, amd


def _refuse_hidden(asked: list[str], visible: list[str], kind: str, where: str, prefix: str = "") -> None:
    hidden = [g for g in asked if g not in visible]
    if hidden:
        raise UsageError(
            f"--gpus names {kind} GPU(s) {', '.join(prefix + g for g in hidden)}, but {where} hides them "
            f"(visible: {', '.join(prefix + g for g in visible) or 'none'}); name a visible GPU, or use --gpus none"
        )


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
    if cpu_workers is not None and cpu_workers > MAX_CPU_WORKERS:
        raise UsageError(f"--cpu-workers must be <= {MAX_CPU_WORKERS}, got {cpu_workers}")
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
        if cpu_workers is not None:  # a flag is never silently ignored
            logger.warning("--cpu-workers %d does not apply: %d GPU slot(s) are planned (%s), one worker each; "
                           "--gpus none trains on %d CPU worker(s)", cpu_workers, len(slots),
                           ", ".join(s.label for s in slots), cpu_workers)
    else:
        n = cpu_workers if cpu_workers is not None else default_cpu_workers(cores)
        if n > cores:
            logger.warning("--cpu-workers %d on %d core(s): the workers take turns on the cores (one thread each), "
                           "so a job waits for its turn; %d is this host's default", n, cores,
                           default_cpu_workers(cores))
        threads = max(1, cores // n)
        slots = [DeviceSlot.cpu(i, threads) for i in range(n)]
    return [replace(s, device_env=env) for s in slots]
