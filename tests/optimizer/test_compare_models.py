"""--compare-models with an injected fake optimizer: selection, failures, skips, files."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from step5 import artifacts, model_set
from step5.artifacts import MODEL_TYPES
from step5.data.survivors import load_survivors
from step5.errors import DataError, DegenerateSignalError, Step5Error, StorageError, UsageError
from step5.execution.summary import RunnerStats, build_execution_summary
from step5.optimizer import compare
from step5.optimizer.diagnostics import HEALTH_FILE
from step5.policy import DiagnosticsPolicy
from step5.optimizer.config import OptimizerConfig, RunOutcome
from step5.sidecar import build_data_context, build_sidecar

FEATURES = ["a", "b", "c"]


def make_sidecar(model_type: str, outcome: str, test_r2: float | None, cv: float | None) -> dict:
    """A valid sidecar (artifacts.validate_sidecar passes) for a fake run."""
    success = outcome == "SUCCESS"
    metrics = dict.fromkeys(artifacts.TRAINING_METRIC_KEYS)
    if success:
        metrics.update(cv_r2_mean=cv, cv_r2_std=0.01, train_r2=0.9, val_r2=cv, test_r2=test_r2,
                       train_mse=0.001, val_mse=0.002, test_mse=0.002, overfit_ratio=2.0,
                       beats_mean=artifacts.beats_mean(test_r2))
    return build_sidecar(
        model_type=model_type,
        checkpoint_path=artifacts.checkpoint_filename(model_type) if success else None,
        feature_schema=artifacts.build_feature_schema(FEATURES, ["score"], "survivors.json"),
        signal_quality={"signal_status": "healthy" if success else "degenerate", "prediction_allowed": success,
                        "target_mean": 0.3, "target_std": 0.1 if success else 0.0,
                        "target_variance": 0.01 if success else 0.0, "unique_target_values": 50 if success else 1,
                        "sample_size": 100},
        data_context=build_data_context(
            fingerprint="0123456789abcdef", training_draws=10, holdout_draws=None, survivors_file="survivors.json",
            survivor_count=100, prng_type=None, mod=None, target="holdout_quality", missing_feature_fills=0,
            lottery_data_file="history.json"),
        training_metrics=metrics,
        hyperparameters={"fake": 1} if success else {},
        optuna={"study_name": "s", "storage": None, "trials_run": 2 if success else 0,
                "best_trial_number": 0 if success else None, "best_value": cv},
        execution=build_execution_summary(RunnerStats(mode="inline", devices=["cpu"])).to_dict(),
        provenance={"run_id": "r", "parent_run_id": None, "command_line": [], "created_at": "now", "versions": {}},
        checkpoint_sha256=hashlib.sha256(f"{model_type} model".encode()).hexdigest() if success else None,
    )


class FakeOptimizer:
    """Plays one model type's run from a script: ("ok", test_r2, cv[, cv_rescored]) |
    ("raise", exc) | ("degenerate",) | ("no_checkpoint", test_r2, cv). Records every config
    it was given."""

    script: dict = {}
    configs: list[OptimizerConfig] = []

    def __init__(self, config: OptimizerConfig) -> None:
        FakeOptimizer.configs.append(config)
        self.config = config

    def run(self) -> RunOutcome:
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        mt = cfg.model_type
        kind, *args = self.script[mt]
        if kind == "raise":
            (out / "partial.log").write_text("half a run")
            raise args[0]
        if kind == "degenerate":
            sidecar = make_sidecar(mt, "DEGENERATE_SIGNAL", None, None)
            path = artifacts.write_sidecar(out / artifacts.SIDECAR_NAME, sidecar)
            exc = DegenerateSignalError("target is constant")
            exc.outcome = RunOutcome(mt, "DEGENERATE_SIGNAL", sidecar=sidecar, sidecar_path=path)
            raise exc
        test_r2, cv, rescored = (*args, None) if len(args) == 2 else args
        ckpt = out / artifacts.checkpoint_filename(mt)
        if kind != "no_checkpoint":
            ckpt.write_text(f"{mt} model")
        (out / "best_model.history.png").write_bytes(b"png")
        sidecar = make_sidecar(mt, "SUCCESS", test_r2, cv)
        path = artifacts.write_sidecar(out / artifacts.SIDECAR_NAME, sidecar)
        return RunOutcome(mt, "SUCCESS", sidecar=sidecar, checkpoint_path=ckpt, sidecar_path=path,
                          cv_score=cv, cv_rescored=rescored, test_r2=test_r2, trials_run=cfg.trials, wall_s=0.1)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(FakeOptimizer, "configs", [])
    monkeypatch.setattr(FakeOptimizer, "script", {})
    return FakeOptimizer


@pytest.fixture
def config(tmp_path) -> OptimizerConfig:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"training_diagnostics": {"model_skip_rules": {"max_consecutive_critical": 2}}}))
    return OptimizerConfig(
        survivors=tmp_path / "survivors.json", lottery_data=tmp_path / "history.json",
        compare_models=True, trials=3, k_folds=3, output_dir=tmp_path / "out", seed=7,
        policy_path=policy, diagnostics_dir=tmp_path / "diag", skip_registry=tmp_path / "diag" / "registry.json", persistent_workers=False, cpu_workers=2,
        study_name="mystudy", normalize_features=False, dropout=0.2, gpus=["0"],
    )


def summary_of(config: OptimizerConfig) -> dict:
    return json.loads((config.diagnostics_dir / compare.SUMMARY_NAME).read_text())


def test_the_best_rescored_objective_wins_never_the_test_r2_and_is_left_as_best_model(fake, config):
    # catboost has the best rescored CV objective and the worst test R^2; xgboost has the
    # search's best objective and the best test R^2: the search's maximum only breaks ties,
    # and the test rows only report
    fake.script = {"neural_net": ("ok", 0.30, 0.35, 0.33), "xgboost": ("ok", 0.60, 0.60, 0.40),
                   "lightgbm": ("ok", 0.40, 0.50, 0.48), "catboost": ("ok", 0.10, 0.45, 0.55)}
    assert compare.run_compare(config, optimizer_factory=fake) == 0

    out = config.output_dir
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "best_model.cbm", "best_model.history.png", "best_model.meta.json", compare.LOCK_NAME]
    sidecar = artifacts.read_sidecar(out / artifacts.SIDECAR_NAME)  # still valid
    assert sidecar["model_type"] == "catboost"
    assert artifacts.resolve_checkpoint(out / artifacts.SIDECAR_NAME, sidecar).read_text() == "catboost model"
    block = sidecar["compare_models"]
    assert block["winner"] == "catboost" and block["role"] == "winner"
    assert block["criterion"]["primary"] == "cv_rescored"
    assert block["criterion"]["tie_break"] == ["cv_score", "model_type_order"]
    assert block["candidates"]["catboost"]["test_r2"] == 0.10  # reported as it was
    assert block["candidates"]["catboost"]["cv_rescored"] == 0.55
    assert set(block["candidates"]) == set(MODEL_TYPES)

    # the others are archived, each loadable from its own folder
    for mt in ("neural_net", "xgboost", "lightgbm"):
        folder = out / compare.ARCHIVE_DIRNAME / mt
        archived = artifacts.read_sidecar(folder / artifacts.SIDECAR_NAME)
        assert archived["model_type"] == mt and archived["compare_models"]["role"] == "archived"
        assert artifacts.resolve_checkpoint(folder / artifacts.SIDECAR_NAME, archived).read_text() == f"{mt} model"
    assert not (out / compare.STAGING_DIRNAME).exists()

    summary = summary_of(config)
    assert summary["winner"] == "catboost" and summary["exit_code"] == 0
    assert {mt: m["rank"] for mt, m in summary["models"].items()} == {
        "catboost": 1, "lightgbm": 2, "xgboost": 3, "neural_net": 4}
    for m in summary["models"].values():
        assert m["status"] == "SUCCESS" and m["trials_run"] == 3 and m["wall_s"] >= 0
        assert set(m) >= {"cv_score", "cv_rescored", "test_r2", "wall_s", "trials_run", "status", "error"}
    assert summary["models"]["catboost"]["checkpoint_path"] == str(out / "best_model.cbm")
    assert summary["settings"]["rescore_partitions"] == 3  # the compare default
    png = Path(summary["plot"])
    assert png == config.diagnostics_dir / compare.PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def each_run_writes_its_report(fake, monkeypatch) -> None:
    """Each model type's fake run writes its single health report, as the real optimizer does with diagnostics."""
    from step5.optimizer.diagnostics import model_health_report, write_health_report

    run = FakeOptimizer.run

    def run_and_report(self):
        outcome = run(self)
        write_health_report(self.config.diagnostics_folder, model_health_report(
            self.config.model_type, outcome.sidecar["training_metrics"], DiagnosticsPolicy()),
            model_type=self.config.model_type)
        return outcome

    monkeypatch.setattr(fake, "run", run_and_report)


