"""Device discovery and slot layout (step5.devices), without a GPU and without torch:
``CUDA_VISIBLE_DEVICES`` read as CUDA reads it, a stand-in ``nvidia-smi`` on ``PATH``
(answering, failing, hanging, absent), the CPU fallback, threads per slot, and the
environment each slot's process is started with."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step5.devices import (
    TORCH_THREADS_ENV,
    DeviceSlot,
    default_cpu_workers,
    detect_gpus,
    parse_gpu_list,
    plan_slots,
)
from step5.errors import UsageError
from step5.lifeline import PARENT_PID_ENV


@pytest.fixture(autouse=True)
def no_host_gpu_variables(monkeypatch):
    """The variables of the host running the suite (a scheduler's CUDA_VISIBLE_DEVICES) do not
    reach these tests: a listed GPU they hide is refused (plan_slots)."""
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` running ``body`` (a shell script) first on ``PATH``, with
    ``CUDA_VISIBLE_DEVICES`` unset so that detection has to ask it."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    folder = tmp_path / "bin"
    folder.mkdir()

    def install(body: str) -> Path:
        script = folder / "nvidia-smi"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
        return script

    return install


# --- --gpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ids", [("0", ["0"]), ("0,1", ["0", "1"]), (" 3 , 1 ", ["3", "1"]), ("10,2", ["10", "2"])])
def test_gpu_list_parses_indices_in_the_order_given(text, ids):
    assert parse_gpu_list(text) == ids


@pytest.mark.parametrize("text", ["", " ", "0,", ",1", "0,,1", "a", "gpu0", "-1", "0;1", "1.5", "0 1",
                                  "\uff10", "\u00b2"])  # non-ASCII digits: not an index CUDA or HIP reads
def test_a_malformed_gpu_list_is_a_usage_error_naming_the_flag_and_value(text):
    with pytest.raises(UsageError, match=r"--gpus must be a comma-separated list of GPU indices") as info:
        parse_gpu_list(text)
    assert repr(text) in str(info.value)


def test_a_gpu_listed_twice_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--gpus lists a GPU twice: '0,1,0'"):
        parse_gpu_list("0,1,0")
    # The same GPU in another spelling: two slots on GPU 1 (CUDA_VISIBLE_DEVICES=01 is GPU 1).
    for text in ("1,01", "rocm:1,rocm:001", "cuda:01,1"):
        with pytest.raises(UsageError, match="--gpus lists a GPU twice"):
            parse_gpu_list(text)
    assert parse_gpu_list("02,rocm:03") == ["2", "rocm:3"]


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("visible, ids", [
    ("0", ["0"]),
    ("1,0", ["1", "0"]),
    (" 2 , 3 ", ["2", "3"]),
    ("", []),  # empty: no GPU
    ("-1", []),  # CUDA's way of saying none
    ("2,-1,3", ["2"]),  # CUDA stops at the first invalid entry
    ("0,,1", ["0", "1"]),
    ("NoDevFiles", []),  # Slurm's value for a job given no GPU: not a GPU named "NoDevFiles"
    ("1,abc,2", ["1"]),  # any entry that is not an index or a UUID ends the list, not only "-1"
    ("0,0", ["0"]),  # one GPU listed twice is one GPU: one slot, not two on the same GPU
    ("01,1", ["1"]),
    ("GPU-8f3a1b2c,MIG-5d6e/1/0", ["GPU-8f3a1b2c", "MIG-5d6e/1/0"]),
])
def test_cuda_visible_devices_wins_and_is_read_as_cuda_reads_it(visible, ids, fake_smi):
    fake_smi("echo 0; echo 1; echo 2; echo 3")  # must not be asked
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": visible}) == ids


def test_detection_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert detect_gpus() == ["5", "6"]


def test_without_cuda_visible_devices_nvidia_smi_is_asked(fake_smi):
    fake_smi('[ "$1" = "--query-gpu=index" ] && [ "$2" = "--format=csv,noheader" ] || exit 9\nprintf "0\\n1\\n\\n"')
    assert detect_gpus({}) == ["0", "1"]


def test_lines_of_nvidia_smi_that_are_not_indices_are_ignored(fake_smi):
    fake_smi('echo "No devices were found"; echo " 4 "')
    assert detect_gpus({}) == ["4"]


def test_no_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: nothing to find
    assert detect_gpus({}) == []


def test_a_failing_nvidia_smi_means_no_gpu_and_says_why(fake_smi, caplog):
    fake_smi('echo "NVIDIA-SMI has failed because it could not communicate with the driver" >&2; exit 9')
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        assert detect_gpus({}) == []
    assert "nvidia-smi exited 9 (NVIDIA-SMI has failed" in caplog.text


def test_a_hanging_nvidia_smi_is_given_up_on(fake_smi, caplog):
    fake_smi("exec sleep 30")  # exec: the timeout's kill reaches the sleeper itself
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        assert detect_gpus({}, nvidia_smi_timeout_s=0.5) == []
    assert time.monotonic() - start < 10
    assert "nvidia-smi failed" in caplog.text and "assuming no GPU" in caplog.text


# --- slot layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (8, 8), (64, 8)])
def test_default_cpu_workers_is_one_per_core_up_to_eight(cores, workers):
    assert default_cpu_workers(cores) == workers


def test_one_slot_per_gpu_pinned_to_it_with_the_cores_shared():
    slots = plan_slots(["0", "3"], None, cpu_count=16)
    assert slots == [DeviceSlot("GPU-0", "cuda", "0", 8), DeviceSlot("GPU-3", "cuda", "3", 8)]


def test_gpu_slots_get_at_least_one_thread_and_ignore_cpu_workers(caplog):
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        slots = plan_slots(["0", "1", "2"], 5, cpu_count=2)
    assert [(s.label, s.torch_threads) for s in slots] == [("GPU-0", 1), ("GPU-1", 1), ("GPU-2", 1)]
    # ... but not silently: the user asked for 5 workers and gets 3.
    assert "--cpu-workers 5 does not apply: 3 GPU slot(s) are planned (GPU-0, GPU-1, GPU-2)" in caplog.text


@pytest.mark.parametrize("cpu_workers, cores, threads", [(1, 8, 8), (3, 8, 2), (4, 2, 1), (2, 7, 3)])
def test_without_gpus_cpu_workers_share_the_cores_and_hide_every_gpu(cpu_workers, cores, threads):
    slots = plan_slots([], cpu_workers, cpu_count=cores)
    assert slots == [DeviceSlot(f"CPU-{i}", "cpu", "", threads) for i in range(cpu_workers)]


def test_more_cpu_workers_than_cores_are_planned_and_warned_about(caplog):
    with caplog.at_level("WARNING", logger="step5.devices"):
        assert len(plan_slots([], 2, cpu_count=2)) == 2
        assert not caplog.records
        assert len(plan_slots([], 8, cpu_count=2)) == 8  # asked for: honoured
    (record,) = caplog.records
    assert record.getMessage().startswith("--cpu-workers 8 on 2 core(s): the workers take turns")
    assert record.getMessage().endswith("2 is this host's default")


def test_without_gpus_or_cpu_workers_the_default_count_is_used():
    assert [s.label for s in plan_slots([], None, cpu_count=3)] == ["CPU-0", "CPU-1", "CPU-2"]
    slots = plan_slots([], None, cpu_count=32)
    assert len(slots) == 8 and {s.torch_threads for s in slots} == {4}


def test_gpus_none_means_detect(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert plan_slots(None, None, cpu_count=4) == [DeviceSlot("GPU-7", "cuda", "7", 4)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [s.kind for s in plan_slots(None, 2, cpu_count=4)] == ["cpu", "cpu"]


@pytest.mark.parametrize("cpu_workers", [0, -2])
def test_fewer_than_one_cpu_worker_is_a_usage_error(cpu_workers):
    with pytest.raises(UsageError, match=f"--cpu-workers must be >= 1, got {cpu_workers}"):
        plan_slots([], cpu_workers, cpu_count=4)


def test_more_cpu_workers_than_any_host_starts_is_a_usage_error(caplog):
    # 10**18 hung building its slots; more workers than cores is only a warning.
    with pytest.raises(UsageError, match="--cpu-workers must be <= 1024, got 1025"):
        plan_slots([], 1025, cpu_count=4)
    assert len(plan_slots([], 1024, cpu_count=4)) == 1024
    assert "--cpu-workers 1024 on 4 core(s)" in caplog.text


# --- a slot's environment --------------------------------------------------------------------


def test_a_gpu_slots_environment_pins_its_gpu_and_its_threads():
    base = {"CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "64", "HOME": "/home/u"}
    env = DeviceSlot("GPU-1", "cuda", "1", 4).environment(base)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env[TORCH_THREADS_ENV] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4"
    assert env[PARENT_PID_ENV] == str(os.getpid())
    assert env["HOME"] == "/home/u"
    assert base == {"CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "64", "HOME": "/home/u"}  # not changed


def test_a_cpu_slots_environment_hides_every_gpu():
    env = DeviceSlot("CPU-0", "cpu", "", 2).environment({"CUDA_VISIBLE_DEVICES": "0"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert detect_gpus(env) == []


def test_a_slot_without_a_thread_count_leaves_torch_its_default():
    env = DeviceSlot("CPU-0", "cpu", "", None).environment({TORCH_THREADS_ENV: "3", "OMP_NUM_THREADS": "3"})
    assert TORCH_THREADS_ENV not in env
    assert env["OMP_NUM_THREADS"] == "3"  # the user's own setting is theirs


def test_a_process_started_with_a_slots_environment_sees_only_its_device_and_can_import_step5(tmp_path):
    env = DeviceSlot("GPU-2", "cuda", "2", 3).environment()
    probe = (
        "import json, os, step5.devices as d; "
        f"print(json.dumps([d.detect_gpus(), os.environ[{TORCH_THREADS_ENV!r}], os.environ[{PARENT_PID_ENV!r}]]))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [["2"], "3", str(os.getpid())]


# --- AMD GPUs and mixed hosts ----------------------------------------------------------------

from step5.devices import SLOT_KINDS, AmdGpus, TorchBuild, cuda_ids, device_env_problem  # noqa: E402

ROCM_BUILD = TorchBuild("2.5.1+rocm6.2", None, "6.2.41133")
CPU_BUILD = TorchBuild("2.13.0+cpu", None, None)


def _plan(gpus, *, nvidia=(), amd=(), build=ROCM_BUILD, cores=16, env=None):
    return plan_slots(gpus, None, cpu_count=cores, device_env=env, detect_nvidia=lambda: list(nvidia),
                      detect_amd=lambda: AmdGpus(tuple(amd), "rocm-smi"), torch_build=lambda: build)


@pytest.mark.parametrize("text, tokens", [
    ("rocm:0,rocm:1", ["rocm:0", "rocm:1"]),
    ("cuda:0,cuda:1", ["0", "1"]),
    ("0,rocm:0", ["0", "rocm:0"]),  # NVIDIA GPU 0 and AMD GPU 0 are different GPUs
    ("ROCm:3", ["rocm:3"]),
    ("all", ["all"]), (" rocm ", ["rocm"]), ("cuda", ["cuda"]),
])
def test_gpu_list_names_amd_gpus_and_whole_kinds(text, tokens):
    assert parse_gpu_list(text) == tokens


@pytest.mark.parametrize("text", ["amd:0", "rocm:", "rocm:-1", "hip:0", "all,0", "rocm,0", "rocm:0;1", "cuda:x"])
def test_malformed_amd_or_kind_lists_are_usage_errors(text):
    with pytest.raises(UsageError, match=r"--gpus must be a comma-separated list of GPU indices"):
        parse_gpu_list(text)


def test_the_same_gpu_twice_through_both_spellings_is_a_usage_error():
    with pytest.raises(UsageError, match="lists a GPU twice"):
        parse_gpu_list("0,cuda:0")


def test_a_rocm_host_gets_one_pinned_slot_per_amd_gpu():
    slots = _plan(None, amd=[str(i) for i in range(8)])
    assert [s.label for s in slots] == [f"ROCm-{i}" for i in range(8)]
    assert {s.kind for s in slots} == {"rocm"} and {s.torch_threads for s in slots} == {2}
    assert [(s.hip_visible_devices, s.cuda_visible_devices) for s in slots] == [(str(i), "") for i in range(8)]


def test_a_host_with_both_kinds_uses_its_nvidia_gpus_unless_asked(caplog):
    with caplog.at_level(logging.INFO, logger="step5.devices"):
        slots = _plan(None, nvidia=["0", "1"], amd=["0"])
    assert [s.label for s in slots] == ["GPU-0", "GPU-1"]
    assert "not used unless asked: --gpus all" in caplog.text
    assert [s.label for s in _plan(["all"], nvidia=["0", "1"], amd=["0"])] == ["GPU-0", "GPU-1", "ROCm-0"]
    assert [s.label for s in _plan(["rocm"], nvidia=["0", "1"], amd=["0"])] == ["ROCm-0"]
    assert [s.label for s in _plan(["cuda"], nvidia=["0", "1"], amd=["0"])] == ["GPU-0", "GPU-1"]
    assert [s.label for s in _plan(["1", "rocm:0"], nvidia=["0", "1"], amd=["0"])] == ["GPU-1", "ROCm-0"]


def test_asking_for_a_kind_the_host_lacks_is_a_usage_error_but_all_falls_back_to_the_cpu(caplog):
    with pytest.raises(UsageError, match="--gpus rocm: no AMD GPU found here"):
        _plan(["rocm"], nvidia=["0"])
    with pytest.raises(UsageError, match="--gpus cuda: no NVIDIA GPU found here"):
        _plan(["cuda"], amd=["0"])
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        assert {s.kind for s in _plan(["all"])} == {"cpu"}
    assert "--gpus all: no GPU found here" in caplog.text


def test_explicit_gpus_and_none_keep_their_meaning():
    assert _plan(["0", "3"], amd=["0"], cores=16) == [DeviceSlot("GPU-0", "cuda", "0", 8), DeviceSlot("GPU-3", "cuda", "3", 8)]
    assert {s.kind for s in _plan([], nvidia=["0"], amd=["0"])} == {"cpu"}


def test_a_listed_gpu_the_environment_hides_is_a_usage_error(monkeypatch):
    # A scheduler's CUDA_VISIBLE_DEVICES=0,1: GPU 3 is another job's, and a worker pinned to it
    # (CUDA_VISIBLE_DEVICES=3) would train there; the tree models refuse it too (device_for_gpus).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UsageError, match=r"--gpus names NVIDIA GPU\(s\) 3, but CUDA_VISIBLE_DEVICES='0,1' hides them"):
        _plan(["0", "3"], nvidia=["0", "1"])
    assert [s.label for s in _plan(["1"], nvidia=["0", "1"])] == ["GPU-1"]
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "2,3")
    with pytest.raises(UsageError, match=r"AMD GPU\(s\) rocm:0, but HIP_VISIBLE_DEVICES='2,3' hides them"):
        _plan(["rocm:0"], amd=["2", "3"])
    assert [s.label for s in _plan(["1", "rocm:3"], nvidia=["0", "1"], amd=["2", "3"])] == ["GPU-1", "ROCm-3"]
    monkeypatch.delenv("HIP_VISIBLE_DEVICES")
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "4,5")  # HIP numbers them 0 and 1
    with pytest.raises(UsageError, match="rocm:2, but ROCR_VISIBLE_DEVICES='4,5' hides them"):
        _plan(["rocm:2"], amd=["0", "1"])
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # nothing hides a GPU: the list is taken as given
    assert [s.label for s in _plan(["3", "rocm:7"])] == ["GPU-3", "ROCm-7"]


def test_amd_slots_under_a_torch_that_is_not_a_rocm_build_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        slots = _plan(None, amd=["0", "1"], build=CPU_BUILD)
    assert [s.kind for s in slots] == ["rocm", "rocm"]  # still what the host has: the workers say what they got
    assert "torch 2.13.0+cpu is not a ROCm build" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        _plan(None, amd=["0"], build=ROCM_BUILD)
        _plan(None, amd=["0"], build=None)  # unknown build: nothing to say
    assert caplog.text == ""


def test_the_installed_torch_build_is_read_without_importing_torch():
    probe = ("import json, sys, step5.devices as d; b = d.installed_torch_build(); "
             "print(json.dumps([b.version, b.hip, 'torch' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    version, hip, imported = json.loads(proc.stdout)
    assert version.startswith("2.") and hip is None and imported is False  # this machine: a CPU build


@pytest.mark.parametrize("slot, cuda, hip", [
    (DeviceSlot.cuda("1", 2), "1", "-1"),
    (DeviceSlot.rocm("3", 2), "", "3"),
    (DeviceSlot.cpu(0, 2), "", "-1"),
])
def test_every_slot_pins_its_own_gpu_and_hides_every_other(slot, cuda, hip):
    env = slot.environment({"CUDA_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "0,1,2,3"})
    assert (env["CUDA_VISIBLE_DEVICES"], env["HIP_VISIBLE_DEVICES"]) == (cuda, hip)
    assert slot.kind in SLOT_KINDS


def test_the_policy_device_environment_reaches_every_slot_and_cannot_undo_the_pins():
    rig = {"HSA_OVERRIDE_GFX_VERSION": "10.3.0", "HSA_ENABLE_SDMA": "0"}
    slots = _plan(None, amd=["0", "1"], env=rig)
    for slot in slots:
        env = slot.environment({"HSA_ENABLE_SDMA": "1", "HOME": "/home/u"})
        assert env["HSA_OVERRIDE_GFX_VERSION"] == "10.3.0" and env["HSA_ENABLE_SDMA"] == "0"  # the policy wins
        assert env["HOME"] == "/home/u" and env["HIP_VISIBLE_DEVICES"] == slot.hip_visible_devices
    assert {s.kind for s in _plan([], env=rig)} == {"cpu"}
    assert all(dict(s.device_env) == rig for s in _plan([], env=rig))  # one-shot CPU trainers get it too


@pytest.mark.parametrize("name, value, why", [
    ("HIP_VISIBLE_DEVICES", "0", "set by Step 5 itself"),
    ("CUDA_VISIBLE_DEVICES", "", "set by Step 5 itself"),
    ("ROCR_VISIBLE_DEVICES", "0", "set by Step 5 itself"),
    ("PYTHONPATH", "/x", "set by Step 5 itself"),
    ("STEP5_TORCH_THREADS", "4", "set by Step 5 itself"),
    ("HSA OVERRIDE", "1", "not an environment variable name"),
    ("9LIVES", "1", "not an environment variable name"),
    ("HSA_ENABLE_SDMA", 0, "must be a string"),
])
def test_device_env_entries_that_would_break_a_worker_are_refused(name, value, why):
    assert why in device_env_problem(name, value)


def test_a_process_started_with_a_rocm_slots_environment_sees_only_its_amd_gpu(tmp_path):
    env = DeviceSlot("ROCm-2", "rocm", "", 3, "2", (("HSA_OVERRIDE_GFX_VERSION", "10.3.0"),)).environment()
    probe = ("import json, os, step5.devices as d; "
             "print(json.dumps([d.detect_gpus(), list(d.detect_amd_gpus().ids), os.environ['HSA_OVERRIDE_GFX_VERSION']]))")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[], ["2"], "10.3.0"]


@pytest.mark.parametrize("gpus, ids", [
    (None, None), ([], []), (["0", "rocm:1"], ["0"]), (["rocm:0"], []), (["all"], None), (["cuda"], None),
    (["rocm"], []),
    (["GPU-8f3a1b2c"], ["GPU-8f3a1b2c"]),  # --device cuda:1 under CUDA_VISIBLE_DEVICES=GPU-...,GPU-8f3a1b2c
])
def test_the_tree_libraries_get_the_nvidia_part_of_gpus(gpus, ids):
    assert cuda_ids(gpus) == ids


def test_device_cuda_n_under_uuid_visible_devices_reaches_the_tree_models(monkeypatch):
    # --device cuda:1 becomes the visible list's second entry; the trees must train there, not on the CPU.
    from step5.models.trees import device_for_gpus
    from step5.optimizer.cli import apply_compatibility_flags

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    args = argparse.Namespace(allow_inline_nn_fallback=False, device=["1"])
    apply_compatibility_flags(args)
    assert device_for_gpus(cuda_ids(args.device)) == "cuda:1"
