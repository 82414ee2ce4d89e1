"""The model backends: how a batch of trials' folds, and the final model, get trained
(NN: runner jobs, grouped for fusion; trees: in-process; docs/optimizer-internals.md#backends, #grouping)."""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import optuna

from step5.data.splits import FoldFiles
from step5.errors import JobError, Step5Error, UsageError
from step5.models import trees
from step5.execution.pool import FoldRunner, raise_first_job_error
from step5.execution.summary import RunnerStats, Timings
from step5.optimizer.objective import summarize_folds
from step5.optimizer.search_space import SEARCH_BATCH_MODE, DataShape, suggest_nn_params
from step5.protocol import MergeRequest, NNParams, TrainRequest, fusion_key

if TYPE_CHECKING:
    from step5.optimizer.config import OptimizerConfig
    from step5.optimizer.search import SearchPlan

logger = logging.getLogger(__name__)

#: ``fold_idx`` of a tree model's final fit (distinct from every CV fold, for logs and seeds).
FINAL_FOLD_IDX = 1_000_000
#: ``gate(trial_number, fold_results_so_far)`` -> True to train the trial's next fold
#: (:mod:`step5.optimizer.search` reports the fold and asks the pruner).
FoldGate = Callable[[int, Sequence[dict[str, Any]]], bool]


@dataclass
class Pruned:
    """A trial the pruner stopped: its folds trained so far (fold order)."""

    folds: list[dict[str, Any]] = field(default_factory=list)


#: What a backend returns per trial: its K fold results, the JobError that failed it, or Pruned.
TrialOutcome = list[dict[str, Any]] | JobError | Pruned


def fold_seed(base_seed: int, trial_number: int, fold_idx: int) -> int:
    state = np.random.SeedSequence([int(base_seed), int(trial_number), int(fold_idx)]).generate_state(2, np.uint32)
    return (int(state[0]) << 30) | (int(state[1]) >> 2)  # 62 bits: within the protocol's seed < 2**63


