"""The neural-net hyperparameter search space: what Optuna may try for one trial
(the table and the reasons: docs/optimizer-internals.md#search_space)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from step5.protocol import NNParams

LAYER_WIDTHS = (8, 16, 32, 64, 128, 256)
WEIGHT_DECAY_RANGE = (1e-6, 1.0)
LEARNING_RATE_RANGE = (3e-4, 2e-2)
PATIENCE_RANGE = (8, 30)
#: The rates tried once input dropout is on; "off" (0) is its own choice, as likely as
#: "on" (see the module doc).
INPUT_DROPOUT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5)
#: Input sparsity, in units of :attr:`DataShape.lasso_scale`: a net's (``input_sparsity_rel``)
#: and a linear model's (``linear_sparsity_rel``), searched apart because they sit apart.
NET_SPARSITY_RANGE = (0.02, 1.0)
LINEAR_SPARSITY_RANGE = (0.05, 2.0)
MAX_LAYERS = 3
#: Candidate mini-batch sizes; :meth:`DataShape.batch_sizes` offers those that suit a fold.
BATCH_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: At most this many steps per epoch (larger folds get larger batches) ...
MAX_STEPS_PER_EPOCH = 64
#: ... and at least this many, where the fold is large enough (smaller batches for small folds).
MIN_STEPS_PER_EPOCH = 3
NN_OPTIMIZERS = ("adam", "adamw")
#: Batch mode of every search and final-model request: the batch size is searched, and the
#: largest choice for a small fold spans it (one step per epoch: full batch).
SEARCH_BATCH_MODE = "mini"
#: The share of a training fold that early stopping sets aside (step5.nn.job carves it).
_EARLY_STOPPING_FRACTION = 0.2


@dataclass(frozen=True)
class DataShape:
    """What the priors follow: the rows one fold model fits on and the number of inputs."""

    fit_rows: int
    features: int

    @classmethod
    def of_development(cls, dev_rows: int, features: int, k_folds: int) -> "DataShape":
        """The shape of the fold models of K-fold CV on ``dev_rows`` rows: each trains on
        (K-1)/K of them and early-stops on a fifth of those (step5.nn.job)."""
        if dev_rows < 2 or features < 1 or k_folds < 2:
            raise ValueError(f"need >= 2 rows, >= 1 feature and >= 2 folds, got {dev_rows}, {features}, {k_folds}")
        train = dev_rows - math.ceil(dev_rows / k_folds)
        return cls(max(2, train - round(train * _EARLY_STOPPING_FRACTION)), features)

    @property
    def lasso_scale(self) -> float:
        """``sqrt(2 ln(D) / n)``, the lasso's universal threshold: input sparsity is searched as a multiple of it
        (docs/optimizer-internals.md#search_space, "Input sparsity in the data's units")."""
        return math.sqrt(2.0 * math.log(max(self.features, 2)) / self.fit_rows)

    def batch_sizes(self) -> tuple[int, ...]:
        """The sizes giving a fold MIN_STEPS_PER_EPOCH to MAX_STEPS_PER_EPOCH steps, and one spanning it; never empty."""
        n = self.fit_rows
        fits = [b for b in BATCH_SIZES if n / MAX_STEPS_PER_EPOCH <= b <= max(n / MIN_STEPS_PER_EPOCH, BATCH_SIZES[0])]
        spanning = next((b for b in BATCH_SIZES if b >= n), None)
        if spanning is not None and spanning not in fits:
            fits.append(spanning)
        return tuple(fits) if fits else (BATCH_SIZES[-1],)


def suggest_nn_params(trial: optuna.Trial, *, max_epochs: int, data: DataShape,
                      fixed_dropout: float | None = None) -> NNParams:
    """Ask ``trial`` for one MLP configuration for data of shape ``data``;
    ``fixed_dropout`` pins dropout instead of searching it."""
    n_layers = trial.suggest_int("n_layers", 0, MAX_LAYERS)
    hidden = tuple(trial.suggest_categorical(f"width_l{i}", LAYER_WIDTHS) for i in range(n_layers))
    if fixed_dropout is not None:
        dropout = fixed_dropout
    else:  # a linear model has no hidden unit to drop
        dropout = trial.suggest_float("dropout", 0.0, 0.5) if n_layers else 0.0
    if n_layers:
        sparsity = trial.suggest_float("input_sparsity_rel", *NET_SPARSITY_RANGE, log=True)
    else:
        sparsity = trial.suggest_float("linear_sparsity_rel", *LINEAR_SPARSITY_RANGE, log=True)
    raw: dict[str, Any] = {
        "hidden_layers": list(hidden),
        "learning_rate": trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True),
        "dropout": float(dropout),
        "input_dropout": _suggest_input_dropout(trial),
        "input_sparsity": sparsity * data.lasso_scale,
        "epochs": int(max_epochs),
        "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True),
        "optimizer": trial.suggest_categorical("optimizer", NN_OPTIMIZERS),
        "batch_size": trial.suggest_categorical("batch_size", data.batch_sizes()),
        "early_stopping_patience": trial.suggest_int("early_stopping_patience", *PATIENCE_RANGE),
        "gradient_clip": trial.suggest_float("gradient_clip", 0.5, 5.0),
    }
    # The same validation the worker applies: a bad range here fails in the parent, loudly.
    return NNParams.from_dict(raw)


def first_nn_trials(data: DataShape, *, fixed_dropout: float | None = None) -> list[dict[str, Any]]:
    """The configurations a fresh NN study tries before any sampled one (Optuna's
    ``enqueue_trial``), as the search space's own parameters: see the module doc."""
    sizes = data.batch_sizes()
    small_batch = min(sizes, key=lambda b: abs(b - 64))
    common = {"input_dropout_on": False, "batch_size": small_batch, "gradient_clip": 2.0,
              "early_stopping_patience": 20}
    hidden_dropout = {"dropout": 0.1} if fixed_dropout is None else {}
    plain = {
        "n_layers": 1, "width_l0": 64, "learning_rate": 3e-3, "input_sparsity_rel": NET_SPARSITY_RANGE[0],
        "weight_decay": 0.1, "optimizer": "adamw", **hidden_dropout, **common,
    }
    sparse = {
        "n_layers": 2, "width_l0": 128, "width_l1": 64, "learning_rate": 3e-3, "input_sparsity_rel": 0.3,
        "weight_decay": 0.1, "optimizer": "adamw", **hidden_dropout, **common,
    }
    linear = {
        "n_layers": 0, "learning_rate": 5e-3, "linear_sparsity_rel": 0.6, "weight_decay": 1e-4, "optimizer": "adam",
        **common,
    }
    return [plain, sparse, linear]


def _suggest_input_dropout(trial: optuna.Trial) -> float:
    """0 when the trial turns input dropout off, else one of :data:`INPUT_DROPOUT_RATES` (why a gate and why
    this name: docs/optimizer-internals.md#search_space)."""
    if not trial.suggest_categorical("input_dropout_on", (False, True)):
        return 0.0
    return float(trial.suggest_categorical("input_dropout_rate", INPUT_DROPOUT_RATES))
