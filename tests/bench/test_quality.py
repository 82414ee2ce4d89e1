"""The quality benchmark's pieces: datasets as survivors files, the targets' arithmetic."""
from __future__ import annotations

import numpy as np

from bench import quality
from step5.data.survivors import load_survivors


def test_a_dataset_written_as_survivors_loads_back_row_for_row(tmp_path):
    ds = quality.datasets(200)["diabetes_noise80"]()
    assert ds.X.shape == (442, 10 + quality.NOISE_COLUMNS)
    survivors, history = quality.write_survivors(ds, tmp_path)
    table = load_survivors(survivors)
    assert table.feature_names == [f"x{j:03d}" for j in range(ds.X.shape[1])]
    np.testing.assert_array_equal(table.X, ds.X.astype(np.float32))
    np.testing.assert_allclose(table.y, ds.y)
    assert history.is_file()


def _row(name, nn, cv, baselines, compare=None):
    row = {"dataset": name, "nn": {"test_r2": nn, "cv_r2_mean": cv}, "baselines": dict(zip(quality.BASELINES, baselines))}
    if compare is not None:
        row["compare"] = {"test_r2": compare, "winner": "xgboost"}
    return row


def test_the_targets_are_judged_against_the_best_baseline_of_each_dataset():
    ok = _row("a", 0.46, 0.50, (0.40, 0.50, 0.30, 0.20), compare=0.495)
    text, met = quality.report([ok])
    assert met and "MISSED" not in text and "| 0.040 |" in text  # optimism = CV - test
    _, met = quality.report([ok, _row("b", 0.44, 0.5, (0.40, 0.50, 0.30, 0.20))])  # 0.06 below the best
    assert not met
    text, met = quality.report([_row("c", 0.50, 0.5, (0.50, 0.1, 0.1, 0.1), compare=0.48)])
    assert not met and "compare-models 0.480 >= best baseline 0.500 - 0.01: MISSED" in text


def test_runs_split_by_dataset_join_into_one_report(tmp_path, capsys):
    import json

    for part, names in (("a", ["friedman1", "diabetes_s42"]), ("b", ["diabetes_s1"])):
        (tmp_path / part).mkdir()
        rows = [_row(n, 0.5, 0.5, (0.4, 0.5, 0.3, 0.2), compare=0.5) for n in names]
        (tmp_path / part / "quality.json").write_text(json.dumps({"settings": {"trials": 30}, "rows": rows}))
    assert quality.main(["--report-from", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    table = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "data" not in line]
    assert table == ["| diabetes_s42", "| diabetes_s1", "| friedman1"]  # the benchmark's dataset order
    assert "All targets met: True" in out and (tmp_path / "all" / "quality.png").is_file()
    assert len(json.loads((tmp_path / "all" / "quality.json").read_text())["rows"]) == 3
