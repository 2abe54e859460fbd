"""ReZero: ``x_{i+1} = x_i + alpha_i F(x_i)`` with ``alpha_i = 0`` at initialisation.

Bachlechner et al. 2020 (arXiv 2003.04887), eq. (4). Every layer is the identity at the start and
``alpha_i`` still receives a non-zero gradient, ``dL/dalpha_i = <dL/dx_{i+1}, F(x_i)>``. In transformers
ReZero also removes LayerNorm, so it runs with no norm on every family unless one is asked for
(``norm="pre"``). On a transformer one ``alpha_i`` per layer gates **both** its sublayers, attention and
MLP, as in the authors' code (``resweight`` of their ``RZTXEncoderLayer``); elsewhere one per branch.
"""

from __future__ import annotations

from reslab.residuals.base import register_residual
from reslab.residuals.skipinit import SkipInit


@register_residual("rezero", paper="Bachlechner et al. 2020, arXiv 2003.04887")
class ReZero(SkipInit):
    """``x_{i+1} = post(shortcut(x_i) + alpha_i F(x_i))``, ``alpha_i`` initialised to 0."""

    default_init = 0.0
    per_layer = True