def cv_val_scores(folds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``r2``/``val_mse`` of a final model with no validation rows of its own: its trial's CV means."""
    return {"r2": float(np.mean([f["r2"] for f in folds])), "val_mse": float(np.mean([f["val_mse"] for f in folds]))}


#: Seed-stream tags: the rescore's partitions and the search's repeats draw from separate
#: streams, so the rescore's partitions are the same whatever ``--cv-repeats`` a model type
#: runs with, and compare-models compares the types on the same folds.
_RESCORE_STREAM, _REPEAT_STREAM = 0x5EED, 0x4E9E


def partition_seed(base_seed: int, partition: int, *, search_repeat: bool = False) -> int:
    """The KFold shuffle seed of rescore partition ``partition`` (>= 1), or of the search's repeat
    ``partition`` (``--cv-repeats``): a stream of its own, never any run's search ``seed + 1``."""
    stream = _REPEAT_STREAM if search_repeat else _RESCORE_STREAM
    return int(np.random.SeedSequence([int(base_seed), stream, int(partition)]).generate_state(1, np.uint32)[0])


@dataclass
class CVData:
    """The rows of one run, split once (indices are positions in ``X_dev``); the test rows are in no fold."""

    X_dev: np.ndarray  # (n_dev, d) float32
    y_dev: np.ndarray  # (n_dev,) float64
    X_test: np.ndarray  # (n_test, d) held out: scored by the final model only
    y_test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]  # K (train_idx, val_idx) pairs over dev rows
    final_fit_idx: np.ndarray  # dev rows the final model is fitted on
    final_es_idx: np.ndarray  # dev rows the final model early-stops on (~1/K of dev)
    feature_names: list[str]
    # Further K-fold partitions of the dev rows: the first ``search_repeats - 1`` are the search's too
    # (repeated CV); the best trial is scored again on the rest (``rescore``), unseen by the search's choice.
    fresh_partitions: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    search_repeats: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.search_repeats <= 1 + len(self.fresh_partitions):
            raise ValueError(f"{self.search_repeats} search partitions, but only {1 + len(self.fresh_partitions)} exist")

    @property
    def k(self) -> int:
        return len(self.folds)

    def partition(self, number: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if not 0 <= number <= len(self.fresh_partitions):
            raise ValueError(f"partition {number} does not exist: this run has {len(self.fresh_partitions)} fresh ones")
        return self.folds if number == 0 else self.fresh_partitions[number - 1]

    @property
    def search_partitions(self) -> range:
        return range(self.search_repeats)

    @property
    def rescore_partitions(self) -> range:
        return range(self.search_repeats, 1 + len(self.fresh_partitions))

    def search_folds(self) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Every fold a trial trains, in order: (partition, fold_idx, train rows, validation rows)."""
        return [(p, self.fold_idx(p, f), tr, va)
                for p in self.search_partitions for f, (tr, va) in enumerate(self.partition(p))]

    def fold_idx(self, partition: int, fold: int) -> int:
        """0..K-1 for partition 0, then K.. for the fresh ones, so every fold's training seed differs."""
        return partition * self.k + fold


#: Trials in flight per device slot when neither the flag nor the policy sets B: with one, every batch
#: ends with the slots idle while its longest fold finishes (docs/benchmark.md measures it).
TRIALS_IN_FLIGHT_PER_SLOT = 2


def default_trials_in_flight(capacity: int) -> int:
    return TRIALS_IN_FLIGHT_PER_SLOT * max(1, capacity)


def fusion_groups(trial_requests: Mapping[int, Sequence[TrainRequest]], max_groups: int = 1,
                  n_train: Mapping[str, int] | None = None) -> list[list[int]]:
    """Trial numbers grouped by their folds' :func:`~step5.protocol.fusion_key` (``n_train``: a fold file's
    training rows, resolving ``auto`` batch mode), in order of first appearance; with fewer groups than
    ``max_groups`` (slots), the largest are split by whole trials so that every slot gets work."""
    rows = n_train or {}
    by_key: dict[frozenset[tuple[Any, ...]], list[int]] = {}
    for number, requests in trial_requests.items():
        # A trial's folds may resolve to different batch plans (sizes straddling the auto
        # threshold); the worker then splits the pass, so group on the whole set of keys.
        keys = frozenset(fusion_key(r, rows.get(r.data_path)) for r in requests)
        by_key.setdefault(keys, []).append(number)
    groups = list(by_key.values())
    while len(groups) < max_groups:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) < 2:
            break
        g = groups[largest]
        groups[largest:largest + 1] = [g[:(len(g) + 1) // 2], g[(len(g) + 1) // 2:]]
    return groups


def estimated_cost(group: Sequence[TrainRequest]) -> float:
    # A rough relative cost: epochs x parameters-ish x models.
    return sum(r.params.epochs * (1 + sum(r.params.hidden_layers)) for r in group)


def plan_groups(trial_requests: Mapping[int, Sequence[TrainRequest]], *, fuse_folds: bool, fuse_trials: bool,
                capacity: int, n_train: Mapping[str, int] | None = None) -> list[list[TrainRequest]]:
    """The groups for one batch of trials, longest first (docs/optimizer-internals.md#grouping)."""
    if fuse_trials:
        groups = [[r for n in trials for r in trial_requests[n]]
                  for trials in fusion_groups(trial_requests, capacity, n_train)]
    elif fuse_folds:
        groups = [list(requests) for requests in trial_requests.values()]
    else:
        groups = [[r] for requests in trial_requests.values() for r in requests]
    # sorted() is stable: equal estimates keep the trial/fold order.
    return sorted(groups, key=estimated_cost, reverse=True)


class NNBackend:
    """Neural-net folds as :class:`TrainRequest` jobs for a :class:`FoldRunner`; the fold files are written
    once. Each search fold saves its model; the best trial's so far are kept for :meth:`train_final`."""

    model_type = "neural_net"

    def __init__(self, runner: FoldRunner, cv: CVData, files: FoldFiles, config: OptimizerConfig,
                 plan: SearchPlan) -> None:
        self.runner, self.cv, self.files, self.config, self.plan = runner, cv, files, config, plan
        self.data_shape = DataShape.of_development(len(cv.y_dev), cv.X_dev.shape[1], cv.k)
        start = time.perf_counter()
        self.fold_rows: dict[str, int] = {}  # rows each fold file trains on: resolves "auto" batch mode
        self._partition_paths: dict[int, list[str]] = {}
        self.states = files.path / "fold_states"  # each trial's search fold models, while it may be the best
        # The best trial so far whose fold models are kept: (objective, trial, its first K fold results).
        self._kept: tuple[float, int, list[dict[str, Any]]] | None = None
        self._write_partition(0)
        # What the final model is scored on: every dev row, and the test rows (the file's
        # required validation slot holds them too). Nothing trains on this file.
        self.final_path = str(files.write("final", cv.X_dev, cv.y_dev, cv.X_test, cv.y_test, X_test=cv.X_test,
                                          y_test=cv.y_test, feature_names=cv.feature_names))
        self.write_s = time.perf_counter() - start
        logger.info("wrote %d fold NPZ files + the final split to %s in %.2fs", cv.k, files.path, self.write_s)

    def _write_partition(self, number: int) -> list[str]:
        if number not in self._partition_paths:
            cv, paths = self.cv, []
            prefix = "" if number == 0 else f"partition_{number}_"
            for f, (tr, va) in enumerate(cv.partition(number)):
                path = str(self.files.write(f"{prefix}fold_{f}", cv.X_dev[tr], cv.y_dev[tr], cv.X_dev[va], cv.y_dev[va],
                                            feature_names=cv.feature_names))
                paths.append(path)
                self.fold_rows[path] = len(tr)
            self._partition_paths[number] = paths
        return self._partition_paths[number]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return suggest_nn_params(trial, max_epochs=self.config.nn_max_epochs, data=self.data_shape,
                                 fixed_dropout=self.config.dropout).to_dict()

    def fold_requests(self, trial_number: int, params: dict[str, Any], *, partition: int = 0,
                      save_states: bool = False) -> list[TrainRequest]:
        """The K fold jobs of one trial, the same whether fused or not; ``save_states``: each saves its model."""
        nn_params, cfg = NNParams.from_dict(params), self.config
        paths = self._write_partition(partition)
        saves: Sequence[Path | None] = [None] * len(paths)
        if save_states:
            saves = self.state_paths(trial_number)
            saves[0].parent.mkdir(parents=True, exist_ok=True)
        requests = []
        for f, (path, save) in enumerate(zip(paths, saves)):
            fold_idx = self.cv.fold_idx(partition, f)
            requests.append(TrainRequest(
                data_path=path, params=nn_params, trial_number=trial_number, fold_idx=fold_idx,
                normalize_features=cfg.normalize_features, use_leaky_relu=cfg.use_leaky_relu,
                batch_mode=SEARCH_BATCH_MODE, seed=fold_seed(cfg.seed, trial_number, fold_idx),
                job_id=f"t{trial_number}-f{fold_idx}", save_model_path=None if save is None else str(save)))
        return requests

    def state_paths(self, trial_number: int) -> list[Path]:
        return [self.states / f"trial_{trial_number}" / f"fold_{f}.pth" for f in range(self.cv.k)]

    def search_requests(self, trial_number: int, params: dict[str, Any]) -> list[TrainRequest]:
        """Every fold job of one search trial; the first partition's save their models (the final model's)."""
        return [r for p in self.cv.search_partitions
                for r in self.fold_requests(trial_number, params, partition=p, save_states=p == 0)]

    def _keep_states_of_best(self, number: int, outcome: TrialOutcome) -> None:
        """Keep ``number``'s fold models if it is the best trial so far, delete the others'."""
        value = summarize_folds(outcome)["value"] if isinstance(outcome, list) else math.nan
        if math.isfinite(value) and (self._kept is None or value > self._kept[0]):
            if self._kept is not None:
                shutil.rmtree(self.states / f"trial_{self._kept[1]}", ignore_errors=True)
            self._kept = (value, number, list(outcome[: self.cv.k]))  # type: ignore[index] - a list here
        else:
            shutil.rmtree(self.states / f"trial_{number}", ignore_errors=True)

    def _run_requests(self, requests: dict[int, list[TrainRequest]]) -> dict[tuple[int, int], Any]:
        """One ``runner.run`` call, grouped by the plan; each job's outcome by (trial number, fold index)."""
        groups = plan_groups(requests, fuse_folds=self.plan.fuse_folds, fuse_trials=self.plan.fuse_trials,
                             capacity=self.runner.capacity, n_train=self.fold_rows)
        outcomes = self.runner.run(groups)
        if [len(o) for o in outcomes] != [len(g) for g in groups]:
            raise Step5Error(f"the fold runner returned {[len(o) for o in outcomes]} outcomes for groups of "
                             f"{[len(g) for g in groups]} jobs")
        return {(r.trial_number, r.fold_idx): o for g, out in zip(groups, outcomes) for r, o in zip(g, out)}

    def run_trials(self, trials: Sequence[tuple[int, dict[str, Any]]],
                   gate: FoldGate | None = None) -> list[TrialOutcome]:
        """Every fold of every trial in one ``runner.run`` call; with a ``gate``, in waves: fold k of every live
        trial, then the gate for each in trial order (a wave holds one fold per trial: nothing to fuse-fold).
        A failing trial fails only itself; a stopped or failed one sends no more folds."""
        requests = {number: self.search_requests(number, params) for number, params in trials}
        n_folds = len(self.cv.search_folds())
        waves = [slice(0, n_folds)] if gate is None else [slice(k, k + 1) for k in range(n_folds)]
        done: dict[int, list[dict[str, Any]]] = {number: [] for number, _ in trials}
        ended: dict[int, TrialOutcome] = {}
        for wave in waves:
            live = [number for number, _ in trials if number not in ended]
            if not live:
                break
            by_job = self._run_requests({number: requests[number][wave] for number in live})
            for number in live:
                try:
                    done[number] += raise_first_job_error([by_job[(number, r.fold_idx)] for r in requests[number][wave]])
                except JobError as exc:
                    ended[number] = exc
                    continue
                if gate is not None and wave.stop < n_folds and not gate(number, done[number]):
                    ended[number] = Pruned(done[number])
        results = [ended.get(number, done[number]) for number, _ in trials]
        for (number, _), outcome in zip(trials, results):
            self._keep_states_of_best(number, outcome)
        return results

    def rescore(self, trial_number: int, params: dict[str, Any], partition: int) -> list[dict[str, Any]]:
        requests = self.fold_requests(trial_number, params, partition=partition)
        by_job = self._run_requests({trial_number: requests})
        return raise_first_job_error([by_job[(trial_number, r.fold_idx)] for r in requests])

    def train_final(self, trial_number: int, params: dict[str, Any], checkpoint_path: Path) -> dict[str, Any]:
        """The best trial's K fold models (kept by the search, else trained again with the same seeds)
        merged into one net by a ``merge`` job on the runner, then copied to ``checkpoint_path``
        (docs/optimizer.md, "Final model")."""
        paths = self.state_paths(trial_number)
        requests = self.fold_requests(trial_number, params, save_states=True)
        folds = self._kept[2] if self._kept is not None and self._kept[1] == trial_number else None
        if folds is None or not all(p.is_file() for p in paths):
            logger.info("trial %d's fold models were not kept by this process; training them again", trial_number)
            by_job = self._run_requests({trial_number: requests})
            folds = raise_first_job_error([by_job[(trial_number, r.fold_idx)] for r in requests])
        merged = self.files.path / "final" / Path(checkpoint_path).name
        merged.parent.mkdir(parents=True, exist_ok=True)
        merge = MergeRequest(tuple(map(str, paths)), str(merged), self.final_path, trial_number=trial_number,
                             job_id=f"t{trial_number}-merge")
        what = f"merging trial {trial_number}'s {len(paths)} fold models into the final model"
        ((outcome,),) = self.runner.run([[merge]])
        if isinstance(outcome, JobError):
            raise Step5Error(f"{what} failed ({outcome.error_type}): {outcome.message}") from outcome
        if not merged.is_file():
            raise Step5Error(f"{what} reported success but wrote no checkpoint at {merged}")
        shutil.copyfile(merged, checkpoint_path)  # the output dir's first write: its OSError names it
        # The merged net's training curve: its members' mean best epoch and epochs run (None if unreported).
        best = [f.get("best_epoch") for f in folds]
        run = [f.get("epochs_run") for f in folds]
        known = all(v is not None for v in best + run)
        return {**outcome, "model_path": str(checkpoint_path), **cv_val_scores(folds), "n_fit": int(len(self.cv.y_dev)),
                "n_early_stop": 0, "epochs_run": None, "best_epoch": None, "fold_best_epochs": best,
                "best_round": float(np.mean(best)) if known else None,
                "rounds_trained": float(np.mean(run)) if known else None}

    def training_options(self) -> dict[str, Any]:
        cfg = self.config
        return {"normalize_features": cfg.normalize_features, "use_leaky_relu": cfg.use_leaky_relu,
                "batch_mode": SEARCH_BATCH_MODE, "dropout_fixed": cfg.dropout, "nn_max_epochs": cfg.nn_max_epochs}

    def summary(self) -> RunnerStats:
        return self.runner.summary()

    def close(self) -> None:
        self.runner.close()


class TreeBackend:
    """xgboost / lightgbm / catboost folds fitted in-process (no torch or CUDA state in the parent), through
    :mod:`step5.models.trees`; ``n_threads`` (``--cpu-workers``) is the library's, None its default."""

    def __init__(self, model_type: str, cv: CVData, *, seed: int, gpus: list[str] | None = None,
                 n_threads: int | None = None) -> None:
        self.model_type, self.cv, self.seed, self.n_threads = model_type, cv, seed, n_threads
        try:
            # --gpus: None detects, [] forces CPU, ["1", ...] trains on the first listed GPU.
            self.device: str | None = trees.device_for_gpus(gpus)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.tree_devices = trees.TreeDevices()  # this run's GPU checks and failures, kept across folds
        self._jobs, self._compute_s, self._wall_s = 0, 0.0, 0.0
        self._devices: set[str] = set()

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return dict(trees.adapter_for(self.model_type).suggest(trial))

    def _fit(self, trial_number: int, fold_idx: int, params: dict[str, Any], tr: np.ndarray, va: np.ndarray,
             **test: Any) -> tuple[dict[str, Any], Any]:
        start = time.perf_counter()
        try:
            metrics, model = trees.train_fold(self.model_type, dict(params), self.cv.X_dev[tr], self.cv.y_dev[tr],
                                                   self.cv.X_dev[va], self.cv.y_dev[va],
                                                   seed=fold_seed(self.seed, trial_number, fold_idx),
                                                   device=self.device, feature_names=self.cv.feature_names,
                                                   n_threads=self.n_threads, devices=self.tree_devices, **test)
        except JobError as exc:
            # The library rejected these params or this data: deterministic, fails the trial.
            exc.trial_number = trial_number if exc.trial_number is None else exc.trial_number
            exc.fold_idx = fold_idx if exc.fold_idx is None else exc.fold_idx
            raise
        self._jobs += 1
        self._wall_s += time.perf_counter() - start
        self._compute_s += metrics["duration"]
        self._devices.add(metrics["device"])
        metrics.update(trial_number=trial_number, fold_idx=fold_idx)
        return metrics, model

    def run_trials(self, trials: Sequence[tuple[int, dict[str, Any]]],
                   gate: FoldGate | None = None) -> list[TrialOutcome]:
        """One trial after another (the libraries use every thread given), fold by fold."""
        out: list[TrialOutcome] = []
        search_folds = self.cv.search_folds()
        for number, params in trials:
            folds: list[dict[str, Any]] = []
            outcome: TrialOutcome = folds
            try:
                for i, (_p, fold_idx, tr, va) in enumerate(search_folds):
                    folds.append(self._fit(number, fold_idx, params, tr, va)[0])
                    if gate is not None and i < len(search_folds) - 1 and not gate(number, folds):
                        outcome = Pruned(folds)
                        break
            except JobError as exc:
                outcome = exc
            out.append(outcome)
        return out

    def rescore(self, trial_number: int, params: dict[str, Any], partition: int) -> list[dict[str, Any]]:
        return [self._fit(trial_number, self.cv.fold_idx(partition, f), params, tr, va)[0]
                for f, (tr, va) in enumerate(self.cv.partition(partition))]

    def train_final(self, trial_number: int, params: dict[str, Any], checkpoint_path: Path) -> dict[str, Any]:
        """Fit ``params`` on the final split, or, for a model that does not early-stop (xgboost's gblinear),
        on every dev row, scored by its trial's CV means (its folds fitted again: same seeds, same scores)."""
        if trees.adapter_for(self.model_type).reads_validation_rows(params):
            metrics, model = self._fit(trial_number, FINAL_FOLD_IDX, params, self.cv.final_fit_idx,
                                       self.cv.final_es_idx, X_test=self.cv.X_test, y_test=self.cv.y_test)
        else:
            folds = [f for p in self.cv.search_partitions for f in self.rescore(trial_number, params, p)]
            every_row = np.arange(len(self.cv.y_dev))  # passed as validation rows too: only scored
            metrics, model = self._fit(trial_number, FINAL_FOLD_IDX, params, every_row, every_row,
                                       X_test=self.cv.X_test, y_test=self.cv.y_test)
            metrics.update(**cv_val_scores(folds), n_fit=len(every_row), n_early_stop=0, n_val=0)
        trees.save_model(model, self.model_type, checkpoint_path)
        metrics.update(model_path=str(checkpoint_path), best_round=metrics["n_iterations"])
        return metrics

    def training_options(self) -> dict[str, Any]:
        return {"device_request": self.device or "auto", "n_threads": self.n_threads}

    def summary(self) -> RunnerStats:
        timings = Timings(jobs=self._jobs, wall_s=self._wall_s, compute_s=self._compute_s,
                          overhead_s=max(0.0, self._wall_s - self._compute_s))
        return RunnerStats(mode="inline", devices=sorted(self._devices) or ["cpu"], timings=timings)

    def close(self) -> None:
        pass


#: One model family's way of training a trial's folds and the final model. ``run_trials`` returns, per trial
#: (input order), its fold results in fold order, the :class:`JobError` that failed it (only it), or
#: :class:`Pruned` when ``gate``, called after each fold, said False; ``rescore`` raises its first fold's JobError.
ModelBackend = NNBackend | TreeBackend
