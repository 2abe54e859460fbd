"""Identity residual: ``x_{l+1} = post(shortcut(x_l) + F_l(x_l))``.

He et al. 2015 (arXiv 1512.03385), eq. (1)-(2): ``y = F(x) + x``, with ``W_s x`` where dimensions change
(see ``reslab.shortcuts``). ``post="relu"`` gives the original post-activation unit (ReLU after the add);
``post=None`` gives the identity mapping of He et al. 2016 (arXiv 1603.05027), eq. (4):
``x_L = x_l + sum_{i=l}^{L-1} F(x_i)``.
"""

from __future__ import annotations

from torch import Tensor

from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("identity", paper="He et al. 2015, arXiv 1512.03385")
class Identity(AdditiveScheme):
    """``x_{l+1} = post(shortcut(x_l) + F_l(x_l))``."""

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return fx + self.shortcut(i, x)  # y = F(x) + W_s x (eq. 2; W_s = 1 where the shape is kept)
