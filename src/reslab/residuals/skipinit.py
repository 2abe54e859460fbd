"""SkipInit: a learnable scalar at the end of each branch, ``x_{l+1} = post(shortcut(x_l) + alpha_l F_l(x_l))``.

De & Smith 2020 (arXiv 2002.10444): ``alpha_l`` is initialised to zero (or a small constant
``<= 1/sqrt(depth)``), so that a deep net without normalisation starts close to the identity. It replaces
normalisation, so on transformers it runs with no norm unless one is asked for (``norm="pre"``). With
``init="1/sqrt(L)"`` it is the learnable form of the scaled residual ``x + F(x)/sqrt(L)`` (``L`` branches).

Args:
    init: initial value of every ``alpha_l``, a number or ``"1/sqrt(L)"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reslab.branch import layer_of
from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("skipinit", paper="De & Smith 2020, arXiv 2002.10444")
class SkipInit(AdditiveScheme):
    """``x_{l+1} = post(shortcut(x_l) + alpha_l * F_l(x_l))``, one learnable scalar per branch."""

    default_init = 0.0
    default_norm = "none"  # it replaces normalisation
    per_layer = False  # one alpha per branch; True: one per layer, shared by a transformer layer's sublayers

    def __init__(self, specs, init: float | str | None = None, **kw) -> None:
        super().__init__(specs, **kw)
        if isinstance(init, str):
            if init.replace(" ", "") != "1/sqrt(L)":
                raise ValueError(f"{self.name}: init must be a number or '1/sqrt(L)', got {init!r}")
            init = 1.0 / math.sqrt(len(self.specs))
        value = self.default_init if init is None else float(init)
        self.layer = layer_of(self.specs) if self.per_layer else tuple(range(len(self.specs)))
        self.alpha = nn.Parameter(torch.full((self.layer[-1] + 1,), value))

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return self.alpha[self.layer[i]] * out

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.shortcut(i, x) + self.alpha[self.layer[i]] * fx
