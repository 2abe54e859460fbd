"""Value residual learning (ResFormer): later attention layers mix their values with the first layer's.

Zhou et al. 2024 (arXiv 2410.17897), REFERENCE.md section 10. With ``V_n`` the values of the ``n``-th attention
layer (after the qkv split, before the heads are formed) and ``A_n`` its attention matrix::

    U_n = A_n V_n',    V_1' = V_1,    V_n' = lambda_n V_n + (1 - lambda_n) V_1   (n >= 2)

one learnable scalar ``lambda_n`` per attention layer from the second on, initialised to ``0.5``. The paper's
first version fixes the mix at ``U_n = A_n (V_n + V_1) / 2`` (our init; ``learnable=False`` keeps it fixed);
its later versions write ``lambda_1 V_1 + lambda_2 V_n`` and study fixed and learned lambdas; the learnable
convex form used here is the one the NanoGPT speedrun adopted (Nov. 2024, one scalar per layer, init 0.5).
``lambda_n = 1`` is exactly the Pre-LN transformer. Everything else is the Pre-LN additive residual
``x + F(N(x))`` (:class:`~reslab.residuals.identity.Identity`), so the stream and its decomposition are unchanged.

Wiring: :meth:`ValueResidual.bind` sets each attention branch's ``value_mix`` (branches with role ``"attn"``);
``V_1`` is the values of the first attention branch by depth index, kept on the scheme for one forward only
(set by that branch, cleared in :meth:`begin` and :meth:`end`). Outside a trunk forward (a branch called on its
own) values pass unchanged. Lesion of the first attention branch: ``V_1`` does not exist in that forward, so the
later layers use their own values unmixed (``V_n' = V_n``); the same holds for any attention layer that runs
before it under a custom block order. Families without attention branches are refused at :meth:`bind`.

Args:
    init: initial ``lambda_n``.
    learnable: learn ``lambda_n`` (default) or keep them fixed at ``init``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.residuals.base import Capabilities, register_residual
from reslab.residuals.identity import Identity


class ValueMix:
    """The ``value_mix`` callable of attention branch ``branch``: a plain object (not a closure), so that
    ``copy.deepcopy`` and pickling of a model follow it to the copied scheme."""

    def __init__(self, scheme: "ValueResidual", branch: int) -> None:
        self.scheme, self.branch = scheme, branch

    def __call__(self, v: Tensor) -> Tensor:
        return self.scheme.mix_values(self.branch, v)

    def __repr__(self) -> str:
        return f"ValueMix(branch={self.branch})"


@register_residual("value_residual", paper="Zhou et al. 2024 (ResFormer), arXiv 2410.17897")
class ValueResidual(Identity):
    """Pre-LN residual whose attention layers ``n >= 2`` use ``lambda_n V_n + (1 - lambda_n) V_1``."""

    capabilities = Capabilities(needs_roles=("attn",))

    def __init__(self, specs: Sequence[BranchSpec], init: float = 0.5, learnable: bool = True, **kw: Any) -> None:
        super().__init__(specs, **kw)
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"value_residual: init must be a finite number, got {init!r}")
        self.init, self.learnable = float(init), bool(learnable)
        self.attn = tuple(i for i, s in enumerate(self.specs) if s.role == "attn")
        self._slot = {b: k for k, b in enumerate(self.attn[1:])}
        lam = torch.full((len(self._slot),), self.init)
        self.lambdas: Tensor | None
        if not self._slot:
            self.lambdas = None
        elif self.learnable:
            self.lambdas = nn.Parameter(lam)
        else:
            self.register_buffer("lambdas", lam)
        self._v1: Tensor | None = None
        self._active = False

    def bind(self, branches: Sequence[nn.Module]) -> None:
        """Wire ``value_mix`` into every attention branch; refuse a model without attention branches."""
        if not self.attn:
            raise ValueError("residual scheme 'value_residual' needs attention branches (role 'attn'); "
                             "this model has none")
        if len(branches) != len(self.specs):
            raise ValueError(f"residual scheme 'value_residual' was built for {len(self.specs)} branches, "
                             f"got {len(branches)}")
        for b in self.attn:
            if not hasattr(branches[b], "value_mix"):
                raise ValueError(f"residual scheme 'value_residual': attention branch {b} "
                                 f"({type(branches[b]).__name__}) has no value_mix hook")
        for b in self.attn:
            branches[b].value_mix = ValueMix(self, b)

    def begin(self, x0: Tensor) -> Tensor:
        self._v1, self._active = None, True
        return x0

    def end(self, state: Tensor) -> Tensor:
        self._v1, self._active = None, False
        return state

    def mix_values(self, branch: int, v: Tensor) -> Tensor:
        """The values attention branch ``branch`` uses, given its own values ``v`` ``(N, T, d)``."""
        if not self._active:
            return v
        if branch == self.attn[0]:
            self._v1 = v
            return v
        if self._v1 is None:  # the first attention layer was lesioned (or has not run) in this forward
            return v
        lam = self.lambdas[self._slot[branch]]
        return lam * v + (1.0 - lam) * self._v1

    def value_lambdas(self) -> dict[int, float]:
        """``{branch index: lambda_n}`` for the attention branches after the first."""
        if self.lambdas is None:
            return {}
        return {b: float(self.lambdas[k].detach()) for b, k in self._slot.items()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init:g}, learnable={self.learnable}"
