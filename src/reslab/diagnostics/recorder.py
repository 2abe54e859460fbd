"""The recorder: collects the trunk's taps, and the gradient that flows back into the stream at each depth.

Usage::

    with record(model, names=("resid_pre", "branch_out"), grads=True) as rec:
        loss = criterion(model(x), y)
        loss.backward()
    rec.get("branch_out")       # list over depth of tensors, batches concatenated
    rec.grads()                 # list over depth of dL/d(resid_pre_i)

``reduce`` turns each tapped tensor into something smaller before it is kept, so a recorder can run over a whole
dataset: a function ``reduce(name, i, tensor)``, or ``"norm"`` for per-sample L2 norms over all non-batch axes.
The built-in ``"norm"`` does not depend on the tap's name, so when a tap hands over the very tensor the previous
kept tap had (``contribution`` is ``branch_out`` for schemes that add the branch as it is; ``resid_pre`` of block
``i + 1`` is ``resid_post`` of block ``i``) its norms are reused instead of computed again.
The context manager always detaches, also on error.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from reslab.trunk import BLOCK_TAPS, Trunk

Reduce = Callable[[str, int, Tensor], Tensor]


def _sample_norms(name: str, i: int, t: Tensor) -> Tensor:
    """Per-sample L2 norms over all non-batch axes (``torch.linalg.vector_norm``, no Python wrapper)."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t.abs()


class Recorder:
    """Keeps (optionally reduced) copies of tapped tensors per ``(name, depth)``.

    Args:
        names: taps to keep (default: all). ``final`` is kept under depth ``len(trunk)``.
        reduce: ``reduce(name, i, tensor) -> tensor`` applied before keeping (detached first), or ``"norm"``.
        grads: also capture ``dL/d(resid_pre_i)`` during backward (needs a graph through the stream).
        grad_reduce: reduction applied to each captured gradient, a function or ``"norm"``.
    """

    def __init__(self, names: Iterable[str] | None = None, reduce: Reduce | str | None = None, grads: bool = False,
                 grad_reduce: Reduce | str | None = None) -> None:
        self.names = frozenset(names) if names is not None else frozenset((*BLOCK_TAPS, "final"))
        unknown = self.names - {*BLOCK_TAPS, "final"}
        if unknown:
            raise ValueError(f"unknown tap {sorted(unknown)[0]!r}; taps: {', '.join((*BLOCK_TAPS, 'final'))}")
        for r in (reduce, grad_reduce):
            if isinstance(r, str) and r != "norm":
                raise ValueError(f"unknown reduction {r!r}; give a function or 'norm'")
        self.reduce = _sample_norms if reduce == "norm" else reduce
        self.grad_reduce = _sample_norms if grad_reduce == "norm" else grad_reduce
        self.want_grads = grads
        self._data: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        self._grads: dict[int, list[Tensor]] = defaultdict(list)
        self._reuse = reduce == "norm"  # a name-independent reduction: the same tensor twice gives the same result
        self._last: tuple[Tensor, Tensor] | None = None  # (tapped tensor, its reduction) of the last kept tap

    def __call__(self, name: str, i: int, value: Tensor) -> None:
        if self.want_grads and name == "resid_pre" and value.requires_grad:
            value.register_hook(lambda g, i=i: self._keep_grad(i, g))
        if name in self.names:
            last = self._last
            if last is not None and last[0] is value:
                kept = last[1]
            else:
                v = value.detach()
                kept = self.reduce(name, i, v) if self.reduce is not None else v
                if self._reuse:
                    self._last = (value, kept)
            self._data[(name, i)].append(kept)
        if name == "final":
            self._last = None  # hold no reference to this forward's tensors past its end

    def _keep_grad(self, i: int, g: Tensor) -> None:
        g = g.detach()
        self._grads[i].append(self.grad_reduce("grad", i, g) if self.grad_reduce is not None else g)

    def get(self, name: str) -> list[Tensor]:
        """Tensors tapped under ``name``, one per depth (in depth order), batches concatenated along dim 0."""
        depths = sorted(i for (n, i) in self._data if n == name)
        return [torch.cat(self._data[(name, i)]) for i in depths]

    def by_depth(self, name: str, n: int) -> list[Tensor | None]:
        """Tensors tapped under ``name`` at depths ``0..n-1`` (batches concatenated), ``None`` where nothing was."""
        return [torch.cat(self._data[(name, i)]) if (name, i) in self._data else None for i in range(n)]

    def grads(self) -> list[Tensor]:
        """``dL/d(resid_pre_i)`` per depth, batches concatenated along dim 0."""
        return [torch.cat(self._grads[i]) for i in sorted(self._grads)]

    def clear(self) -> None:
        self._data.clear()
        self._grads.clear()
        self._last = None


def trunk_of(model: nn.Module) -> Trunk:
    """The trunk of a reslab model (or the trunk itself)."""
    if isinstance(model, Trunk):
        return model
    trunk = getattr(model, "trunk", None)
    if not isinstance(trunk, Trunk):
        raise ValueError(f"{type(model).__name__} has no reslab trunk")
    return trunk


@contextlib.contextmanager
def record(model: nn.Module, names: Iterable[str] | None = None, reduce: Reduce | str | None = None,
           grads: bool = False, grad_reduce: Reduce | str | None = None) -> Iterator[Recorder]:
    """Attach a :class:`Recorder` to ``model``'s trunk for the duration of the block."""
    trunk = trunk_of(model)
    if trunk.recorder is not None:
        raise ValueError("a recorder is already attached to this trunk")
    rec = Recorder(names, reduce, grads, grad_reduce)
    trunk.set_tap(rec)
    try:
        yield rec
    finally:
        trunk.set_tap(None)