def test_with_diagnostics_a_compare_run_leaves_its_own_summary_beside_its_own_report(fake, config, monkeypatch):
    """Each model type's run writes its single report, as the real optimizer does (retiring an earlier compare
    run's summary); at the end the summary and training_diagnostics.json both describe this compare run."""
    each_run_writes_its_report(fake, monkeypatch)
    config = dataclasses.replace(config, enable_diagnostics=True)
    config.diagnostics_dir.mkdir()
    earlier = json.dumps({"winner": "neural_net"})
    (config.diagnostics_dir / compare.SUMMARY_NAME).write_text(earlier)
    fake.script = {"neural_net": ("ok", 0.1, 0.1), "xgboost": ("ok", 0.1, 0.2),
                   "lightgbm": ("ok", 0.1, 0.3), "catboost": ("ok", 0.1, 0.9)}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    assert summary_of(config)["winner"] == "catboost"
    report = json.loads((config.diagnostics_dir / HEALTH_FILE).read_text())
    assert report["mode"] == "compare_models" and report["comparison"]["winner"] == "catboost"
    assert [p.read_text() for p in config.diagnostics_dir.glob("compare_models_summary_*.json")] == [earlier]


def test_a_compare_run_without_diagnostics_retires_an_earlier_runs_health_report(fake, config):
    """The pipeline's health check reads the summary's winner as the model of the report beside it: an
    earlier single run's report left there was judged as this run's winner."""
    config.diagnostics_dir.mkdir()
    earlier = json.dumps({"mode": "single", "model_type": "neural_net"})
    (config.diagnostics_dir / HEALTH_FILE).write_text(earlier)
    fake.script = {mt: ("ok", 0.1, 0.1) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    assert not (config.diagnostics_dir / HEALTH_FILE).exists()
    assert [p.read_text() for p in config.diagnostics_dir.glob("training_diagnostics_*.json")] == [earlier]


def test_every_flag_reaches_every_sub_run(fake, config):
    fake.script = {mt: ("ok", 0.1, 0.1) for mt in MODEL_TYPES}
    compare.run_compare(config, optimizer_factory=fake)
    assert [c.model_type for c in fake.configs] == list(MODEL_TYPES)
    changed = {"model_type", "compare_models", "output_dir", "study_name", "storage", "rescore_partitions"}
    for sub in fake.configs:
        for f in dataclasses.fields(OptimizerConfig):
            if f.name not in changed:
                assert getattr(sub, f.name) == getattr(config, f.name), f.name
        assert sub.compare_models is False
        assert sub.study_name == f"mystudy_{sub.model_type}"
        assert sub.output_dir == config.output_dir / compare.STAGING_DIRNAME / sub.model_type
        # one SQLite file for the four studies, where a single run keeps its study
        assert sub.storage == f"sqlite:///{config.output_dir.resolve() / 'optuna_step5.db'}"


def test_an_explicit_storage_and_no_study_name_are_kept(fake, config):
    fake.script = {mt: ("ok", 0.1, 0.1) for mt in MODEL_TYPES}
    config = dataclasses.replace(config, storage="sqlite:////tmp/x.db", study_name=None)
    compare.run_compare(config, optimizer_factory=fake)
    assert {c.storage for c in fake.configs} == {"sqlite:////tmp/x.db"}
    assert {c.study_name for c in fake.configs} == {None}  # the optimizer's per-type default


def test_cv_ties_go_to_the_model_order_never_to_the_test_r2(fake, config):
    fake.script = {"neural_net": ("ok", 0.4, 0.1), "xgboost": ("ok", 0.1, 0.9),
                   "lightgbm": ("ok", 0.8, 0.9), "catboost": ("ok", 0.2, 0.3)}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    assert summary_of(config)["winner"] == "xgboost"  # ties lightgbm on CV, earlier in the order


@pytest.mark.parametrize(("error", "traced"), [(RuntimeError, True), (Step5Error, False)])
def test_a_failing_model_type_is_reported_and_the_others_go_on(fake, config, caplog, error, traced):
    fake.script = {"neural_net": ("raise", error("worker pool exploded")),
                   "xgboost": ("ok", 0.2, 0.2), "lightgbm": ("no_checkpoint", 0.9, 0.9),
                   "catboost": ("ok", 0.1, 0.3)}
    with caplog.at_level("ERROR", logger="step5.optimizer.compare"):
        assert compare.run_compare(config, optimizer_factory=fake) == 0
    summary = summary_of(config)
    assert summary["winner"] == "catboost"
    nn = summary["models"]["neural_net"]
    assert nn["status"] == "FAILED" and nn["error"] == f"{error.__name__}: worker pool exploded"
    assert nn["rank"] is None and nn["checkpoint_path"] is None
    # claimed SUCCESS with the best score, but no checkpoint on disk: cannot win
    lgb = summary["models"]["lightgbm"]
    assert lgb["status"] == "FAILED" and "checkpoint" in lgb["error"]
    (line,) = [r for r in caplog.records if "worker pool exploded" in r.getMessage()]
    assert bool(line.exc_info) is traced  # a Step5Error's message is its report; a bug's is its trace
    # what the failed run left is archived for inspection, not in the output folder
    assert (config.output_dir / compare.ARCHIVE_DIRNAME / "neural_net" / "partial.log").is_file()
    assert artifacts.read_sidecar(config.output_dir / artifacts.SIDECAR_NAME)["model_type"] == "catboost"


def test_all_failed_is_exit_1_and_leaves_the_previous_model_alone(fake, config):
    config.output_dir.mkdir(parents=True)
    (config.output_dir / "best_model.pth").write_text("yesterday's model")
    fake.script = {mt: ("raise", ValueError(f"{mt} broke")) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 1
    summary = summary_of(config)
    assert summary["winner"] is None and summary["exit_code"] == 1
    assert {m["status"] for m in summary["models"].values()} == {"FAILED"}
    assert (config.output_dir / "best_model.pth").read_text() == "yesterday's model"
    assert Path(summary["plot"]).is_file()


def test_degenerate_target_is_exit_2_with_a_degenerate_sidecar_and_no_model(fake, config):
    config.output_dir.mkdir(parents=True)
    (config.output_dir / "best_model.cbm").write_text("stale")
    fake.script = {mt: ("degenerate",) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 2
    sidecar = artifacts.read_sidecar(config.output_dir / artifacts.SIDECAR_NAME)
    assert sidecar["outcome"] == "DEGENERATE_SIGNAL" and sidecar["compare_models"]["winner"] is None
    assert sorted(p.name for p in config.output_dir.iterdir() if p.is_file()) == ["best_model.meta.json",
                                                                                   compare.LOCK_NAME]
    assert {m["status"] for m in summary_of(config)["models"].values()} == {"DEGENERATE_SIGNAL"}


def test_a_new_winner_replaces_a_stale_model_of_another_type(fake, config):
    config.output_dir.mkdir(parents=True)
    (config.output_dir / "best_model.pth").write_text("old nn")
    (config.output_dir / "notes.txt").write_text("the user's file")
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "lightgbm" else 0.1) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    names = sorted(p.name for p in config.output_dir.iterdir() if p.is_file())
    assert names == ["best_model.history.png", "best_model.meta.json", "best_model.txt", compare.LOCK_NAME,
                     "notes.txt"]


def test_registry_skips_are_logged_and_cannot_win(fake, config, caplog):
    from step5.watcher.registry import record_result

    registry = config.skip_registry
    rules = DiagnosticsPolicy(max_consecutive_critical=2)
    for _ in range(2):  # at the policy's limit of 2
        record_result(registry, "xgboost", True, "cv_r2 -0.3 < min 0.0", rules)
    record_result(registry, "catboost", True, "cv_r2 -0.1 < min 0.0", rules)  # under the limit
    fake.script = {mt: ("ok", 0.1, 0.9 if mt == "xgboost" else 0.2) for mt in MODEL_TYPES}
    with caplog.at_level("WARNING", logger="step5.optimizer.compare"):
        assert compare.run_compare(config, optimizer_factory=fake) == 0
    assert "xgboost" not in [c.model_type for c in fake.configs]
    assert "compare: skipping xgboost" in caplog.text
    summary = summary_of(config)
    assert summary["models"]["xgboost"]["status"] == "SKIPPED"
    assert "2 consecutive critical" in summary["models"]["xgboost"]["error"]
    assert summary["models"]["catboost"]["status"] == "SUCCESS"
    assert summary["winner"] != "xgboost"


def test_everything_skipped_is_exit_1(fake, config):
    from step5.watcher.registry import record_result

    for mt in MODEL_TYPES:
        for _ in range(2):
            record_result(config.skip_registry, mt, True, "bad", DiagnosticsPolicy(max_consecutive_critical=2))
    assert compare.run_compare(config, optimizer_factory=fake) == 1
    assert fake.configs == []
    assert {m["status"] for m in summary_of(config)["models"].values()} == {"SKIPPED"}


def test_a_malformed_registry_is_an_error_not_skip_nothing(fake, config):
    config.skip_registry.parent.mkdir(parents=True)
    config.skip_registry.write_text("{not json")
    with pytest.raises(DataError, match="skip registry"):
        compare.run_compare(config, optimizer_factory=fake)
    assert fake.configs == []


def test_a_usage_error_stops_before_any_model_trains(fake, config):
    with pytest.raises(UsageError, match="--k-folds"):
        compare.run_compare(dataclasses.replace(config, k_folds=1), optimizer_factory=fake)
    assert fake.configs == []


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_where_a_model_type_is_staged_stops_before_any_model_trains(fake, config, kind):
    # preflight checks compare_runs itself; a file (or a link) in it under a model type's name made that
    # type's clearing fail with a traceback after the types before it had trained
    staging = config.output_dir / compare.STAGING_DIRNAME / "lightgbm"
    staging.parent.mkdir(parents=True)
    if kind == "file":
        staging.write_text("not a folder")
    else:
        (config.output_dir / "elsewhere").mkdir()
        staging.symlink_to(config.output_dir / "elsewhere")
    fake.script = {mt: ("ok", 0.1, 0.2) for mt in MODEL_TYPES}
    with pytest.raises(Step5Error, match=re.escape(f"{staging} is in the way of the lightgbm run")):
        compare.run_compare(config, optimizer_factory=fake)
    assert fake.configs == []
    assert os.path.lexists(staging)  # the user's, left as it was


def test_a_staging_folder_that_cannot_be_cleared_fails_that_model_type_alone(fake, config):
    class InTheWay(FakeOptimizer):  # neural_net's run leaves a file where lightgbm is staged next
        def run(self) -> RunOutcome:
            outcome = super().run()
            if self.config.model_type == "neural_net":
                (Path(self.config.output_dir).parent / "lightgbm").write_text("in the way")
            return outcome

    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "catboost" else 0.2) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=InTheWay) == 0
    summary = summary_of(config)
    lgb = summary["models"]["lightgbm"]
    assert lgb["status"] == "FAILED" and "cannot clear its staging folder" in lgb["error"]
    assert "compare_runs/lightgbm" in lgb["error"]
    assert summary["winner"] == "catboost"
    assert {m["status"] for t, m in summary["models"].items() if t != "lightgbm"} == {"SUCCESS"}


