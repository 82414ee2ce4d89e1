"""Fixtures the optimizer's in-process tests share: a config for a run on the sample inputs,
a fake fold runner in place of the real one, and the Optuna study a run left behind."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import optuna
import pytest

from step5.optimizer import OptimizerConfig
from step5.testing.fake_runner import FakeFoldRunner, install_fake_runner


@pytest.fixture
def config_defaults() -> dict[str, Any]:
    """Config fields a test module's runs use unless a test says otherwise (over
    :func:`make_config`'s own); a module overrides this fixture to change them."""
    return {}


@pytest.fixture
def make_config(sample_inputs, tmp_path: Path, config_defaults: dict[str, Any]) -> Callable[..., OptimizerConfig]:
    """``make_config(name="out", inputs=None, **fields)``: an :class:`OptimizerConfig` for an
    in-process run: 3 trials x 3 folds (one partition) on one CPU worker, seed 11, no policy
    file, output in ``tmp_path / name``. ``inputs`` is a (survivors, history) pair, the sample
    inputs by default."""

    def make(name: str = "out", *, inputs: tuple[Any, Any] | None = None, **fields: Any) -> OptimizerConfig:
        survivors, history = sample_inputs if inputs is None else inputs
        values: dict[str, Any] = dict(
            survivors=Path(survivors), lottery_data=Path(history), trials=3, k_folds=3,
            output_dir=tmp_path / name, policy_path=None, cpu_workers=1, seed=11,
            diagnostics_dir=tmp_path / "diag", command_line=["test"],
            # One K-fold partition: by default a tree run on the sample's 480 dev rows would
            # score every trial 3 times over. Repetition has tests of its own.
            cv_repeats=1,
        )
        values.update(config_defaults)
        values.update(fields)
        return OptimizerConfig(**values)

    return make


def _study_of(config: OptimizerConfig, outcome: Any) -> optuna.Study:
    return optuna.load_study(study_name=outcome.sidecar["optuna"]["study_name"],
                             storage=f"sqlite:///{(config.output_dir / 'optuna_step5.db').resolve()}")


@pytest.fixture
def study_of() -> Callable[[OptimizerConfig, Any], optuna.Study]:
    """``study_of(config, outcome)``: the study a run with ``config`` used (its default SQLite
    storage in the output dir), named by the run's sidecar."""
    return _study_of


@pytest.fixture
def fake_runner(monkeypatch) -> tuple[list[FakeFoldRunner], dict[str, Any]]:
    """Runs in this test get a :class:`FakeFoldRunner`; returns (runners made, options for
    the next ones)."""
    return install_fake_runner(monkeypatch)
