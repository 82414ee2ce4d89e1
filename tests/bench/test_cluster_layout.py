"""The pipeline's layout, small: one command on the coordinator runs a study across
stand-in hosts of a distributed_config.json (a stand-in ssh runs each rig's command here,
each rig finds its AMD GPUs through a stand-in rocm-smi), on one PostgreSQL study.

No rate is asserted (a shared machine makes any figure meaningless; the benchmark prints
it): what is checked is exactly N complete trials, none running, no configuration twice,
each told once, every rig's helper found its GPUs and ended, and, with a helper SIGKILLed,
no trial lost.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster_layout import Layout, format_rows, run_layout

SMALL = Layout(main_gpus=2, rigs=3, rig_gpus=2, trials=30, k_folds=2, job_sleep_s=0.3)


def test_one_command_runs_a_study_across_the_stand_in_hosts(postgres_server, sample_inputs, tmp_path):
    row = run_layout(postgres_server, SMALL, sample_inputs, tmp_path, scenario="steady", timeout_s=300)
    assert all(row["checks"].values()), (row["checks"], row["log"])
    assert row["complete"] == 30 and row["failed"] == 0 and row["processes"] == 4
    log = Path(row["log"]).read_text()
    for rig in ("rig-1", "rig-2", "rig-3"):
        assert f"[{rig}] " in log and f"{rig} " in log.split("helpers: ")[-1]
    assert "found 2 AMD GPU(s) (ids 0,1) from rocm-smi" in log
    assert "every worker and one-shot trainer gets HSA_ENABLE_SDMA=0 HSA_OVERRIDE_GFX_VERSION=10.3.0" in log
    assert "| steady | 8 | 0.3 x 2 | 30 | 30 |" in format_rows([row])


@pytest.mark.slow
def test_a_helper_killed_mid_study_loses_no_trial(postgres_server, sample_inputs, tmp_path):
    layout = Layout(main_gpus=2, rigs=3, rig_gpus=2, trials=45, k_folds=2, job_sleep_s=0.5)
    row = run_layout(postgres_server, layout, sample_inputs, tmp_path, scenario="kill", timeout_s=300)
    assert all(row["checks"].values()), (row["checks"], row["killed"], row["log"])
    assert row["complete"] == 45 and row["failed"] >= 1 and row["killed"].startswith("rig-2")
