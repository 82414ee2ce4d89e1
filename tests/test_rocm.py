"""AMD GPU discovery without torch (step5.devices), on a host with no AMD GPU: the variables
read as HIP and ROCr read them, stand-in ``amd-smi`` / ``rocm-smi`` (answering, failing,
hanging, talking text), a fabricated ``/sys/class/kfd`` tree, the order of the sources,
and the log line that names the source used."""
from __future__ import annotations

import logging
import time

import pytest

from step5.devices import AmdGpus, count_smi_gpus, detect_amd_gpus, read_hip_visible, read_kfd_gpus
from step5.testing.standins import write_amd_smi, write_kfd_tree, write_rocm_smi

RX6600 = 100302  # gfx1032


def _which(folder):
    """A tool lookup that finds only what is in ``folder``."""
    def which(name):
        path = folder / name
        return str(path) if path.exists() else None
    return which


@pytest.fixture
def bare(tmp_path):
    """No variables, no tools, an empty sysfs root: nothing to find."""
    (tmp_path / "bin").mkdir()
    return {"env": {}, "which": _which(tmp_path / "bin"), "sysfs_root": tmp_path / "sys"}


# --- variables -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, ids", [
    ("0", ("0",)), ("3,1", ("3", "1")), (" 2 , 5 ", ("2", "5")), ("-1", ()), ("1,-1,2", ("1",)), ("0,,1", ("0", "1")),
    ("NoDevFiles", ()), ("2,2", ("2",)), ("1,gpu3", ("1",)),
])
def test_hip_visible_devices_wins_and_is_read_as_hip_reads_it(value, ids, tmp_path, bare):
    write_rocm_smi(tmp_path / "bin", 8)  # must not be asked
    found = detect_amd_gpus({"HIP_VISIBLE_DEVICES": value, "ROCR_VISIBLE_DEVICES": "0,1,2,3"},
                            which=bare["which"], sysfs_root=bare["sysfs_root"])
    assert found.ids == ids
    assert found.source == f"HIP_VISIBLE_DEVICES={value.strip()}"


def test_an_empty_hip_visible_devices_is_unset_as_hip_reads_it(tmp_path, bare):
    write_rocm_smi(tmp_path / "bin", 2)
    found = detect_amd_gpus({"HIP_VISIBLE_DEVICES": " "}, which=bare["which"], sysfs_root=bare["sysfs_root"])
    assert found == AmdGpus(("0", "1"), "rocm-smi")


@pytest.mark.parametrize("value, ids", [("2,5", ("0", "1")), ("7", ("0",)), ("", ()), ("-1", ()),
                                          ("NoDevFiles", ()), ("4,4", ("0",))])
def test_rocr_visible_devices_gives_hip_ordinals_from_zero(value, ids, bare):
    # ROCr shows only the GPUs it lists and HIP numbers them from 0: a child pinned with
    # HIP_VISIBLE_DEVICES=1 (and the inherited ROCR list) sees physical GPU 5.
    found = detect_amd_gpus({"ROCR_VISIBLE_DEVICES": value}, which=bare["which"], sysfs_root=bare["sysfs_root"])
    assert found.ids == ids and found.source.startswith("ROCR_VISIBLE_DEVICES=")


def test_uuid_entries_are_kept_as_hip_takes_them():
    assert read_hip_visible("GPU-4f3e,1") == ["GPU-4f3e", "1"]


# --- tools -----------------------------------------------------------------------------------


def test_amd_smi_is_asked_first(tmp_path, bare):
    write_amd_smi(tmp_path / "bin", 3)
    write_rocm_smi(tmp_path / "bin", 8)
    assert detect_amd_gpus(**bare) == AmdGpus(("0", "1", "2"), "amd-smi")


def test_rocm_smi_answers_when_there_is_no_amd_smi(tmp_path, bare, caplog):
    write_rocm_smi(tmp_path / "bin", 8)
    with caplog.at_level(logging.INFO, logger="step5.devices"):
        found = detect_amd_gpus(**bare)
    assert found.ids == tuple(str(i) for i in range(8)) and found.source == "rocm-smi"
    assert "found 8 AMD GPU(s) (ids 0-7) from rocm-smi" in caplog.text


