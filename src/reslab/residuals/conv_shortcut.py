"""1x1-conv shortcut: ``y = post(W_s x + F(x))`` with a learned 1x1 convolution on every block.

He et al. 2016 (arXiv 1603.05027), Table 1e: replacing every identity shortcut of ResNet-110 by a 1x1
convolution (no BN) gives 12.22% CIFAR-10 error instead of 6.61%: multiplicative shortcuts hamper
propagation even when they could learn the identity. The projection is this scheme's own, so it takes no
shortcut option. On feature vectors it is a bias-free linear map.
"""

from __future__ import annotations

from torch import Tensor, nn

from reslab.residuals.base import AdditiveScheme, Capabilities, register_residual


@register_residual("conv_shortcut", paper="He et al. 2016, arXiv 1603.05027 (Table 1e)")
class ConvShortcut(AdditiveScheme):
    """``y = post(conv1x1(x) + F(x))`` on every block."""

    capabilities = Capabilities(uses_shortcut=False, owns_shortcut=True)

    def __init__(self, specs, **kw) -> None:
        super().__init__(specs, **kw)
        self.projections = nn.ModuleList(s.pointwise() for s in self.specs)

    def skip(self, state: Tensor, i: int) -> Tensor:
        return self.projections[i](state)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.projections[i](x) + fx
