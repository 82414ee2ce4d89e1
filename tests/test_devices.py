"""Device discovery and slot layout (step5.devices), without a GPU and without torch:
``CUDA_VISIBLE_DEVICES`` read as CUDA reads it, a stand-in ``nvidia-smi`` on ``PATH``
(answering, failing, hanging, absent), the CPU fallback, threads per slot, and the
environment each slot's process is started with."""
from __future__ import annotations

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


@pytest.mark.parametrize("text", ["", " ", "0,", ",1", "0,,1", "a", "gpu0", "-1", "0;1", "1.5", "0 1"])
def test_a_malformed_gpu_list_is_a_usage_error_naming_the_flag_and_value(text):
    with pytest.raises(UsageError, match=r"--gpus must be a comma-separated list of GPU indices") as info:
        parse_gpu_list(text)
    assert repr(text) in str(info.value)


def test_a_gpu_listed_twice_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--gpus lists a GPU twice: '0,1,0'"):
        parse_gpu_list("0,1,0")


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("visible, ids", [
    ("0", ["0"]),
    ("1,0", ["1", "0"]),
    (" 2 , 3 ", ["2", "3"]),
    ("", []),  # empty: no GPU
    ("-1", []),  # CUDA's way of saying none
    ("2,-1,3", ["2"]),  # CUDA stops at the first invalid entry
    ("0,,1", ["0", "1"]),
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


def test_gpu_slots_get_at_least_one_thread_and_ignore_cpu_workers():
    slots = plan_slots(["0", "1", "2"], 5, cpu_count=2)
    assert [(s.label, s.torch_threads) for s in slots] == [("GPU-0", 1), ("GPU-1", 1), ("GPU-2", 1)]


@pytest.mark.parametrize("cpu_workers, cores, threads", [(1, 8, 8), (3, 8, 2), (4, 2, 1), (2, 7, 3)])
def test_without_gpus_cpu_workers_share_the_cores_and_hide_every_gpu(cpu_workers, cores, threads):
    slots = plan_slots([], cpu_workers, cpu_count=cores)
    assert slots == [DeviceSlot(f"CPU-{i}", "cpu", "", threads) for i in range(cpu_workers)]


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
