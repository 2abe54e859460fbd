"""Where the LayerNorm sits in a transformer's residual stream: Pre-LN, Post-LN and sandwich norm.

All three are the identity residual with a norm placement (``norm=`` of every scheme; see
:class:`~reslab.residuals.base.ResidualScheme`), registered under the names the literature uses:

- ``preln``: ``x_{l+1} = x_l + F_l(N_l(x_l))``, with a final norm before the head (Xiong et al. 2020,
  arXiv 2002.04745; GPT-2). At initialisation ``E||x_l||^2`` grows linearly in ``l``: Xiong et al. bound it by
  ``(1 + l/2) d`` and ``(1 + 3l/2) d`` for FFN sublayers.
- ``postln``: ``x_{l+1} = N_l(x_l + F_l(x_l))`` (Vaswani et al. 2017, arXiv 1706.03762): the stream is
  renormalised after every sublayer, so its norm stays constant in depth; it needs learning-rate warm-up.
- ``sandwich``: ``x_{l+1} = x_l + N'_l(F_l(N_l(x_l)))`` (Ding et al. 2021, CogView, arXiv 2105.13290): a second
  norm on each branch output bounds what a sublayer can add.

``N`` is a LayerNorm, or an RMSNorm with ``norm_type="rmsnorm"``. Deleting a sublayer (a lesion) leaves the skip
path ``x_l`` itself (the sublayer and its norms are removed together).
"""

from __future__ import annotations

from reslab.residuals.base import register_residual
from reslab.residuals.identity import Identity


@register_residual("preln", paper="Xiong et al. 2020, arXiv 2002.04745")
class PreLN(Identity):
    """``x_{l+1} = x_l + F_l(N_l(x_l))`` (final norm in the head)."""

    default_norm = "pre"


@register_residual("postln", paper="Vaswani et al. 2017, arXiv 1706.03762")
class PostLN(Identity):
    """``x_{l+1} = N_l(x_l + F_l(x_l))``."""

    default_norm = "post"


@register_residual("sandwich", paper="Ding et al. 2021 (CogView), arXiv 2105.13290")
class Sandwich(Identity):
    """``x_{l+1} = x_l + N'_l(F_l(N_l(x_l)))``."""

    default_norm = "sandwich"
