"""SkipInit: a learnable scalar at the end of each branch, ``x_{l+1} = post(shortcut(x_l) + alpha_l F_l(x_l))``.

De & Smith 2020 (arXiv 2002.10444): ``alpha_l`` is initialised to zero (or a small constant
``<= 1/sqrt(depth)``), so that a deep net without normalisation starts close to the identity.

Args:
    init: initial value of every ``alpha_l``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("skipinit", paper="De & Smith 2020, arXiv 2002.10444")
class SkipInit(AdditiveScheme):
    """``x_{l+1} = post(shortcut(x_l) + alpha_l * F_l(x_l))``, one learnable scalar per branch."""

    default_init = 0.0

    def __init__(self, specs, init: float | None = None, shortcut=None, post=None) -> None:
        super().__init__(specs, shortcut=shortcut, post=post)
        value = self.default_init if init is None else float(init)
        self.alpha = nn.Parameter(torch.full((len(self.specs),), value))

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return self.alpha[i] * out
