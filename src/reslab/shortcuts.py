"""Shortcuts: how the skip path matches a branch whose output shape differs from its input.

He et al. 2015 (arXiv 1512.03385), section 3.3 and Table 3:

- **A**: identity where the shape is kept; where it changes, subsample by the stride and zero-pad the
  extra channels. Parameter-free, so a ResNet and its plain twin have the same parameter count.
- **B**: identity where the shape is kept; a projection ``W_s x`` (1x1 strided conv + BN) where it changes.
- **C**: a projection on every block.
- **D**: avg-down (ResNet-D, He et al. 2019, arXiv 1812.01187): where the shape changes, average-pool
  by the stride, then a 1x1 conv + BN, so the projection sees every input position.

On ``features`` layouts (MLPs, tokens) a projection is a bias-free linear map and zero-padding pads
the feature dimension; avg-down needs spatial maps.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchSpec

SHORTCUTS: dict[str, str] = {
    "A": "zero-pad extra channels, subsample by stride; parameter-free (He et al. 2015, option A)",
    "B": "projection (1x1 conv + BN) only where the shape changes (He et al. 2015, option B)",
    "C": "projection on every block (He et al. 2015, option C)",
    "D": "avg-down: avg-pool then 1x1 conv + BN where the shape changes (ResNet-D, He et al. 2019)",
}


class ZeroPadShortcut(nn.Module):
    """Option A: ``x[..., ::s, ::s]`` with ``out - in`` zero channels appended."""

    def __init__(self, spec: BranchSpec) -> None:
        super().__init__()
        if spec.out_dim < spec.in_dim:
            raise ValueError(f"zero-pad shortcut cannot shrink {spec.in_dim} -> {spec.out_dim} channels; "
                             "use a projection shortcut (B or C)")
        self.spec = spec
        self.extra = spec.out_dim - spec.in_dim

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if s.layout == "conv":
            if s.stride != 1:
                x = x[:, :, ::s.stride, ::s.stride]
            return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x
        return F.pad(x, (0, self.extra)) if self.extra else x


class ProjectionShortcut(nn.Module):
    """Options B/C: ``W_s x``; a 1x1 strided conv + BN on maps, a bias-free linear map on features."""

    def __init__(self, spec: BranchSpec) -> None:
        super().__init__()
        self.proj = nn.Sequential(spec.pointwise(), nn.BatchNorm2d(spec.out_dim)) if spec.layout == "conv" \
            else spec.pointwise()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class AvgDownShortcut(nn.Module):
    """Option D (ResNet-D): ``BN(conv1x1(avgpool_s(x)))``."""

    def __init__(self, spec: BranchSpec) -> None:
        super().__init__()
        if spec.layout != "conv":
            raise ValueError("shortcut D (avg-down) needs spatial maps; this family has feature vectors")
        pool: nn.Module = (nn.AvgPool2d(spec.stride, spec.stride, ceil_mode=True, count_include_pad=False)
                           if spec.stride > 1 else nn.Identity())
        self.proj = nn.Sequential(pool, nn.Conv2d(spec.in_dim, spec.out_dim, 1, bias=False),
                                  nn.BatchNorm2d(spec.out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def make_shortcut(option: str, spec: BranchSpec) -> nn.Module:
    """The skip-path module for one branch under shortcut ``option`` (A, B, C or D)."""
    option = option.upper() if isinstance(option, str) else option
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {option!r}; expected one of {', '.join(SHORTCUTS)}")
    if option == "C":
        return ProjectionShortcut(spec)
    if option == "D" and spec.layout != "conv":
        return AvgDownShortcut(spec)  # raises the clear error
    if not spec.changes_shape:
        return nn.Identity()
    return {"A": ZeroPadShortcut, "B": ProjectionShortcut, "D": AvgDownShortcut}[option](spec)
