"""Normalisation layers a residual stream uses, by ``norm_type`` name (where they sit is the scheme's
``norm`` placement, :mod:`reslab.residuals.base`).

- ``layernorm``: ``(x - mean(x)) / sqrt(var(x) + eps) * g + b`` over the last axis (Ba et al. 2016).
- ``rmsnorm``: ``x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich 2019, arXiv 1910.07467).
"""

from __future__ import annotations

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


#: ``norm_type`` name -> constructor taking the feature width
NORM_TYPES: dict[str, Callable[[int], nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}
