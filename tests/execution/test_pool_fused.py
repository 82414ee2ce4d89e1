"""WorkerPool.run with groups of several jobs: one `train_folds` request per group, on one worker.

Every job comes back as its result or its JobError, in place. What did not come out of a
pass (a group whose pass could not run: a worker fault, a fallen-back slot; a job that
failed inside a pass) is re-run unfused on the same slot, so the caller gets the unfused
outcomes.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from step5.errors import JobError
from step5.protocol import NNParams, TrainRequest
from step5.testing import fake_pool, run_each, summary_of
from step5.testing.fake_worker import fake_metrics

METRICS = ("r2", "val_mse", "train_mse", "trial_number", "fold_idx", "job_id")


def group(data_file: Path | str, trial: int, n: int = 3) -> list[TrainRequest]:
    return [TrainRequest(str(data_file), NNParams(epochs=4), trial_number=trial, fold_idx=i, seed=trial,
                         job_id=f"t{trial}-f{i}") for i in range(n)]


def expected(groups: list[list[TrainRequest]]) -> list[list[dict]]:
    return [[{k: fake_metrics(r)[k] for k in METRICS} for r in g] for g in groups]


def metrics(results: list[list[dict]]) -> list[list[dict]]:
    return [[{k: r[k] for k in METRICS} for r in g] for g in results]


def test_each_group_runs_on_one_worker_concurrently(data_file):
    groups = [group(data_file, 0), group(data_file, 1)]
    with fake_pool(2, "--job-s", "0.2") as pool:
        results = pool.run(groups)
        summary = summary_of(pool)
    assert metrics(results) == expected(groups)
    pids = [{r["worker_pid"] for r in g} for g in results]
    assert all(len(p) == 1 for p in pids)  # a group stays on one worker
    assert pids[0] != pids[1]  # the two groups ran on the two workers
    assert summary["timings"]["jobs"] == 6 and summary["faults"] == []
    assert summary["fusion"] == {"groups": 2, "jobs": 6, "fused_groups": 2, "unfused_groups": 0, "rerun_jobs": 0,
                                 "largest_group": 3}
    # Every fused result carries its share of the pass, so compute time is their sum.
    durations = sum(r["duration"] for g in results for r in g)
    assert summary["timings"]["compute_s"] == pytest.approx(durations, abs=1e-3)


def test_a_failing_fold_is_rerun_alone_and_its_error_comes_back_in_place(data_file, tmp_path):
    bad = group(data_file, 1)
    bad[1] = TrainRequest(str(tmp_path / "gone.npz"), trial_number=1, fold_idx=1, job_id="t1-f1")
    good = group(data_file, 0)
    with fake_pool(2) as pool:
        got_good, got_bad = pool.run([good, bad])
        error = got_bad[1]
        assert isinstance(error, JobError)
        assert error.error_type == "data_error" and error.job_id == "t1-f1" and "gone.npz" in error.message
        assert metrics([got_good, [got_bad[0], got_bad[2]]]) == expected([good, [bad[0], bad[2]]])
        summary = summary_of(pool)
        assert summary["faults"] == []  # a job error is not a worker fault
        assert summary["timings"]["jobs"] == 3 + 2  # each healthy fold trained once, fused
        # Only the failed fold ran again, alone: its unfused run is its verdict.
        assert summary["fusion"] == {"groups": 2, "jobs": 6, "fused_groups": 2, "unfused_groups": 0,
                                     "rerun_jobs": 1, "largest_group": 3}
        with pytest.raises(JobError, match="gone.npz"):  # run_each raises it
            run_each(pool, bad)


def test_a_pass_that_fails_as_a_whole_is_rerun_fold_by_fold(data_file, caplog):
    groups = [group(data_file, 0), group(data_file, 1, n=1)]
    with fake_pool(1, "--fault", "pass_error") as pool:
        results = pool.run(groups)
        summary = summary_of(pool)
    # Alone, each fold trains fine (a one-job group is not a shared pass).
    assert metrics(results) == expected(groups)
    assert summary["faults"] == [] and summary["workers"][0]["restarts"] == 0
    assert summary["timings"]["jobs"] == 4
    # The one-job group is an unfused job and runs fine; the three jobs of the broken pass
    # each ran again alone.
    assert summary["fusion"] == {"groups": 2, "jobs": 4, "fused_groups": 1, "unfused_groups": 0,
                                 "rerun_jobs": 3, "largest_group": 3}
    assert "3 fused job(s) failed" in caplog.text and "the fused pass broke" in caplog.text


def test_worker_crash_during_a_fused_group_restarts_and_reruns_it(data_file, tmp_path):
    groups = [group(data_file, 0, n=4)]
    with fake_pool(1, "--fault", "sigkill", "--after", "2", "--faulty-starts", "1", state_dir=tmp_path) as pool:
        results = pool.run(groups)
        summary = summary_of(pool)
    assert metrics(results) == expected(groups)
    assert summary["workers"][0]["restarts"] == 1
    assert summary["timings"]["jobs"] == 4  # the rerun counted once
    assert [c["status"] for c in summary["faults"]] == ["SIGKILL(-9)"]


def test_fallen_back_slot_runs_groups_through_one_shot_trainers(data_file):
    groups = [group(data_file, 2, n=2)]
    with fake_pool(1, "--boot", "exit", max_worker_restarts=0) as pool:
        assert summary_of(pool)["workers"][0]["fallback"] is True
        results = pool.run(groups)
        assert summary_of(pool)["fusion"]["unfused_groups"] == 1
    assert metrics(results) == expected(groups)
    assert all(r["device"] == "fake-oneshot" for r in results[0])


def test_empty_group_is_rejected(data_file):
    with fake_pool(1) as pool:
        with pytest.raises(ValueError, match="empty group"):
            pool.run([group(data_file, 0), []])
        assert pool.run([]) == []
