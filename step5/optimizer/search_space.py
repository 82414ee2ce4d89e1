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

from typing import Any

import optuna

from step5.protocol import NNParams

LAYER_WIDTHS = (8, 16, 32, 64, 128, 256)
WEIGHT_DECAY_RANGE = (1e-6, 1.0)
#: The rates tried once input dropout is on; "off" (0) is its own choice, as likely as
#: "on" (see the module doc).
INPUT_DROPOUT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5)
INPUT_SPARSITY_RANGE = (1e-4, 0.1)
MAX_LAYERS = 3
BATCH_SIZES = (64, 128, 256, 512)
NN_OPTIMIZERS = ("adam", "adamw")


def suggest_nn_params(
    trial: optuna.Trial,
    *,
    max_epochs: int,
    fixed_dropout: float | None = None,
) -> NNParams:
    """Ask ``trial`` for one MLP configuration; ``fixed_dropout`` pins dropout instead of searching it."""
    n_layers = trial.suggest_int("n_layers", 0, MAX_LAYERS)
    hidden = tuple(trial.suggest_categorical(f"width_l{i}", LAYER_WIDTHS) for i in range(n_layers))
    if fixed_dropout is not None:
        dropout = fixed_dropout
    else:  # a linear model has no hidden unit to drop
        dropout = trial.suggest_float("dropout", 0.0, 0.5) if n_layers else 0.0
    raw: dict[str, Any] = {
        "hidden_layers": list(hidden),
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "dropout": float(dropout),
        "input_dropout": _suggest_input_dropout(trial),
        "input_sparsity": trial.suggest_float("input_sparsity", *INPUT_SPARSITY_RANGE, log=True),
        "epochs": int(max_epochs),
        "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True),
        "optimizer": trial.suggest_categorical("optimizer", NN_OPTIMIZERS),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
        "early_stopping_patience": trial.suggest_int("early_stopping_patience", 5, 20),
        "gradient_clip": trial.suggest_float("gradient_clip", 0.5, 5.0),
    }
    # The same validation the worker applies: a bad range here fails in the parent, loudly.
    return NNParams.from_dict(raw)


def first_nn_trials(*, fixed_dropout: float | None = None) -> list[dict[str, Any]]:
    """The configurations a fresh NN study tries before any sampled one (Optuna's
    ``enqueue_trial``), as the search space's own parameters.

    Two ends of the space, so that TPE's model has a strong point of each kind from the
    start, whatever the random start-up trials draw (these two are the first of TPE's ten
    start-up trials): a lasso-like linear model, and a two-layer net of moderate width
    with input sparsity and a small learning rate (the kind of net that scored best on
    friedman1 with 80 noise columns). The linear model's sparsity is the range's top:
    scikit-learn's LassoCV picks the equivalent of 0.12 on diabetes with 80 noise columns
    (0.005 to 0.03 on the plain diabetes splits, where TPE goes lower from there), and a
    first trial at 0.03 there overfitted (train R² 0.64, CV 0.35) yet stayed the best of
    its search. Without them, a search on data with many uninformative columns could
    spend its start-up trials on narrow nets that input sparsity starves, and settle on
    the linear model or a narrow net (docs/quality.md:
    friedman1 with 80 noise columns 0.75 to 0.82 in two of three search seeds, 0.92 in
    the third, which found a wide net; 0.89 to 0.93 in all three with these first).
    """
    linear = {
        "n_layers": 0, "learning_rate": 5e-3, "input_dropout_on": False, "input_sparsity": 0.1,
        "weight_decay": 1e-4, "optimizer": "adam", "batch_size": 128, "early_stopping_patience": 15,
        "gradient_clip": 1.0,
    }
    mlp = {
        "n_layers": 2, "width_l0": 128, "width_l1": 64, "learning_rate": 7e-4, "input_dropout_on": False,
        "input_sparsity": 0.04, "weight_decay": 1e-5, "optimizer": "adam", "batch_size": 64,
        "early_stopping_patience": 10, "gradient_clip": 2.0,
        **({"dropout": 0.1} if fixed_dropout is None else {}),
    }
    return [linear, mlp]


def _suggest_input_dropout(trial: optuna.Trial) -> float:
    """0 when the trial turns input dropout off, else one of :data:`INPUT_DROPOUT_RATES`.

    The rate is a parameter only of trials that turned it on; independent TPE models it on
    those trials alone. Its name is new with the gate (it was ``input_dropout``, with 0
    among the choices), so a study resumed from before the gate does not meet a changed
    choice list under an old name, which Optuna refuses."""
    if not trial.suggest_categorical("input_dropout_on", (False, True)):
        return 0.0
    return float(trial.suggest_categorical("input_dropout_rate", INPUT_DROPOUT_RATES))
