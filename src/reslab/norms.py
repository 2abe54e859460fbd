"""Normalisation layers a residual stream uses, by ``norm_type`` name (where they sit is the scheme's
``norm`` placement, :mod:`reslab.residuals.base`).

- ``layernorm``: ``(x - mean(x)) / sqrt(var(x) + eps) * g + b`` over the last axis (Ba et al. 2016).
- ``rmsnorm``: ``x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich 2019, arXiv 1910.07467).
- ``dyt``: Dynamic Tanh, ``gamma * tanh(alpha x) + beta`` elementwise, no statistics (Zhu et al. 2025,
  arXiv 2503.10622): a drop-in replacement of the norm, :class:`DyT`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``x / rms(x) * g`` over the last axis (Zhang & Sennrich 2019, arXiv 1910.07467), learnable gain ``g``."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.rms_norm(x, (self.dim,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class DyT(nn.Module):
    """Dynamic Tanh: ``DyT(x) = gamma * tanh(alpha * x) + beta`` (Zhu, Chen, He, LeCun & Liu 2025, "Transformers
    without Normalization", arXiv 2503.10622, eq. (1)).

    ``alpha`` is one learnable scalar (it sets the input range that stays in tanh's linear part); ``gamma`` and
    ``beta`` are per-channel vectors, initialised to ones and zeros as a LayerNorm's affine. It squashes each
    feature on its own: no mean, no variance, no reduction over the channels. Init of ``alpha`` (the paper's
    section 7): ``alpha_0 = 0.5`` serves the non-LLM models; for LLMs the paper tunes ``alpha_0`` by width (smaller
    for wider models) and by place: higher before attention than before the FFN and at the final norm (LLaMA 7B:
    0.8 / 0.2 / 0.2). Here one ``alpha_0`` for every norm of a scheme (``NORM_TYPES["dyt"]`` uses 0.5).

    Args:
        dim: the feature width (``gamma`` and ``beta`` have this length).
        alpha: the initial ``alpha_0`` (positive).
    """

    def __init__(self, dim: int, alpha: float = 0.5) -> None:
        super().__init__()
        if int(dim) <= 0:
            raise ValueError(f"DyT needs a positive width, got {dim}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"DyT alpha must be a positive number, got {alpha}")
        self.dim = int(dim)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.weight = nn.Parameter(torch.ones(self.dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(self.dim))  # beta

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha={self.alpha.item():.4g}"


#: ``norm_type`` name -> constructor taking the feature width
NORM_TYPES: dict[str, Callable[[int], nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm, "dyt": DyT}
