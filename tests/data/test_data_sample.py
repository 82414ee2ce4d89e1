"""Sample generator: SPEC-shaped records, a learnable planted signal, a working CLI."""
from __future__ import annotations

import subprocess

import numpy as np
import orjson
import pytest

from step5.data.history import load_history
from step5.data.sample import HISTORY_FILENAME, N_SIGNAL_FEATURES, SURVIVORS_FILENAME, feature_names, write_sample
from step5.data.survivors import LEAKAGE_COLUMNS, load_survivors


def test_records_have_the_spec_shape(sample_inputs):
    survivors_path, history_path = sample_inputs
    records = orjson.loads(survivors_path.read_bytes())
    assert len(records) == 600
    r = records[0]
    assert set(r) == {"seed", "score", "features", "metadata", "holdout_hits", "holdout_quality"}
    assert type(r["seed"]) is int
    assert r["metadata"] == {"prng_type": "java_lcg", "mod": 1000}
    assert {"score", "confidence"} <= set(r["features"])
    assert r["features"]["score"] == r["score"]
    assert 0.0 <= r["holdout_quality"] <= 1.0
    model_keys = set(r["features"]) - set(LEAKAGE_COLUMNS)
    assert len(model_keys) == 24
    assert {"lane_agreement_8", "skip_min", "skip_mean"} <= model_keys
    assert any(k.startswith("residue_mod_16_") for k in model_keys)
    assert len({rec["seed"] for rec in records}) == 600  # seeds are unique
    history = orjson.loads(history_path.read_bytes())
    assert set(history[0]) == {"date", "session", "draw"}
    assert history[0]["date"] == "2024-01-01" and history[1]["session"] == "evening"


def test_a_few_records_lack_a_key(sample_inputs):
    records = orjson.loads(sample_inputs[0].read_bytes())
    sizes = [len(r["features"]) for r in records]
    full = max(sizes)
    short = [i for i, s in enumerate(sizes) if s < full]
    assert len(short) == 3 and all(sizes[i] == full - 1 for i in short)


def test_planted_signal_is_learnable(sample_inputs):
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_val_score

    t = load_survivors(sample_inputs[0])
    ridge = cross_val_score(Ridge(alpha=1.0), t.X, t.y, cv=5, scoring="r2").mean()
    gbm_model = GradientBoostingRegressor(n_estimators=60, max_depth=3, random_state=0)  # single-threaded
    gbm = cross_val_score(gbm_model, t.X, t.y, cv=3).mean()
    assert ridge > 0.2
    assert gbm > 0.3
    # the signal lives in the named carriers; a model without them learns far less
    carriers = [t.feature_names.index(n) for n in feature_names(N_SIGNAL_FEATURES)]
    rest = np.delete(t.X, carriers, axis=1)
    assert cross_val_score(Ridge(), rest, t.y, cv=5).mean() < ridge - 0.2


def test_leakage_keys_track_the_target(sample_inputs):
    records = orjson.loads(sample_inputs[0].read_bytes())
    q = np.array([r["holdout_quality"] for r in records])
    s = np.array([r["features"]["score"] for r in records])
    assert np.corrcoef(q, s)[0, 1] > 0.8  # that is why `score` must never be an input


def test_degenerate_target_is_constant(degenerate_inputs):
    t = load_survivors(degenerate_inputs[0])
    assert np.unique(t.y).tolist() == [0.0]
    assert t.n_features == 12


def test_same_arguments_same_bytes(tmp_path):
    a = write_sample(tmp_path / "a", n_survivors=50, n_features=8, seed=3, n_draws=20)
    b = write_sample(tmp_path / "b", n_survivors=50, n_features=8, seed=3, n_draws=20)
    c = write_sample(tmp_path / "c", n_survivors=50, n_features=8, seed=4, n_draws=20)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    assert a[0].name == SURVIVORS_FILENAME and a[1].name == HISTORY_FILENAME


def test_chunked_writer_yields_one_valid_array(tmp_path, monkeypatch):
    import step5.data.sample as sample

    monkeypatch.setattr(sample, "_CHUNK_RECORDS", 7)  # several chunks, a short last one
    path, _ = write_sample(tmp_path, n_survivors=30, n_features=4, seed=1, n_draws=3)
    records = orjson.loads(path.read_bytes())
    assert len(records) == 30
    assert [len(r["features"]) for r in records].count(5) == 1  # 4 + 2 leakage keys, one dropped


@pytest.mark.parametrize("n_features", [1, 3, 120])
def test_feature_counts_small_and_beyond_the_name_pool(tmp_path, n_features):
    path, _ = write_sample(tmp_path, n_survivors=40, n_features=n_features, seed=2, n_draws=5)
    t = load_survivors(path)
    assert t.n_features == n_features
    assert len(set(feature_names(n_features))) == n_features


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n_survivors": 0}, "n_survivors"), ({"n_features": 0}, "n_features"), ({"n_draws": -1}, "n_draws")],
)
def test_rejects_bad_sizes(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_sample(tmp_path, **kwargs)


def test_cli_writes_loadable_files(tmp_path, python, repo_root):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [python, "-m", "step5.data.sample", "--out", str(out), "--survivors", "300", "--features", "16",
         "--draws", "40", "--seed", "5"],
        cwd=repo_root, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [str(out / SURVIVORS_FILENAME), str(out / HISTORY_FILENAME)]
    t = load_survivors(lines[0])
    assert (t.n_records, t.n_features) == (300, 16)
    assert len(load_history(lines[1])) == 40
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_val_score

    assert cross_val_score(Ridge(), t.X, t.y, cv=5).mean() > 0.2


def test_cli_degenerate_and_usage_error(tmp_path, python, repo_root):
    ok = subprocess.run(
        [python, "-m", "step5.data.sample", "--out", str(tmp_path), "--survivors", "20", "--features", "3",
         "--degenerate"],
        cwd=repo_root, capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert set(load_survivors(tmp_path / SURVIVORS_FILENAME).y) == {0.0}
    for flag, value, expected in (("--survivors", "0", "an integer >= 1"), ("--seed", "-1", "an integer >= 0")):
        bad = subprocess.run(
            [python, "-m", "step5.data.sample", "--out", str(tmp_path), flag, value],
            cwd=repo_root, capture_output=True, text=True, timeout=60,
        )
        # 64 like every command (a negative --seed was numpy's ValueError traceback)
        assert bad.returncode == 64 and f"argument {flag}: expected {expected}, got {value}" in bad.stderr


def test_cli_output_it_cannot_write_is_one_line_and_exit_1(tmp_path, capsys):
    from step5.data.sample import main

    (tmp_path / "a_file").write_text("x")
    assert main(["--out", str(tmp_path / "a_file"), "--survivors", "5", "--log-level", "ERROR"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: cannot write the sample to {tmp_path / 'a_file'}: File exists"]
