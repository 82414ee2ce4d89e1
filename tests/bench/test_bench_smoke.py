"""The benchmark runs end to end on a tiny workload and its modes train the same thing.

No timing is asserted: a shared CI machine makes any figure meaningless. What is checked
is that every mode completes, returns one result per job, the metrics match across modes
(the benchmark's own cross-check), the parent never imports torch, and the outputs exist.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
import sys

import pytest

from bench.modes import MODES, ModeRun, median_round
from bench.report import compare_metrics, judge_targets
from bench.workload import params_sequence

ALL_MODES = ",".join(MODES)


def test_params_sequence_is_fixed_and_realistic():
    a, b = params_sequence(20, 42), params_sequence(20, 42)
    assert a == b  # every mode (and every run) trains the same trials
    assert params_sequence(20, 43) != a
    for p in a:
        assert 1 <= len(p.hidden_layers) <= 3 and all(32 <= w <= 128 for w in p.hidden_layers)
        assert 20 <= p.epochs <= 60


def _run(name: str, results: list[dict]) -> ModeRun:
    return ModeRun(name, 1, 1.0, 0.0, results)


def test_metric_check_flags_a_mode_that_trained_something_else():
    ref = [{"job_id": "t0-f0", "r2": 0.5, "val_mse": 1.0, "train_mse": 0.9, "epochs_run": 10}]
    same = [dict(ref[0])]
    off = [dict(ref[0], r2=0.51)]
    ok = compare_metrics([_run("limit1", ref), _run("s96b", same)], rtol=1e-6)
    assert ok["ok"] and ok["max_rel_diff"]["s96b"] == 0.0
    bad = compare_metrics([_run("limit1", ref), _run("s96b", off)], rtol=1e-6)
    assert not bad["ok"] and "s96b t0-f0 r2" in bad["mismatches"][0]
    missing = compare_metrics([_run("limit1", ref), _run("loky", [])], rtol=1e-6)
    assert not missing["ok"] and math.isinf(missing["max_rel_diff"]["loky"])


def test_a_mode_row_is_its_median_round():
    rounds = [ModeRun("s96b", 2, w, 0.0, []) for w in (3.0, 1.0, 2.0)]
    chosen = median_round(rounds)
    assert chosen.wall_s == 2.0
    assert chosen.extra["rounds_wall_s"] == [3.0, 1.0, 2.0]  # in the order they ran


def test_targets_are_judged_only_when_their_modes_ran():
    runs = {n: ModeRun(n, 2, w, 0.0, []) for n, w in (("s96a", 50.0), ("s96b", 5.0), ("limit", 4.0), ("loky", 6.0))}
    runs["limit1"] = ModeRun("limit1", 1, 9.8, 0.0, [])
    verdicts = {t["name"]: t for t in judge_targets(runs)}
    assert verdicts["s96b_speedup_vs_s96a"]["held"] is True  # 10x
    assert verdicts["s96b_vs_ideal"]["value"] == pytest.approx(5.0 / (9.8 / 2))  # 1.02x of limit1 / 2
    assert verdicts["s96b_vs_ideal"]["held"] is True
    assert verdicts["s96b_vs_limit"]["held"] is False  # 1.25x
    assert verdicts["s96b_vs_loky"]["held"] is True
    partial = {t["name"]: t for t in judge_targets({"s96b": runs["s96b"]})}
    assert all(t["held"] is None for t in partial.values())


@pytest.mark.slow
def test_benchmark_runs_every_mode_on_a_tiny_workload(tmp_path, repo_root):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_benchmark", "--trials", "1", "--folds", "2", "--survivors", "200",
         "--features", "12", "--gpus", "none", "--workers", "2", "--modes", ALL_MODES, "--big-survivors", "0",
         "--rounds", "1", "--out", str(out), "--log-level", "WARNING"],
        cwd=repo_root, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in MODES:
        assert name in proc.stdout
    assert "metrics: MATCH" in proc.stdout
    report = json.loads((out / "benchmark.json").read_text())
    assert report["metrics"]["ok"] is True
    assert report["torch_imported_in_parent"] is False
    assert set(report["results"]) == set(MODES)
    for name, results in report["results"].items():
        assert sorted(r["job_id"] for r in results) == ["t0-f0", "t0-f1"], name
    assert {t["name"] for t in report["targets"]} == {"s96b_speedup_vs_s96a", "s96b_vs_ideal", "s96b_vs_limit",
                                                      "s96b_vs_loky"}
    assert all(t["held"] in (True, False) for t in report["targets"])  # judged, whatever the verdict
    assert (out / "benchmark.png").stat().st_size > 0
    assert (out / "benchmark.txt").read_text().strip() in proc.stdout


@pytest.mark.slow
def test_a_one_process_peer_still_trains_in_a_child_process(tmp_path, repo_root):
    """One device means one worker: joblib.Parallel(n_jobs=1) would train in the parent
    (importing torch there); the loky peer must still use a real pool process."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_benchmark", "--trials", "1", "--folds", "2", "--survivors", "200",
         "--features", "12", "--gpus", "none", "--workers", "1", "--modes", "limit1,loky", "--big-survivors", "0",
         "--rounds", "1", "--out", str(out), "--log-level", "WARNING"],
        cwd=repo_root, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["torch_imported_in_parent"] is False
    assert report["metrics"]["ok"] is True


def test_unknown_mode_is_a_usage_error(repo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_benchmark", "--modes", "s96b,warp-drive"],
        cwd=repo_root, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2  # argparse's usage-error status
    assert "warp-drive" in proc.stderr


def test_one_process_rows_are_measured_against_whichever_one_process_limit_ran():
    # On one GPU every mode has one process: `limit` is then the one-process limit too.
    from bench.report import mode_row

    runs = {n: ModeRun(n, 1, w, 0.0, []) for n, w in (("limit", 4.0), ("s96b", 5.0), ("s96b-ff", 1.0))}
    assert mode_row(runs["s96b"], runs)["x_limit"] == pytest.approx(1.25)
    assert mode_row(runs["s96b-ff"], runs)["x_limit"] == pytest.approx(0.25)
    two = {"limit1": ModeRun("limit1", 1, 4.0, 0.0, []), "s96b": ModeRun("s96b", 2, 5.0, 0.0, [])}
    assert mode_row(two["s96b"], two)["x_limit"] is None  # no two-process limit ran


def test_datapath_benchmark_runs_every_reader_side_by_side(tmp_path, repo_root, python):
    """The data-path benchmark on a tiny file: every reader measured in its own process,
    the same record count, memory read from /proc, the four targets judged. No timing asserted."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [python, "-m", "bench.datapath", "--records", "300", "--features", "12", "--rounds", "1", "--out", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "datapath.json").read_text())
    assert list(data["kinds"]) == ["json_load", "load_survivors", "predictor_reader"]
    assert {v["records"] for v in data["kinds"].values()} == {300}
    assert all(v["seconds"] > 0 and v["peak_mib"] >= 0 for v in data["kinds"].values())
    assert len(data["targets"]) == 4
    text = (out / "datapath.txt").read_text()
    assert text == proc.stdout
    assert "json.dump indent=2" in text and text.count("HOLDS") + text.count("MISSED") == 4
    first = (Path(data["path"])).read_text()[:20]
    assert first.startswith("[\n  {\n    \"seed\"")  # written by json.dump(..., indent=2)
