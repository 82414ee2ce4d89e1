"""The survivor-quality MLP, in two forms that share one set of weights' layout.

Per model, for each hidden width ``W``::

    Linear(D_in, W, bias=False) -> BatchNorm1d(W) -> LeakyReLU(0.01) | ReLU -> Dropout(p)

then ``Linear(W_last, 1)``. With no hidden layer the model is that head alone,
``Linear(D_in, 1)``: a linear model, the most strongly regularised net the search may
choose (a Step 6 that rebuilds ``nn.Sequential`` from ``hidden_layers`` gets it too).

Input dropout (on the standardised features, before the first Linear) exists only while
training: :class:`FusedMLP` applies a mask the trainer passes in, and the inference layout
below has no module for it, so checkpoints keep the same keys.

The hidden Linear layers have no bias: BatchNorm subtracts the batch mean right after, so
such a bias gets only a rounding-noise gradient -- which Adam normalises into full-size
steps, making results depend on float summation order (and fused runs drift from lone
ones). BatchNorm's own shift plays the bias's role.

* :class:`FusedMLP` holds ``M`` independent models of identical layer shapes. Every
  weight carries a leading model dimension and layers are batched matmuls
  (``torch.baddbmm``), so the K folds of a trial -- or several same-shape trials -- train
  in one pass. A single fold is simply ``M = 1``: there is no second code path.
  Padded rows (folds of unequal length) are excluded from BatchNorm statistics by a row
  mask; dropout masks are drawn by the trainer (from per-model generators) and passed in,
  so this module is a pure function of its inputs and weights.
* :func:`build_reference_mlp` is one model as ordinary torch modules: an ``nn.Sequential``
  under the attribute ``network``, hidden Linear layers *with* a bias (stored as zeros),
  which is the layout the existing pipeline's Step 6 rebuilds and loads strictly
  (``network.0.weight``, ``network.0.bias``, ``network.1.running_mean``, ...). A zero
  bias followed by BatchNorm is the same function as no bias. Checkpoints store a single
  model's weights in this ``state_dict`` layout (:meth:`FusedMLP.export_model`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default negative slope
BN_EPS = 1e-5  # nn.BatchNorm1d defaults, so exported weights behave the same there
BN_MOMENTUM = 0.1


class ReferenceMLP(nn.Module):
    """One model as plain torch modules, in the layout checkpoints are stored in."""

    def __init__(
        self, n_features: int, hidden_layers: Sequence[int], *, use_leaky_relu: bool, dropout: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d_in = n_features
        for width in hidden_layers:
            layers += [
                nn.Linear(d_in, width),  # its bias stays zero: training has none (see the module doc)
                nn.BatchNorm1d(width, eps=BN_EPS, momentum=BN_MOMENTUM),
                nn.LeakyReLU(LEAKY_SLOPE) if use_leaky_relu else nn.ReLU(),
                nn.Dropout(dropout),
            ]
            d_in = width
        layers.append(nn.Linear(d_in, 1))
        self.network = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Standardised features (N, D) -> standardised predictions (N, 1)."""
        return self.network(x)


def build_reference_mlp(
    n_features: int, hidden_layers: Sequence[int], *, use_leaky_relu: bool, dropout: float
) -> ReferenceMLP:
    """One model as plain torch modules: the layout checkpoints are stored in."""
    return ReferenceMLP(n_features, hidden_layers, use_leaky_relu=use_leaky_relu, dropout=dropout)


