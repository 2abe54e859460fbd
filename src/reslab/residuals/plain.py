"""Plain: no skip path at all, ``x_{l+1} = post(F_l(x_l))``.

The plain twin of every family (He et al. 2015, arXiv 1512.03385, section 4.1: "plain networks"): the same
branches stacked with no shortcut. Deleting branch ``i`` (a lesion) passes its input on unchanged, zero-padded
and subsampled where the branch changes shape, so "remove layer i" means exactly that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reslab.residuals.base import Capabilities, ParameterFreeSkip, ResidualScheme, Tap, register_residual


@register_residual("plain", paper="He et al. 2015, arXiv 1512.03385 (plain baseline)")
class Plain(ResidualScheme):
    """``x_{l+1} = post(F_l(x_l))``: every branch replaces the stream."""

    capabilities = Capabilities(uses_shortcut=False, skip_path=False)

    def __init__(self, specs, **kw) -> None:
        super().__init__(specs, **kw)
        self.lesion_skips = nn.ModuleList(ParameterFreeSkip(s) for s in self.specs)

    def write(self, state: Tensor, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Tensor:
        out = self.norm_out(i, out)
        if tap is not None:
            tap("contribution", i, out)
        return self.finish(i, out)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return fx

    def decompose(self, x0, outs, mix) -> Tensor:
        """Only the last branch reaches the output: every other component contributes zero."""
        self._check_linear()
        last = self.norm_out(len(outs) - 1, outs[-1])
        return torch.stack([torch.zeros_like(last)] * len(outs) + [last])

    def skip(self, state: Tensor, i: int) -> Tensor:
        return self.lesion_skips[i](state)
