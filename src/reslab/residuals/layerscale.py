"""LayerScale: ``x_{l+1} = post(shortcut(x_l) + diag(lambda_l) F_l(x_l))``, one learnable scale per channel.

Touvron et al. 2021, CaiT (arXiv 2103.17239), eq. (3): ``lambda_l`` initialised to a small constant chosen
by depth, 0.1 for depth <= 18, 1e-5 for depth 24, 1e-6 deeper (depth in layers: residual blocks, or
transformer layers of two sublayers; we use 1e-5 up to 24 layers). On transformers the branch reads a
pre-norm, ``x + diag(lambda) F(LN(x))``.

Args:
    init: initial value of every entry of ``lambda_l``, or ``"cait"`` (the default) for CaiT's rule by depth.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reslab.branch import layer_count
from reslab.residuals.base import AdditiveScheme, register_residual


def cait_init(layers: int) -> float:
    """CaiT's LayerScale initialisation for a network of ``layers`` layers."""
    return 0.1 if layers <= 18 else 1e-5 if layers <= 24 else 1e-6


@register_residual("layerscale", paper="Touvron et al. 2021 (CaiT), arXiv 2103.17239")
class LayerScale(AdditiveScheme):
    """``x_{l+1} = post(shortcut(x_l) + diag(lambda_l) F_l(x_l))``."""

    def __init__(self, specs, init: float | str = "cait", **kw) -> None:
        super().__init__(specs, **kw)
        if isinstance(init, str):
            if init != "cait":
                raise ValueError(f"layerscale: init must be a number or 'cait', got {init!r}")
            init = cait_init(layer_count(self.specs))
        self.init = float(init)
        self.scales = nn.ParameterList(nn.Parameter(torch.full((s.out_dim,), self.init)) for s in self.specs)

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return self.specs[i].channel_view(self.scales[i]) * out

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.shortcut(i, x) + self.specs[i].channel_view(self.scales[i]) * fx  # x + diag(lambda) F(x)
