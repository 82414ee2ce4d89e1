"""``AntiOverfitMetaOptimizer``: one Step 5 run for one model type, data to sidecar
(the flow: docs/optimizer-internals.md#optimizer). The parent never imports torch."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from step5 import artifacts, model_set
from step5.artifacts import get_model_type
from step5.data.history import load_history
from step5.data.splits import FoldFiles, dev_rows, holdout_split, kfold_splits, renumbered, row_groups, rows_of
from step5.data.survivors import SurvivorTable, load_survivors
from step5.cluster import (
    ClusterNode, HelperFleet, helper_arguments, load_cluster_config, split_local, storage_warnings,
)
from step5.devices import cuda_ids, plan_slots
from step5.errors import DataError, DegenerateSignalError, JobError, Step5Error, StorageError
from step5.execution.pool import WorkerPool
from step5.execution.summary import ExecutionSummary, SearchRecord, build_execution_summary
from step5.interrupts import raise_if_interrupted
from step5.policy import Policy, load_policy
from step5.sidecar import build_data_context, build_provenance, build_sidecar, build_training_metrics
from step5.signal_quality import assess_signal
from step5.values import finite_or_none, utc_timestamp
from step5.optimizer.config import (
    DEFAULT_MOD, DEFAULT_PRNG_TYPE, OptimizerConfig, RunOutcome, cv_repeats, rescore_partitions, validate_config,
)
from step5.optimizer.diagnostics import (
    model_health_report, plot_optimization_history, write_health_report, write_run_diagnostics
)
from step5.optimizer.backends import default_trials_in_flight
from step5.optimizer.backends import CVData, ModelBackend, NNBackend, TreeBackend, partition_seed
from step5.optimizer.objective import OBJECTIVE_FORMULA, OVERFIT_PENALTY, summarize_folds
from step5.optimizer.search import SearchGoal, SearchPlan, TrialProgress, run_search
from step5.optimizer.search_space import DataShape, first_nn_trials
from step5.optimizer.study import (
    OpenedStudy, best_complete_trial, count_states, default_storage_url, default_study_name, open_study,
    record_model_built, redact_storage, release_storage,
)

logger = logging.getLogger(__name__)


def resolve_search_plan(config: OptimizerConfig, policy: Policy, capacity: int, *, neural_net: bool) -> SearchPlan:
    """Trials in flight, fusion and pruner for this run (neural nets alone fuse); flags win over the policy,
    whose ``trials_in_flight`` 0 means two per device slot for nets. ``--fuse-trials N`` > 1 fuses folds too."""
    fuse_trials = neural_net and config.fuse_trials > 1
    if fuse_trials:
        fuse_folds, source = True, f"--fuse-trials {config.fuse_trials}"
    elif config.fuse_folds is not None:
        fuse_folds, source = config.fuse_folds, "--fuse-folds" if config.fuse_folds else "--no-fuse-folds"
    else:
        fuse_folds = policy.training.fuse_folds
        source = f"the policy's training.fuse_folds ({policy.source or 'defaults'})"
    fuse_folds = fuse_folds and neural_net
    if fuse_trials:
        in_flight = config.fuse_trials
    elif config.trials_in_flight is not None:
        in_flight = config.trials_in_flight
    elif policy.training.trials_in_flight > 0:
        in_flight = policy.training.trials_in_flight
    else:
        in_flight = default_trials_in_flight(capacity) if neural_net else 1
    pruner = config.pruner if config.pruner is not None else policy.training.pruner
    return SearchPlan(in_flight, fuse_folds, fuse_trials, source, pruner=pruner,
                      max_consecutive_failures=policy.training.max_consecutive_failed_trials)


def nn_only_settings(config: OptimizerConfig) -> list[str]:
    """The :data:`~step5.optimizer.config.NN_ONLY` settings this run was given, typed in any spelling or set
    away from their defaults in code: ``["--dropout=0.2", ...]``."""
    from step5.optimizer.cli import flag_spellings

    typed = {arg.split("=", 1)[0] for arg in (config.command_line or []) if arg.startswith("--")}
    return [f"--{f.name.replace('_', '-')}={getattr(config, f.name)}" for f in dataclasses.fields(config)
            if f.metadata.get("nn_only") and (getattr(config, f.name) != f.default or typed & flag_spellings()[f.name])]


@dataclasses.dataclass(frozen=True)
class InputData:
    """The survivors table and history draws a run reads, and how long reading them took. --compare-models
    reads them once, so its four model types are trained and judged on one snapshot of the files."""

    table: SurvivorTable
    draws: list[int]
    load_s: float
    groups: np.ndarray | None = None  # rows with equal features share a group (splits keep it whole); None: no repeats

    @property
    def repeated_rows(self) -> int:
        """Rows whose features repeat an earlier row's exactly (the sidecar records it)."""
        return 0 if self.groups is None else len(self.groups) - int(self.groups.max()) - 1


