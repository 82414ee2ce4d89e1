"""Step 6's loader on a real tree-model run (in-process, no torch needed), and its refusals."""
from __future__ import annotations

import json
from pathlib import Path
import os
import stat
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
        survivors=survivors, lottery_data=history, model_type="lightgbm", trials=2, k_folds=2, cv_repeats=1,
        output_dir=out, policy_path=None, seed=3, gpus=[], command_line=["test"],
    )
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    return outcome, out


def test_tree_run_sidecar_and_round_trip(lightgbm_run, sample_inputs):
    outcome, out = lightgbm_run
    survivors, _ = sample_inputs
    assert outcome.status == "SUCCESS"
    assert outcome.sidecar["execution"]["mode"] == "inline"
    # The committed set's file, by an absolute path: the existing Step 6 opens it as written.
    ckpt = Path(outcome.sidecar["checkpoint_path"])
    assert ckpt.is_absolute() and ckpt.name == "best_model.txt" and ckpt.parent.parent.name == ".model_sets"
    assert ckpt.samefile(out / "best_model.txt")
    assert outcome.test_r2 > 0.2
    umask = os.umask(0)
    os.umask(umask)
    for name in ("best_model.txt", artifacts.SIDECAR_NAME, artifacts.HISTORY_PNG_NAME):  # not mkstemp's 0600
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name

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
    degenerate.update(outcome="DEGENERATE_SIGNAL", checkpoint_path=None, checkpoint_format=None, checkpoint_sha256=None)
    degenerate["signal_quality"].update(prediction_allowed=False, signal_status="degenerate", quality="degenerate",
                                        confidence=0.0)
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


def _plain_copy(out, dest):
    """The model set ``out`` shows, as plain files in ``dest`` (what `cp -rL` would give)."""
    import shutil

    dest.mkdir()
    for name in (artifacts.SIDECAR_NAME, "best_model.txt"):
        shutil.copyfile(out / name, dest / name)
    return dest


