"""Frac-connections (``frac``): hyper-connections with an expansion rate ``n = 1/m`` below 1.

Zhu, Huang, Zhou, Huang, Zeng, Wu, Min & Zhou 2025, "Frac-Connections: Fractional Extension of Hyper-Connections",
arXiv 2503.14125, eqs. (6)-(19), Algorithms 1-3. Instead of copying the hidden state ``h in R^d`` into ``n`` streams
(``hc``), it is split into ``m`` fractions (the frac-rate ``m = 1/n``) that act as the streams (eq. (6))::

    H = (h_1 ... h_m)^T = Reshape(h, (m, d/m)),     FC = [[0_{1 x m}, B], [Y, A]] in R^{(m+1) x 2m}   (eq. (7))

with ``B in R^{1 x m}`` and ``Y, A in R^{m x m}``. Branch ``k`` reads and writes (eq. (8), Algorithm 1 lines 4-5)::

    h_in = Reshape(Y^T H, (d,)),     H' = B^T o Reshape(T_k(h_in), (m, d/m)) + A^T H

so input fraction ``i`` is ``sum_j Y[j, i] h_j``, and fraction ``i`` of the new stream is
``sum_j A[j, i] h_j + beta_i T_k(h_in)_i``: ``B`` scales each fraction of the branch output on its own (the
paper's Algorithm 2, ``beta[..., None] * out.reshape(m, d/m)``), where HC's ``B^T`` spreads the whole output over
every stream. Dynamic FC (DFC, ``dynamic=True``, eqs. (11)-(14)): ``Hbar = norm(H)`` over each fraction (one norm of
width ``d/m`` shared by the fractions: the scheme's ``norm_type``, LayerNorm in Algorithm 2),
``B(H) = s_b tanh(Hbar W_b)^T + B``, ``Y(H) = s_a tanh(Hbar W_y) + Y``, ``A(H) = s_a tanh(Hbar W_a) + A``: row ``j``
of each dynamic term comes from fraction ``j``. Static FC (SFC, ``dynamic=False``): ``B, Y, A`` alone. Init
(eq. (15), Algorithm 2): ``Y = A = I``, ``B = 1``, ``W = 0``, ``s_a = s_b = 0.01`` for every branch (no layer-index
one-hot: each fraction is read where it lies). The trunk output is ``Reshape(H_L, (d,))`` (Algorithm 1 line 7); the
head's final norm follows. Parameters per branch: ``m (2m + 1)`` static (eq. (16)), plus ``|norm| + (d/m)(2m + 1) + 2``
dynamic (eq. (19)).

Exact at init: ``h_in = h`` and ``H' = H + Reshape(T(h), (m, d/m))``, Pre-LN's ``x + F(x)``, bit for bit, for every
``m``. ``m = 1`` is ``hc`` with one stream (the same parameters, in the same layout). A ``post`` op (ReLU) applies to
the whole stream after each combination, as for ``hc``.

Shared with ``hc`` (a :class:`~reslab.residuals.hyper.MultiStreamScheme`): the state :class:`Streams` (here
``(..., m, d/m)``: ``d`` numbers per token, no memory growth, where HC holds ``n d``) carrying what read computed to
write, the lesion, the carrier, the argument checks, norm placements and post ops. Its own: the read (a matrix
``Y``, fractions joined; ``[Y | A]^T H`` in one batched matmul), the write's per-fraction branch term, the join
(concatenate, not sum) and the decomposition.

Taps and tools. ``stream(state)`` and ``end``: ``Reshape(H, (d,))``; ``carrier``: ``H``. ``mix`` (every branch):
``(..., m, 2m + 1) = [A | Y | B]`` per token (HC's ``[A_r | A_m | B]`` with ``A_m`` now the matrix ``Y``;
:func:`~reslab.residuals.hyper.composite_gain` reads its first ``m`` columns as well). ``contribution``: the branch
term ``Reshape(B^T o T_k, (d,))``. Lesion (``skip``): the branch term removed, the mixing kept,
``H' = post(A(H)^T H)``. :meth:`decompose`: each component's ``(m, d/m)`` matrix carried through the recorded ``A``
(exact without a ``post`` op).

The ``hyper-connections`` package (v0.4.11, ``num_fracs``) computes another function. Its ``beta`` is an ``m x m``
routing of branch-output fraction ``f1`` to stream fraction ``f2`` whose static part depends on ``f2`` only, so at
its init every fraction receives the sum of all output fractions; and its static init ``[e_1 1^T | I]`` (rows:
fractions) is read back in an interleaved (fraction, read / residual) column order, so at its own init (``m = 4``)
the branch reads ``(h_1, h_1, h_1, h_3)`` and the residual is ``(h_1, h_1, h_2, h_4)``. Its width connection, with
these weights loaded in its column order, is ours (``tests/test_frac.py``).

Args:
    fracs: the frac-rate ``m`` (4: the paper's DFC x4); the width must be divisible by it.
    dynamic: DFC (the input-dependent terms) or SFC (``False``: the static matrices only).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.norms import NORM_TYPES
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual
from reslab.residuals.hyper import Coefs, MultiStreamScheme, Streams, _positive_int, site_mixing


class FracConnection(nn.Module):
    """The (dynamic) frac-connection of one branch, eqs. (11)-(15) and Algorithm 2: returns ``[Y | A]`` and ``B``
    for the fractions ``H`` ``(..., m, d/m)``, per token."""

    def __init__(self, dim: int, m: int, dynamic: bool, norm_type: str) -> None:
        super().__init__()
        self.static_alpha = nn.Parameter(torch.cat((torch.eye(m), torch.eye(m)), dim=1))  # [Y | A], (m, 2m)
        self.static_beta = nn.Parameter(torch.ones(m))  # B
        self.dynamic = dynamic
        if dynamic:
            self.norm = NORM_TYPES[norm_type](dim)  # over each fraction, d/m
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, 2 * m))  # [W_y | W_a]
            self.dynamic_alpha_scale = nn.Parameter(torch.tensor(0.01))  # s_alpha
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))  # W_beta
            self.dynamic_beta_scale = nn.Parameter(torch.tensor(0.01))  # s_beta

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``([Y | A], B)``: ``(..., m, 2m)`` and ``(..., m)``."""
        return site_mixing(self, h)