def load_inputs(config: OptimizerConfig) -> InputData:
    """Read ``config``'s survivors and history files (a :class:`DataError` naming the file if either is bad).
    The arrays come back read-only: runs that share them cannot change what the next one sees."""
    start = time.perf_counter()
    table = load_survivors(config.survivors, config.target)
    draws = load_history(config.lottery_data)
    table.X.flags.writeable = table.y.flags.writeable = False
    inputs = InputData(table, draws, time.perf_counter() - start, row_groups(table.X))
    logger.info("loaded %d survivors x %d features (%d excluded: %s) and %d history draws in %.2fs",
                table.n_records, table.n_features, len(table.excluded_features), table.excluded_features,
                len(draws), inputs.load_s)
    if inputs.repeated_rows:
        logger.warning("survivors file %s: %d of %d rows repeat another row's features exactly. The splits keep a "
                       "row's copies on one side, so no model is scored on rows it trained on, but each copy still "
                       "weighs in training and scoring: deduplicate the survivors upstream (the pipeline's "
                       "sanity_tests.py --test dedup lists them)", table.source_file, inputs.repeated_rows,
                       table.n_records)
    return inputs


class AntiOverfitMetaOptimizer:
    """Search hyperparameters for one model type and save the best model with its sidecar. ``run()`` returns
    a :class:`RunOutcome` or raises a :class:`Step5Error` (:class:`DegenerateSignalError` carries ``.outcome``)."""

    def __init__(self, config: OptimizerConfig, *, inputs: InputData | None = None) -> None:
        validate_config(config)
        self.config = config
        self.inputs = inputs  # None: run() reads the files
        self.torch = get_model_type(config.model_type).torch  # neural net: trained by workers
        self.run_id = uuid.uuid4().hex
        self.output_dir = Path(config.output_dir)
        self.timings: dict[str, float] = {}
        self.policy: Policy | None = None
        self.plan = SearchPlan(1, False, False, "not resolved yet")
        self._search_record = SearchRecord()
        self._t0 = time.perf_counter()
        self.cv_repeats = 1  # K-fold partitions per trial: resolved once the row count is known

    def run(self) -> RunOutcome:
        cfg = self.config
        self._t0 = time.perf_counter()
        logger.info("Step 5 run %s: model %s, %d trials, %d folds, test holdout %.2f, seed %d", self.run_id[:8],
                    cfg.model_type, cfg.trials, cfg.k_folds, cfg.test_holdout, cfg.seed)
        self.policy = load_policy(cfg.policy_path)
        helper_nodes = self._helper_nodes()  # a bad cluster config fails before the data is read

        inputs = self.inputs or load_inputs(cfg)
        table, draws = inputs.table, inputs.draws
        self.timings["load_s"] = inputs.load_s

        # What both the success and the degenerate sidecar record about the data.
        signal = self.signal = assess_signal(table.y)
        data_context = self.data_context = self._data_context(table, draws, inputs.repeated_rows)
        self.feature_schema = artifacts.build_feature_schema(table.feature_names, table.excluded_features,
                                                             table.source_file)
        self.cv_repeats = cv_repeats(cfg, dev_rows(table.n_records, cfg.test_holdout))
        setup = self._setup(inputs)
        study_name = cfg.study_name or default_study_name(cfg.model_type, data_context["fingerprint_hash"], setup)
        storage_url = cfg.storage or default_storage_url(self.output_dir)

        if not signal["prediction_allowed"]:
            if cfg.search_only:  # a helper writes nothing: its output dir may hold another run's model
                raise DegenerateSignalError(
                    f"target {cfg.target!r} has no usable signal ({signal['reason']}); a --search-only helper has "
                    "nothing to search and writes no sidecar (the process without --search-only writes it)")
            outcome = self._write_degenerate(study_name, storage_url)
            exc = DegenerateSignalError(
                f"target {cfg.target!r} has no usable signal ({signal['reason']}); "
                f"wrote the degenerate sidecar {outcome.sidecar_path}, no model"
            )
            exc.outcome = outcome  # type: ignore[attr-defined]
            raise exc

        with contextlib.ExitStack() as outputs:  # the new model set: discarded unless committed
            runner = None
            if self.torch:  # its workers boot while the rows are split and the study is opened
                runner = self._start_runner()
                outputs.callback(runner.close)  # idempotent: the backend closes it first on the search's path
            start = time.perf_counter()
            cv = self._split(inputs)
            self.timings["split_s"] = time.perf_counter() - start

            first_trials: list[dict[str, Any]] = []
            if self.torch:
                shape = DataShape.of_development(len(cv.y_dev), cv.X_dev.shape[1], cv.k)
                # No more first trials than --trials: the rest would wait in the study unrun.
                first_trials = first_nn_trials(shape, fixed_dropout=cfg.dropout)[: cfg.trials]
            opened = open_study(study_name=study_name, storage_url=storage_url, setup=setup, seed=cfg.seed,
                                trials=cfg.trials, training=self.policy.training, first_trials=first_trials,
                                data={"fingerprint_hash": data_context["fingerprint_hash"],
                                      "survivor_count": data_context["survivor_source"]["survivor_count"],
                                      "training_window_draws": data_context["training_window"]["draw_count"]},
                                helper=cfg.search_only)
            outputs.callback(release_storage, opened.storage)  # last, after the sidecar has read the study
            if opened.round_over:
                logger.warning(
                    "search-only: the last round of study %r is complete (%d complete trials, round target %d), so this "
                    "helper has nothing to do: a --search-only helper starts no round, the process without "
                    "--search-only does (start the helpers of a resumed study after it)", opened.study_name,
                    opened.complete_before, opened.target_complete)
                return self._search_only_outcome(opened)
            with contextlib.ExitStack() as stack:
                # Helpers on the other hosts join the study while this process boots its workers;
                # they stop once the search is over, however it ends.
                # A round left unbuilt has nothing to search: its helpers would only find it complete and warn.
                helpers = stack.enter_context(self._helper_fleet(helper_nodes if opened.trials_left else [], study_name))
                files = stack.enter_context(FoldFiles())
                backend = self._make_backend(cv, files, runner)
                stack.callback(backend.close)  # workers shut down however the run ends
                self._search(opened, backend)
                helpers.stop("the study is full")
                if cfg.search_only:
                    return self._search_only_outcome(opened)
                best = best_complete_trial(opened.study)
                if best is None:
                    failed = opened.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    reasons = [f"trial {t.number}: {t.user_attrs.get('fail_reason', 'unknown')}" for t in failed[-3:]]
                    raise Step5Error(
                        f"study {opened.study_name!r} has no complete trial ({len(failed)} failed), so there is no "
                        "model to build" + (". Last failures:\n  " + "\n  ".join(reasons) if reasons else ""))
                rescore = self._rescore(best, backend, cv)
                staged = outputs.enter_context(model_set.stage(self.output_dir))
                with model_set.writing(self.output_dir):  # a full or read-only disk: one line, exit 1
                    final = self._train_final(best, backend, staged.path)
                execution = build_execution_summary(backend.summary(), search=self._search_record,
                                                    phases=self.timings)
            # Fold files and workers are gone here; only the outputs remain.
            return self._write_success(opened, best, final, rescore, cv, execution, backend, staged)

    def _helper_nodes(self) -> list[ClusterNode]:
        cfg = self.config
        if cfg.cluster_config is None:
            return []
        nodes = load_cluster_config(cfg.cluster_config)
        local, remote = split_local(nodes)
        for node in local:
            logger.info("cluster: %s (%d x %s) is this host: the main process runs here",
                        node.hostname, node.gpu_count, node.gpu_type or "?")
        if remote:
            logger.info("cluster: a --search-only helper will start on %s",
                        ", ".join(f"{n.hostname} ({n.gpu_count} x {n.gpu_type or '?'})" for n in remote))
            for warning in storage_warnings(cfg.storage):  # given, and a database server (validate_config)
                logger.warning("cluster: %s", warning)
        else:
            logger.warning("cluster: %s lists no host other than this one; searching alone", cfg.cluster_config)
        return remote

    def _helper_fleet(self, nodes: list[ClusterNode], study_name: str) -> HelperFleet:
        if not nodes:
            return HelperFleet([], [])
        cfg = self.config
        policy_given = any(a == "--policy" or a.startswith("--policy=") for a in cfg.command_line or [])
        return HelperFleet(nodes, helper_arguments(cfg, study_name=study_name, storage=cfg.storage,
                                                   policy_given=policy_given))

    def _data_context(self, table: SurvivorTable, draws: list[int], repeated: int) -> dict[str, Any]:
        cfg = self.config
        prng_type = cfg.prng_type if cfg.prng_type is not None else table.prng_type or DEFAULT_PRNG_TYPE
        mod = cfg.mod if cfg.mod is not None else table.mod or DEFAULT_MOD
        extra = {"prng_type": prng_type, "mod": mod, "holdout_draws": cfg.holdout_draws}
        fingerprint = artifacts.data_fingerprint(table.X, table.y, table.feature_names, draws, target=table.target,
                                                 extra=extra)
        return build_data_context(fingerprint=fingerprint, training_draws=len(draws), holdout_draws=cfg.holdout_draws,
                                  survivors_file=str(cfg.survivors), survivor_count=table.n_records,
                                  prng_type=prng_type, mod=mod, target=table.target,
                                  missing_feature_fills=table.missing_fills, lottery_data_file=str(cfg.lottery_data),
                                  repeated_feature_rows=repeated)

    def _setup(self, inputs: InputData) -> dict[str, Any]:
        """What makes two runs' objective values comparable (docs/optimizer-internals.md#study)."""
        cfg = self.config
        setup: dict[str, Any] = {"model_type": cfg.model_type, "seed": cfg.seed, "k_folds": cfg.k_folds,
                                 "test_holdout": cfg.test_holdout, "target": cfg.target, "objective": OBJECTIVE_FORMULA}
        if self.cv_repeats > 1:  # only then: a study from before repeated CV keeps its name
            setup["cv_repeats"] = self.cv_repeats
        if inputs.groups is not None:  # repeated rows split as groups: other folds than a study from before
            setup["split"] = "grouped_repeated_rows"
        if self.torch:
            setup.update(normalize_features=cfg.normalize_features, use_leaky_relu=cfg.use_leaky_relu,
                         dropout=cfg.dropout, nn_max_epochs=cfg.nn_max_epochs)
        return setup

    def _split(self, inputs: InputData) -> CVData:
        from sklearn.model_selection import train_test_split

        cfg = self.config
        # Every split draws over units, rows or (where rows repeat) groups of equal rows, then maps back to rows.
        table, groups = inputs.table, inputs.groups
        n = table.n_records if groups is None else int(groups.max()) + 1
        n_dev = dev_rows(n, cfg.test_holdout)
        rows = "records" if groups is None else "distinct rows"
        # The test rows, each CV validation fold and the final early-stopping slice need >= 2 rows for an R².
        if n - n_dev < 2:
            raise DataError(
                f"survivors file {table.source_file}: {n} {rows} leave {n - n_dev} for testing (--test-holdout "
                f"{cfg.test_holdout:g}); the test R² needs at least 2. Use a larger --test-holdout or more data."
            )
        if n_dev < 2 * cfg.k_folds:
            raise DataError(
                f"survivors file {table.source_file}: {n} {rows} leave {n_dev} development rows after "
                f"holding out {n - n_dev} for testing (--test-holdout {cfg.test_holdout:g}); {cfg.k_folds}-fold CV "
                f"needs at least {2 * cfg.k_folds}. Use fewer --k-folds, a smaller --test-holdout or more data."
            )
        dev_idx, test_idx = rows_of(holdout_split(n, cfg.test_holdout, cfg.seed), groups)
        dev_groups = None if groups is None else renumbered(groups[dev_idx])

        def kfold(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
            return [rows_of(pair, dev_groups) for pair in kfold_splits(n_dev, cfg.k_folds, seed)]

        folds = kfold(cfg.seed + 1)
        # Partitions 1.. : the search's repeats first, then the rescore's (CVData).
        repeats = self.cv_repeats
        fresh = [kfold(partition_seed(cfg.seed, r, search_repeat=True)) for r in range(1, repeats)]
        fresh += [kfold(partition_seed(cfg.seed, p)) for p in range(1, rescore_partitions(cfg) + 1)]
        fit_pos, es_pos = rows_of(train_test_split(np.arange(n_dev), test_size=1.0 / cfg.k_folds,
                                                   random_state=cfg.seed + 2, shuffle=True), dev_groups)
        final = ("the final net is the best trial's fold models merged into one" if self.torch
                 else f"the final model fits {len(fit_pos)} and early-stops on {len(es_pos)}")
        logger.info("split %d rows: %d dev (%d folds of ~%d validation rows%s), %d test; %s",
                    table.n_records, len(dev_idx), cfg.k_folds, len(dev_idx) // cfg.k_folds,
                    f", each trial on {repeats} partitions" if repeats > 1 else "", len(test_idx), final)
        return CVData(X_dev=table.X[dev_idx], y_dev=table.y[dev_idx], X_test=table.X[test_idx],
                      y_test=table.y[test_idx], folds=folds, final_fit_idx=np.sort(fit_pos),
                      final_es_idx=np.sort(es_pos), feature_names=list(table.feature_names), fresh_partitions=fresh,
                      search_repeats=repeats)

    def _start_runner(self) -> WorkerPool:
        """The neural net's fold runner, its workers booting in the background (docs/workers.md)."""
        cfg, policy = self.config, self.policy
        assert policy is not None
        slots = plan_slots(cfg.gpus, cfg.cpu_workers, device_env=policy.training.device_env)
        if policy.training.device_env:
            logger.info("every worker and one-shot trainer gets %s (training.device_env)",
                        " ".join(f"{k}={v}" for k, v in sorted(policy.training.device_env.items())))
        # --persistent-workers / --no-persistent-workers win; else the policy's kill switch (absent: False).
        persistent = policy.training.use_persistent_workers if cfg.persistent_workers is None else cfg.persistent_workers
        logger.info("neural-net folds run on %s via %s", ", ".join(s.label for s in slots),
                    "persistent workers (S96B)" if persistent else "one-shot subprocesses (S96A)")
        return WorkerPool(slots, policy.training, persistent=persistent, wait=False)

    def _make_backend(self, cv: CVData, files: FoldFiles, runner: WorkerPool | None) -> ModelBackend:
        cfg = self.config
        if runner is None:
            not_applicable = nn_only_settings(cfg)
            if not_applicable:
                # Accepted for every model type (compare runs share one command line), never silently ignored.
                logger.info("neural-net settings do not apply to %s and are ignored: %s", cfg.model_type,
                            ", ".join(not_applicable))
            cores = os.cpu_count() or 1
            if cfg.cpu_workers is not None and cfg.cpu_workers > cores:
                # plan_slots warns for a net's workers; a tree library's threads are the same oversubscription
                # (lightgbm's spin while they wait: 1024 threads on 2 cores finished no trial in minutes).
                logger.warning("--cpu-workers %d on %d core(s): %s trains with %d threads that take turns on the "
                               "cores, which can slow each trial many times over; without --cpu-workers the "
                               "library uses this host's %d", cfg.cpu_workers, cores, cfg.model_type,
                               cfg.cpu_workers, cores)
            elif cfg.cpu_workers is not None:
                logger.info("%s trains with %d thread(s) (--cpu-workers)", cfg.model_type, cfg.cpu_workers)
            self.plan = resolve_search_plan(cfg, self.policy, 1, neural_net=False)
            # The tree libraries drive NVIDIA GPUs only: --gpus rocm:N leaves them on the CPU.
            return TreeBackend(cfg.model_type, cv, seed=cfg.seed, gpus=cuda_ids(cfg.gpus), n_threads=cfg.cpu_workers)
        policy = self.policy
        start = time.perf_counter()
        runner.wait_ready()
        self.timings["runner_start_s"] = time.perf_counter() - start  # what the boot added after the data were ready
        plan = self.plan = resolve_search_plan(cfg, policy, runner.capacity, neural_net=True)
        logger.info("%d trial(s) in flight on %d slot(s); %s; pruner %s", plan.trials_in_flight, runner.capacity,
                    "same-shape trials' folds fused in one pass" if plan.fuse_trials else
                    "each trial's folds fused in one pass" if plan.fuse_folds else "fold by fold", plan.pruner)
        if plan.pruner != "none" and plan.fuse_folds and not plan.fuse_trials:
            logger.info("--pruner %s runs the folds in waves (fold k of every trial in flight), so a trial's "
                        "folds are not fused (--fuse-trials still fuses same-shape trials' fold k)", plan.pruner)
        try:
            return NNBackend(runner, cv, files, cfg, plan)
        except BaseException:
            runner.close()
            raise

    def _search(self, opened: OpenedStudy, backend: ModelBackend) -> None:
        cfg = self.config
        target, n_new = opened.target_complete, opened.trials_left
        if opened.joined_round and not n_new:
            logger.info("the last round of study %r is searched (%d complete trials) but its model was never saved "
                        "(a run stopped or failed after its search): building it from the study, with no new trial (this "
                        "run's --trials %d does not start another round)", opened.study_name, opened.complete_before,
                        cfg.trials)
        elif opened.joined_round:
            logger.info("study %r has an unfinished round: joining it until the study holds %d complete trials "
                        "(it has %d; this run's --trials %d does not start another)",
                        opened.study_name, target, opened.complete_before, cfg.trials)
        else:
            logger.info("up to %d new trial(s): the study holds %d complete, this round ends at %d",
                        n_new, opened.complete_before, target)
        start = time.perf_counter()
        interval = self.policy.training.heartbeat_interval_s
        goal = SearchGoal(complete=target, new_trials=n_new, poll_s=min(1.0, interval),
                          reclaim_every_s=min(10.0, interval))
        self._search_record = run_search(opened, backend, self.plan, goal, TrialProgress(n_new))
        self.timings["search_s"] = time.perf_counter() - start

    def _search_only_outcome(self, opened: OpenedStudy) -> RunOutcome:
        counts = count_states(opened.study)
        self.timings["total_s"] = time.perf_counter() - self._t0
        logger.info(
            "search-only: study %r holds %d complete trials (round target %d); this process ran %d; no model written",
            opened.study_name, counts["complete"], opened.target_complete, self._search_record.trials,
        )
        return RunOutcome(model_type=self.config.model_type, status="SEARCH_ONLY", trials_run=counts["complete"],
                          wall_s=self.timings["total_s"])

    @staticmethod
    def _best_params(best: FrozenTrial) -> dict[str, Any]:
        params = best.user_attrs.get("params")
        if not isinstance(params, dict):
            raise Step5Error(f"best trial {best.number} of the study has no recorded `params`; cannot rebuild it")
        return params

    def _rescore(self, best: FrozenTrial, backend: ModelBackend, cv: CVData) -> dict[str, Any] | None:
        """The best trial trained and scored again on each fresh partition (None: none), an estimate free of
        the search's choice (docs/models.md); a partition that fails scores NaN, and so does the mean."""
        partitions = cv.rescore_partitions
        n = len(partitions)
        if n == 0:
            return None
        params = self._best_params(best)
        start = time.perf_counter()
        values: list[float] = []
        r2_means: list[float] = []
        for p in partitions:
            value = r2_mean = float("nan")
            try:
                summary = summarize_folds(backend.rescore(best.number, params, p))
                value, r2_mean = summary["value"], summary["val_r2_mean"]
            except JobError as exc:
                logger.warning("rescoring trial %d on fresh partition %d failed: %s", best.number, p, exc)
            values.append(value)
            r2_means.append(r2_mean)
        self.timings["rescore_s"] = time.perf_counter() - start
        mean = float(np.mean(values))  # NaN when any partition is
        logger.info(
            "trial %d rescored on %d fresh partition(s) of the dev rows: objective %.4f (per partition %s; "
            "the search's %.4f) in %.1fs", best.number, n, mean, ", ".join(f"{v:.4f}" for v in values),
            best.value, self.timings["rescore_s"],
        )
        return {
            "partitions": n,
            "objective_mean": finite_or_none(mean),
            "objective_values": [finite_or_none(v) for v in values],
            "cv_r2_means": [finite_or_none(v) for v in r2_means],
            "search_objective": finite_or_none(best.value),
        }

    def _train_final(self, best: FrozenTrial, backend: ModelBackend, staging: Path) -> dict[str, Any]:
        """The final model from the best trial's exact params, into ``staging`` (the new model set)."""
        params = self._best_params(best)
        name = artifacts.checkpoint_filename(self.config.model_type)
        logger.info("training the final model with trial %d's params: %s", best.number, params)
        start = time.perf_counter()
        result = backend.train_final(best.number, params, staging / name)
        self.timings["final_s"] = time.perf_counter() - start
        result["params"] = params
        logger.info("final model: train R² %.4f, val R² %.4f, test R² %.4f (%.1fs)",
                    result.get("train_r2", float("nan")), result.get("r2", float("nan")),
                    result.get("test_r2", float("nan")), self.timings["final_s"])
        return result

    def _optuna_block(self, study_name: str, storage_url: str, opened: OpenedStudy | None = None,
                      best: FrozenTrial | None = None) -> dict[str, Any]:
        """The sidecar's ``optuna`` block; without ``opened`` (a degenerate target) no study was opened."""
        counts = count_states(opened.study) if opened is not None else {}
        return {
            "study_name": study_name,
            "storage": redact_storage(storage_url),
            "trials_run": counts.get("complete", 0),
            "trials_failed": counts.get("fail", 0),
            "trials_new": self._search_record.trials,  # told by this process, any end state
            "trials_requested": self.config.trials,
            "round_target": opened.target_complete if opened is not None else None,
            "resumed": opened is not None and opened.resumed,
            "best_trial_number": best.number if best is not None else None,
            "best_value": float(best.value) if best is not None and best.value is not None else None,
            "direction": "maximize",
            "sampler": "TPESampler",
            "pruner": self.plan.pruner,
            "trials_pruned": counts.get("pruned", 0),
            "sampler_seed": opened.sampler_seed if opened is not None else None,
            "objective_formula": OBJECTIVE_FORMULA,
        }

    def _sidecar(self, **fields: Any) -> dict[str, Any]:
        """This run's sidecar: what every outcome records about the data and the run, and ``fields``."""
        cfg = self.config
        provenance = build_provenance(
            run_id=self.run_id, parent_run_id=cfg.parent_run_id, created_at=utc_timestamp(),
            command_line=cfg.command_line if cfg.command_line is not None else [sys.executable, *sys.argv],
            extra={"cwd": os.getcwd(), "policy_file": self.policy.source if self.policy is not None else None},
        )
        return build_sidecar(model_type=cfg.model_type, feature_schema=self.feature_schema, signal_quality=self.signal,
                             data_context=self.data_context, provenance=provenance, **fields)

    def _write_degenerate(self, study_name: str, storage_url: str) -> RunOutcome:
        cfg = self.config
        stale = self.output_dir / artifacts.checkpoint_filename(cfg.model_type)
        if stale.exists():
            # The set about to be committed holds only a sidecar that says "no model"; the
            # commit removes the earlier run's checkpoint from what the output dir shows.
            logger.warning("replacing the model from an earlier run (%s): this run's data has no usable signal", stale)
        self.timings["total_s"] = time.perf_counter() - self._t0
        sidecar = self._sidecar(optuna=self._optuna_block(study_name, storage_url),
                                execution=build_execution_summary(None, phases=self.timings).to_dict())
        with model_set.stage(self.output_dir) as staged, model_set.writing(self.output_dir):
            artifacts.write_sidecar(staged.path / artifacts.SIDECAR_NAME, sidecar)
            staged.commit()
        path = self.output_dir / artifacts.SIDECAR_NAME
        logger.error("degenerate target signal: %s; wrote %s (no model)", self.signal["reason"], path)
        return RunOutcome(model_type=cfg.model_type, status="DEGENERATE_SIGNAL", sidecar=sidecar, sidecar_path=path,
                          wall_s=self.timings["total_s"])

    def _write_success(self, opened: OpenedStudy, best: FrozenTrial, final: dict[str, Any],
                       rescore: dict[str, Any] | None, cv: CVData, execution_summary: ExecutionSummary,
                       backend: ModelBackend, staged: model_set.StagedSet) -> RunOutcome:
        cfg = self.config
        metrics = build_training_metrics(best.user_attrs.get("cv", {}), final, objective_value=best.value,
                                         objective_formula=OBJECTIVE_FORMULA, overfit_penalty=OVERFIT_PENALTY,
                                         k_folds=cfg.k_folds, cv_repeats=cv.search_repeats, n_dev=len(cv.y_dev),
                                         n_fit=len(cv.final_fit_idx), n_early_stop=len(cv.final_es_idx),
                                         n_test=len(cv.y_test), rescore=rescore)
        name = artifacts.checkpoint_filename(cfg.model_type)
        self.timings["total_s"] = time.perf_counter() - self._t0
        execution_summary.timings.total_s = self.timings["total_s"]
        execution = execution_summary.to_dict()
        sidecar = self._sidecar(
            checkpoint_path=str(staged.final_dir / name), checkpoint_sha256=artifacts.file_sha256(staged.path / name),
            training_metrics=metrics, hyperparameters=final["params"], training_options=dict(backend.training_options()),
            optuna=self._optuna_block(opened.study_name, opened.storage_url, opened, best), execution=execution,
        )
        trials = opened.study.get_trials(deepcopy=False)
        with model_set.writing(self.output_dir):  # a full or read-only disk: one line, exit 1
            try:
                artifacts.write_sidecar(staged.path / artifacts.SIDECAR_NAME, sidecar)
            except ValueError as exc:  # a trainer result lacking a metric the sidecar requires
                raise Step5Error(f"the final model's results cannot make a valid sidecar: {exc}") from None
            plot_optimization_history(trials, staged.path / artifacts.HISTORY_PNG_NAME,
                                      title=f"Step 5 {cfg.model_type}: {opened.study_name}")
            # A Ctrl-C or SIGTERM the interpreter dropped (step5.interrupts) after the search's last check
            # stops the run here, uncommitted, rather than letting it end 0 as if none had come.
            raise_if_interrupted()
            staged.commit()
        # After the commit: a run stopped before it leaves the round unbuilt, and the same command again only
        # builds its model (docs/optimizer.md, "Resume semantics").
        try:
            record_model_built(opened)
        except StorageError as exc:  # the model is saved: the cost is one more final fit on the next run
            logger.warning("saved the model, but study %r could not record it (%s): the next run of this command "
                           "builds this round's model again before starting a new round", opened.study_name, exc)
        sidecar_path = self.output_dir / artifacts.SIDECAR_NAME
        if metrics["beats_mean"] is False:
            logger.warning(
                "the final model is no better than predicting the mean: test R² %.4f <= 0 (CV R² %.4f); "
                "the sidecar flags it (training_metrics.beats_mean = false). More data or more trials may help",
                metrics["test_r2"], metrics["cv_r2_mean"],
            )
        if cfg.enable_diagnostics:
            write_run_diagnostics(cfg.diagnostics_folder, model_type=cfg.model_type, run_id=self.run_id, trials=trials,
                                  first_new_number=opened.trials_before, execution=execution, final_metrics=metrics,
                                  extra={"study_name": opened.study_name, "objective_formula": OBJECTIVE_FORMULA})
            write_health_report(cfg.diagnostics_folder, model_health_report(
                cfg.model_type, metrics, self.policy.training_diagnostics), model_type=cfg.model_type)
        logger.info("saved %s and %s: CV R² %.4f ± %.4f, test R² %.4f, objective %.4f (trial %d); run took %.1fs",
                    self.output_dir / name, sidecar_path, metrics["cv_r2_mean"], metrics["cv_r2_std"],
                    metrics["test_r2"], best.value, best.number, self.timings["total_s"])
        return RunOutcome(model_type=cfg.model_type, status="SUCCESS", sidecar=sidecar,
                          checkpoint_path=self.output_dir / name, sidecar_path=sidecar_path, cv_score=best.value,
                          cv_rescored=rescore["objective_mean"] if rescore else None, test_r2=metrics["test_r2"],
                          trials_run=sidecar["optuna"]["trials_run"], wall_s=self.timings["total_s"])
