"""LayerScale: ``x_{l+1} = post(shortcut(x_l) + diag(lambda_l) F_l(x_l))``, one learnable scale per channel.

Touvron et al. 2021, CaiT (arXiv 2103.17239), eq. (3): ``lambda_l`` initialised to a small constant,
0.1 for depth <= 18, 1e-5 for 24, 1e-6 deeper.

Args:
    init: initial value of every entry of ``lambda_l``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("layerscale", paper="Touvron et al. 2021 (CaiT), arXiv 2103.17239")
class LayerScale(AdditiveScheme):
    """``x_{l+1} = post(shortcut(x_l) + diag(lambda_l) F_l(x_l))``."""

    def __init__(self, specs, init: float = 0.1, shortcut=None, post=None) -> None:
        super().__init__(specs, shortcut=shortcut, post=post)
        self.scales = nn.ParameterList(nn.Parameter(torch.full((s.out_dim,), float(init))) for s in self.specs)

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return self.specs[i].channel_view(self.scales[i]) * out
