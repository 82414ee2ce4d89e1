"""The cluster simulation runs end to end on a tiny workload and its checks hold.

No rate is asserted (a shared machine makes any figure meaningless); what is checked is
that P processes on one PostgreSQL study end with exactly P x m complete trials, none
running, no configuration twice, each told once, and that the report has its columns.
"""
from __future__ import annotations

import argparse

from bench.cluster_sim import format_table, run_one


def test_two_processes_share_one_postgres_study_without_loss_or_duplicates(postgres_server, sample_inputs, tmp_path):
    args = argparse.Namespace(trials_per_process=2, job_sleep_s=0.2, k_folds=2, timeout_s=180)
    rows = [run_one(postgres_server, n, args, sample_inputs, tmp_path) for n in (1, 2)]
    for row in rows:
        assert all(row["checks"].values()), row["checks"]
        assert row["trials_per_s"] > 0 and row["ask_p50_ms"] > 0 and row["tell_p50_ms"] > 0
    table = format_table(rows)
    assert "| 2 | 4 |" in table and "all hold" in table
