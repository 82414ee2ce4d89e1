"""Step 6 round trip for every tree format: a real Step 5 run -> step5.predictor -> the
same predictions as the model that was saved."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from step5 import artifacts
from step5.artifacts import checkpoint_filename
from step5.models import trees


@pytest.fixture(scope="module")
def runs(sample_inputs, tmp_path_factory):
    """One tiny Step 5 run per tree model type (1 trial, 2 folds, single-threaded)."""
    from step5.optimizer.config import OptimizerConfig
    from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

    repo = Path(__file__).resolve().parents[2]
    survivors, history = sample_inputs
    real = trees.train_fold
    out = {}
    # one thread per library on a shared machine (module scope: no monkeypatch fixture)
    trees.train_fold = lambda *a, **k: real(*a, **{**k, "n_threads": 1})
    try:
        for mt in trees.TREE_MODEL_TYPES:
            d = tmp_path_factory.mktemp(mt)
            cfg = OptimizerConfig(survivors=survivors, lottery_data=history, model_type=mt, trials=1, k_folds=2,
                                  cv_repeats=1, output_dir=d, diagnostics_dir=d / "diag",
                                  policy_path=repo / "watcher_policies.json", command_line=["test"])
            out[mt] = AntiOverfitMetaOptimizer(cfg).run()
    finally:
        trees.train_fold = real
    return out


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_predictor_loads_every_tree_format_and_predicts_like_the_saved_model(model_type, runs, sample_inputs):
    from step5.data.survivors import load_survivors
    from step5.predictor import load_predictor

    outcome = runs[model_type]
    out_dir = outcome.sidecar_path.parent
    predictor = load_predictor(out_dir)
    assert predictor.model_type == model_type
    assert predictor.checkpoint_path.name == checkpoint_filename(model_type)
    assert predictor.sidecar["checkpoint_format"] == artifacts.MODEL_REGISTRY[model_type].checkpoint_format

    survivors, _ = sample_inputs
    got = predictor.predict_file(survivors)
    table = load_survivors(survivors)
    assert got.shape == (table.n_records,) and np.isfinite(got).all()
    direct = trees.load_model(out_dir / checkpoint_filename(model_type), model_type).predict(table.X)
    np.testing.assert_allclose(got, direct, rtol=1e-6, atol=1e-9)
    # the model is not a constant and it learned the planted signal
    assert np.corrcoef(got, table.y)[0, 1] > 0.5


def test_predictor_cli_on_a_tree_model(runs, sample_inputs, repo_root, python, tmp_path):
    survivors, _ = sample_inputs
    out_dir = runs["lightgbm"].sidecar_path.parent
    dest = tmp_path / "preds.json"
    proc = subprocess.run(
        [python, "-m", "step5.predictor", "--model-dir", str(out_dir), "--survivors", str(survivors),
         "--output", str(dest)],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(dest.read_text())
    records = json.loads(survivors.read_text())
    assert [r["seed"] for r in rows] == [r["seed"] for r in records]
    assert all(isinstance(r["prediction"], float) for r in rows)


def test_predictor_refuses_a_tree_checkpoint_from_another_schema(runs, tmp_path):
    """A checkpoint whose stored feature names differ from its sidecar's is caught."""
    from step5.errors import DataError
    from step5.predictor import load_predictor

    src = runs["xgboost"].sidecar_path.parent
    for name in (artifacts.SIDECAR_NAME, "best_model.json"):
        shutil.copy(src / name, tmp_path / name)
    sidecar = json.loads((tmp_path / artifacts.SIDECAR_NAME).read_text())
    names = list(reversed(sidecar["feature_schema"]["feature_names"]))
    sidecar["feature_schema"].update(feature_names=names, feature_schema_hash=artifacts.feature_schema_hash(names))
    (tmp_path / artifacts.SIDECAR_NAME).write_text(json.dumps(sidecar))
    model = trees.load_model(tmp_path / "best_model.json", "xgboost")
    assert model.feature_names == list(reversed(names))  # the optimizer stores the names in the checkpoint
    # the same names in another order: the message named no difference ("in sidecar only: [], in checkpoint only: []")
    with pytest.raises(DataError, match=f"different feature schema.*the same names in another order: position 0 is "
                                        f"'{names[0]}' in the sidecar, '{names[-1]}' in the checkpoint"):
        load_predictor(tmp_path)
