"""Constant scaling: ``x_{l+1} = post(a * shortcut(x_l) + b * F_l(x_l))``.

He et al. 2016 (arXiv 1603.05027), section 3.1 and Table 1 (b): ``h(x) = lambda x`` on the skip; with
``a = b = 0.5`` ResNet-110 reaches 12.35% CIFAR-10 error instead of 6.61%, since
``x_L = (prod a) x_l + ...`` makes the skip path vanish (``a < 1``) or explode (``a > 1``).
With ``a = 1, b = 1/sqrt(L)`` it is the scaled residual that bounds the stream norm (REFERENCE.md section 7).

Args:
    a: scale on the skip path.
    b: scale on the branch, a number or ``"1/sqrt(L)"`` (``L`` = number of branches).
"""

from __future__ import annotations

import math

from torch import Tensor

from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("scaled", paper="He et al. 2016, arXiv 1603.05027 (Table 1b); scaled residual 1/sqrt(L)")
class Scaled(AdditiveScheme):
    """``x_{l+1} = post(a * shortcut(x_l) + b * F_l(x_l))`` with constant ``a``, ``b``."""

    def __init__(self, specs, a: float = 1.0, b: float | str = "1/sqrt(L)", **kw) -> None:
        super().__init__(specs, **kw)
        if isinstance(b, str):
            if b.replace(" ", "") != "1/sqrt(L)":
                raise ValueError(f"scaled: b must be a number or '1/sqrt(L)', got {b!r}")
            b = 1.0 / math.sqrt(len(self.specs))
        self.a, self.b = float(a), float(b)

    def skip(self, state: Tensor, i: int) -> Tensor:
        s = self.shortcut(i, state)
        return s if self.a == 1.0 else self.a * s

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return self.b * out

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.a * self.shortcut(i, x) + self.b * fx

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.a:g}, b={self.b:g}"
