"""The neural-net hyperparameter search space: what Optuna may try for one trial.

:func:`suggest_nn_params` turns a trial into a validated :class:`~step5.protocol.NNParams`
for data of a given :class:`DataShape` (the rows one fold model fits on, and the number
of input columns): two priors follow the data, the rest are fixed ranges.

============================  =====================================================
``n_layers``                   0 .. 3 hidden layers; 0 is a linear model
``width_l{i}``                 8, 16, 32, 64, 128 or 256 units per layer (shrinking not forced)
``learning_rate``              3e-4 .. 2e-2, log scale
``dropout``                    0.0 .. 0.5, or fixed by ``--dropout`` (not searched then;
                               not asked of a linear model, which has no hidden unit)
``input_dropout_on``           whether to drop input features at all (always searched)
``input_dropout_rate``         0.1, 0.2, 0.3, 0.4 or 0.5, asked only when on; it becomes
                               ``NNParams.input_dropout`` (0 when off)
``input_sparsity_rel``         a net's input sparsity, 0.02 .. 1 (log) times the data's
                               lasso threshold ``sqrt(2 ln D / n)`` (:attr:`DataShape.lasso_scale`)
``linear_sparsity_rel``        a linear model's, 0.05 .. 2 (log) times the same
``weight_decay``               1e-6 .. 1.0, log scale
``optimizer``                  adam or adamw (plain SGD needs far more tuning to compete)
``batch_size``                 by the fold's rows (:meth:`DataShape.batch_sizes`): 3 to 64
                               steps per epoch, and one size that spans a small fold (full batch)
``early_stopping_patience``    8 .. 30 epochs (on rows carved from each training fold)
``gradient_clip``              0.5 .. 5.0
``epochs``                     not searched: the cap ``--nn-max-epochs`` [200]; early
                               stopping decides how many actually run
============================  =====================================================

**Mini-batches at every size** (issue 36). Every search and final-model request is sent
with ``batch_mode="mini"`` (:data:`SEARCH_BATCH_MODE`). The trainer's ``auto`` mode trains
a fold of up to 10,000 rows in full batch, one optimizer step per epoch, so on the tables
the pipeline meets (hundreds to thousands of rows) a whole trial had at most 200 steps
under the default epoch cap and an early-stopping patience of 5 to 20 *steps*: folds
stopped at epoch 9 of 200 on noise, others ran out of epochs still improving. In mini-batches of
32 to 128 rows the same 200 epochs are 1,000 to 3,000 steps, and the patience means what
it says. The batch sizes offered give 3 to 64 steps per epoch, so a large table trains in
large batches (a GPU's pass stays short), and the largest choice on a small table spans the
whole fold, so full batch remains a choice.

**Input sparsity in the data's units.** Input sparsity (a group lasso on each input
column's weights, applied as a proximal step: docs/training.md) zeroes a column whose data
gradient stays under the strength. For a column of pure noise that gradient is of the order
of ``sqrt(2 ln D / n)`` on a standardised target (the lasso's universal threshold), so a
fixed range fits one table size only: scikit-learn's LassoCV picks 0.12 on diabetes with
80 noise columns (226 rows fit per fold; the threshold is 0.20 there), while 6,400 rows
of 16 columns have a threshold of 0.03. The search asks for a multiple of the threshold
instead, the net's and the linear model's apart (a net's best multiples lie near 0.1 to
0.3, a lasso's near 0.5 to 1, and TPE models each parameter on its own).

**Three known-good first trials** (:func:`first_nn_trials`): a plain MLP (one layer of 64,
input sparsity at the range's floor), a sparse two-layer net (128, 64 units, 0.3 of the
threshold) and a lasso (a linear model at 0.6 of it), so TPE's model has a strong point of
each kind before its random start-up trials, whatever they draw. Both nets carry AdamW
decay 0.1 and dropout 0.1: without them the plain net fitted its training rows to R² 0.94
to 0.99 and scored CV R² 0.29 to 0.61 on the tuning tables with noise columns
(docs/quality.md, issue 36). The sparse net had the best CV R² of the fixed configurations
tried on four of the six tuning tables.

Regularisation reaches as far as small, noisy tabular data needs (issue 14): a linear
model, narrow layers (8, 16 units) and weight decay up to 1.0 (with Adam's L2 decay, far
stronger than scikit-learn's MLPRegressor ``alpha=10`` on a few hundred rows). Input
dropout hides a random part of the features from each training row; it is an on/off
choice and then a rate because where it does not help it hurts a lot, so "off" must be as
likely as "on" while TPE is still drawing at random (a uniform range almost never drew a
rate near 0, which cost friedman1 0.05 to 0.07 of test R²; docs/quality.md has the
history). ``--dropout`` pins the hidden layers' dropout only (the existing optimizer's
meaning); input dropout is searched either way.

The epoch cap is a search-space bound, not a test hook: it bounds every trial's (and the
final model's) training time, and a user with little time or data lowers it honestly.
The full parameter object of each trial is stored in its ``user_attrs["params"]``, so the
final model is rebuilt from exactly what the trial trained with, even after the search
space changes between a run and its resumption.
"""
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
        """``sqrt(2 ln(D) / n)``: the lasso penalty at which a column of pure noise stops
        paying for itself on a standardised target (the universal threshold of the lasso
        theory, for noise of sd 1). Input sparsity is searched as a multiple of it, so a
        table of 200 rows and one of 20,000 start from the same relative point."""
        return math.sqrt(2.0 * math.log(max(self.features, 2)) / self.fit_rows)

    def batch_sizes(self) -> tuple[int, ...]:
        """The mini-batch sizes that give a fold between :data:`MIN_STEPS_PER_EPOCH` and
        :data:`MAX_STEPS_PER_EPOCH` steps per epoch, and one that spans a small fold (full
        batch); never empty."""
        n = self.fit_rows
        fits = [b for b in BATCH_SIZES if n / MAX_STEPS_PER_EPOCH <= b <= max(n / MIN_STEPS_PER_EPOCH, BATCH_SIZES[0])]
        spanning = next((b for b in BATCH_SIZES if b >= n), None)
        if spanning is not None and spanning not in fits:
            fits.append(spanning)
        return tuple(fits) if fits else (BATCH_SIZES[-1],)


def suggest_nn_params(
    trial: optuna.Trial,
    *,
    max_epochs: int,
    data: DataShape,
    fixed_dropout: float | None = None,
) -> NNParams:
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
    """0 when the trial turns input dropout off, else one of :data:`INPUT_DROPOUT_RATES`.

    The rate is a parameter only of trials that turned it on; independent TPE models it on
    those trials alone. Its name is new with the gate (it was ``input_dropout``, with 0
    among the choices), so a study resumed from before the gate does not meet a changed
    choice list under an old name, which Optuna refuses."""
    if not trial.suggest_categorical("input_dropout_on", (False, True)):
        return 0.0
    return float(trial.suggest_categorical("input_dropout_rate", INPUT_DROPOUT_RATES))
