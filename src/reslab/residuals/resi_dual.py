"""ResiDual: a Post-LN stream and a Pre-LN-like sum stream, run side by side on the same branches.

Xie, Zhang, Guo, Tan, Bian, Awadalla, Menezes, Qin & Yan 2023, "ResiDual: Transformer with Dual Residual
Connections" (arXiv 2304.14802), section 3 ("Pre-Post-LN"). With ``N`` the post norm of branch ``k`` and ``N_f`` one
final norm of the sum stream::

    x_{k+1} = N_k(x_k + F_k(x_k))          the Post-LN stream: every branch reads it
    d_{k+1} = d_k + F_k(x_k)               the sum stream: the same branch outputs, never normalised
    y       = x_L + N_f(d_L)               x_0 = d_0 = the stem output

``d_0 = x_0`` as in the authors' fairseq code (``res = x * res_input_norm_scale``, scale 1; a zero start is left
commented out there). Branch ``k`` reads ``x_k`` itself (no pre norm); the stem output enters both streams.

Relation to the other norm placements. The ``x`` stream is exactly ``postln``'s (:class:`~reslab.residuals.
norm_placement.PostLN`, same branches and post norms): drop the ``N_f(d_L)`` term and ResiDual is Post-LN. ``d`` is the
un-normalised sum of ``preln``'s identity path, ``x_0 + sum_k F_k``, but its terms are the outputs of branches that read
the Post-LN stream, not ``N(d_k)`` as in Pre-LN; it gives every branch a direct, un-normalised path to the output
(the paper's lower bound on the gradient), while ``x`` keeps Post-LN's representations. The model families' own final
norm (the GPT head's) still runs after ``y``; the paper feeds ``y`` to the output projection directly
(``final_norm="none"`` on the GPT family).

State and taps. The state (:class:`DualState`, made per forward pass by :meth:`ResiDual.begin`) holds both streams as
one tensor ``(..., 2, d)`` = ``[x_k, d_k]``. ``stream(state)`` is ``x_k + N_f(d_k)``: what the trunk would return if
it ended at this depth, so the ``resid_post`` tap of the last block equals ``final`` and the logit lens reads
ResiDual's own early exit. That is a summary no later depth reads, so ``carrier(state)`` is the pair
``[x_k, d_k]``: every gradient to earlier depths passes through it (``state`` tap, the recorder's gradients). A
``post`` op (the post-activation MLP's ReLU) applies on the ``x`` stream before its norm, ``x' = N(post(x + F))``;
``d`` takes the raw branch output. ``contribution`` is ``F_k(x_k)``, added to both streams.

Lesion (``skip``): the branch's term leaves both streams, ``x' = x``, ``d' = d`` (the norm goes with the branch, as
for ``postln``). There is no decomposition: ``x`` is renormalised after each combination and ``d`` once at the end.

ResiDual needs feature streams of one width (transformers, MLPs): only the ``post`` norm placement, no shortcut.
No published package has it (x-transformers 2.31.10 has no ``resi_dual`` option); the authors' code is fairseq layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from reslab.branch import BranchSpec
from reslab.norms import NORM_TYPES
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual


class DualState(NamedTuple):
    """ResiDual's state: ``both = [x_k, d_k]`` stacked on axis -2, ``(..., 2, d)``."""

    both: Tensor

    @property
    def x(self) -> Tensor:
        """The Post-LN stream ``x_k`` (what branch ``k`` reads)."""
        return self.both[..., 0, :]

    @property
    def d(self) -> Tensor:
        """The sum stream ``d_k = x_0 + sum_{j<k} F_j(x_j)``."""
        return self.both[..., 1, :]


@register_residual("resi_dual", paper="Xie et al. 2023 (ResiDual), arXiv 2304.14802")
class ResiDual(ResidualScheme):
    """``x_{k+1} = N_k(x_k + F_k(x_k))``, ``d_{k+1} = d_k + F_k(x_k)``; output ``x_L + N_f(d_L)``."""

    capabilities = Capabilities(shape_change=False, multi_stream=True, uses_shortcut=False)
    default_norm = "post"
    norm_placements = ("post",)

    def __init__(self, specs: Sequence[BranchSpec], **kw: Any) -> None:
        super().__init__(specs, **kw)
        widths = {s.in_dim for s in self.specs}
        if len(widths) != 1:
            raise ValueError(f"residual scheme 'resi_dual' needs branches of one width, got {sorted(widths)}")
        self.final_norm = NORM_TYPES[self.norm_type](widths.pop())

    def begin(self, x0: Tensor) -> DualState:
        return DualState(x0.unsqueeze(-2).expand(*x0.shape[:-1], 2, x0.shape[-1]))  # x_0 = d_0 = x0

    def read(self, state: DualState, i: int, tap: Tap | None = None) -> Tensor:
        return self.norm_in(i, state.x)

    def write(self, state: DualState, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> DualState:
        if tap is not None:
            tap("contribution", i, out)
        return DualState(torch.stack((self.finish(i, state.x + out), state.d + out), dim=-2))

    def skip(self, state: DualState, i: int) -> DualState:
        """Lesion: the branch's term leaves both streams."""
        return state

    def end(self, state: DualState, tap: Tap | None = None) -> Tensor:
        return self.stream(state)

    def stream(self, state: DualState) -> Tensor:
        """``x_k + N_f(d_k)``: the trunk's output had it ended here (see the module docstring)."""
        return state.x + self.final_norm(state.d)

    def carrier(self, state: DualState) -> Tensor:
        """Both streams, ``(..., 2, d)``: every gradient to earlier depths passes through them."""
        return state.both

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        raise ValueError("residual scheme 'resi_dual' normalises its stream after each combination (and its sum "
                         "stream at the end), so the final stream is not a sum of components")
