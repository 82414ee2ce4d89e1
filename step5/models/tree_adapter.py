"""The one interface every tree library sits behind (xgboost, lightgbm, catboost).

:mod:`step5.models.trees` does everything the libraries share (argument checks, the GPU
choice and its CPU fallback, metrics, atomic checkpoint files) and asks an adapter, found
in ``trees.ADAPTERS`` by model type, for the five things that differ::

    trees.train_fold --suggest / fit--> adapter --> library booster --> TreeModel
    TreeModel.predict --predict-------> adapter
    trees.save_model --save (temp path)--> adapter;  trees.load_model --load--> adapter

An adapter holds no state and imports its library only inside its methods, so importing
the adapters (and :mod:`step5.models.trees`) costs nothing when the ``trees`` extra is not
installed. Search spaces use the names each library reads, so a sidecar's
``hyperparameters`` say exactly what trained the model (docs/models.md lists them).
"""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import numpy as np


class LoadedBooster(NamedTuple):
    """What an adapter reads back from a checkpoint file."""

    booster: Any  # the library's model object, set up to predict on the CPU
    n_features: int
    n_iterations: int  # boosting rounds the file holds
    feature_names: Sequence[str] | None  # as the library reports them (may be made up, e.g. Column_0)


class TreeAdapter(Protocol):
    """One gradient-boosting library: its search space, fit, predict, save and load."""

    #: The model type (and the library's module and PyPI name): "xgboost", ...
    model_type: str
    #: Library parameters :meth:`suggest` may produce; train_fold accepts exactly these
    #: (plus the shared driver keys), so a typo in a hand-written dict is an error.
    library_keys: tuple[str, ...]
    #: Library parameters whose value is one of a few strings (xgboost's ``booster``), and
    #: those strings; every other library parameter is a finite number.
    choice_keys: Mapping[str, tuple[str, ...]]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One point of the search space from an Optuna trial: the library's parameters
        plus ``n_estimators``, as plain ints, floats and choice strings (JSON-ready)."""
        ...

    def fit(
        self, params: dict[str, Any], X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray,
        *, max_rounds: int, early_stopping_rounds: int, seed: int, n_threads: int | None, device: str,
        feature_names: list[str] | None,
    ) -> tuple[Any, int]:
        """Boost at most ``max_rounds`` rounds, stopping once the validation loss has not
        improved for ``early_stopping_rounds``; returns (booster cut to its best round, the
        number of rounds it keeps). ``device`` is "cpu" or "cuda:N"; the returned booster
        predicts on the CPU. ``params`` are checked library parameters (:attr:`library_keys`)."""
        ...

    def reads_validation_rows(self, params: dict[str, Any]) -> bool:
        """Whether a fit of ``params`` early-stops on its validation rows. One that does not
        only scores them, so its final model can fit every development row."""
        ...

    def cpu_only_reason(self, params: dict[str, Any]) -> str | None:
        """Why a fit of ``params`` trains on the CPU even where a GPU is asked for, or None
        when it may use one (the device choice is then :class:`~step5.models.trees.TreeDevices`')."""
        ...

    def predict(self, booster: Any, X: np.ndarray) -> np.ndarray:
        """Predictions for the float32 rows ``X`` (n >= 1, n_features), any float dtype, shape (n,)."""
        ...

    def save(self, booster: Any, path: Path) -> None:
        """Write ``booster`` to ``path`` in the library's native format (the name ends with
        the checkpoint's suffix; the caller makes the write atomic)."""
        ...

    def load(self, path: Path) -> LoadedBooster:
        """Read a file written by :meth:`save`; any library error propagates."""
        ...

    def library_error(self) -> type[BaseException]:
        """The exception class the library raises for a fit it rejects (bad parameter
        value, out of memory); imports the library."""
        ...

    def gpu_unsupported_reason(self, gpu_id: int) -> str | None:
        """Why this library's build cannot train on GPU ``gpu_id``, or None when it can
        (or cannot tell before trying: a failing GPU fit then falls back to CPU)."""
        ...


#: ``choice_keys`` of a library whose parameters are all numbers.
NO_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType({})


def suggest_boosting(trial: Any) -> dict[str, Any]:
    """The part of every search space that all three libraries share, suggested first (the
    order of suggestions decides what a seeded sampler draws): the cap on boosting rounds
    (early stopping usually ends sooner) and the learning rate."""
    return {
        "n_estimators": trial.suggest_int("n_estimators", 100, 1000, step=50),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
    }
