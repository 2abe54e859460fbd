"""Where the norm sits in a transformer's residual stream: Pre-LN, Post-LN, sandwich, Peri-LN, Mix-LN and
LayerNorm Scaling.

Each is the identity residual with a norm placement (``norm=`` of every scheme; see
:class:`~reslab.residuals.base.ResidualScheme`), registered under the names the literature uses:

- ``preln``: ``x_{l+1} = x_l + F_l(N_l(x_l))``, with a final norm before the head (Xiong et al. 2020,
  arXiv 2002.04745; GPT-2). At initialisation ``E||x_l||^2`` grows linearly in ``l``: Xiong et al. bound it by
  ``(1 + l/2) d`` and ``(1 + 3l/2) d`` for FFN sublayers.
- ``postln``: ``x_{l+1} = N_l(x_l + F_l(x_l))`` (Vaswani et al. 2017, arXiv 1706.03762): the stream is
  renormalised after every sublayer, so its norm stays constant in depth; it needs learning-rate warm-up.
- ``sandwich``: ``x_{l+1} = x_l + N'_l(F_l(N_l(x_l)))`` (Ding et al. 2021, CogView, arXiv 2105.13290): a second
  norm on each branch output bounds what a sublayer can add.
- ``periln``: Peri-LN (Kim et al. 2025, arXiv 2502.02732): the sandwich update ``x_{l+1} = x_l + N'_l(F_l(N_l(x_l)))``
  (norms "around" each sublayer, as in Gemma 2 and OLMo 2) **plus** a norm of the embedding, ``x_0 = N_e(e)``,
  owned by the scheme and applied in :meth:`PeriLN.begin`; the final norm ``N_f(x_L)`` before the head is the
  family's (``final_norm``), as for ``preln`` and ``sandwich``. So ``periln`` differs from ``sandwich`` in exactly
  ``N_e``: one more norm (``d`` gains, plus ``d`` biases for a LayerNorm) and a stream that starts normalised (unit
  RMS per token for a LayerNorm or RMSNorm at init); ``periln`` with ``embed_norm=False`` is ``sandwich``, output
  for output.
- ``mixln``: Mix-LN (Li, Yin & Liu 2024, arXiv 2412.13795): Post-LN ``x_{l+1} = N_l(x_l + F_l(x_l))`` in the first
  ``floor(alpha M)`` of the ``M`` *layers* (both sublayers of a transformer layer; ``alpha = 0.25``), Pre-LN
  ``x_{l+1} = x_l + F_l(N_l(x_l))`` in the others; the family's final norm before the head. ``alpha = 0`` is
  ``preln``, ``alpha = 1`` is ``postln``.
- ``lnscaling``: LayerNorm Scaling, LNS (Sun et al. 2025, "The Curse of Depth in Large Language Models", arXiv
  2502.05795, section 4): Pre-LN with each norm's output scaled by the depth of its layer,
  ``x_{l+1} = x_l + F_l(N_l(x_l) / sqrt(k))`` for a sublayer of layer ``k = 1..M`` (counted from 1, as in the
  authors' code: both sublayers of a layer share ``k``); the final norm before the head is not scaled. It has no
  parameter of its own. The paper recommends dropping the depth-scaled init of the output projections with it
  (GPT family: ``scaled_out_init=False``).

``N`` is a LayerNorm, an RMSNorm (``norm_type="rmsnorm"``) or a Dynamic Tanh (``norm_type="dyt"``). Deleting a
sublayer (a lesion) leaves the skip path ``x_l`` itself (the sublayer and its norms are removed together; in a
Post-LN layer of ``mixln`` its post norm too, as for ``postln``).
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from reslab.branch import layer_count, layer_of
from reslab.norms import NORM_TYPES
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


@register_residual("periln", paper="Kim et al. 2025 (Peri-LN), arXiv 2502.02732")
class PeriLN(Identity):
    """``x_0 = N_e(e)``, ``x_{l+1} = x_l + N'_l(F_l(N_l(x_l)))`` (final norm in the head).

    Args:
        embed_norm: normalise the embedding (the paper's Peri-LN); ``False`` leaves it, which is ``sandwich``.
    """

    default_norm = "sandwich"
    norm_placements = ("sandwich",)

    def __init__(self, specs, embed_norm: bool = True, **kw) -> None:
        super().__init__(specs, **kw)
        if not isinstance(embed_norm, bool):
            raise ValueError(f"periln: embed_norm must be True or False, got {embed_norm!r}")
        self.embed_norm = NORM_TYPES[self.norm_type](self.specs[0].in_dim) if embed_norm else None

    def begin(self, x0: Tensor) -> Tensor:
        """The stream starts at the normalised embedding ``N_e(x0)``."""
        return x0 if self.embed_norm is None else self.embed_norm(x0)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.shortcut(i, x) + fx  # fx = N'_l(F_l(N_l(x))), after the output norm

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """As for every additive rule, with the normalised embedding ``N_e(x0)`` as the first component."""
        return super().decompose(self.begin(x0), outs, mix)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_norm={self.embed_norm is not None}"


@register_residual("mixln", paper="Li et al. 2024 (Mix-LN), arXiv 2412.13795")
class MixLN(Identity):
    """Post-LN ``x_{l+1} = N_l(x_l + F_l(x_l))`` in the first ``floor(alpha M)`` layers, Pre-LN
    ``x_{l+1} = x_l + F_l(N_l(x_l))`` after.

    Args:
        alpha: the share of the ``M`` layers that are Post-LN (the paper's default 0.25), in ``[0, 1]``.
    """

    default_norm = "mix"
    norm_placements = ("mix",)

    def __init__(self, specs, alpha: float = 0.25, **kw) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"mixln: alpha must be a number in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)  # read by _init_norms, which the base constructor calls
        super().__init__(specs, **kw)

    def _init_norms(self, norm: str, norm_type: str) -> None:
        """A post norm on each branch of the first ``floor(alpha M)`` layers, a pre norm on every other branch
        (``nn.Identity`` in the other list), so that the base :meth:`norm_in` and :meth:`finish` apply them."""
        if norm != "mix":
            raise ValueError(f"residual scheme 'mixln' places its own norms (Post-LN, then Pre-LN): norm must be "
                             f"'mix' or None, not {norm!r}")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"unknown norm_type {norm_type!r}; expected one of {', '.join(NORM_TYPES)}")
        if any(s.layout != "features" for s in self.specs):
            raise ValueError("norm placement 'mix' needs feature streams (transformer tokens, MLPs); "
                             "convolutional branches carry their own BatchNorm")
        self.norm_placement, self.norm_type = norm, norm_type
        self.post_layers = math.floor(self.alpha * layer_count(self.specs) + 1e-9)
        post = [k < self.post_layers for k in layer_of(self.specs)]
        make = NORM_TYPES[norm_type]
        self.in_norms = nn.ModuleList(nn.Identity() if p else make(s.in_dim) for p, s in zip(post, self.specs))
        self.out_norms = None
        self.post_norms = nn.ModuleList(make(s.out_dim) if p else nn.Identity() for p, s in zip(post, self.specs))

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        # inside N_l(.) (the post norm) in a Post-LN layer; fx = F_l(N_l(x)) in a Pre-LN layer
        return self.shortcut(i, x) + fx

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:g}, post_layers={self.post_layers}"


@register_residual("lnscaling", paper="Sun et al. 2025 (The Curse of Depth; LayerNorm Scaling), arXiv 2502.05795")
class LNScaling(Identity):
    """``x_{l+1} = x_l + F_l(N_l(x_l) / sqrt(k))``, ``k = 1..M`` the layer of sublayer ``l`` (final norm unscaled)."""

    default_norm = "pre"
    norm_placements = ("pre",)

    def __init__(self, specs, **kw) -> None:
        super().__init__(specs, **kw)
        self.scales = tuple(1.0 / math.sqrt(k + 1) for k in layer_of(self.specs))

    def norm_in(self, i: int, x: Tensor) -> Tensor:
        """``N_i(x) / sqrt(k)`` for branch ``i`` of layer ``k`` (from 1)."""
        return self.in_norms[i](x) * self.scales[i]

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        return self.shortcut(i, x) + fx  # fx = F_l(N_l(x) / sqrt(k)): the scale is on what the branch reads

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales=1/sqrt(1..{layer_count(self.specs)})"
