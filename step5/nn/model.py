"""The survivor-quality MLP in two forms sharing one weights' layout (docs/training.md, "The
model"): :class:`FusedMLP` trains ``M`` same-shape models as batched matmuls (a lone fold is
M = 1), :class:`ReferenceMLP` is one model in the layout checkpoints store and Step 6 loads."""
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

    def __init__(self, n_features: int, hidden_layers: Sequence[int], *, use_leaky_relu: bool, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d_in = n_features
        for width in hidden_layers:
            layers += [nn.Linear(d_in, width), nn.BatchNorm1d(width, eps=BN_EPS, momentum=BN_MOMENTUM),
                       nn.LeakyReLU(LEAKY_SLOPE) if use_leaky_relu else nn.ReLU(), nn.Dropout(dropout)]
            d_in = width
        self.network = nn.Sequential(*layers, nn.Linear(d_in, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Standardised features (N, D) -> standardised predictions (N, 1)."""
        return self.network(x)


class FusedMLP(nn.Module):
    """``M`` independent MLPs of the same shape, a pure function of its inputs (the trainer
    passes row and dropout masks in). Per hidden layer ``i``: ``weights[i]`` (M, D_in, W),
    ``bn_weights[i]``, ``bn_biases[i]`` and buffers ``running_mean_i``, ``running_var_i``
    (M, 1, W); the head: ``head_weight`` (M, W_last, 1), ``head_bias`` (M, 1, 1)."""

    def __init__(self, n_features: int, hidden_layers: Sequence[int], *, use_leaky_relu: bool,
                 generators: Sequence[torch.Generator], device: torch.device) -> None:
        super().__init__()
        self.n_models = M = len(generators)
        self.hidden_layers = tuple(hidden_layers)
        self.use_leaky_relu = use_leaky_relu
        widths = [n_features, *self.hidden_layers]
        self.weights = nn.ParameterList()
        self.bn_weights = nn.ParameterList()
        self.bn_biases = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            self.weights.append(nn.Parameter(_uniform((d_in, d_out), d_in, generators, device)))
            self.bn_weights.append(nn.Parameter(torch.ones(M, 1, d_out, device=device)))
            self.bn_biases.append(nn.Parameter(torch.zeros(M, 1, d_out, device=device)))
            self.register_buffer(f"running_mean_{i}", torch.zeros(M, 1, d_out, device=device))
            self.register_buffer(f"running_var_{i}", torch.ones(M, 1, d_out, device=device))
        # Each generator draws the head's weights, then its bias (the order a lone model draws them in).
        self.head_weight = nn.Parameter(_uniform((widths[-1], 1), widths[-1], generators, device))
        self.head_bias = nn.Parameter(_uniform((1, 1), widths[-1], generators, device))

    @property
    def input_weights(self) -> Tensor:
        """The weights that read the input features, (M, D, W): the first hidden layer's,
        or the head's (W = 1) in a model without hidden layers."""
        return self.weights[0] if self.hidden_layers else self.head_weight

    def running_stats(self) -> list[Tensor]:
        """BatchNorm running mean/var buffers, layer by layer, each (M, 1, W)."""
        return [getattr(self, f"running_{s}_{i}") for i in range(len(self.hidden_layers)) for s in ("mean", "var")]

    def forward(self, x: Tensor, *, row_mask: Tensor | None = None, row_count: Tensor | None = None,
                dropout_masks: Sequence[Tensor | None] | None = None, input_mask: Tensor | None = None,
                stats_update: Tensor | None = None) -> Tensor:
        """Predict standardised targets: x (M, N, D) -> (M, N, 1).

        Training mode (the trainer passes every mask): BatchNorm normalises with each model's
        own statistics over its real rows (``row_mask`` (M, N, 1), ``row_count`` (M, 1, 1) >= 1),
        and folds them into its running statistics where ``stats_update`` (M, 1, 1) is true;
        ``input_mask`` (M, N, D) and ``dropout_masks[i]`` (M, N, W_i), scaled by 1/(1-p) or
        None, are the dropout. Eval mode uses the running statistics, no mask is needed.
        """
        training = self.training
        h = x * input_mask if training and input_mask is not None else x
        for i in range(len(self.hidden_layers)):
            h = torch.bmm(h, self.weights[i])  # (M, N, W)
            rm = getattr(self, f"running_mean_{i}")
            rv = getattr(self, f"running_var_{i}")
            if training:
                mean = (h * row_mask).sum(dim=1, keepdim=True) / row_count  # (M, 1, W)
                centred = h - mean
                var = (centred * centred * row_mask).sum(dim=1, keepdim=True) / row_count  # biased
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
        # The 1-wide head as multiply + sum over the last dim, not a matmul: for one model bmm
        # takes a matrix-vector kernel that rounds differently from the batched one used for
        # several, which breaks "fused equals alone" after a few epochs.
        return (h * self.head_weight.transpose(1, 2)).sum(dim=2, keepdim=True) + self.head_bias

    @torch.no_grad()
    def export_model(self, m: int, *, num_batches_tracked: int = 0) -> dict[str, Tensor]:
        """Model ``m``'s weights as a CPU ``state_dict`` of :class:`ReferenceMLP`: contiguous
        copies of its own, since a view of the group's stacked parameters would keep them
        alive and be saved whole (torch.save writes a view's entire storage)."""
        sd: dict[str, Tensor] = {}
        for i, width in enumerate(self.hidden_layers):
            lin, bn = f"network.{4 * i}", f"network.{4 * i + 1}"
            sd[f"{lin}.weight"] = self.weights[i][m].t()  # (W, D_in) as nn.Linear
            sd[f"{lin}.bias"] = torch.zeros(width, dtype=self.weights[i].dtype)  # BatchNorm's shift is the bias
            sd[f"{bn}.weight"] = self.bn_weights[i][m, 0]
            sd[f"{bn}.bias"] = self.bn_biases[i][m, 0]
            sd[f"{bn}.running_mean"] = getattr(self, f"running_mean_{i}")[m, 0]
            sd[f"{bn}.running_var"] = getattr(self, f"running_var_{i}")[m, 0]
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(num_batches_tracked, dtype=torch.long)
        head = f"network.{4 * len(self.hidden_layers)}"
        sd[f"{head}.weight"] = self.head_weight[m].t()  # (1, W_last)
        sd[f"{head}.bias"] = self.head_bias[m, 0]
        return {name: t.contiguous().to("cpu", copy=True) for name, t in sd.items()}


def _uniform(shape: tuple[int, ...], d_in: int, generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """nn.Linear's default init, U(-1/sqrt(d_in), 1/sqrt(d_in)), of ``shape`` for each model from
    its own generator: (M, *shape)."""
    bound = 1.0 / math.sqrt(d_in)
    return torch.stack([torch.rand(*shape, generator=g, device=device) * (2 * bound) - bound for g in generators])
