"""Dropout shortcut: ``y = post(dropout_p(shortcut(x)) + F(x))``.

He et al. 2016 (arXiv 1603.05027), Table 1f: dropout (ratio 0.5) on the identity shortcut; it "fails to
converge to a good solution" because it scales the skip path by a random factor at every block. Dropout is
active in training mode only, so a lesion at test time leaves the plain shortcut.

Args:
    p: drop probability on the shortcut.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("dropout_shortcut", paper="He et al. 2016, arXiv 1603.05027 (Table 1f)")
class DropoutShortcut(AdditiveScheme):
    """``y = post(dropout_p(shortcut(x)) + F(x))``."""

    def __init__(self, specs, p: float = 0.5, **kw) -> None:
        super().__init__(specs, **kw)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_shortcut: p must be in [0, 1), got {p}")
        self.p = float(p)

    def skip(self, state: Tensor, i: int) -> Tensor:
        return F.dropout(self.shortcut(i, state), self.p, self.training)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return F.dropout(self.shortcut(i, x), self.p, self.training) + fx
