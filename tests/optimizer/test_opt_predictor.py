"""Step 6's loader on a real tree-model run (in-process, no torch needed), and its refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from step5 import artifacts
from step5.errors import DataError
from step5.optimizer import AntiOverfitMetaOptimizer, OptimizerConfig
from step5.predictor import PredictionNotAllowed, load_predictor


@pytest.fixture(scope="module")
def lightgbm_run(sample_inputs, tmp_path_factory):
    survivors, history = sample_inputs
    out = tmp_path_factory.mktemp("lgb") / "out"
    cfg = OptimizerConfig(
        survivors=survivors, lottery_data=history, model_type="lightgbm", trials=2, k_folds=2,
        output_dir=out, policy_path=None, seed=3, gpus=[], command_line=["test"],
    )
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    return outcome, out


def test_tree_run_sidecar_and_round_trip(lightgbm_run, sample_inputs):
    outcome, out = lightgbm_run
    survivors, _ = sample_inputs
    assert outcome.status == "SUCCESS"
    assert outcome.sidecar["execution"]["mode"] == "inline"
    assert outcome.sidecar["checkpoint_path"] == "best_model.txt"
    assert outcome.test_r2 > 0.2

    by_dir = load_predictor(out)
    by_sidecar = load_predictor(out / artifacts.SIDECAR_NAME)
    preds = by_dir.predict_file(survivors)
    np.testing.assert_array_equal(preds, by_sidecar.predict_file(survivors))
    records = json.loads(survivors.read_text())
    y = np.array([r["holdout_quality"] for r in records])
    assert preds.shape == y.shape and np.corrcoef(preds, y)[0, 1] > 0.5
    # Records with their keys in any order, extra keys, or a missing key: same column order.
    shuffled = [{**r, "features": dict(list(reversed(list(r["features"].items()))) + [("new_key", 1.0)])} for r in records[:5]]
    np.testing.assert_allclose(by_dir.predict_records(shuffled), preds[:5])


def test_cli_writes_seed_prediction_pairs_to_stdout(lightgbm_run, sample_inputs, repo_root):
    _, out = lightgbm_run
    survivors, _ = sample_inputs
    proc = subprocess.run(
        [sys.executable, "-m", "step5.predictor", "--model-dir", str(out), "--survivors", str(survivors)],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert set(rows[0]) == {"seed", "prediction"}
    assert len(rows) == len(json.loads(survivors.read_text()))


def test_refusals_and_errors(lightgbm_run, tmp_path):
    _, out = lightgbm_run
    with pytest.raises(DataError, match="no Step 5 sidecar"):
        load_predictor(tmp_path)

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "best_model.txt").unlink()
    with pytest.raises(DataError, match="does not exist"):
        load_predictor(broken)

    sidecar = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    del sidecar["feature_schema"]
    (broken / artifacts.SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(DataError, match="missing key `feature_schema`"):
        load_predictor(broken)

    degenerate = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    degenerate.update(outcome="DEGENERATE_SIGNAL", checkpoint_path=None, checkpoint_format=None)
    degenerate["signal_quality"].update(prediction_allowed=False, signal_status="degenerate")
    (broken / artifacts.SIDECAR_NAME).write_text(json.dumps(degenerate))
    with pytest.raises(PredictionNotAllowed, match="prediction is not allowed"):
        load_predictor(broken)


def test_cli_usage_error_exits_64(repo_root):
    proc = subprocess.run([sys.executable, "-m", "step5.predictor", "--survivors", "x.json"],
                          cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "--model-dir" in proc.stderr


def test_cli_reads_what_python_json_writes_and_names_a_non_finite_feature(lightgbm_run, sample_inputs, repo_root,
                                                                          tmp_path):
    """A file from json.dump(indent=2) with NaN tokens: NaN in a key the model does not read
    is fine; NaN in a model feature is exit 1 naming the record, its seed and the key."""
    _, out = lightgbm_run
    survivors, _ = sample_inputs
    records = json.loads(survivors.read_text())
    for r in records[::3]:
        r["features"]["score"] = float("nan")  # leakage: never a model input
    path = tmp_path / "new_survivors.json"
    path.write_text(json.dumps(records, indent=2))

    def run():
        return subprocess.run(
            [sys.executable, "-m", "step5.predictor", "--model-dir", str(out), "--survivors", str(path)],
            cwd=repo_root, capture_output=True, text=True, timeout=120,
        )

    proc = run()
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["seed"] for r in rows] == [r["seed"] for r in records]
    np.testing.assert_allclose([r["prediction"] for r in rows], load_predictor(out).predict_file(survivors))

    key = load_predictor(out).feature_names[0]
    records[7]["features"][key] = float("inf")
    path.write_text(json.dumps(records, indent=2))
    proc = run()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"record 7: feature {key!r} must be a finite number, got inf (float) [seed {records[7]['seed']}]" in proc.stderr