def test_a_failing_tool_hands_over_to_the_next_source(tmp_path, bare, caplog):
    write_amd_smi(tmp_path / "bin", 4, exit_code=2)
    write_rocm_smi(tmp_path / "bin", 2)
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        assert detect_amd_gpus(**bare).source == "rocm-smi"
    assert "amd-smi exited 2" in caplog.text


def test_a_hanging_tool_is_given_up_on(tmp_path, bare, caplog):
    hang = tmp_path / "bin" / "rocm-smi"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    write_kfd_tree(bare["sysfs_root"], [RX6600])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="step5.devices"):
        found = detect_amd_gpus(**bare, tool_timeout_s=0.5)
    assert time.monotonic() - start < 10
    assert "rocm-smi failed" in caplog.text and found.source.endswith("class/kfd") and found.ids == ("0",)


def test_a_tool_that_lists_no_gpu_hands_over_to_the_next_source(tmp_path, bare):
    # amd-smi printing nothing (or a form not read here) must not hide rocm-smi's or the kernel's GPUs.
    silent = tmp_path / "bin" / "amd-smi"
    silent.write_text("#!/bin/sh\nexit 0\n")
    silent.chmod(0o755)
    write_rocm_smi(tmp_path / "bin", 2)
    assert detect_amd_gpus(**bare) == AmdGpus(("0", "1"), "rocm-smi")
    (tmp_path / "bin" / "rocm-smi").write_text('#!/bin/sh\necho "{}"\n')
    write_kfd_tree(bare["sysfs_root"], [RX6600] * 8)
    found = detect_amd_gpus(**bare)
    assert found.ids == tuple(str(i) for i in range(8)) and found.source.endswith("class/kfd")
    assert "amd-smi and rocm-smi listed none" in detect_amd_gpus(which=bare["which"], sysfs_root=tmp_path / "x").source


@pytest.mark.parametrize("tool, text, count", [
    ("amd-smi", '[{"gpu": 0, "bdf": "0000:03:00.0"}, {"gpu": 1, "bdf": "0000:04:00.0"}]', 2),
    ("amd-smi", "GPU: 0\n    BDF: 0000:03:00.0\nGPU: 1\n    BDF: 0000:04:00.0\nGPU: 2\n", 3),
    ("rocm-smi", 'WARNING: low power\n{"card0": {"Device ID": "0x73ff"}, "card1": {}, "system": {}}', 2),
    ("rocm-smi", "======= ROCm System Management Interface =======\nGPU[0]\t\t: Device ID: 0x73ff\n"
                 "GPU[0]\t\t: Device Rev: 0xc7\nGPU[1]\t\t: Device ID: 0x73ff\n", 2),
    ("rocm-smi", "", 0),
    # Warnings with brackets before the JSON, or any text after it, leave the GPUs counted.
    ("rocm-smi", '[WARN] fan speed unavailable\n{"card0": {"Device ID": "0x73ff"}, "card1": {}}', 2),
    ("rocm-smi", '{"card0": {}, "card1": {}, "card2": {}}\nWARNING: One or more commands failed.\n', 3),
    ("amd-smi", '[{"gpu": 0}, {"gpu": 1}]\n[AMDSMI] WARNING: could not read the fan\n', 2),
])
def test_tool_outputs_in_json_and_text_forms_are_counted(tool, text, count):
    assert count_smi_gpus(tool, text) == count


# --- the kernel's topology -------------------------------------------------------------------


def test_kfd_gpu_nodes_are_counted_and_cpu_nodes_are_not(bare, caplog):
    write_kfd_tree(bare["sysfs_root"], [RX6600] * 8, cpu_nodes=2)
    with caplog.at_level(logging.INFO, logger="step5.devices"):
        found = detect_amd_gpus(**bare)
    assert found.ids == tuple(str(i) for i in range(8)) and found.targets == ("gfx1032",) * 8
    assert "8 AMD GPU(s) (ids 0-7, gfx1032) from" in caplog.text and "class/kfd" in caplog.text


def test_kfd_targets_are_named_from_their_version(tmp_path):
    write_kfd_tree(tmp_path, [100302, 90010, 110000])
    assert read_kfd_gpus(tmp_path) == ["gfx1032", "gfx90a", "gfx1100"]


def test_nothing_anywhere_means_no_amd_gpu_and_says_what_was_looked_at(bare):
    found = detect_amd_gpus(**bare)
    assert found.ids == () and "no /sys/class/kfd" in found.source
    assert found.describe().startswith("no AMD GPU")
