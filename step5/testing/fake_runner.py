"""A fake :class:`~step5.execution.pool.FoldRunner` for in-process optimizer tests: no
processes, metrics a smooth function of the params (so a study has a known best trial),
every call recorded, chosen folds failed or the runner blown up (docs/workers.md "The fakes")."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from step5.errors import JobError
from step5.execution.pool import check_groups
from step5.execution.summary import FusionRecord, RunnerStats, Timings
from step5.protocol import Job, MergeRequest, TrainRequest, fusion_key
from step5.testing.fake_worker import FAKE_CHECKPOINT, FAKE_ENSEMBLE_TEST_R2, merge

__all__ = ["FAKE_ENSEMBLE_TEST_R2", "FakeFoldRunner", "install_fake_runner"]


@dataclass(kw_only=True, eq=False)
class FakeFoldRunner:
    """A FoldRunner with ``run`` and no processes."""

    mode: str = "subprocess"
    fail_trials: Collection[int] = ()
    failure: tuple[str, str, int] = ("NaN in X_train row 3", "data_error", 1)  # message, type, fold
    explode_on_trial: int | None = None
    explosion: type[BaseException] = RuntimeError
    seed_in_metrics: bool = False  # a tiny seed term makes a wrong fold seed visible in the values
    capacity: int = 2  # device slots it pretends to have
    job_sleep_s: float = 0.0  # each job "trains" this long (its slot's jobs one after another)
    calls: list[list[list[Job]]] = field(default_factory=list)  # every run() call's groups
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # fold file -> its arrays
    merges: list[tuple[list[Path], Path, Path]] = field(default_factory=list)  # (fold checkpoints, merged, score)
    persistent: bool | None = None  # set by install_fake_runner's factory
    closed: bool = False

    def _result(self, req: TrainRequest) -> dict[str, Any]:
        with np.load(req.data_path, allow_pickle=False) as npz:
            self.arrays[req.data_path] = {k: npz[k] for k in npz.files}
        val = 0.6 - 0.1 * abs(np.log10(req.params.learning_rate) + 3.0)
        if self.seed_in_metrics:
            val += (req.seed % 997) * 1e-6
        train = val + 0.05 * len(req.params.hidden_layers)
        out = {"status": "complete", "model_type": "neural_net", "r2": val, "train_r2": train,
               "val_mse": 1.0 - val, "train_mse": 1.0 - train, "duration": 0.01, "device": "cpu",
               "trial_number": req.trial_number, "fold_idx": req.fold_idx, "job_id": req.job_id,
               "epochs_run": 7, "best_epoch": 4}
        if "X_test" in self.arrays[req.data_path]:
            out["test_r2"], out["test_mse"] = val - 0.01, 1.01 - val
        if req.save_model_path:
            Path(req.save_model_path).write_bytes(FAKE_CHECKPOINT)
            out["model_path"] = req.save_model_path
        return out

    def _merge(self, req: MergeRequest) -> dict[str, Any]:
        """The final model: every fold must have saved its checkpoint; the score file's
        arrays and the call are recorded (``arrays``, ``merges``)."""
        missing = [p for p in req.fold_paths if not Path(p).is_file()]
        assert not missing, f"the final model's folds saved no checkpoint at {missing}"
        with np.load(req.score_path, allow_pickle=False) as npz:
            self.arrays[req.score_path] = {k: npz[k] for k in npz.files}
        assert "X_test" in self.arrays[req.score_path], \
            f"the final model's score file {req.score_path} has no test rows"
        self.merges.append(([Path(p) for p in req.fold_paths], Path(req.out_path), Path(req.score_path)))
        return {**merge(req), "trial_number": req.trial_number, "job_id": req.job_id}

    def _outcome(self, req: Job) -> dict[str, Any] | JobError:
        if isinstance(req, MergeRequest):
            return self._merge(req)
        message, error_type, fold = self.failure
        if req.trial_number in self.fail_trials and req.fold_idx == fold:
            return JobError(message, error_type, trial_number=req.trial_number, fold_idx=fold, job_id=req.job_id)
        return self._result(req)

    @property
    def requests(self) -> list[TrainRequest]:
        """Every train request of every call, in the order sent (merges: ``merges``)."""
        return [r for call in self.calls for g in call for r in g if isinstance(r, TrainRequest)]

    @property
    def train_calls(self) -> list[list[list[TrainRequest]]]:
        """Every call that trained folds (not the final model's merge)."""
        return [c for c in self.calls if all(isinstance(r, TrainRequest) for g in c for r in g)]  # type: ignore[misc]

    @property
    def fused_groups(self) -> list[list[TrainRequest]]:
        """Every group of two or more jobs sent."""
        return [g for call in self.calls for g in call if len(g) > 1]

    def run(self, groups: Sequence[Sequence[Job]]) -> list[list[dict[str, Any] | JobError]]:
        assert not self.closed
        groups = check_groups(groups)
        self.calls.append(groups)
        for g in groups:  # what the worker checks before fusing
            assert len(g) == 1 or len({fusion_key(r) for r in g}) == 1, \
                "a group mixes layer shapes"  # type: ignore[arg-type]
        if self.explode_on_trial in {r.trial_number for g in groups for r in g}:
            raise self.explosion("the runner blew up")
        if self.job_sleep_s > 0:
            # Groups share the slots; a slot trains its groups one after another.
            time.sleep(self.job_sleep_s * -(-len(groups) // max(1, self.capacity)))
        return [[self._outcome(r) for r in g] for g in groups]

    def summary(self) -> RunnerStats:
        groups = [g for call in self.calls for g in call]
        fusion = FusionRecord(groups=len(groups), jobs=len(self.requests), fused_groups=len(self.fused_groups),
                              largest_group=max([0, *(len(g) for g in groups)]))
        return RunnerStats(mode=self.mode, devices=["CPU-0"], fusion=fusion, timings=Timings(jobs=len(self.requests)))

    def wait_ready(self) -> None:
        """Nothing boots: ready at once."""

    def close(self) -> None:
        self.closed = True


def install_fake_runner(monkeypatch: Any, **defaults: Any) -> tuple[list[FakeFoldRunner], dict[str, Any]]:
    """Make the optimizer build :class:`FakeFoldRunner` s instead of real runners; returns the
    runners made and an options dict whose entries override ``defaults`` for the runners made after."""
    from step5.optimizer import optimizer as optimizer_module

    made: list[FakeFoldRunner] = []
    options: dict[str, Any] = {}

    def factory(slots: Any, policy: Any, *, persistent: bool, wait: bool = True) -> FakeFoldRunner:
        made.append(FakeFoldRunner(**{**defaults, **options, "persistent": persistent}))
        return made[-1]

    monkeypatch.setattr(optimizer_module, "WorkerPool", factory)
    return made, options
