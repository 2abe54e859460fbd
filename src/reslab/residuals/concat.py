"""Concatenation: DenseNet's dense connectivity, each layer reading every earlier output.

Huang et al. 2017 (arXiv 1608.06993), eq. (2) (REFERENCE.md section 5). With ``x_0`` the input of a dense block
and ``H_l`` its ``l``-th layer::

    x_l = H_l([x_0, x_1, ..., x_{l-1}])            ([...]: concatenation on channels)

and the block's output is ``[x_0, x_1, ..., x_n]``, ``c_0 + n k`` channels for growth rate ``k``. A transition
(branch role ``"transition"``) reads that concatenation and starts the next block: its output is the next
``x_0``. The trunk's end is the concatenation of the last block.

State: :class:`~reslab.branch.Sources`, the feature maps since the last transition (``x_0`` first). :meth:`read`
hands them to the branch as they are, and the branch joins them itself: at once (naive), or inside a checkpoint
that recomputes the join in backward (memory-efficient, Pleiss et al. 2017, arXiv 1707.06990; the family's
``memory_efficient`` option), so that the rule is the same in both modes. :meth:`write` appends ``x_l``; a
transition's output becomes the new one-element state. :meth:`stream` is the concatenation (made only when a tap
asks; from then on the branches read it, so that the tapped stream carries every gradient to earlier depths).
Nothing is added, so there is no ``contribution`` tap and no decomposition.

Lesion: deleting dense layer ``l`` leaves its features absent, ``x_l = 0`` (zeros of its output shape are
appended, so the layers after it read the same number of channels). A transition cannot be deleted: the next
block would have no input of the width it reads. No reordering: channel ``j`` of a concatenation is one feature of
one earlier layer, so a layer moved elsewhere (even where it reads as many channels) would read unrelated
features.

The branches must read the concatenation of every earlier output: each dense layer's ``in_dim`` equals the
channels before it (the first branch's ``in_dim`` at the start, a transition's ``out_dim`` after it); the scheme
refuses other families (their branches read a stream of fixed width) when it is built.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from reslab.branch import BranchSpec, Sources
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual


def concatenated_width(specs: Sequence[BranchSpec]) -> int:
    """The channels of the final concatenation, checking that every branch reads the concatenation before it.

    Raises:
        ValueError: one line, for branches that read a stream of fixed width (every family but DenseNet).
    """
    c = specs[0].in_dim if specs else 0
    for i, s in enumerate(specs):
        transition = s.role == "transition"
        why = ("is not convolutional" if s.layout != "conv" else
               f"reads {s.in_dim} channels where the concatenation has {c}" if s.in_dim != c else
               f"has stride {s.stride} but is no transition" if s.stride != 1 and not transition else None)
        if why is not None:
            raise ValueError(f"residual scheme 'concat' needs branches that read the concatenation of all earlier "
                             f"outputs (the densenet family): branch {i} {why}")
        c = s.out_dim if transition else c + s.out_dim
    return c


@register_residual("concat", paper="Huang et al. 2017, arXiv 1608.06993")
class Concat(ResidualScheme):
    """``x_l = H_l([x_0, x_1, ..., x_{l-1}])``; a transition's output starts a new concatenation."""

    capabilities = Capabilities(shape_change=True, keeps_history=True, uses_shortcut=False, reorder=False,
                                family_only=True)
    norm_placements = ("none",)
    post_ops = ("none",)

    def __init__(self, specs: Sequence[BranchSpec], **kw: Any) -> None:
        out_dim = concatenated_width(specs)  # first: the reason this scheme fits no other family
        super().__init__(specs, **kw)
        self.out_dim = out_dim  #: channels of the final concatenation

    def begin(self, x0: Tensor) -> Sources:
        return Sources((x0,))

    def read(self, state: Sources, i: int, tap: Tap | None = None) -> Sources:
        return state.parts()

    def write(self, state: Sources, i: int, out: Tensor, h: Sources, tap: Tap | None = None) -> Sources:
        return Sources((out,)) if self.specs[i].role == "transition" else Sources((*h, out))

    def skip(self, state: Sources, i: int) -> Sources:
        """Dense layer ``i`` deleted: ``x_i = 0``. Raises ``ValueError`` for a transition."""
        spec = self.specs[i]
        if spec.role == "transition":
            raise ValueError(f"concat cannot delete branch {i}: it is a transition, and the next dense block "
                             "would have no input (only dense layers can be lesioned)")
        parts = state.parts()
        x = parts[0]
        return Sources((*parts, x.new_zeros(x.shape[0], spec.out_dim, *x.shape[2:])))

    def deletable(self, keep_shape_changes: bool = False) -> list[int]:
        """The dense layers (deleting one keeps every shape); never a transition."""
        return [i for i, s in enumerate(self.specs) if s.role != "transition"]

    def end(self, state: Sources, tap: Tap | None = None) -> Tensor:
        return state.joined()

    def stream(self, state: Sources) -> Tensor:
        return state.joined()

    def extra_repr(self) -> str:
        return f"branches={len(self.specs)}, out_dim={self.out_dim}"