def test_a_checkpoint_that_is_not_the_sidecars_is_refused(lightgbm_run, tmp_path):
    _, out = lightgbm_run
    other = _plain_copy(out, tmp_path / "other")
    # another run's checkpoint beside this sidecar: same features, so only the hash can tell
    with open(other / "best_model.txt", "a") as fh:
        fh.write("\n")
    with pytest.raises(DataError, match="does not match its sidecar"):
        load_predictor(other)
    # and the sidecar must record a hash at all
    sidecar = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    sidecar["checkpoint_sha256"] = None
    (other / artifacts.SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(DataError, match="checkpoint_sha256"):
        load_predictor(other)


def test_dataframes_are_matched_by_column_name_and_arrays_by_exact_width(lightgbm_run, sample_inputs):
    pd = pytest.importorskip("pandas")
    _, out = lightgbm_run
    survivors, _ = sample_inputs
    predictor = load_predictor(out)
    names = predictor.feature_names
    records = json.loads(survivors.read_text())[:20]
    X = np.array([[r["features"].get(k, 0.0) for k in names] for r in records], dtype=np.float32)
    expected = predictor.predict(X)

    df = pd.DataFrame(X, columns=names)
    reversed_df = df[list(reversed(names))].assign(unrelated=1.0)  # any order, extra columns ignored
    np.testing.assert_array_equal(predictor.predict(reversed_df), expected)
    with pytest.raises(ValueError, match=f"lacks 2 of the model's {len(names)} feature columns: .*{names[0]!r}"):
        predictor.predict(df.drop(columns=names[:2]))
    for width in (len(names) - 1, len(names) + 1):
        with pytest.raises(ValueError, match=f"must have shape \\(n, {len(names)}\\)"):
            predictor.predict(np.zeros((3, width)))


def test_survivors_missing_too_many_feature_cells_are_refused_naming_the_keys(lightgbm_run, sample_inputs, tmp_path,
                                                                             repo_root):
    _, out = lightgbm_run
    survivors, _ = sample_inputs
    predictor = load_predictor(out)
    dropped = predictor.feature_names[:2]
    records = json.loads(survivors.read_text())
    for r in records:  # upstream renamed two features: every record lacks them
        for k in dropped:
            r["features"].pop(k, None)
    with pytest.raises(DataError, match=f"more than --max-missing-fraction 0.01 allows.*{dropped[0]!r}"):
        predictor.predict_records(records)
    assert predictor.predict_records(records, max_missing_fraction=1.0).shape == (len(records),)

    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(records))
    cmd = [sys.executable, "-m", "step5.predictor", "--model-dir", str(out), "--survivors", str(path)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{dropped[0]!r} (missing in {len(records)} of {len(records)})" in proc.stderr
    proc = subprocess.run([*cmd, "--max-missing-fraction", "1"], cwd=repo_root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_model_no_better_than_the_mean_is_flagged_and_warned_about(tmp_path, caplog):
    rng = np.random.default_rng(0)
    records = [{"seed": i, "features": {f"f{j}": float(rng.normal()) for j in range(4)},
                "holdout_quality": float(rng.normal())} for i in range(10)]
    survivors = tmp_path / "tiny.json"
    survivors.write_text(json.dumps(records))
    history = tmp_path / "history.json"
    history.write_text(json.dumps(list(range(50))))
    cfg = OptimizerConfig(
        survivors=survivors, lottery_data=history, model_type="lightgbm", trials=2, k_folds=2, cv_repeats=1,
        output_dir=tmp_path / "out", policy_path=None, seed=3, gpus=[], command_line=["test"],
    )
    with caplog.at_level("WARNING"):
        outcome = AntiOverfitMetaOptimizer(cfg).run()
    metrics = outcome.sidecar["training_metrics"]
    assert metrics["test_r2"] <= 0 and metrics["beats_mean"] is False
    assert "no better than predicting the mean" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="step5.predictor"):
        load_predictor(cfg.output_dir)
    assert "no better than predicting the mean" in caplog.text


def test_cli_output_dash_is_stdout_a_new_folder_is_made_and_an_unwritable_path_is_one_line(lightgbm_run, sample_inputs,
                                                                                           tmp_path, capsys,
                                                                                           monkeypatch):
    import logging

    from step5.predictor import main

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    args = ["--model-dir", str(out), "--survivors", str(survivors), "--log-level", "WARNING"]
    monkeypatch.chdir(tmp_path)
    # main() sets up logging once per process: its handler must write to this test's stderr,
    # not to a stream an earlier test in this worker captured and closed.
    monkeypatch.setattr(logging.root, "handlers", [])
    assert main([*args, "--output", "-"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 600 and not (tmp_path / "-").exists()
    assert main([*args, "--output", "new/folder/p.json"]) == 0
    assert len(json.loads((tmp_path / "new/folder/p.json").read_text())) == 600
    (tmp_path / "taken").mkdir()
    assert main([*args, "--output", "taken"]) == 1  # was an IsADirectoryError traceback
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: cannot write the predictions to taken: Is a directory"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "taken"]  # no temp file left


def test_cli_ctrl_c_is_one_line_and_exit_130(lightgbm_run, sample_inputs, tmp_path, capsys, monkeypatch):
    import logging

    from step5 import predictor

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    monkeypatch.setattr("step5.data.survivors.load_features", pressed)  # what main() imports
    monkeypatch.setattr(logging.root, "handlers", [])  # main()'s logging on this test's stderr
    rc = predictor.main(["--model-dir", str(out), "--survivors", str(survivors), "--output", str(tmp_path / "p.json")])
    assert rc == 130 and not (tmp_path / "p.json").exists()
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted (Ctrl-C); no predictions written"


def test_cli_writes_seeds_orjson_cannot_as_the_survivors_file_had_them(lightgbm_run, sample_inputs, tmp_path,
                                                                         capsys, monkeypatch):
    """An int seed beyond 64 bits or a string seed with a lone surrogate escape is read fine, but
    orjson cannot write it: that was a TypeError traceback and no predictions."""
    import logging

    from step5.predictor import main

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    records = json.loads(survivors.read_text())[:30]
    records[3]["seed"] = 2**64  # one past what orjson writes
    records[17]["seed"] = "lcg-\ud800"  # json.dumps writes it as an escape
    records[20]["seed"] = [2**70, "x"]
    path = tmp_path / "survivors.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr(logging.root, "handlers", [])  # main()'s logging on this test's stderr
    args = ["--model-dir", str(out), "--survivors", str(path), "--log-level", "WARNING"]
    assert main([*args, "--output", str(tmp_path / "p.json")]) == 0
    assert main([*args, "--output", "-"]) == 0
    for text in ((tmp_path / "p.json").read_text(), capsys.readouterr().out):
        rows = json.loads(text)
        assert [r["seed"] for r in rows] == [r["seed"] for r in records]


def test_cli_writes_into_a_pipe_given_as_output_and_leaves_it_a_pipe(lightgbm_run, sample_inputs, tmp_path):
    # `--output /dev/null` (or /dev/stdout, a FIFO): the atomic rename replaced the device with a
    # regular file, which as root broke /dev/null for the whole machine. A FIFO stands in for it.
    import threading

    from step5.predictor import main

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    fifo = tmp_path / "predictions.fifo"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR)  # a writer, so the reader's open never blocks; closed: the reader's EOF
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as fh:
            got.append(fh.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = main(["--model-dir", str(out), "--survivors", str(survivors), "--output", str(fifo)])
    finally:
        os.close(keep)
    reader.join(timeout=60)
    assert code == 0
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the pipe, not a file put in its place
    rows = json.loads(got[0])
    assert len(rows) == len(json.loads(survivors.read_text())) and set(rows[0]) == {"seed", "prediction"}


@pytest.mark.parametrize("given", ["sidecar link", "checkpoint in the set", "picture link", "new file in the set",
                                   "study database", "commit lock"])
def test_cli_refuses_an_output_that_is_the_models_own_file_or_in_its_committed_set(lightgbm_run, sample_inputs,
                                                                                   tmp_path, capsys, monkeypatch,
                                                                                   given):
    # `--output <model dir>/best_model.meta.json` replaced the sidecar's link with the predictions (the folder
    # held no model any more), and the checkpoint's path in .model_sets was overwritten in place (its SHA-256
    # no longer the sidecar's); both exit 0
    import logging
    import shutil

    from step5.predictor import main

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    model = tmp_path / "model"
    shutil.copytree(out, model, symlinks=True)
    target = {"sidecar link": model / artifacts.SIDECAR_NAME,
              "checkpoint in the set": model / ".model_sets" / "current" / "best_model.txt",
              "picture link": model / artifacts.HISTORY_PNG_NAME,
              "new file in the set": model / ".model_sets" / "current" / "preds.json",
              # the run's every trial, replaced by the predictions (exit 0)
              "study database": model / "optuna_step5.db",
              "commit lock": model / ".model_sets" / ".commit.lock"}[given]  # replaced, exit 0
    before = {p.relative_to(model): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
              for p in sorted(model.rglob("*"))}
    monkeypatch.setattr(logging.root, "handlers", [])  # main()'s logging on this test's stderr
    assert main(["--model-dir", str(model), "--survivors", str(survivors), "--output", str(target)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: --output {target} is ") and err.endswith("choose another path")
    assert {p.relative_to(model): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
            for p in sorted(model.rglob("*"))} == before
    load_predictor(model)  # still whole
    # beside the links, in the model dir itself, is fine
    assert main(["--model-dir", str(model), "--survivors", str(survivors), "--output", str(model / "p.json")]) == 0


@pytest.mark.parametrize("given", ["same path", "another path", "symlink to it", "hard link to it"])
def test_cli_refuses_an_output_that_is_the_survivors_file(lightgbm_run, sample_inputs, tmp_path, capsys,
                                                          monkeypatch, given):
    # `--output` equal to `--survivors` (or the same file by another path) replaced the input data with the
    # predictions, atomically, and exit 0
    import logging
    import shutil

    from step5.predictor import main

    _, out = lightgbm_run
    survivors = tmp_path / "s.json"
    shutil.copyfile(sample_inputs[0], survivors)
    (tmp_path / "sub").mkdir()
    output = {"same path": survivors, "another path": tmp_path / "sub" / ".." / "s.json",
              "symlink to it": tmp_path / "link.json", "hard link to it": tmp_path / "hard.json"}[given]
    if given == "symlink to it":
        output.symlink_to(survivors)
    elif given == "hard link to it":
        os.link(survivors, output)
    before = survivors.read_bytes()
    monkeypatch.setattr(logging.root, "handlers", [])  # main()'s logging on this test's stderr
    assert main(["--model-dir", str(out), "--survivors", str(survivors), "--output", str(output)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --output {output} is the --survivors file {survivors}: the predictions would replace the "
        "survivors; choose another path")
    assert survivors.read_bytes() == before and output.read_bytes() == before


def test_cli_names_a_file_where_the_outputs_folder_must_be(lightgbm_run, sample_inputs, tmp_path, capsys,
                                                           monkeypatch):
    import logging

    from step5.predictor import main

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    (tmp_path / "notes").write_text("a file")
    monkeypatch.setattr(logging.root, "handlers", [])  # main()'s logging on this test's stderr
    output = tmp_path / "notes" / "sub" / "p.json"
    assert main(["--model-dir", str(out), "--survivors", str(survivors), "--output", str(output)]) == 1
    # was "... : File exists", from making the folders
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write the predictions to {output}: {tmp_path / 'notes'} is a file, not a folder")


def test_cli_a_stdout_that_cannot_be_written_is_one_line(lightgbm_run, sample_inputs, capsys, monkeypatch):
    # `| head` closing the pipe early, `>/dev/full`: a BrokenPipeError / OSError traceback
    import errno
    import logging

    from step5.predictor import main

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: writing raises BrokenPipeError (SIGPIPE is ignored by Python)

    class ClosedPipe:
        buffer = os.fdopen(write_end, "wb", buffering=0)

        def fileno(self) -> int:
            return write_end

        def flush(self) -> None:
            pass

    monkeypatch.setattr(logging.root, "handlers", [])  # main()'s logging on this test's stderr
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["--model-dir", str(out), "--survivors", str(survivors)]) == 1
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: cannot write the predictions to stdout: {os.strerror(errno.EPIPE)}")
        ClosedPipe.buffer.write(b"x")  # now pointed at /dev/null: Python's flush at exit cannot fail again
    finally:
        ClosedPipe.buffer.close()


def test_a_prediction_that_overflows_is_an_error_naming_the_record_not_a_null(tmp_path):
    # Finite float32 features (3e38) overflow a net's activations: the CLI wrote "prediction": null, exit 0
    import torch

    from step5.nn.checkpoint import Checkpoint, load_checkpoint
    from step5.nn.model import ReferenceMLP
    from step5.predictor import Predictor

    names = ["a", "b", "c"]
    module = ReferenceMLP(3, [4], use_leaky_relu=True, dropout=0.0).eval()
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # large inputs overflow the first layer to inf; inf - inf in the last is nan
        linears[0].weight.fill_(1.0)
        linears[-1].weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0]]))
    path = Checkpoint(module.state_dict(), 3, (4,), True, 0.0, np.zeros(3), np.ones(3), 0.0, 1.0,
                      feature_names=names).save(tmp_path / "best_model.pth")
    predictor = Predictor(sidecar={"model_type": "neural_net", "feature_schema": {"feature_names": names}},
                          sidecar_path=tmp_path / artifacts.SIDECAR_NAME, checkpoint_path=path,
                          model=load_checkpoint(path))
    ordinary = {"a": 0.5, "b": 0.1, "c": 0.2}
    assert np.isfinite(predictor.predict_records([{"seed": 1, "features": ordinary}])).all()
    records = [{"seed": 1, "features": ordinary}, {"seed": 77, "features": dict.fromkeys(names, 3e38)}]
    with pytest.raises(DataError, match=r"survivors <records>: record 1 \[seed 77\]: the model predicted nan "
                                        r"\(1 of 2 non-finite\)"):
        predictor.predict_records(records)
    with pytest.raises(DataError, match=r"^row 1: the model predicted nan \(1 of 2 non-finite\)"):
        predictor.predict(np.array([[0.5, 0.1, 0.2], [3e38, 3e38, 3e38]], dtype=np.float32))


def test_a_model_set_replaced_twice_while_loading_is_loaded_again_from_the_link(lightgbm_run, sample_inputs,
                                                                                tmp_path, monkeypatch):
    # Each commit keeps only the set before it: two commits during a load removed the set the load had
    # resolved, and it failed with "... names checkpoint ..., which does not exist" (or a raw
    # FileNotFoundError from the checksum) though the folder held a whole model all along
    import shutil

    from step5 import model_set, predictor

    _, out = lightgbm_run
    survivors, _ = sample_inputs
    model = tmp_path / "model"
    shutil.copytree(out, model, symlinks=True)
    files = {n: tmp_path / "files" / n for n in model_set.current_files(model)}
    shutil.copytree(model_set.current_dir(model), tmp_path / "files")
    real_read = predictor.read_sidecar
    commits = []

    def read_then_two_commits(path):
        sidecar = real_read(path)
        if not commits:
            for _ in range(2):
                with model_set.stage(model) as staged:
                    model_set.copy_files(staged, files)
                    commits.append(staged.commit())
        return sidecar

    monkeypatch.setattr(predictor, "read_sidecar", read_then_two_commits)
    loaded = load_predictor(model)
    assert loaded.sidecar_path.parent == commits[-1]
    np.testing.assert_array_equal(loaded.predict_file(survivors), load_predictor(out).predict_file(survivors))


def test_a_checkpoint_the_user_cannot_read_is_a_data_error_naming_it(lightgbm_run, monkeypatch):
    # a model dir shared with Step 6's group without read permission on the checkpoint: the checksum's
    # PermissionError was a traceback
    from step5 import predictor

    _, out = lightgbm_run

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(predictor, "file_sha256", refused)
    with pytest.raises(DataError, match=r"cannot read checkpoint .*best_model\.txt: permission denied"):
        load_predictor(out)
