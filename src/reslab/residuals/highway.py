"""Gated skips: highway networks and the gating variants of He et al. 2016, Table 1.

- ``highway`` (Srivastava et al. 2015, arXiv 1505.00387, eq. (3)):
  ``y = T(x) * H(x) + (1 - T(x)) * x``, ``T(x) = sigmoid(W_T x + b_T)``, with ``b_T`` negative at
  initialisation (about -1/-2/-3 for depth ~10/20/30) so that every layer starts near "carry".
- ``exclusive_gating`` (He et al. 2016, arXiv 1603.05027, Table 1c): the same rule with a 1x1-conv gate,
  ``y = (1 - g(x)) x + g(x) F(x)``; it trains only with a strongly negative bias (8.70% at -6 on ResNet-110).
- ``shortcut_gating`` (Table 1d): only the skip is gated, ``y = (1 - g(x)) x + F(x)`` (6.91% at -6).

The gate reads the block input and is a 1x1 convolution (strided like the branch) on maps, a linear map on
feature vectors. Gate values ``T`` are emitted on the ``mix`` tap. Deleting a gated block leaves the carry
path, ``y = shortcut(x)`` (the gate closed on the branch).

Args:
    gate_bias: initial ``b_T``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.residuals.base import GATE_MIX, Capabilities, ResidualScheme, Tap, register_residual


def _gate(spec: BranchSpec, bias: float) -> nn.Module:
    g = spec.pointwise(bias=True)
    nn.init.constant_(g.bias, bias)
    return g


class GatedScheme(ResidualScheme):
    """``y = post(s(T) * shortcut(x) + b(T) * F(x))`` with ``T = sigmoid(gate(x))``."""

    capabilities = Capabilities(exposes_mixing=True, mix_shape=GATE_MIX)
    gate_branch = True
    gate_skip = True
    default_bias = -2.0

    def __init__(self, specs, gate_bias: float | None = None, **kw) -> None:
        super().__init__(specs, **kw)
        bias = self.default_bias if gate_bias is None else float(gate_bias)
        self.gate_bias = bias
        self.gates = nn.ModuleList(_gate(s, bias) for s in self.specs)

    def write(self, state: Tensor, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Tensor:
        t = torch.sigmoid(self.gates[i](h))
        out = self.norm_out(i, out)
        c = t * out if self.gate_branch else out
        carry = self.shortcut(i, state)
        if self.gate_skip:
            carry = (1.0 - t) * carry
        if tap is not None:
            tap("mix", i, t)
            tap("contribution", i, c)
        return self.finish(i, carry + c)

    def decompose(self, x0, outs, mix) -> Tensor:
        """Replay with the recorded gates ``T_i`` (``mix[i]``): carry terms scaled by ``1 - T_i``."""
        self._check_linear()
        comps = [x0]
        for i, (out, t) in enumerate(zip(outs, mix)):
            comps = [self.shortcut(i, c) for c in comps]
            if self.gate_skip:
                comps = [(1.0 - t) * c for c in comps]
            out = self.norm_out(i, out)
            comps.append(t * out if self.gate_branch else out)
        return torch.stack(comps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate_bias={self.gate_bias:g}"


@register_residual("highway", paper="Srivastava et al. 2015, arXiv 1505.00387")
class Highway(GatedScheme):
    """``y = T(x) H(x) + (1 - T(x)) x``."""

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        t = torch.sigmoid(self.gates[i](self.norm_in(i, x)))  # the gate reads what the branch reads
        return t * fx + (1 - t) * self.shortcut(i, x)


@register_residual("exclusive_gating", paper="He et al. 2016, arXiv 1603.05027 (Table 1c)")
class ExclusiveGating(GatedScheme):
    """``y = (1 - g(x)) x + g(x) F(x)``, 1x1-conv gate, bias -6 by default (the setting that trained)."""

    default_bias = -6.0


@register_residual("shortcut_gating", paper="He et al. 2016, arXiv 1603.05027 (Table 1d)")
class ShortcutGating(GatedScheme):
    """``y = (1 - g(x)) x + F(x)``: only the skip is gated."""

    gate_branch = False
    default_bias = -6.0

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        g = torch.sigmoid(self.gates[i](self.norm_in(i, x)))
        return (1 - g) * self.shortcut(i, x) + fx
