"""DeepNorm: ``x_{l+1} = LN(alpha * x_l + G_l(x_l))``, Post-LN with the skip up-weighted and a down-scaled init.

Wang et al. 2022 (arXiv 2203.00555), eq. (5) and Figure 2: ``alpha`` multiplies the **skip**, and the
feed-forward, value and output projections are initialised with Xavier-normal gain ``beta`` (queries and keys
with gain 1). Constants for a decoder-only model of ``M`` layers (each an attention and an FFN sublayer):
``alpha = (2M)^(1/4)``, ``beta = (8M)^(-1/4)``; encoder-only: ``(2N)^(1/4)``, ``(8N)^(-1/4)``. It trains
1,000-layer transformers. Deleting a sublayer leaves the scaled skip ``alpha * x_l``.

Args:
    alpha, beta: override the constants (numbers), e.g. for the encoder-only rule.
"""

from __future__ import annotations

from torch import Tensor, nn

from reslab.branch import layer_count, weights_by_role
from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("deepnorm", paper="Wang et al. 2022 (DeepNet), arXiv 2203.00555")
class DeepNorm(AdditiveScheme):
    """``x_{l+1} = LN(alpha * x_l + G_l(x_l))`` with beta-scaled Xavier init of FFN / value / output weights."""

    default_norm = "post"
    norm_placements = ("post",)

    def __init__(self, specs, alpha: float | None = None, beta: float | None = None, **kw) -> None:
        super().__init__(specs, **kw)
        m = layer_count(self.specs)
        self.alpha = float((2 * m) ** 0.25 if alpha is None else alpha)
        self.beta = float((8 * m) ** -0.25 if beta is None else beta)

    def skip(self, state: Tensor, i: int) -> Tensor:
        return self.alpha * self.shortcut(i, state)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.alpha * x + fx  # inside LN(.), the post norm

    def bind(self, branches) -> None:
        for w in weights_by_role(branches, "query", "key"):
            nn.init.xavier_normal_(w, gain=1.0)
        for w in weights_by_role(branches, "ffn", "value", "out"):
            nn.init.xavier_normal_(w, gain=self.beta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:.4g}, beta={self.beta:.4g}"
