"""The one training core: M same-shape MLPs trained in one pass, each exactly as if alone (a lone
fold is M = 1). docs/training.md describes the loop, fusing and determinism."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from step5.devices import TORCH_THREADS_ENV as THREADS_ENV
from step5.nn.device_loop import EpochLoop, resolve_train_loop
from step5.nn.model import FusedMLP
from step5.protocol import OPTIMIZERS, resolve_batch_mode

logger = logging.getLogger(__name__)

EVAL_CHUNK_ROWS = 65_536  # rows per evaluation forward, bounding activation memory
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
#: Rows are padded (masked) up to a multiple of this, alone as in a fused pass, so sums add in
#: the same order whichever models share a pass (docs/training.md, "Unequal fold lengths").
ROW_BUCKET = 64


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by every model of one pass (they fix the tensor shapes)."""

    hidden_layers: tuple[int, ...] = (128, 64)  # widths of the hidden layers
    use_leaky_relu: bool = True  # LeakyReLU(0.01) instead of ReLU after each BatchNorm
    normalize_features: bool = True  # standardise X with each model's own train-fold stats
    optimizer: str = "adam"  # adam (L2 decay) | adamw (decoupled decay) | sgd (momentum 0.9)
    epochs: int = 100  # upper bound on epochs; early stopping may end a model sooner
    batch_mode: str = "auto"  # full | mini | auto (full when n_train <= AUTO_FULL_BATCH_MAX_ROWS)
    batch_size: int = 256  # rows per mini-batch (mini mode only)


@dataclass(frozen=True)
class ModelSpec:
    """Hyperparameters of one model; they may differ between the models of a pass."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.0  # L2 penalty (adam, sgd) or decoupled decay (adamw)
    dropout: float = 0.3  # after each hidden activation
    input_dropout: float = 0.0  # on the (standardised) input features
    input_sparsity: float = 0.0  # group-lasso strength on the weights reading each input feature; 0 = off
    seed: int = 0  # seeds this model's generator: init, dropout masks, batch order
    patience: int = 10  # epochs without an early-stopping improvement before stopping; 0 = never
    gradient_clip: float = 1.0  # max gradient norm over this model's parameters; 0 = off
    restore_best: bool = True  # restore the best early-stopping epoch's weights; False keeps the last


@dataclass(frozen=True)
class Fold:
    """One model's data: float32 features (n, D) and float64 targets (n,), original scale."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray | None = None  # scored after training, never used to fit or stop
    y_test: np.ndarray | None = None
    X_stop: np.ndarray | None = None  # early-stopping rows; None: stop on the validation rows
    y_stop: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None  # copied into the checkpoint

    @property
    def nbytes(self) -> int:
        arrays = (self.X_train, self.y_train, self.X_val, self.y_val, self.X_test, self.y_test)
        return sum(a.nbytes for a in arrays if a is not None)  # a file's fold has no X_stop

    @property
    def stop_rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self.X_stop is not None and self.y_stop is not None:
            return self.X_stop, self.y_stop
        return self.X_val, self.y_val


@dataclass
class TrainedModel:
    """What one model of a pass produced."""

    n_train: int
    n_val: int
    epochs_run: int  # epochs this model trained before stopping (or diverging)
    best_epoch: int  # 1-based epoch whose weights were restored (0 if it diverged)
    metrics: dict[str, float] = field(default_factory=dict)  # r2, val_mse, train_mse, train_r2 [+ test_*]
    error: str | None = None  # set when the model diverged (or its data overflowed); metrics are empty then
    error_type: str = "train_error"  # the JobError type of ``error``: data_error for data float32 cannot standardise
    state_dict: dict[str, Tensor] | None = None  # CPU, ReferenceMLP layout
    feature_mean: np.ndarray | None = None  # (D,) standardiser fitted on the train fold
    feature_scale: np.ndarray | None = None  # (D,)
    target_mean: float = 0.0
    target_std: float = 1.0
    val_pred: np.ndarray | None = None  # (n_val,) validation predictions, original scale


