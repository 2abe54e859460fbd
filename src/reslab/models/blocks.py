"""Branch building blocks shared by the families: a two-layer branch in post- or pre-activation order."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def make_norm(kind: str, dim: int, layout: str) -> nn.Module:
    """A normalisation layer by name: ``bn`` (BatchNorm), ``ln`` (LayerNorm over channels) or ``none``."""
    if kind == "bn":
        return nn.BatchNorm2d(dim) if layout == "conv" else nn.BatchNorm1d(dim)
    if kind == "ln":
        if layout == "conv":
            return nn.GroupNorm(1, dim)
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected 'bn', 'ln' or 'none'")


class TwoLayerBranch(nn.Module):
    """Two weight layers, each with a norm and a ReLU between them.

    Post-activation (He et al. 2015): ``F(x) = norm2(layer2(relu(norm1(layer1(x)))))``; the family puts the
    final ReLU after the combination. Pre-activation (He et al. 2016, "full pre-activation"):
    ``F(x) = layer2(relu(norm2(layer1(relu(norm1(x))))))``.
    """

    def __init__(self, layer1: nn.Module, layer2: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 preact: bool) -> None:
        super().__init__()
        self.layer1, self.layer2, self.norm1, self.norm2 = layer1, layer2, norm1, norm2
        self.preact = preact

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            return self.layer2(F.relu(self.norm2(self.layer1(F.relu(self.norm1(x))))))
        return self.norm2(self.layer2(F.relu(self.norm1(self.layer1(x)))))

    def last_module(self) -> nn.Module:
        """The module that writes the branch output: the last norm (post-act) or last layer (pre-act)."""
        if self.preact or isinstance(self.norm2, nn.Identity):
            return self.layer2
        return self.norm2

    def zero_init_last_(self) -> None:
        """Zero the scale of the branch's last module, so the block starts as its skip path (Goyal et al. 2017)."""
        nn.init.zeros_(self.last_module().weight)