class FusedMLP(nn.Module):
    """``M`` independent MLPs of the same shape, evaluated with batched matmuls.

    Parameters (all with leading model dim ``M``), per hidden layer ``i``:
    ``weights[i]`` (M, D_in, W), ``bn_weights[i]`` / ``bn_biases[i]``
    (M, 1, W); buffers ``running_mean_i`` / ``running_var_i`` (M, 1, W). Head:
    ``head_weight`` (M, W_last, 1), ``head_bias`` (M, 1, 1).
    """

    def __init__(
        self,
        n_features: int,
        hidden_layers: Sequence[int],
        *,
        use_leaky_relu: bool,
        generators: Sequence[torch.Generator],
        device: torch.device,
    ) -> None:
        super().__init__()
        if not generators:
            raise ValueError("FusedMLP needs at least one model (one generator per model)")
        self.n_models = len(generators)
        self.n_features = n_features
        self.hidden_layers = tuple(hidden_layers)
        self.use_leaky_relu = use_leaky_relu
        widths = [n_features, *self.hidden_layers]
        self.weights = nn.ParameterList()
        self.bn_weights = nn.ParameterList()
        self.bn_biases = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            w, _ = _init_linear(d_in, d_out, generators, device, bias=False)
            self.weights.append(nn.Parameter(w))  # (M, D_in, W)
            self.bn_weights.append(nn.Parameter(torch.ones(self.n_models, 1, d_out, device=device)))
            self.bn_biases.append(nn.Parameter(torch.zeros(self.n_models, 1, d_out, device=device)))
            self.register_buffer(f"running_mean_{i}", torch.zeros(self.n_models, 1, d_out, device=device))
            self.register_buffer(f"running_var_{i}", torch.ones(self.n_models, 1, d_out, device=device))
        hw, hb = _init_linear(widths[-1], 1, generators, device, bias=True)
        assert hb is not None
        self.head_weight = nn.Parameter(hw)  # (M, W_last, 1)
        self.head_bias = nn.Parameter(hb)  # (M, 1, 1)

    @property
    def input_weights(self) -> Tensor:
        """The weights that read the input features, (M, D, W): the first hidden layer's,
        or the head's (W = 1) in a model without hidden layers."""
        return self.weights[0] if self.hidden_layers else self.head_weight

    def running_stats(self) -> list[Tensor]:
        """BatchNorm running mean/var buffers, layer by layer, each (M, 1, W)."""
        out: list[Tensor] = []
        for i in range(len(self.hidden_layers)):
            out += [getattr(self, f"running_mean_{i}"), getattr(self, f"running_var_{i}")]
        return out

    def forward(
        self,
        x: Tensor,
        *,
        row_mask: Tensor | None = None,
        row_count: Tensor | None = None,
        dropout_masks: Sequence[Tensor | None] | None = None,
        input_mask: Tensor | None = None,
        stats_update: Tensor | None = None,
    ) -> Tensor:
        """Predict standardised targets: x (M, N, D) -> (M, N, 1).

        In training mode (``self.train()``) BatchNorm normalises with each model's own
        batch statistics over its valid rows: ``row_mask`` (M, N, 1) is 1.0 for real rows
        and 0.0 for padding, ``row_count`` (M, 1, 1) the number of real rows (>= 1).
        ``stats_update`` (M, 1, 1) bool says which models fold this batch into their
        running statistics (a frozen model or an empty batch must not).
        ``dropout_masks[i]`` (M, N, W_i), already scaled by 1/(1-p), or None for no
        dropout at layer ``i``; ``input_mask`` (M, N, D), scaled the same way, drops input
        features (None: no input dropout). In eval mode BatchNorm uses the running
        statistics and every row is independent, and no dropout applies, so no mask is needed.
        """
        training = self.training
        if training and (row_mask is None or row_count is None or stats_update is None):
            raise ValueError("training-mode forward needs row_mask, row_count and stats_update")
        h = x * input_mask if training and input_mask is not None else x  # (M, N, D)
        for i in range(len(self.hidden_layers)):
            h = torch.bmm(h, self.weights[i])  # (M, N, W)
            rm = getattr(self, f"running_mean_{i}")
            rv = getattr(self, f"running_var_{i}")
            if training:
                assert row_mask is not None and row_count is not None and stats_update is not None
                mean = (h * row_mask).sum(dim=1, keepdim=True) / row_count  # (M, 1, W)
                centred = h - mean  # (M, N, W)
                var = (centred * centred * row_mask).sum(dim=1, keepdim=True) / row_count  # biased, (M, 1, W)
                h = centred * torch.rsqrt(var + BN_EPS)
                with torch.no_grad():
                    # Running variance is unbiased, as in nn.BatchNorm1d.
                    unbiased = var * (row_count / (row_count - 1.0).clamp_min(1.0))
                    torch.where(stats_update, torch.lerp(rm, mean, BN_MOMENTUM), rm, out=rm)
                    torch.where(stats_update, torch.lerp(rv, unbiased, BN_MOMENTUM), rv, out=rv)
            else:
                h = (h - rm) * torch.rsqrt(rv + BN_EPS)
            h = h * self.bn_weights[i] + self.bn_biases[i]
            h = nn.functional.leaky_relu(h, LEAKY_SLOPE) if self.use_leaky_relu else torch.relu(h)
            if training and dropout_masks is not None and dropout_masks[i] is not None:
                h = h * dropout_masks[i]
        # The 1-wide head as multiply + sum over the last dim, not a matmul: for one model,
        # bmm with a single output column takes a matrix-vector kernel whose rounding
        # differs from the batched kernel used for several models, which breaks "fused
        # equals unfused" after a few epochs. A last-dim sum rounds the same for any M.
        head_row = self.head_weight.transpose(1, 2)  # (M, 1, W_last)
        return (h * head_row).sum(dim=2, keepdim=True) + self.head_bias  # (M, N, 1)

    @torch.no_grad()
    def export_model(self, m: int, *, num_batches_tracked: int = 0) -> dict[str, Tensor]:
        """Model ``m``'s weights as a CPU ``state_dict`` of :func:`build_reference_mlp`."""
        if not 0 <= m < self.n_models:
            raise IndexError(f"model index {m} out of range for {self.n_models} models")
        sd: dict[str, Tensor] = {}
        for i, width in enumerate(self.hidden_layers):
            lin, bn = f"network.{4 * i}", f"network.{4 * i + 1}"
            sd[f"{lin}.weight"] = self.weights[i][m].t().contiguous().cpu()  # (W, D_in) as nn.Linear
            sd[f"{lin}.bias"] = torch.zeros(width, dtype=self.weights[i].dtype)  # BatchNorm's shift is the bias
            sd[f"{bn}.weight"] = self.bn_weights[i][m, 0].clone().cpu()
            sd[f"{bn}.bias"] = self.bn_biases[i][m, 0].clone().cpu()
            sd[f"{bn}.running_mean"] = getattr(self, f"running_mean_{i}")[m, 0].clone().cpu()
            sd[f"{bn}.running_var"] = getattr(self, f"running_var_{i}")[m, 0].clone().cpu()
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
        head = f"network.{4 * len(self.hidden_layers)}"
        sd[f"{head}.weight"] = self.head_weight[m].t().contiguous().cpu()  # (1, W_last)
        sd[f"{head}.bias"] = self.head_bias[m, 0].clone().cpu()  # (1,)
        return sd


def _init_linear(
    d_in: int, d_out: int, generators: Sequence[torch.Generator], device: torch.device, *, bias: bool
) -> tuple[Tensor, Tensor | None]:
    """nn.Linear's default init, U(-1/sqrt(d_in), 1/sqrt(d_in)), each model from its own
    generator, so model m's weights do not depend on how many models share the pass."""
    bound = 1.0 / math.sqrt(d_in)
    ws, bs = [], []
    for g in generators:
        ws.append(torch.rand(d_in, d_out, generator=g, device=device) * (2 * bound) - bound)
        if bias:
            bs.append(torch.rand(1, d_out, generator=g, device=device) * (2 * bound) - bound)
    return torch.stack(ws), (torch.stack(bs) if bias else None)  # (M, D_in, W), (M, 1, W)
