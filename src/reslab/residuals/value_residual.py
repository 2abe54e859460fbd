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

Wiring, per forward pass (nothing is stored on a module): the state is :class:`ValueState`, the stream and a cell
shared by the pass's states; :meth:`ValueResidual.read` hands each attention branch (role ``"attn"``) a value mix
as a keyword input (:class:`~reslab.branch.BranchCall`, ``branch(h, value_mix=...)``). The first attention branch by
depth index puts its values ``V_1`` in the cell; the later ones mix with them. A branch called on its own gets no
value mix (values unchanged). Lesion of the first attention branch: ``V_1`` does not exist in that forward, so the
later layers use their own values unmixed (``V_n' = V_n``); the same holds for any attention layer that runs
before it under a custom block order. A model without attention branches is refused when it is built
(``capabilities.needs_roles``), and one whose attention branches take no ``value_mix`` at :meth:`bind`.

Args:
    init: initial ``lambda_n``.
    learnable: learn ``lambda_n`` (default) or keep them fixed at ``init``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reslab.branch import BranchCall, BranchSpec
from reslab.residuals.base import Capabilities, Tap, register_residual
from reslab.residuals.identity import Identity


class ValueState:
    """The state of one forward pass: the stream ``x`` and the cell holding ``V_1`` once the first attention branch
    has run (``cell[0]``, shared by every state of the pass)."""

    __slots__ = ("x", "cell")

    def __init__(self, x: Tensor, cell: list[Tensor | None]) -> None:
        self.x, self.cell = x, cell


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

    def bind(self, branches: Sequence[nn.Module]) -> None:
        """Check that every attention branch takes a ``value_mix`` keyword input."""
        if len(branches) != len(self.specs):
            raise ValueError(f"residual scheme 'value_residual' was built for {len(self.specs)} branches, "
                             f"got {len(branches)}")
        for b in self.attn:
            if "value_mix" not in inspect.signature(branches[b].forward).parameters:
                raise ValueError(f"residual scheme 'value_residual': attention branch {b} "
                                 f"({type(branches[b]).__name__}) takes no value_mix input")

    # --- the protocol, on the stream inside the state ----------------------------------------
    def begin(self, x0: Tensor) -> ValueState:
        return ValueState(x0, [None])

    def read(self, state: ValueState, i: int, tap: Tap | None = None) -> Tensor | BranchCall:
        h = self.norm_in(i, state.x)
        return BranchCall(h, {"value_mix": functools.partial(self.mix_values, state.cell, i)}) if i in self.attn else h

    def write(self, state: ValueState, i: int, out: Tensor, h: Any, tap: Tap | None = None) -> ValueState:
        return ValueState(super().write(state.x, i, out, h, tap), state.cell)

    def skip(self, state: ValueState | Tensor, i: int) -> ValueState | Tensor:
        """The skip path: of the stream in a state (a lesion), or of a tensor (as in :meth:`decompose`)."""
        if isinstance(state, ValueState):
            return ValueState(super().skip(state.x, i), state.cell)
        return super().skip(state, i)

    def end(self, state: ValueState, tap: Tap | None = None) -> Tensor:
        return state.x

    def stream(self, state: ValueState) -> Tensor:
        return state.x

    def mix_values(self, cell: list[Tensor | None], branch: int, v: Tensor) -> Tensor:
        """The values attention branch ``branch`` uses, given its own values ``v`` ``(N, T, d)``, in the forward pass
        whose ``V_1`` cell is ``cell``."""
        if branch == self.attn[0]:
            cell[0] = v
            return v
        if cell[0] is None:  # the first attention layer was lesioned (or has not run) in this forward
            return v
        lam = self.lambdas[self._slot[branch]]
        return lam * v + (1.0 - lam) * cell[0]

    def value_lambdas(self) -> dict[int, float]:
        """``{branch index: lambda_n}`` for the attention branches after the first."""
        if self.lambdas is None:
            return {}
        return {b: float(self.lambdas[k].detach()) for b, k in self._slot.items()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init:g}, learnable={self.learnable}"