def test_ctrl_c_is_not_swallowed(fake, config):
    fake.script = {mt: ("raise", KeyboardInterrupt()) for mt in MODEL_TYPES}
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(config, optimizer_factory=fake)
    assert len(fake.configs) == 1


def test_a_rerun_replaces_the_archive(fake, config):
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "catboost" else 0.1) for mt in MODEL_TYPES}
    compare.run_compare(config, optimizer_factory=fake)
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "neural_net" else 0.1) for mt in MODEL_TYPES}
    compare.run_compare(config, optimizer_factory=fake)
    archive = config.output_dir / compare.ARCHIVE_DIRNAME
    assert sorted(p.name for p in archive.iterdir()) == ["catboost", "lightgbm", "xgboost"]
    assert (archive / "catboost" / "best_model.cbm").is_file()
    assert artifacts.read_sidecar(config.output_dir / artifacts.SIDECAR_NAME)["model_type"] == "neural_net"


def test_an_archive_that_is_a_link_to_a_folder_is_refilled_and_stays_a_link(fake, config, tmp_path):
    # compare_archive linked to a bigger disk passes the preflight; clearing it with rmtree raised
    # "Cannot call rmtree on a symbolic link" as a traceback after every model type had trained
    elsewhere = tmp_path / "bigger_disk" / "archive"
    elsewhere.mkdir(parents=True)
    config.output_dir.mkdir(parents=True)
    (config.output_dir / compare.ARCHIVE_DIRNAME).symlink_to(elsewhere)
    for winner in ("catboost", "neural_net"):  # the second run clears the first one's archive
        fake.script = {mt: ("ok", 0.1, 0.5 if mt == winner else 0.1) for mt in MODEL_TYPES}
        assert compare.run_compare(config, optimizer_factory=fake) == 0
    archive = config.output_dir / compare.ARCHIVE_DIRNAME
    assert archive.is_symlink() and archive.resolve() == elsewhere.resolve()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["catboost", "lightgbm", "xgboost"]
    assert artifacts.read_sidecar(archive / "catboost" / artifacts.SIDECAR_NAME)["compare_models"]["winner"] == \
        "neural_net"
    assert artifacts.read_sidecar(config.output_dir / artifacts.SIDECAR_NAME)["model_type"] == "neural_net"


