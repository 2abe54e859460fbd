"""What the trunk knows about each branch: widths, stride and layout; and what a branch may read: one tensor, or
several that it reads as one (:class:`Sources`), with keyword inputs of one forward pass (:class:`BranchCall`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

ROLES = ("", "attn", "mlp", "transition")
#: what each role is, in words (for errors)
ROLE_NAMES = {"": "whole residual blocks", "attn": "attention sublayers", "mlp": "MLP sublayers",
              "transition": "DenseNet transitions"}


@dataclass(frozen=True)
class BranchSpec:
    """What a scheme knows about branch ``i``: widths, stride and tensor layout.

    Attributes:
        in_dim: channels (``layout="conv"``) or features (``layout="features"``) the branch reads.
        out_dim: channels or features the branch writes.
        stride: spatial stride of the branch (conv layout only).
        layout: ``"conv"`` for ``(N, C, H, W)`` maps, ``"features"`` for ``(..., C)`` vectors/tokens.
        role: what the branch is inside its layer: ``""`` (a whole residual block), ``"attn"`` or ``"mlp"``
            (a transformer layer's two sublayers; a layer starts at each branch that is not ``"mlp"``), or
            ``"transition"`` (a DenseNet transition between dense blocks, a layer of its own).
    """

    in_dim: int
    out_dim: int
    stride: int = 1
    layout: str = "conv"
    role: str = ""

    def __post_init__(self) -> None:
        if self.in_dim <= 0 or self.out_dim <= 0 or self.stride <= 0:
            raise ValueError(f"branch sizes must be positive, got {self}")
        if self.layout not in ("conv", "features"):
            raise ValueError(f"unknown layout {self.layout!r}; expected 'conv' or 'features'")
        if self.layout == "features" and self.stride != 1:
            raise ValueError("a 'features' branch cannot have a stride")
        if self.role not in ROLES:
            raise ValueError(f"unknown branch role {self.role!r}; expected one of {ROLES}")

    @property
    def changes_shape(self) -> bool:
        """True when the branch output cannot be added to its input as it is."""
        return self.in_dim != self.out_dim or self.stride != 1

    def pointwise(self, bias: bool = False) -> nn.Module:
        """A map from what the branch reads to the shape it writes, entry by entry: a 1x1 convolution with the
        branch's stride on maps, a linear map on features (projection shortcuts, highway gates)."""
        if self.layout == "conv":
            return nn.Conv2d(self.in_dim, self.out_dim, 1, stride=self.stride, bias=bias)
        return nn.Linear(self.in_dim, self.out_dim, bias=bias)

    def channel_view(self, v: Tensor) -> Tensor:
        """Reshape a per-channel vector so it broadcasts against this branch's output."""
        return v.view(-1, 1, 1) if self.layout == "conv" else v


class BranchCall(NamedTuple):
    """A branch input with keyword inputs of this forward pass: what a scheme's ``read`` returns to have the trunk
    call ``branch(x, **kwargs)`` (the value residual hands each attention branch its value mix this way, so nothing
    of one forward pass is stored on a module)."""

    x: Tensor
    kwargs: dict[str, Any]


def call_branch(branch: nn.Module, h: Any) -> Tensor:
    """``branch(h)``, or ``branch(h.x, **h.kwargs)`` for a :class:`BranchCall`."""
    return branch(h.x, **h.kwargs) if isinstance(h, BranchCall) else branch(h)


def branch_input(h: Any) -> Tensor:
    """The tensor a branch reads, as the taps show it: the concatenation of :class:`Sources`, the input of a
    :class:`BranchCall`, else ``h`` itself."""
    if isinstance(h, BranchCall):
        h = h.x
    return h.joined() if isinstance(h, Sources) else h


class Sources(tuple):
    """Tensors that a branch reads as one: ``[x_0, x_1, ..., x_{l-1}]``, their concatenation on channels (dim 1).

    What the concatenating scheme (DenseNet) hands a branch. The branch joins them itself: at once
    (:meth:`joined`), or inside a checkpoint that recomputes the join in backward (memory-efficient DenseNet), so
    that nothing of the concatenation's size is kept. :meth:`joined` makes ``torch.cat(self, 1)`` once and keeps
    it; after that :meth:`parts` gives the same tensors as views of it, so that everything computed from them goes
    through that one tensor (the trunk taps it as the stream, and the stream's gradient is its gradient).
    """

    _joined: Tensor | None = None

    def joined(self) -> Tensor:
        """``torch.cat(self, 1)``, made on the first call (a single tensor is its own concatenation)."""
        if self._joined is None:
            self._joined = self[0] if len(self) == 1 else torch.cat(tuple(self), 1)  # a plain tuple: no graph break
        return self._joined

    def parts(self) -> "Sources":
        """The tensors, as views of the concatenation once it has been made (else these very tensors)."""
        if self._joined is None or len(self) == 1:
            return self
        views = Sources(self._joined.split([t.shape[1] for t in self], 1))
        views._joined = self._joined
        return views


def layer_of(specs: Sequence[BranchSpec]) -> tuple[int, ...]:
    """The layer each branch belongs to: residual blocks are one layer each; a transformer layer is an
    attention sublayer and the MLP sublayers after it (a new layer starts at each branch that is not ``"mlp"``).
    """
    layers, k = [], -1
    for s in specs:
        k += s.role != "mlp" or k < 0
        layers.append(k)
    return tuple(layers)


def layer_count(specs: Sequence[BranchSpec]) -> int:
    """Number of layers (see :func:`layer_of`): the depth that per-layer rules such as CaiT's LayerScale
    init and DeepNorm's constants are stated in."""
    return layer_of(specs)[-1] + 1 if specs else 0


def weights_by_role(branches: Sequence[nn.Module], *roles: str) -> list[Tensor]:
    """The weights of ``branches`` that play any of ``roles``, each once (branches without roles give none).

    A branch declares roles through a ``projections() -> {role: [weight, ...]}`` method (views allowed), e.g.
    ``query``, ``key``, ``value``, ``out`` (writes to the stream), ``ffn``.
    """
    seen: dict[tuple[int, tuple[int, ...]], Tensor] = {}
    for b in branches:
        proj = getattr(b, "projections", None)
        if proj is None:
            continue
        for role, ws in proj().items():
            if role in roles:
                for w in ws:
                    seen.setdefault((w.data_ptr(), tuple(w.shape)), w)
    return list(seen.values())
