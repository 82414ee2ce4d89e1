"""The one training core: M same-shape MLPs trained together, each as if alone.

Every path -- the persistent worker, the one-shot trainer, in-process calls, fused folds --
ends in :func:`train_models`. A single fold is ``M = 1``. With ``M > 1`` (the K folds of a
trial, or several trials whose layer shapes match) each model's metrics equal its own
``M = 1`` run up to float rounding, because nothing one model sees depends on the others:

* randomness: model m owns a ``torch.Generator`` seeded with its seed; init, dropout masks
  (input, then hidden) and mini-batch order are drawn from it in the same order and shapes
  as in a lone run;
* data: folds of unequal length are padded to a common row count and a row mask keeps
  padding out of BatchNorm statistics, losses and gradients (no row is ever dropped);
* optimisation: per-model learning rate / weight decay / clip are (M, 1, 1) tensors, the
  optimizer state is per model, and a model that stopped early is frozen (weights,
  moments and BatchNorm running statistics untouched) while the others continue.

The loop, per epoch: draw the batches -> for each batch: forward, per-model MSE, backward,
per-model gradient clipping, functional optimizer step -> evaluate the early-stopping MSE
-> early stopping on the host -> exit when every model has stopped or ``epochs`` is reached.
The best early-stopping weights of each model are restored at the end (unless its spec
says ``restore_best=False``: then the last epoch's weights are kept) and scored on the
original target scale.

Early stopping decides on ``Fold.X_stop`` when a fold has such rows (step5.nn.job carves
them from the training fold), so the validation rows only score the model; a fold without
them stops on its validation rows (direct callers of this core).

Determinism: the same seed, data, params, device and torch thread count give bit-identical
results in one process and across processes. CPU reductions split work by thread count,
so two processes must run with the same ``torch.get_num_threads()``:
:func:`configure_torch_threads` applies ``STEP5_TORCH_THREADS``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import mean_squared_error, r2_score
from torch import Tensor

from step5.nn.model import FusedMLP
from step5.protocol import AUTO_FULL_BATCH_MAX_ROWS, resolve_batch_mode  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

#: Evaluation runs over at most this many rows at a time, bounding activation memory.
EVAL_CHUNK_ROWS = 65_536
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SGD_MOMENTUM = 0.9
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
#: Row counts are padded (masked) up to a multiple of this, in a lone run as in a fused
#: pass, so a model's tensors have the same length whichever models share its pass: a
#: matmul or a sum then adds in the same order, and a fused model is bit-identical to its
#: lone run on CPU. step5.nn.job trains folds whose padded lengths differ in separate passes.
ROW_BUCKET = 64
THREADS_ENV = "STEP5_TORCH_THREADS"


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

    learning_rate: float = 1e-3  # optimizer step size
    weight_decay: float = 0.0  # L2 penalty (adam, sgd) or decoupled decay (adamw)
    dropout: float = 0.3  # dropout probability after each hidden activation
    input_dropout: float = 0.0  # dropout probability on the (standardised) input features
    input_sparsity: float = 0.0  # group-lasso strength on the weights reading each input feature; 0 = off
    seed: int = 0  # seeds this model's generator: init, dropout masks, batch order
    patience: int = 10  # epochs without an early-stopping improvement before stopping; 0 = never
    gradient_clip: float = 1.0  # max gradient norm over this model's parameters; 0 = off
    restore_best: bool = True  # restore the best early-stopping epoch's weights; False keeps the last


@dataclass(frozen=True)
class Fold:
    """One model's data: float32 features (n, D) and targets (n,), original scale."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray | None = None  # scored after training, never used to fit or stop
    y_test: np.ndarray | None = None
    X_stop: np.ndarray | None = None  # early-stopping rows; None: stop on the validation rows
    y_stop: np.ndarray | None = None

    @property
    def stop_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows early stopping decides on."""
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
    error: str | None = None  # set when the model diverged; metrics are empty then
    state_dict: dict[str, Tensor] | None = None  # CPU, build_reference_mlp layout
    feature_mean: np.ndarray | None = None  # (D,) standardiser fitted on the train fold
    feature_scale: np.ndarray | None = None  # (D,)
    target_mean: float = 0.0
    target_std: float = 1.0
    val_pred: np.ndarray | None = None  # (n_val,) validation predictions, original scale


# ---------------------------------------------------------------------------- helpers


def configure_torch_threads(environ: Mapping[str, str] | None = None) -> int:
    """Apply ``STEP5_TORCH_THREADS`` (if set) and return the thread count in effect.

    Results are bit-identical only between processes with the same thread count, and CPU
    workers sharing a machine must split its cores, so the parent sets this variable.
    """
    env = os.environ if environ is None else environ
    raw = env.get(THREADS_ENV)
    if raw not in (None, ""):
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


def fit_feature_scaler(X: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and scale of a training fold (identity when ``normalize`` is off).

    Same definition as sklearn's StandardScaler (population std, a constant column gets
    scale 1), computed in float64 directly to avoid copying the fold into a scaler object.
    """
    d = X.shape[1]
    if not normalize:
        return np.zeros(d), np.ones(d)
    mean = X.mean(axis=0, dtype=np.float64)
    scale = X.std(axis=0, dtype=np.float64)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    return mean, scale