def test_select_winner_ignores_non_success_and_non_finite_scores():
    C = compare.Candidate
    cands = [C("neural_net", "FAILED", test_r2=0.99, cv_score=0.9),
             C("xgboost", "SUCCESS", test_r2=float("nan"), cv_score=0.8),
             C("lightgbm", "DEGENERATE_SIGNAL"), C("catboost", "SUCCESS", test_r2=0.7, cv_score=None),
             C("neural_net", "SUCCESS", test_r2=-0.5, cv_score=-0.2)]
    assert compare.select_winner(cands).model_type == "neural_net"
    assert compare.select_winner(cands[:4]) is None


def test_select_winner_ranks_by_rescored_objective_then_search_objective_then_type_order():
    C = compare.Candidate

    def ranking(cands):
        compare.select_winner(cands)
        return [c.model_type for c in sorted(cands, key=lambda c: c.rank)]

    # the rescored objective decides, whatever the search's maximum says
    assert ranking([C("neural_net", "SUCCESS", test_r2=0.5, cv_score=0.9, cv_rescored=0.3),
                    C("xgboost", "SUCCESS", test_r2=0.1, cv_score=0.4, cv_rescored=0.35)]) == ["xgboost", "neural_net"]
    # a type whose rescore failed (None) ranks after every type with one, even a lower one
    assert ranking([C("neural_net", "SUCCESS", test_r2=0.5, cv_score=0.9, cv_rescored=None),
                    C("xgboost", "SUCCESS", test_r2=0.1, cv_score=0.4, cv_rescored=-0.2)]) == ["xgboost", "neural_net"]
    # equal rescored objectives: the search's objective, then MODEL_TYPES order
    assert ranking([C("lightgbm", "SUCCESS", test_r2=0.5, cv_score=0.5, cv_rescored=0.4),
                    C("xgboost", "SUCCESS", test_r2=0.1, cv_score=0.6, cv_rescored=0.4),
                    C("catboost", "SUCCESS", test_r2=0.1, cv_score=0.6, cv_rescored=0.4)]) == [
        "xgboost", "catboost", "lightgbm"]
    # no rescore anywhere: the search's objective alone
    assert ranking([C("neural_net", "SUCCESS", test_r2=0.5, cv_score=0.2),
                    C("catboost", "SUCCESS", test_r2=0.1, cv_score=0.3)]) == ["catboost", "neural_net"]