def configure_torch_threads(environ: Mapping[str, str] | None = None) -> int:
    """Apply ``STEP5_TORCH_THREADS`` (if set) and return the thread count in effect: results
    are bit-identical only between processes with the same count, and the parent splits the cores."""
    raw = (os.environ if environ is None else environ).get(THREADS_ENV)
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ROW_BUCKET` (the padded tensor length)."""
    return -(-n // ROW_BUCKET) * ROW_BUCKET


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private random stream on ``device``; global torch RNG state is never used."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(R^2, MSE) bit for bit as scikit-learn's ``r2_score`` and ``mean_squared_error``, in float64
    (a constant target: R^2 1.0 when predicted exactly, else 0.0; under two rows: NaN); callers
    reject non-finite metrics. Written out because importing ``sklearn.metrics`` (and scipy) was
    ~1 s of a worker's 2.3 s boot; tests/nn/test_nn_trainer.py holds it equal to scikit-learn's."""
    # sklearn's shapes and order of operations: one output column, summed along the rows.
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1, 1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1, 1)
    squared = (y_true - y_pred) ** 2
    mse = float(np.mean(squared, axis=0)[0])
    if len(y_true) < 2:
        return float("nan"), mse
    numerator = float(np.sum(squared, axis=0)[0])
    denominator = float(np.sum((y_true - np.mean(y_true, axis=0)) ** 2, axis=0)[0])
    if numerator == 0.0:
        return 1.0, mse
    return (1.0 - numerator / denominator if denominator != 0.0 else 0.0), mse


def _pad_rows(arrays: Sequence[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-model arrays of unequal length as one (M, N_max, ...) tensor of zero padding, and
    its (M, N_max) float row mask (1 = real row): the one upload of this data for the pass."""
    n_max = max(padded_rows(a.shape[0]) for a in arrays)
    out = np.zeros((len(arrays), n_max, *arrays[0].shape[1:]), dtype=np.float32)
    mask = np.zeros((len(arrays), n_max), dtype=np.float32)
    for m, a in enumerate(arrays):
        out[m, : a.shape[0]] = a
        mask[m, : a.shape[0]] = 1.0
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)


@torch.no_grad()
def predict_standardized(model: FusedMLP, X: Tensor) -> Tensor:
    """Eval-mode predictions (M, N) for X (M, N, D), in row chunks to bound memory."""
    model.eval()
    outs = [model(X[:, s : s + EVAL_CHUNK_ROWS]) for s in range(0, X.shape[1], EVAL_CHUNK_ROWS)]
    return torch.cat(outs, dim=1)[..., 0]


def masked_mse(pred: Tensor, y: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Per-model mean squared error over real rows: (M, N) x3, (M,) -> (M,)."""
    err = pred - y
    return (err * err * mask).sum(dim=1) / count


def clip_grads_per_model(grads: list[Tensor], max_norm: Tensor) -> list[Tensor]:
    """clip_grad_norm_'s rule per model: max_norm (M, 1, 1), 0 = no clipping."""
    # Accumulated tensor by tensor, in a fixed order: a stack(...).sum(dim=0) reduces
    # contiguously when M == 1 but strided when M > 1, so a lone model and the same model
    # in a fused pass would round their gradient norms differently.
    sq = grads[0].pow(2).sum(dim=(1, 2))  # (M,)
    for g in grads[1:]:
        sq = sq + g.pow(2).sum(dim=(1, 2))
    norm = sq.sqrt().view(-1, 1, 1)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))
    return [g * coef for g in grads]


class FunctionalOptimizer:
    """Adam / AdamW / SGD(momentum 0.9) with torch.optim's rules over parameters with a leading
    model dimension, per-model lr and decay (M, 1, 1), and a masked step (docs/training.md)."""

    def __init__(self, kind: str, params: Sequence[Tensor], lr: Tensor, weight_decay: Tensor) -> None:
        self.kind = kind
        self.params = list(params)
        self.lr = lr
        self.wd = weight_decay
        self.steps = torch.zeros_like(lr)  # per-model step count, for bias correction
        self.exp_avg = [torch.zeros_like(p) for p in self.params]  # Adam m / SGD momentum buffer
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params] if kind != "sgd" else []
        self._bc2_sqrt = torch.ones_like(lr)  # Adam's sqrt(bias correction 2), set by each step

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], active: Tensor) -> None:
        """Update the models where ``active`` (M, 1, 1) is true; leave the others untouched."""
        # In place (a captured CUDA graph replays on these tensors), with the per-model
        # factors computed once per step and masked writes straight into the state: kernel
        # count matters as much as arithmetic for these tiny models.
        torch.where(active, self.steps + 1.0, self.steps, out=self.steps)
        if self.kind == "sgd":
            for p, g, buf in zip(self.params, grads, self.exp_avg):
                g = g + self.wd * p
                new_buf = buf * SGD_MOMENTUM + g  # first step: 0 * 0.9 + g = g, as torch
                torch.where(active, p - self.lr * new_buf, p, out=p)
                torch.where(active, new_buf, buf, out=buf)
            return
        b1, b2 = ADAM_BETAS
        steps = self.steps.clamp_min(1.0)
        step_size = self.lr / (1.0 - b1 ** steps)
        self._bc2_sqrt = (1.0 - b2 ** steps).sqrt()
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            if self.kind == "adam":
                g = g + self.wd * p
                base = p
            else:
                base = p * (1.0 - self.lr * self.wd)
            new_m = torch.lerp(m, g, 1.0 - b1)
            new_v = v * b2 + (g * g) * (1.0 - b2)
            new_p = base - step_size * new_m / self._adam_denominator(new_v)
            torch.where(active, new_p, p, out=p)
            torch.where(active, new_m, m, out=m)
            torch.where(active, new_v, v, out=v)

    def _adam_denominator(self, v: Tensor) -> Tensor:
        """Adam's ``sqrt(v_hat) + eps`` at the step counts of the last :meth:`step`."""
        return v.sqrt() / self._bc2_sqrt + ADAM_EPS

    @torch.no_grad()
    def shrink_input_groups(self, index: int, strength: Tensor, active: Tensor, *,
                            feeds_batchnorm: bool = False) -> None:
        """The group lasso's proximal step on parameter ``index`` (M, D, W) after :meth:`step`,
        ``strength`` (M, 1, 1); ``feeds_batchnorm``: keep each hidden unit's incoming norm
        (docs/training.md, "Input sparsity")."""
        p = self.params[index]
        if self.kind == "sgd":
            step = self.lr
        else:
            step = (self.lr / self._adam_denominator(self.exp_avg_sq[index])).mean(dim=2, keepdim=True)  # (M, D, 1)
        norms = p.pow(2).sum(dim=2, keepdim=True).sqrt()  # (M, D, 1)
        keep = torch.clamp(1.0 - step * strength / norms.clamp_min(1e-30), min=0.0)
        shrunk = p * keep
        if feeds_batchnorm:
            before = p.pow(2).sum(dim=1, keepdim=True).sqrt()  # (M, 1, W)
            after = shrunk.pow(2).sum(dim=1, keepdim=True).sqrt()
            shrunk = shrunk * (before / after.clamp_min(1e-30))
        torch.where(active, shrunk, p, out=p)


class TrainingPass:
    """The tensors of one M-model pass and the arithmetic both loops of :mod:`step5.nn.device_loop`
    drive: a step (:meth:`train_step`) and the early-stopping MSE (:meth:`stop_mse`)."""

    def __init__(self, config: TrainConfig, specs: Sequence[ModelSpec], folds: Sequence[Fold],
                 device: torch.device) -> None:
        M = len(specs)
        self.config, self.specs, self.device, self.n_models = config, list(specs), device, M
        self.n_features = D = folds[0].X_train.shape[1]
        self.n_train = [f.X_train.shape[0] for f in folds]
        self.n_val = [f.X_val.shape[0] for f in folds]
        modes = {resolve_batch_mode(config.batch_mode, n) for n in self.n_train}
        if len(modes) != 1:
            raise ValueError(f"batch_mode {config.batch_mode!r} resolves differently for these folds: {sorted(modes)}")
        self.mode = modes.pop()
        self.batch_size = config.batch_size

        # Each model's standardisers come from its own training fold only: StandardScaler's
        # definitions in float64 (population std; a constant column or target gets scale 1).
        self.feat: list[tuple[np.ndarray, np.ndarray]] = []
        self.targ: list[tuple[float, float]] = []
        for f in folds:
            if config.normalize_features:
                scale = f.X_train.std(axis=0, dtype=np.float64)
                scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
                self.feat.append((f.X_train.mean(axis=0, dtype=np.float64), scale))
            else:
                self.feat.append((np.zeros(D), np.ones(D)))
            std = float(np.std(f.y_train, dtype=np.float64))
            std = std if std > 0.0 and math.isfinite(std) else 1.0
            self.targ.append((float(np.mean(f.y_train, dtype=np.float64)), std))
        self.x_mean, self.x_scale = (  # (M, 1, D) each
            torch.tensor(np.stack(part), dtype=torch.float32, device=device)[:, None, :] for part in zip(*self.feat))

        def targets(ys: Iterable[np.ndarray]) -> Tensor:
            z = [((y.astype(np.float64) - mu) / sd).astype(np.float32) for y, (mu, sd) in zip(ys, self.targ)]
            return _pad_rows(z, device)[0]

        Xtr, self.mask_tr = _pad_rows([f.X_train for f in folds], device)  # (M, N, D), (M, N)
        self.Xtr = self.standardize_x(Xtr)
        self.ytr = targets(f.y_train for f in folds)
        Xva, self.mask_va = _pad_rows([f.X_val for f in folds], device)
        self.Xva = self.standardize_x(Xva)
        # The early-stopping rows have their own tensors, so the validation rows are never consulted.
        if all(f.X_stop is None for f in folds):
            self.Xst, self.mask_st = self.Xva, self.mask_va
        else:
            Xst, self.mask_st = _pad_rows([f.stop_rows[0] for f in folds], device)
            self.Xst = self.standardize_x(Xst)
        self.yst = targets(f.stop_rows[1] for f in folds)
        # Features near float32's limit can overflow once standardised (3e38 - (-1e38) is inf): such a
        # model cannot train, and would "diverge" at once, blamed on its learning rate. Named per model.
        self.overflow: list[str | None] = [None] * M
        for part, X, arrays in (("training", self.Xtr, [f.X_train for f in folds]),
                                ("early-stopping", self.Xst, [f.stop_rows[0] for f in folds]),
                                ("validation", self.Xva, [f.X_val for f in folds])):
            self.check_overflow(part, X, arrays)
        self.count_st = torch.tensor([f.stop_rows[0].shape[0] for f in folds], dtype=torch.float32, device=device)

        self.generators = [make_generator(s.seed, device) for s in specs]
        self.model = FusedMLP(D, config.hidden_layers, use_leaky_relu=config.use_leaky_relu,
                              generators=self.generators, device=device)
        self.params = list(self.model.parameters())
        self.opt = FunctionalOptimizer(config.optimizer, self.params, self.per_model([s.learning_rate for s in specs]),
                                       self.per_model([s.weight_decay for s in specs]))
        self.max_norm = self.per_model([s.gradient_clip for s in specs])
        # Hidden and input dropout: each model's rate, and the rates and keep scales 1/(1-p) on the device.
        self.dropout, self.input_dropout = (
            (rates, self.per_model(rates), self.per_model([1.0 / (1.0 - q) for q in rates]))
            for rates in ([s.dropout for s in specs], [s.input_dropout for s in specs]))
        # Group lasso on the input weights (FunctionalOptimizer.shrink_input_groups); None
        # (exactly the plain training) unless a model asks for it.
        sparsity = [s.input_sparsity for s in specs]
        self.sparsity = self.per_model(sparsity) if any(sparsity) else None
        self.input_index = next(i for i, p in enumerate(self.params) if p is self.model.input_weights)
        self.state = self.params + self.model.running_stats()
        self.best_state = [t.detach().clone() for t in self.state]
        if not config.normalize_features:
            # Unstandardised, finite training features can be so large that the net's float32 activations
            # overflow at its initial weights (then training's, BatchNorm squaring them, do too): no learning
            # rate is to blame. One eval-mode pass (nothing drawn, no statistics updated) finds such a model.
            pred = predict_standardized(self.model, self.Xtr)
            for m in torch.nonzero(~torch.isfinite(pred * pred).all(dim=1)).flatten().tolist():
                if self.overflow[m] is None:
                    X = folds[m].X_train
                    row, col = np.unravel_index(np.abs(X).argmax(), X.shape)
                    self.overflow[m] = (
                        f"the training rows overflow the network's float32 activations (normalize_features is off): "
                        f"feature column {col} holds {X[row, col]:.6g}; features this large cannot be trained on "
                        "unstandardised (rescale them, or turn normalize_features on)")

    def per_model(self, values: Sequence[float]) -> Tensor:
        """Per-model scalars as an (M, 1, 1) tensor."""
        return torch.tensor(values, dtype=torch.float32, device=self.device).view(self.n_models, 1, 1)

    def standardize_x(self, X: Tensor) -> Tensor:
        return (X - self.x_mean) / self.x_scale

    def check_overflow(self, part: str, X: Tensor, arrays: Sequence[np.ndarray | None]) -> None:
        """Record, for each model whose standardised ``part`` rows X (M, N, D) hold a non-finite
        value (its ``arrays`` are finite: the reader checked), which feature overflowed."""
        bad = ~torch.isfinite(X)
        for m in torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist():
            if self.overflow[m] is not None or arrays[m] is None:
                continue
            row, col = torch.nonzero(bad[m])[0].tolist()
            mean, scale = self.feat[m][0][col], self.feat[m][1][col]
            self.overflow[m] = (
                f"feature column {col} overflows float32 once standardised: a value of {arrays[m][row, col]:.6g} in "
                f"the {part} rows, with the training rows' mean {mean:.6g} and scale {scale:.6g}; features this "
                "large cannot be trained on (rescale them)")

    def train_step(self, x: Tensor, y: Tensor, mask: Tensor, rows: Sequence[int], rows_t: Tensor,
                   active: Tensor | None = None) -> Tensor:
        """One optimisation step of every model on its batch (x (M, R, D), y and mask (M, R),
        ``rows``/``rows_t`` each model's real row count); a model moves only if it has rows
        and is ``active`` (M,) where given. Returns the per-model loss (M,)."""
        M = self.n_models
        count = rows_t.clamp_min(1.0)
        has_rows = rows_t > 0
        stats_update = rows_t >= 2  # BatchNorm refuses 1-row batches; so do we
        if active is not None:
            has_rows, stats_update = has_rows & active, stats_update & active
        # Input mask first, then the hidden layers', in the same order for a lone run.
        imask = self.dropout_mask(self.input_dropout, rows, x.shape[1], self.n_features)
        dmasks = [self.dropout_mask(self.dropout, rows, x.shape[1], w) for w in self.config.hidden_layers]
        pred = self.model(
            x, row_mask=mask[..., None], row_count=count.view(M, 1, 1), dropout_masks=dmasks, input_mask=imask,
            stats_update=stats_update.view(M, 1, 1),
        )[..., 0]
        loss = masked_mse(pred, y, mask, count)
        # Summing keeps each model's gradient its own: d(sum)/d(theta_m) = d(loss_m)/d(theta_m).
        grads = clip_grads_per_model(list(torch.autograd.grad(loss.sum(), self.params)), self.max_norm)
        self.opt.step(grads, has_rows.view(M, 1, 1))
        if self.sparsity is not None:
            self.opt.shrink_input_groups(self.input_index, self.sparsity, has_rows.view(M, 1, 1),
                                         feeds_batchnorm=bool(self.config.hidden_layers))
        return loss.detach()

    def dropout_mask(self, dropout: tuple[Sequence[float], Tensor, Tensor], rows: Sequence[int], n_rows: int,
                     width: int) -> Tensor | None:
        """Scaled keep-masks (M, n_rows, W) for one layer, or None when no model drops out. Model
        m draws exactly (rows[m], W) uniforms from its own generator, as a lone run does; rows
        it does not draw (padding, or no dropout) stay 1.0."""
        rates, rate, scale = dropout
        if not any(p > 0.0 and r > 0 for p, r in zip(rates, rows)):
            return None
        uniform = torch.ones(self.n_models, n_rows, width, device=self.device)
        for m, (g, p, r) in enumerate(zip(self.generators, rates, rows)):
            if p > 0.0 and r > 0:
                torch.rand(r, width, generator=g, out=uniform[m, :r])
        return torch.where(uniform >= rate, scale, 0.0)

    def batch(self, index: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Mini mode: step ``step``'s rows of each model, gathered by ``index`` (M, S*B)."""
        B = self.batch_size
        idx = index[:, step * B : (step + 1) * B]
        return torch.gather(self.Xtr, 1, idx[..., None].expand(-1, -1, self.n_features)), torch.gather(self.ytr, 1, idx)

    def stop_mse(self) -> Tensor:
        """Each model's early-stopping MSE (M,), in eval mode."""
        return masked_mse(predict_standardized(self.model, self.Xst), self.yst, self.mask_st, self.count_st)

    def keep_best(self, improved: Tensor) -> None:
        """Copy the current weights and statistics into best_state where ``improved`` (M,)."""
        keep = improved.view(self.n_models, 1, 1)
        for b, t in zip(self.best_state, self.state):
            torch.where(keep, t.detach(), b, out=b)


def train_models(
    config: TrainConfig, specs: Sequence[ModelSpec], folds: Sequence[Fold], *, device: torch.device,
    loop: str | None = None,
) -> list[TrainedModel]:
    """Train model m on ``folds[m]`` with ``specs[m]``, all in one pass; one :class:`TrainedModel`
    each, in order (a diverged model has ``error`` set). ``loop``: :func:`resolve_train_loop`.
    Inconsistent inputs (feature counts, batch modes) raise ``ValueError``."""
    M = len(specs)
    if M == 0 or len(folds) != M:
        raise ValueError(f"need one fold per model spec, got {len(specs)} specs and {len(folds)} folds")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")
    n_features = folds[0].X_train.shape[1]
    for m, f in enumerate(folds):
        if f.X_train.shape[1] != n_features or f.X_val.shape[1] != n_features:
            raise ValueError(f"fold {m} has {f.X_train.shape[1]} features; fold 0 has {n_features}")
        if f.X_train.shape[0] < 2 or f.X_val.shape[0] < 1:
            raise ValueError(f"fold {m} needs >= 2 training rows and >= 1 validation row")
    kind = resolve_train_loop(loop, device)
    t_start = time.perf_counter()
    p = TrainingPass(config, specs, folds, device)
    epochs_run, best_epoch, diverged_at, best_stat_updates = EpochLoop(p, kind).run()

    # Restore each model's best weights and score them on the original target scale.
    with torch.no_grad():
        for t, b in zip(p.state, p.best_state):
            t.copy_(b)
    pred_tr = predict_standardized(p.model, p.Xtr).cpu().numpy()
    pred_va = predict_standardized(p.model, p.Xva).cpu().numpy()
    pred_te: np.ndarray | None = None
    if any(f.X_test is not None for f in folds):
        Xte, _ = _pad_rows([f.X_test if f.X_test is not None else f.X_val[:1] for f in folds], device)
        Xte = p.standardize_x(Xte)
        p.check_overflow("test", Xte, [f.X_test for f in folds])
        pred_te = predict_standardized(p.model, Xte).cpu().numpy()

    results: list[TrainedModel] = []
    for m, f in enumerate(folds):
        diverged = int(diverged_at[m])
        mu, sd = p.targ[m]
        res = TrainedModel(
            n_train=p.n_train[m], n_val=p.n_val[m], epochs_run=int(epochs_run[m]),
            best_epoch=int(best_epoch[m]) if not diverged else 0,
            feature_mean=p.feat[m][0], feature_scale=p.feat[m][1], target_mean=mu, target_std=sd,
        )
        if p.overflow[m] is not None:
            res.error, res.error_type = p.overflow[m], "data_error"
            results.append(res)
            continue
        if diverged:
            res.error = (f"training diverged: the loss became non-finite at epoch {diverged} "
                         f"(learning_rate={specs[m].learning_rate:g}, optimizer={config.optimizer}); "
                         "a smaller learning rate or gradient clipping should help")
            results.append(res)
            continue
        # Standardised float32 outputs -> original scale, float64.
        p_va = pred_va[m, : p.n_val[m]].astype(np.float64) * sd + mu
        metrics: dict[str, float] = {}
        metrics["r2"], metrics["val_mse"] = regression_metrics(f.y_val, p_va)
        metrics["train_r2"], metrics["train_mse"] = regression_metrics(
            f.y_train, pred_tr[m, : p.n_train[m]].astype(np.float64) * sd + mu)
        if f.X_test is not None and f.y_test is not None and pred_te is not None:
            metrics["test_r2"], metrics["test_mse"] = regression_metrics(
                f.y_test, pred_te[m, : f.X_test.shape[0]].astype(np.float64) * sd + mu)
        if all(math.isfinite(v) for v in metrics.values()):
            res.metrics, res.val_pred = metrics, p_va
            res.state_dict = p.model.export_model(m, num_batches_tracked=int(best_stat_updates[m]))
        else:
            res.error = f"training produced non-finite predictions (metrics {metrics}); the model diverged"
        results.append(res)
    logger.debug("trained %d model(s) x %d epoch(s) max, %s batches, %s loop, in %.3fs",
                 M, int(epochs_run.max(initial=0)), p.mode, kind, time.perf_counter() - t_start)
    return results
