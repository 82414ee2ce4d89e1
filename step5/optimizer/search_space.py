"""The neural-net hyperparameter search space: what Optuna may try for one trial.

:func:`suggest_nn_params` turns a trial into a validated :class:`~step5.protocol.NNParams`.
The ranges suit small tabular MLPs (tens of features, thousands to millions of rows):

============================  =====================================================
``n_layers``                   0 .. 3 hidden layers; 0 is a linear model
``width_l{i}``                 8, 16, 32, 64, 128 or 256 units per layer (shrinking not forced)
``learning_rate``              1e-4 .. 1e-2, log scale
``dropout``                    0.0 .. 0.5, or fixed by ``--dropout`` (not searched then;
                               not asked of a linear model, which has no hidden unit)
``input_dropout_on``           whether to drop input features at all (always searched)
``input_dropout_rate``         0.1, 0.2, 0.3, 0.4 or 0.5, asked only when on; it becomes
                               ``NNParams.input_dropout`` (0 when off)
``input_sparsity``             1e-4 .. 0.1, log scale: group lasso on the input columns
``weight_decay``               1e-6 .. 1.0, log scale
``optimizer``                  adam or adamw (plain SGD needs far more tuning to compete)
``batch_size``                 64, 128, 256 or 512 (mini-batch mode only)
``early_stopping_patience``    5 .. 20 epochs (on rows carved from each training fold)
``gradient_clip``              0.5 .. 5.0
``epochs``                     not searched: the cap ``--nn-max-epochs`` [200]; early
                               stopping decides how many actually run
============================  =====================================================

Regularisation reaches as far as small, noisy tabular data needs (issue 14): a linear
model, narrow layers (8, 16 units) and weight decay up to 1.0. The linear model (no hidden
layer: ``Linear(D, 1)``, trained by the same core, with input sparsity acting as a lasso on
its weights) is where a net ends when regularised all the way; on diabetes with 80 noise
columns a lasso scores test R² 0.47 where every MLP trial of a 30-trial search stayed at
0.31 to 0.34, and with this choice the search picked a linear trial there (0.386). A
quarter of the random start-up trials are linear; on data that needs interactions
(friedman1, where a linear model scores 0.75) TPE leaves them after that.

With Adam's L2 decay, a weight decay of 1.0 is far stronger than scikit-learn's
MLPRegressor ``alpha=10`` on a few hundred rows (``alpha / n_rows`` there), which its
grid picks on the diabetes data with many uninformative columns; a cap of 1e-2 left the
search only overfitting nets there (bench/quality.py measures it).
Input dropout hides a random part of the features from each training row, so no single
(possibly uninformative) column can be relied on. It reaches 0.5 because that is where
the benefit is on data with many uninformative columns: on diabetes with 80 noise columns
(353 development rows, 90 features) a 0.3 cap left the best trials of a 30-trial search
at the cap (0.25 to 0.28) with CV R² 0.27 to 0.30; with 0.5 they chose 0.39 to 0.49 and
reached CV R² 0.32 to 0.34. The best trial's fold-ensemble test R² rose from 0.337 to
0.348, and from 0.245 to 0.295 with another sampler seed (bench.quality, issue 14; the
seed moves it more than the space does). On ten informative features a high rate hides
much of the signal, and the search chooses less there (0.03 on diabetes, split seed 42,
whose test R² stayed above the best baseline). ``--dropout`` pins the hidden
layers' dropout only (the existing optimizer's meaning); input dropout is searched either way.
It is an on/off choice and then a rate because where it does not help it hurts a lot,
so "off" must be as likely as "on" while TPE is still drawing at random. A uniform range
almost never drew a rate near 0: on friedman1 (ten features that interact) the best
trials of a 30-trial search all carried input dropout 0.16 to 0.27, and their
configurations score fold-ensemble test R² 0.85 to 0.88 with 0.2 against 0.92 to 0.94
with 0 (the best baseline there is 0.948). Six equal choices (0, 0.1, ..., 0.5) were not
enough either: on friedman1 with 80 noise columns none of the ten random start-up trials
drew 0 (a one-in-six chance each), TPE then kept 0.1 for all 20 trials after them, and
the best reached CV R² 0.78 (test 0.83) where the same data without input dropout
reaches 0.89 (test 0.91). Behind a gate, "off" is every other start-up draw, and that
search reached test R² 0.89 there. The price is on data that wants a high rate: diabetes
with 80 noise columns scored 0.322 ± 0.006 over three search seeds behind the gate against
0.352 ± 0.018 with six equal rates; a gate with only 0.1, 0.3 and 0.5 (so each rate is as
likely as before) did no better on either (0.30 to 0.33; 0.84 on friedman1 with noise), so
the rates' odds do not explain that cost (``bench.quality --repeats``, docs/quality.md).
Input sparsity (a group lasso on each input feature's weights in the layer that reads the
inputs, applied as a proximal step: docs/training.md) lets the net drop uninformative
columns, exactly, which neither weight decay nor dropout does. As a loss term, before the
proximal step, a fixed configuration took friedman1 with 80 noise columns from test R²
0.71 to 0.91 at 0.03, and diabetes with 80 noise columns from 0.31 to 0.35; the proximal
step is stronger at the same value (on the unit test's data an MLP keeps R² 0.99 at 0.01
and starves at 0.05 to 0.1), so the top of the range is where it drops informative
columns too, and at 1e-4 it is as good as off: a log range between lets the search
choose either.

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
    common = {"input_dropout_on": False, "optimizer": "adam", "batch_size": small_batch, "gradient_clip": 2.0}
    hidden_dropout = {"dropout": 0.0} if fixed_dropout is None else {}
    plain = {
        "n_layers": 1, "width_l0": 64, "learning_rate": 3e-3, "input_sparsity_rel": NET_SPARSITY_RANGE[0],
        "weight_decay": 1e-4, "early_stopping_patience": 20, **hidden_dropout, **common,
    }
    sparse = {
        "n_layers": 2, "width_l0": 128, "width_l1": 64, "learning_rate": 2e-3, "input_sparsity_rel": 0.2,
        "weight_decay": 1e-5, "early_stopping_patience": 20, **hidden_dropout, **common,
    }
    linear = {
        "n_layers": 0, "learning_rate": 5e-3, "linear_sparsity_rel": 0.6, "weight_decay": 1e-4,
        "early_stopping_patience": 20, **common,
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