def fit_target_scaler(y: np.ndarray) -> tuple[float, float]:
    """Mean and std of the training targets; a constant target gets std 1."""
    mean = float(np.mean(y, dtype=np.float64))
    std = float(np.std(y, dtype=np.float64))
    return mean, (std if std > 0.0 and math.isfinite(std) else 1.0)


def destandardize(z: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Model output (standardised, float32) -> original target scale (float64)."""
    return z.astype(np.float64) * std + mean


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(R^2, MSE) with sklearn's definitions, in float64."""
    y_true = y_true.astype(np.float64)
    return float(r2_score(y_true, y_pred)), float(mean_squared_error(y_true, y_pred))


def _pad_rows(arrays: Sequence[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """Stack per-model arrays of unequal length into (M, N_max, ...) plus a (M, N_max)
    float row mask (1 = real row, 0 = padding). Padding is zeros, so it stays finite."""
    # Host->device: the one upload of this data for the whole pass.
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
    return torch.cat(outs, dim=1)[..., 0]  # (M, N)


def masked_mse(pred: Tensor, y: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Per-model mean squared error over real rows: (M, N) x3, (M,) -> (M,)."""
    err = pred - y
    return (err * err * mask).sum(dim=1) / count


def clip_grads_per_model(grads: list[Tensor], max_norm: Tensor) -> list[Tensor]:
    """Scale each model's gradients so their joint L2 norm is at most ``max_norm`` (M,1,1);
    a model with max_norm 0 is not clipped. Same rule as clip_grad_norm_, per model."""
    # Accumulate tensor by tensor, in a fixed order: a stack(...).sum(dim=0) over the
    # (tensors, M) stack reduces contiguously (vectorised, reordered) when M == 1 but
    # strided when M > 1, so a lone model and the same model in a fused pass would round
    # their gradient norms differently.
    sq = grads[0].pow(2).sum(dim=(1, 2))  # (M,)
    for g in grads[1:]:
        sq = sq + g.pow(2).sum(dim=(1, 2))
    norm = sq.sqrt().view(-1, 1, 1)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))
    return [g * coef for g in grads]


class FunctionalOptimizer:
    """Adam / AdamW / SGD(momentum 0.9) over parameters with a leading model dimension.

    Why not ``torch.optim``: its learning rate and weight decay are scalars per parameter
    group, but one tensor here holds M models that may each have their own; and a model
    that stopped early must not move at all (weights and moment estimates), which a
    masked functional step expresses directly. The update rules are torch.optim's
    (Adam with L2 added to the gradient, AdamW with decoupled decay, SGD with dampening 0).
    """

    def __init__(self, kind: str, params: Sequence[Tensor], lr: Tensor, weight_decay: Tensor) -> None:
        if kind not in ("adam", "adamw", "sgd"):
            raise ValueError(f"`optimizer` must be one of ['adam', 'adamw', 'sgd'], got {kind!r}")
        self.kind = kind
        self.params = list(params)
        self.lr = lr  # (M, 1, 1)
        self.wd = weight_decay  # (M, 1, 1)
        self.steps = torch.zeros_like(lr)  # (M, 1, 1) per-model step count, for bias correction
        self.exp_avg = [torch.zeros_like(p) for p in self.params]  # Adam m / SGD momentum buffer
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params] if kind != "sgd" else []

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], active: Tensor) -> None:
        """Update the models where ``active`` (M, 1, 1) is true; leave the others untouched."""
        self.steps = torch.where(active, self.steps + 1.0, self.steps)
        if self.kind == "sgd":
            for p, g, buf in zip(self.params, grads, self.exp_avg):
                g = g + self.wd * p
                new_buf = buf * SGD_MOMENTUM + g  # first step: 0 * 0.9 + g = g, as torch
                p.copy_(torch.where(active, p - self.lr * new_buf, p))
                buf.copy_(torch.where(active, new_buf, buf))
            return
        b1, b2 = ADAM_BETAS
        bc1 = 1.0 - b1 ** self.steps.clamp_min(1.0)  # (M, 1, 1)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            if self.kind == "adam":
                g = g + self.wd * p
                base = p
            else:
                base = p * (1.0 - self.lr * self.wd)
            new_m = torch.lerp(m, g, 1.0 - b1)
            new_v = v * b2 + (g * g) * (1.0 - b2)
            new_p = base - (self.lr / bc1) * new_m / self._adam_denominator(new_v)
            p.copy_(torch.where(active, new_p, p))
            m.copy_(torch.where(active, new_m, m))
            v.copy_(torch.where(active, new_v, v))

    def _adam_denominator(self, v: Tensor) -> Tensor:
        """Adam's ``sqrt(v_hat) + eps`` for second moments ``v`` at the current step counts."""
        bc2_sqrt = (1.0 - ADAM_BETAS[1] ** self.steps.clamp_min(1.0)).sqrt()  # (M, 1, 1)
        return v.sqrt() / bc2_sqrt + ADAM_EPS

    @torch.no_grad()
    def shrink_input_groups(self, index: int, strength: Tensor, active: Tensor) -> None:
        """The proximal step of the group lasso ``strength * sum_j ||P[:, j, :]||`` on
        parameter ``index`` (M, D, W), after :meth:`step`: each feature's group shrinks
        towards zero by its step size times ``strength`` (M, 1, 1), and lands exactly on
        zero when it is shorter than that. The step size is the one the update just used:
        ``lr`` for SGD, Adam's per-coordinate ``lr / sqrt(v)`` (averaged over the group),
        so the penalty weighs against the data gradient as it would inside the loss. At a
        fixed point a feature is zero unless its data gradient exceeds ``strength``: the
        lasso's own condition."""
        p = self.params[index]
        if self.kind == "sgd":
            step = self.lr  # (M, 1, 1)
        else:
            step = (self.lr / self._adam_denominator(self.exp_avg_sq[index])).mean(dim=2, keepdim=True)  # (M, D, 1)
        norms = p.pow(2).sum(dim=2, keepdim=True).sqrt()  # (M, D, 1)
        keep = torch.clamp(1.0 - step * strength / norms.clamp_min(1e-30), min=0.0)
        p.copy_(torch.where(active, p * keep, p))


def _draw_dropout(
    generators: Sequence[torch.Generator],
    dropouts: Sequence[float],
    rows: Sequence[int],
    n_rows: int,
    width: int,
    device: torch.device,
) -> Tensor | None:
    """Scaled keep-masks (M, n_rows, W) for one layer, or None when no model drops out.

    Model m draws exactly (rows[m], W) uniforms from its own generator -- the same draw a
    lone run of that model makes -- so its stream never depends on the other models.
    """
    if not any(p > 0.0 and r > 0 for p, r in zip(dropouts, rows)):
        return None
    mask = torch.ones(len(generators), n_rows, width, device=device)
    for m, (g, p, r) in enumerate(zip(generators, dropouts, rows)):
        if p > 0.0 and r > 0:
            keep = torch.rand(r, width, generator=g, device=device) >= p
            mask[m, :r] = keep.to(mask.dtype) * (1.0 / (1.0 - p))
    return mask


def _epoch_batches(
    mode: str,
    batch_size: int,
    n_train: Sequence[int],
    active: np.ndarray,
    generators: Sequence[torch.Generator],
    device: torch.device,
) -> tuple[list[list[int]], Tensor | None]:
    """Plan one epoch: per step, the real row count of each model, and (mini mode) a
    (M, S*B) index tensor of each model's shuffled rows (padding indexes row 0).

    A stopped model gets no rows, hence no steps and no random draws.
    """
    M = len(n_train)
    if mode == "full":
        return [[n if a else 0 for n, a in zip(n_train, active)]], None
    n_steps = max(math.ceil(n / batch_size) for n, a in zip(n_train, active) if a)
    index = torch.zeros(M, n_steps * batch_size, dtype=torch.long, device=device)
    for m in range(M):
        if active[m]:
            index[m, : n_train[m]] = torch.randperm(n_train[m], generator=generators[m], device=device)
    rows = [
        [max(0, min(batch_size, n_train[m] - s * batch_size)) if active[m] else 0 for m in range(M)]
        for s in range(n_steps)
    ]
    return rows, index


# ---------------------------------------------------------------------------- the loop


def train_models(
    config: TrainConfig,
    specs: Sequence[ModelSpec],
    folds: Sequence[Fold],
    *,
    device: torch.device,
) -> list[TrainedModel]:
    """Train ``len(specs)`` models, model m on ``folds[m]`` with ``specs[m]``, in one pass.

    Returns one :class:`TrainedModel` per model, in order. A model whose loss becomes
    NaN/inf is stopped and reported through ``TrainedModel.error``; the others go on.
    Raises ``ValueError`` for inconsistent inputs (feature counts, batch modes).
    """
    M = len(specs)
    if M == 0 or len(folds) != M:
        raise ValueError(f"need one fold per model spec, got {len(specs)} specs and {len(folds)} folds")
    if config.optimizer not in ("adam", "adamw", "sgd"):
        raise ValueError(f"`optimizer` must be one of ['adam', 'adamw', 'sgd'], got {config.optimizer!r}")
    n_features = folds[0].X_train.shape[1]
    for m, f in enumerate(folds):
        if f.X_train.shape[1] != n_features or f.X_val.shape[1] != n_features:
            raise ValueError(f"fold {m} has {f.X_train.shape[1]} features; fold 0 has {n_features}")
        if f.X_train.shape[0] < 2 or f.X_val.shape[0] < 1:
            raise ValueError(f"fold {m} needs >= 2 training rows and >= 1 validation row")
        if (f.X_stop is None) != (f.y_stop is None) or (f.X_stop is not None and (
                f.X_stop.shape[0] < 1 or f.X_stop.shape[1] != n_features)):
            raise ValueError(f"fold {m} needs both X_stop and y_stop (>= 1 row, {n_features} features) or neither")
    n_train = [f.X_train.shape[0] for f in folds]
    n_val = [f.X_val.shape[0] for f in folds]
    modes = {resolve_batch_mode(config.batch_mode, n) for n in n_train}
    if len(modes) != 1:
        raise ValueError(f"batch_mode {config.batch_mode!r} resolves differently for these folds: {sorted(modes)}")
    mode = modes.pop()
    B = config.batch_size
    t_start = time.perf_counter()

    # ---- data: each model's standardisers come from its own training fold only
    feat = [fit_feature_scaler(f.X_train, config.normalize_features) for f in folds]
    targ = [fit_target_scaler(f.y_train) for f in folds]
    x_mean = torch.tensor(np.stack([mu for mu, _ in feat]), dtype=torch.float32, device=device)[:, None, :]  # (M, 1, D)
    x_scale = torch.tensor(np.stack([sd for _, sd in feat]), dtype=torch.float32, device=device)[:, None, :]

    def standardize_y(y: np.ndarray, m: int) -> np.ndarray:
        return ((y.astype(np.float64) - targ[m][0]) / targ[m][1]).astype(np.float32)

    Xtr, mask_tr = _pad_rows([f.X_train for f in folds], device)  # (M, N, D), (M, N)
    Xtr = (Xtr - x_mean) / x_scale
    ytr, _ = _pad_rows([standardize_y(f.y_train, m) for m, f in enumerate(folds)], device)  # (M, N)
    Xva, mask_va = _pad_rows([f.X_val for f in folds], device)  # (M, Nv, D), (M, Nv)
    Xva = (Xva - x_mean) / x_scale
    yva, _ = _pad_rows([standardize_y(f.y_val, m) for m, f in enumerate(folds)], device)  # (M, Nv)
    # The early-stopping rows: their own tensors, so the validation rows are never consulted.
    if all(f.X_stop is None for f in folds):
        Xst, yst, mask_st = Xva, yva, mask_va
    else:
        Xst, mask_st = _pad_rows([f.stop_rows[0] for f in folds], device)
        Xst = (Xst - x_mean) / x_scale
        yst, _ = _pad_rows([standardize_y(f.stop_rows[1], m) for m, f in enumerate(folds)], device)
    count_st = torch.tensor([f.stop_rows[0].shape[0] for f in folds], dtype=torch.float32, device=device)  # (M,)

    # ---- model and optimizer: per-model generators and per-model hyper-parameters
    generators = [make_generator(s.seed, device) for s in specs]
    model = FusedMLP(
        n_features, config.hidden_layers, use_leaky_relu=config.use_leaky_relu,
        generators=generators, device=device,
    )
    params = list(model.parameters())

    def per_model(values: Sequence[float]) -> Tensor:  # host->device, once per pass
        return torch.tensor(values, dtype=torch.float32, device=device).view(M, 1, 1)

    opt = FunctionalOptimizer(
        config.optimizer, params, per_model([s.learning_rate for s in specs]), per_model([s.weight_decay for s in specs])
    )
    max_norm = per_model([s.gradient_clip for s in specs])
    dropouts = [s.dropout for s in specs]
    input_dropouts = [s.input_dropout for s in specs]
    # Group lasso on the weights that read each input feature, as a proximal step after
    # each update (FunctionalOptimizer.shrink_input_groups): a feature's weights shrink
    # together and reach exactly zero, so uninformative features drop out of the model.
    # Off (exactly the plain training) unless a model asks for it.
    sparsity = per_model([s.input_sparsity for s in specs]) if any(s.input_sparsity for s in specs) else None
    input_index = next(i for i, p in enumerate(params) if p is model.input_weights)
    state = params + model.running_stats()
    best_state = [t.detach().clone() for t in state]

    # ---- early-stopping bookkeeping lives on the host (M numbers per epoch)
    stopped = np.zeros(M, dtype=bool)
    errors: list[str | None] = [None] * M
    best_val = np.full(M, np.inf)
    best_epoch = np.zeros(M, dtype=np.int64)
    stale = np.zeros(M, dtype=np.int64)
    epochs_run = np.zeros(M, dtype=np.int64)
    stat_updates = np.zeros(M, dtype=np.int64)
    best_stat_updates = np.zeros(M, dtype=np.int64)

    epoch = 0
    while True:
        if stopped.all():
            break  # exit 1: every model stopped early (or diverged)
        if epoch == config.epochs:
            break  # exit 2: the epoch budget is spent
        epoch += 1
        active = ~stopped
        model.train()
        step_rows, index = _epoch_batches(mode, B, n_train, active, generators, device)
        # One host->device copy per epoch: every step's per-model row counts.
        rows_t = torch.tensor(step_rows, dtype=torch.float32, device=device)  # (S, M)
        nonfinite = torch.zeros(M, dtype=torch.bool, device=device)
        for s, rows in enumerate(step_rows):
            if index is None:
                x, y, mask = Xtr, ytr, mask_tr  # (M, N, D), (M, N), (M, N)
            else:
                idx = index[:, s * B : (s + 1) * B]  # (M, B)
                x = torch.gather(Xtr, 1, idx[..., None].expand(-1, -1, n_features))  # (M, B, D)
                y = torch.gather(ytr, 1, idx)  # (M, B)
                mask = (torch.arange(B, device=device)[None, :] < rows_t[s][:, None]).to(torch.float32)  # (M, B)
            count = rows_t[s].clamp_min(1.0)  # (M,)
            has_rows = (rows_t[s] > 0).view(M, 1, 1)
            # Input mask first, then the hidden layers', in the same order for a lone run.
            imask = _draw_dropout(generators, input_dropouts, rows, x.shape[1], n_features, device)
            dmasks = [_draw_dropout(generators, dropouts, rows, x.shape[1], w, device) for w in config.hidden_layers]
            pred = model(
                x, row_mask=mask[..., None], row_count=count.view(M, 1, 1), dropout_masks=dmasks, input_mask=imask,
                stats_update=(rows_t[s] >= 2).view(M, 1, 1),  # BatchNorm refuses 1-row batches; so do we
            )[..., 0]  # (M, R)
            loss = masked_mse(pred, y, mask, count)  # (M,)
            # Summing keeps each model's gradient its own: d(sum)/d(theta_m) = d(loss_m)/d(theta_m).
            grads = torch.autograd.grad(loss.sum(), params)
            grads = clip_grads_per_model(list(grads), max_norm)
            opt.step(grads, has_rows)
            if sparsity is not None:
                opt.shrink_input_groups(input_index, sparsity, has_rows)
            nonfinite |= ~torch.isfinite(loss.detach())
            stat_updates += np.array([r >= 2 for r in rows], dtype=np.int64)

        val_mse = masked_mse(predict_standardized(model, Xst), yst, mask_st, count_st)  # (M,) early-stopping MSE
        # Host/device sync, once per epoch: early stopping and the exit test run on the host.
        val_host, bad_host = torch.stack([val_mse, nonfinite.to(val_mse.dtype)]).cpu().numpy()
        improved = np.zeros(M, dtype=bool)
        for m in np.flatnonzero(active):
            epochs_run[m] = epoch
            if bad_host[m] or not math.isfinite(float(val_host[m])):
                stopped[m] = True
                errors[m] = (
                    f"training diverged: the loss became non-finite at epoch {epoch} "
                    f"(learning_rate={specs[m].learning_rate:g}, optimizer={config.optimizer}); "
                    "a smaller learning rate or gradient clipping should help"
                )
            elif val_host[m] < best_val[m] or not specs[m].restore_best:
                # restore_best=False: the "best" is always the latest epoch (no selection)
                best_val[m], best_epoch[m], stale[m] = val_host[m], epoch, 0
                best_stat_updates[m] = stat_updates[m]
                improved[m] = True
            else:
                stale[m] += 1
                if specs[m].patience > 0 and stale[m] >= specs[m].patience:
                    stopped[m] = True
        if improved.any():
            keep = torch.from_numpy(improved).to(device).view(M, 1, 1)  # host->device: M bools
            for b, t in zip(best_state, state):
                b.copy_(torch.where(keep, t.detach(), b))

    # ---- restore each model's best weights and score them on the original target scale
    with torch.no_grad():
        for t, b in zip(state, best_state):
            t.copy_(b)
    pred_tr = predict_standardized(model, Xtr).cpu().numpy()  # sync: (M, N) to host for sklearn
    pred_va = predict_standardized(model, Xva).cpu().numpy()
    pred_te: np.ndarray | None = None
    if any(f.X_test is not None for f in folds):
        Xte, _ = _pad_rows([f.X_test if f.X_test is not None else f.X_val[:1] for f in folds], device)
        pred_te = predict_standardized(model, (Xte - x_mean) / x_scale).cpu().numpy()

    results: list[TrainedModel] = []
    for m, f in enumerate(folds):
        res = TrainedModel(
            n_train=n_train[m], n_val=n_val[m], epochs_run=int(epochs_run[m]),
            best_epoch=int(best_epoch[m]) if errors[m] is None else 0, error=errors[m],
            feature_mean=feat[m][0], feature_scale=feat[m][1], target_mean=targ[m][0], target_std=targ[m][1],
        )
        if errors[m] is None:
            mu, sd = targ[m]
            p_tr = destandardize(pred_tr[m, : n_train[m]], mu, sd)
            p_va = destandardize(pred_va[m, : n_val[m]], mu, sd)
            metrics: dict[str, float] = {}
            metrics["r2"], metrics["val_mse"] = regression_metrics(f.y_val, p_va)
            metrics["train_r2"], metrics["train_mse"] = regression_metrics(f.y_train, p_tr)
            if f.X_test is not None and f.y_test is not None and pred_te is not None:
                p_te = destandardize(pred_te[m, : f.X_test.shape[0]], mu, sd)
                metrics["test_r2"], metrics["test_mse"] = regression_metrics(f.y_test, p_te)
            if all(math.isfinite(v) for v in metrics.values()):
                res.metrics = metrics
                res.val_pred = p_va
                res.state_dict = model.export_model(m, num_batches_tracked=int(best_stat_updates[m]))
            else:
                res.error = f"training produced non-finite predictions (metrics {metrics}); the model diverged"
        results.append(res)
    logger.debug(
        "trained %d model(s) x %d epoch(s) max, %s batches, in %.3fs",
        M, int(epochs_run.max(initial=0)), mode, time.perf_counter() - t_start,
    )
    return results