def test_every_sub_run_rescores_as_many_partitions_as_asked(fake, config):
    fake.script = {mt: ("ok", 0.1, 0.5) for mt in MODEL_TYPES}
    compare.run_compare(config, optimizer_factory=fake)
    assert [c.rescore_partitions for c in fake.configs] == [3] * len(MODEL_TYPES)  # compare's default
    fake.configs.clear()
    compare.run_compare(dataclasses.replace(config, rescore_partitions=0), optimizer_factory=fake)
    assert [c.rescore_partitions for c in fake.configs] == [0] * len(MODEL_TYPES)


def _tree_of(*folders: Path) -> dict[str, bytes]:
    """Every file and its bytes, but the compare lock, which names the run that holds it."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != compare.LOCK_NAME}


@pytest.mark.parametrize("broken", ["missing survivors", "malformed survivors", "malformed history"])
def test_unreadable_data_stops_before_any_model_type_and_leaves_the_last_comparison_whole(fake, config, sample_inputs,
                                                                                             broken):
    # Each model type used to read the files itself: a bad file failed all four with a traceback each,
    # and the summary of the failures replaced the last good comparison and removed its archive.
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "catboost" else 0.1) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    before = _tree_of(config.output_dir, config.diagnostics_dir)
    assert any(compare.ARCHIVE_DIRNAME in name for name in before)

    survivors, history = sample_inputs
    if broken == "missing survivors":
        survivors, history, named = config.survivors, history, config.survivors.name
    else:
        bad = config.output_dir.parent / "bad.json"
        bad.write_text('{"cut off')
        survivors, history = (bad, history) if broken == "malformed survivors" else (survivors, bad)
        named = "bad.json"
    real = dataclasses.replace(config, survivors=survivors, lottery_data=history)
    with pytest.raises(DataError, match=named):
        compare.run_compare(real)  # the real optimizer: it must not start
    assert _tree_of(config.output_dir, config.diagnostics_dir) == before


def test_every_model_type_is_given_one_read_only_snapshot_of_the_data(fake, config, sample_inputs, monkeypatch):
    from step5.optimizer import optimizer

    reads = []
    monkeypatch.setattr(optimizer, "load_survivors", lambda *a: reads.append(a) or load_survivors(*a))
    given = []

    class Recording(FakeOptimizer):
        def __init__(self, config: OptimizerConfig, *, inputs) -> None:
            super().__init__(config)
            given.append(inputs)

    monkeypatch.setattr(compare, "AntiOverfitMetaOptimizer", Recording)
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "lightgbm" else 0.1) for mt in MODEL_TYPES}
    survivors, history = sample_inputs
    assert compare.run_compare(dataclasses.replace(config, survivors=survivors, lottery_data=history)) == 0
    assert len(reads) == 1 and len(given) == len(MODEL_TYPES) and all(g is given[0] for g in given)
    table = given[0].table
    assert table.n_records == 600 and given[0].draws
    for array in (table.X, table.y):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0


def test_a_database_gone_for_good_stops_the_comparison_and_leaves_the_last_one_whole(fake, config, caplog):
    # Every model type's study is in one database: the next type would wait out the same outage
    # limit (300 s by default) for it, and its failures would replace the last good comparison.
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "catboost" else 0.1) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    before = _tree_of(config.output_dir, config.diagnostics_dir)
    fake.configs.clear()
    fake.script = {mt: ("ok", 0.1, 0.9) for mt in MODEL_TYPES}
    fake.script["xgboost"] = ("raise", StorageError("the study database has been unreachable for too long"))
    with caplog.at_level("ERROR", logger="step5.optimizer.compare"), \
            pytest.raises(StorageError, match="unreachable"):
        compare.run_compare(config, optimizer_factory=fake)
    assert [c.model_type for c in fake.configs] == ["neural_net", "xgboost"]
    assert "compare: stopped at xgboost" in caplog.text
    after = _tree_of(config.output_dir, config.diagnostics_dir)
    assert {k: v for k, v in after.items() if compare.STAGING_DIRNAME not in k} == before


def test_a_summary_that_cannot_be_written_is_one_error_naming_it(fake, config, monkeypatch):
    def full(path, obj, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compare, "write_json_atomic", full)
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "xgboost" else 0.1) for mt in MODEL_TYPES}
    with pytest.raises(Step5Error, match=r"cannot write the compare summary .*compare_models_summary.json: no space "
                                         r"left on the device \(the output dir holds the winner, xgboost\)"):
        compare.run_compare(config, optimizer_factory=fake)
    assert artifacts.read_sidecar(config.output_dir / artifacts.SIDECAR_NAME)["model_type"] == "xgboost"


def test_a_second_compare_run_in_the_same_folder_is_refused_while_the_first_runs(fake, config):
    # Two at once deleted each other's staged runs and archives: seen ending with a sidecar whose
    # checkpoint was gone, an archive of one type out of three, and both runs saying they saved it.
    config.output_dir.mkdir(parents=True)
    with open(config.output_dir / compare.LOCK_NAME, "a+") as first:  # a run that holds the folder
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first.write("pid 4242 on rig-1, since 2026-12-07T05:00:00Z\n")
        first.flush()
        with pytest.raises(Step5Error, match=r"another --compare-models run \(pid 4242 on rig-1, since "
                                             r"2026-12-07T05:00:00Z\) is writing to .*out; wait for it"):
            compare.run_compare(config, optimizer_factory=fake)
        assert fake.configs == [] and not (config.output_dir / compare.STAGING_DIRNAME).exists()
    fake.script = {mt: ("ok", 0.1, 0.1) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 0  # free again once the holder let go
    assert "pid" in (config.output_dir / compare.LOCK_NAME).read_text()


def test_a_folder_that_cannot_be_locked_still_runs_with_a_warning(fake, config, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(compare.fcntl, "flock", no_locks)
    fake.script = {mt: ("ok", 0.1, 0.1) for mt in MODEL_TYPES}
    with caplog.at_level("WARNING", logger="step5.optimizer.compare"):
        assert compare.run_compare(config, optimizer_factory=fake) == 0
    assert "compare: cannot lock" in caplog.text and "would not be stopped" in caplog.text


def test_a_lock_file_the_disk_refuses_to_take_the_holder_costs_only_a_warning(tmp_path, file_size_limit, caplog):
    with caplog.at_level("WARNING", logger="step5.optimizer.compare"), file_size_limit(1):
        with compare.only_compare_run_in(tmp_path / "out"):
            pass
    assert f"compare: cannot record this run in {tmp_path / 'out' / compare.LOCK_NAME} (file too large" in caplog.text


@pytest.mark.parametrize("refused", ["the winner", "an archive"])
def test_a_disk_that_refuses_the_filing_is_one_error_saying_what_the_folder_shows(fake, config, monkeypatch, refused):
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "lightgbm" else 0.1) for mt in MODEL_TYPES}
    compare.run_compare(config, optimizer_factory=fake)  # the comparison the folder shows
    real = artifacts.write_sidecar

    def full(path, sidecar):
        filing = compare.STAGING_DIRNAME not in str(path)  # a sub-run writes its own sidecar in its staging folder
        if filing and (compare.ARCHIVE_DIRNAME in str(path)) == (refused == "an archive"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, sidecar)

    monkeypatch.setattr(artifacts, "write_sidecar", full)
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "xgboost" else 0.1) for mt in MODEL_TYPES}
    with pytest.raises(Step5Error) as caught:
        compare.run_compare(config, optimizer_factory=fake)
    out = config.output_dir
    shows = ("the output dir still shows the model set it showed before" if refused == "the winner"
             else "the output dir holds the winner, xgboost")
    assert re.fullmatch(rf"cannot file this comparison's models in {out}: no space left on the device "
                        rf"\(\S+\.meta\.json\); {shows}; the models not filed are in {out}/compare_runs",
                        str(caught.value)), caught.value
    expected = "lightgbm" if refused == "the winner" else "xgboost"
    assert artifacts.read_sidecar(out / artifacts.SIDECAR_NAME)["model_type"] == expected
    assert not [p for p in out.rglob(f"{model_set.PARTIAL_PREFIX}*")]  # no half-filed set left behind


def test_a_run_stopped_after_promoting_its_winner_leaves_no_summary_naming_an_earlier_one(fake, config, monkeypatch):
    """Ctrl-C between the promotion and the summary once left the earlier run's summary (and picture), naming
    its winner, beside the newly promoted model: the health check would have judged the wrong model type."""
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "catboost" else 0.1) for mt in MODEL_TYPES}
    compare.run_compare(config, optimizer_factory=fake)
    assert summary_of(config)["winner"] == "catboost"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_archive", stopped)
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "neural_net" else 0.1) for mt in MODEL_TYPES}
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(config, optimizer_factory=fake)
    assert artifacts.read_sidecar(config.output_dir / artifacts.SIDECAR_NAME)["model_type"] == "neural_net"
    for name in (compare.SUMMARY_NAME, compare.PLOT_NAME):
        assert not (config.diagnostics_dir / name).exists()
    (kept,) = config.diagnostics_dir.glob("compare_models_summary_*.json")  # the earlier one, renamed
    assert json.loads(kept.read_text())["winner"] == "catboost"


def test_the_summary_records_absolute_paths_for_readers_in_other_directories(fake, config, tmp_path, monkeypatch):
    """A relative --output-dir once gave the summary relative paths: wrong read from any other directory."""
    monkeypatch.chdir(tmp_path)
    config = dataclasses.replace(config, output_dir=Path("out"), diagnostics_dir=Path("diag"),
                                 survivors=Path("survivors.json"))
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "xgboost" else 0.1) for mt in MODEL_TYPES}
    assert compare.run_compare(config, optimizer_factory=fake) == 0
    summary = summary_of(config)
    monkeypatch.chdir("/")
    paths = [summary["output_dir"], summary["plot"], summary["settings"]["survivors"]] + [
        m[key] for m in summary["models"].values() for key in ("checkpoint_path", "sidecar_path")]
    assert all(Path(p).is_absolute() for p in paths), paths
    assert Path(summary["output_dir"]) == tmp_path / "out"
    for m in summary["models"].values():
        assert artifacts.read_sidecar(m["sidecar_path"])["model_type"] in MODEL_TYPES
        assert Path(m["checkpoint_path"]).is_file()
    block = artifacts.read_sidecar(tmp_path / "out" / artifacts.SIDECAR_NAME)["compare_models"]
    assert block["summary_path"] == str(tmp_path / "diag" / compare.SUMMARY_NAME)


def test_a_run_stopped_after_its_summary_leaves_no_other_models_report_beside_it(fake, config, monkeypatch):
    """The compare run's health report came after its summary: a Ctrl-C between them left the summary's winner
    beside the last sub-run's single report, which the health check then judged as the winner's."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    each_run_writes_its_report(fake, monkeypatch)
    monkeypatch.setattr(compare, "write_json_atomic", stopped)  # the summary's write
    config = dataclasses.replace(config, enable_diagnostics=True)
    fake.script = {mt: ("ok", 0.1, 0.5 if mt == "xgboost" else 0.1) for mt in MODEL_TYPES}
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(config, optimizer_factory=fake)
    report = json.loads((config.diagnostics_dir / HEALTH_FILE).read_text())
    assert report["mode"] == "compare_models" and report["comparison"]["winner"] == "xgboost"
