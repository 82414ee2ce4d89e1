"""bench.gpu_loop runs end to end (on the CPU: the graph loop uncaptured) and its modes
train the same models; no timing is asserted."""
from __future__ import annotations

import json

from bench.gpu_loop import main, max_rel_diff, report


def test_every_loop_mode_trains_the_same_models_and_the_report_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--trials", "3", "--folds", "2", "--survivors", "160", "--features", "6", "--rounds", "1",
               "--out", str(out), "--data-dir", str(tmp_path / "data")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "metrics within 0.001 relative of host-1: MATCH" in printed
    saved = json.loads((out / "gpu_loop.json").read_text())
    assert [r["mode"] for r in saved["runs"]] == ["host-1", "host-ff", "graph-ff", "graph-ft"]
    assert [r["passes"] for r in saved["runs"]][:3] == [6, 3, 3]
    results = saved["results"]
    # On the CPU the fixed-shape loop is bit-identical to the host loop on the same passes.
    assert max_rel_diff(results["graph-ff"], results["host-ff"]) == (0.0, 0)
    for mode in ("host-ff", "graph-ff", "graph-ft"):
        worst, flips = max_rel_diff(results[mode], results["host-1"])
        assert worst < 1e-6 and flips == 0, mode
    assert (out / "gpu_loop.png").stat().st_size > 0


def test_the_report_judges_the_target_and_flags_a_metric_difference():
    job = {"r2": 0.5, "val_mse": 1.0, "train_r2": 0.6, "train_mse": 0.8, "epochs_run": 10}
    base = {"mode": "host-ff", "loop": "host", "passes": 20, "wall_s": 10.0, "rounds_wall_s": [10.0],
            "results": {"t0-f0": job}}
    fast = dict(base, mode="graph-ff", loop="graph", wall_s=1.5, rounds_wall_s=[1.5],
                results={"t0-f0": dict(job, r2=0.5004, epochs_run=11)})
    table, ok = report([base, fast], rtol=1e-3)
    assert ok and "0.150x" in table and "HOLDS" in table
    table, ok = report([base, dict(fast, wall_s=2.5, rounds_wall_s=[2.5])], rtol=1e-4)
    assert not ok and "MISSED" in table and "DIFFER" in table
    assert "1" in table.splitlines()[2].split()[-1]  # the epoch flip is counted