@register_residual("frac", paper="Zhu et al. 2025, Frac-Connections: Fractional Extension of Hyper-Connections, "
                                 "arXiv 2503.14125")
class FracConnections(MultiStreamScheme):
    """``h_in = Reshape(Y^T H, (d,))``, ``H' = B^T o Reshape(T(h_in), (m, d/m)) + A^T H`` over ``m`` fractions."""

    capabilities = Capabilities(shape_change=False, multi_stream=True, exposes_mixing=True, uses_shortcut=False,
                                mix_shape=("N", "*lead", "m", "2m + 1"))

    def __init__(self, specs: Sequence[BranchSpec], fracs: int = 4, dynamic: bool = True, **kw: Any) -> None:
        fracs = _positive_int(self.name, "fracs", fracs)
        for name in ("streams", "reduce"):
            if name in kw:
                raise ValueError(f"residual scheme {self.name!r} takes fracs, not {name} (it splits the stream into "
                                 "fractions and joins them back)")
        super().__init__(specs, streams=fracs, dynamic=dynamic, **kw)
        if self.dim % fracs:
            raise ValueError(f"residual scheme {self.name!r}: fracs={fracs} does not divide the width {self.dim}")
        self.fracs = fracs
        self.sites = nn.ModuleList(FracConnection(self.dim // fracs, fracs, self.dynamic, self.norm_type)
                                   for _ in self.specs)

    def _split(self, x: Tensor) -> Tensor:
        """``Reshape(x, (m, d/m))`` on the last axis."""
        return x.unflatten(-1, (self.fracs, -1))

    def coefficients(self, state: Tensor, i: int) -> Coefs:
        """``(Y, A, B)`` of branch ``i`` for the fractions ``state`` ``(..., m, d/m)``, per token."""
        alpha, beta = self.sites[i](state)
        return alpha[..., :self.fracs], alpha[..., self.fracs:], beta

    @staticmethod
    def _mix(a: Tensor, state: Tensor) -> Tensor:
        """``a^T H`` per token, as one batched matmul: ``(..., s, t) x (..., s, d/m) -> (..., t, d/m)``. At the
        fraction widths frac uses, it is faster than HC's broadcast-and-sum (fwd + bwd on a CPU, 512 tokens, m = 4,
        d/m = 32: 0.5 ms against 1.0 ms for one m x m mix, 0.6 ms against 2.5 ms for ``[Y | A]`` at once)."""
        return torch.matmul(a.transpose(-1, -2), state)

    def begin(self, x0: Tensor) -> Streams:
        return Streams(self._split(x0))

    def read(self, state: Streams, i: int, tap: Tap | None = None) -> Tensor:
        """``Reshape(Y^T H, (d,))`` through the pre norm. ``Y^T H`` and ``A^T H`` come from one product
        ``[Y | A]^T H`` (Algorithm 2's ``mix_h``); the coefficients and ``A^T H`` wait in the state for :meth:`write`,
        ``state.coefs = (i, (Y, A, B), A^T H)``."""
        m = self.fracs
        alpha, beta = self.sites[i](state.h)
        mixed = self._mix(alpha, state.h)  # (..., 2m, d/m)
        state.coefs = (i, (alpha[..., :m], alpha[..., m:], beta), mixed[..., m:, :])
        return self.norm_in(i, mixed[..., :m, :].flatten(-2))

    def write(self, state: Streams, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Streams:
        if state.coefs and state.coefs[0] == i:
            _, (y, a, b), kept = state.coefs
        else:
            y, a, b = self.coefficients(state.h, i)
            kept = self._mix(a, state.h)
        term = b.unsqueeze(-1) * self._split(out)
        if tap is not None:
            tap("mix", i, torch.cat((a, y, b.unsqueeze(-1)), dim=-1))
            tap("contribution", i, term.flatten(-2))
        return Streams(self.post(kept + term))

    def end(self, state: Streams, tap: Tap | None = None) -> Tensor:
        return state.h.flatten(-2)

    def stream(self, state: Streams) -> Tensor:
        """The stream ``Reshape(H, (d,))``, shaped like ``x0`` (the same numbers as the state)."""
        return state.h.flatten(-2)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        """Eq. (8) at branch ``i`` from the stream ``x`` and the branch output ``fx``:
        ``Reshape(A(X)^T X + B(X)^T o Reshape(fx, (m, d/m)), (d,))`` with ``X = Reshape(x, (m, d/m))``."""
        big_x = self._split(x)
        _, a, b = self.coefficients(big_x, i)
        return (torch.einsum("...ji,...jd->...id", a, big_x) + b.unsqueeze(-1) * self._split(fx)).flatten(-2)

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """Carry each component's fractions through the recorded ``A``: ``x0`` enters as ``Reshape(x0, (m, d/m))``,
        ``out_i`` as ``B_i^T o Reshape(out_i, (m, d/m))``; each contribution is its matrix joined back to ``d``."""
        self._check_linear()
        m = self.fracs
        comps = self._split(x0).unsqueeze(0)
        for i, out in enumerate(outs):
            mx = mix[i]
            if mx is None:
                raise ValueError(f"residual scheme {self.name!r}: no mix recorded for branch {i}")
            comps = torch.einsum("...st,k...sd->k...td", mx[..., :m], comps)
            comps = torch.cat((comps, (mx[..., 2 * m:] * self._split(out)).unsqueeze(0)))
        return comps.flatten(-2)

    def extra_repr(self) -> str:
        return f"{ResidualScheme.extra_repr(self)}, fracs={self.fracs}, dynamic={self.dynamic}"


__all__ = ["FracConnection", "FracConnections"]
