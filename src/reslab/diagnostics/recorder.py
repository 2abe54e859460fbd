"""The recorder: collects the trunk's taps, and the gradient that flows back into the stream at each depth.

Usage::

    with record(model, names=("resid_pre", "branch_out"), grads=True) as rec:
        loss = criterion(model(x), y)
        loss.backward()
    rec.get("branch_out")       # list over depth of tensors, batches concatenated
    rec.grads()                 # list over depth of dL/d(state_i), the stream's gradient at each depth

``reduce`` turns each tapped tensor into something smaller before it is kept, so a recorder can run over a whole
dataset: a function ``reduce(name, i, tensor)``, or ``"norm"`` for per-sample L2 norms over all non-batch axes.
The built-in ``"norm"`` (:func:`sample_norms`) does not depend on the tap's name, so when a tap hands over the very
tensor the previous kept tap had (``contribution`` is ``branch_out`` for schemes that add the branch as it is;
``resid_pre`` of block ``i + 1`` is ``resid_post`` of block ``i``; ``state`` is ``resid_pre`` but for
hyper-connections) its norms are reused instead of computed again.
The context manager always detaches, also on error. A parameter-shaped tap (a scheme's ``mix`` where
``capabilities.mix_shape`` has no batch axis: DenseFormer's weights) is kept once per forward pass and returned
stacked along a new first axis (forward passes), not joined along the batch.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from reslab.trunk import BLOCK_TAPS, Trunk

Reduce = Callable[[str, int, Tensor], Tensor]


_NORM_DIMS = {2: 1, 3: (1, 2), 4: (1, 2, 3)}


def sample_norms(t: Tensor) -> Tensor:
    """Per-sample L2 norms over all non-batch axes (absolute values of a 1-D tensor): one kernel."""
    if t.dim() < 2:
        return t.abs()
    return torch.linalg.vector_norm(t, dim=_NORM_DIMS.get(t.dim()) or tuple(range(1, t.dim())))


class Recorder:
    """Keeps (optionally reduced) copies of tapped tensors per ``(name, depth)``.

    Args:
        names: taps to keep (default: all). ``final`` is kept under depth ``len(trunk)``.
        reduce: ``reduce(name, i, tensor) -> tensor`` applied before keeping (detached first), or ``"norm"``.
        grads: also capture ``dL/d(state_i)`` during backward (needs a graph through the stream): the gradient of
            the stream at the start of block ``i``, of all ``n`` streams for hyper-connections.
        grad_reduce: reduction applied to each captured gradient, a function or ``"norm"``.
        per_forward: taps that are parameter-shaped (no batch axis): :meth:`get` stacks them along a new first axis,
            one entry per forward pass (:func:`record` sets it from the scheme's ``capabilities.mix_shape``).
    """

    def __init__(self, names: Iterable[str] | None = None, reduce: Reduce | str | None = None, grads: bool = False,
                 grad_reduce: Reduce | str | None = None, per_forward: Iterable[str] = ()) -> None:
        self.per_forward = frozenset(per_forward)
        self.names = frozenset(names) if names is not None else frozenset((*BLOCK_TAPS, "final"))
        unknown = self.names - {*BLOCK_TAPS, "final"}
        if unknown:
            raise ValueError(f"unknown tap {sorted(unknown)[0]!r}; taps: {', '.join((*BLOCK_TAPS, 'final'))}")
        for r in (reduce, grad_reduce):
            if isinstance(r, str) and r != "norm":
                raise ValueError(f"unknown reduction {r!r}; give a function or 'norm'")
        self.reduce = reduce
        self.grad_reduce = grad_reduce
        self.want_grads = grads
        self._data: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        self._grads: dict[int, list[Tensor]] = defaultdict(list)
        self._last: tuple[Tensor, Tensor] | None = None  # (tapped tensor, its norms) of the last kept tap

    def __call__(self, name: str, i: int, value: Tensor) -> None:
        if name == "state" and self.want_grads and value.requires_grad:
            self._watch_grad(i, value)
        if name in self.names:
            reduce = self.reduce
            if reduce == "norm":  # name-independent: the very tensor of the last kept tap has the same norms
                last = self._last
                if last is not None and last[0] is value:
                    kept = last[1]
                else:
                    kept = sample_norms(value.detach())
                    self._last = (value, kept)
            else:
                kept = value.detach() if reduce is None else reduce(name, i, value.detach())
            self._data[(name, i)].append(kept)
        if name == "final":
            self._last = None  # hold no reference to this forward's tensors past its end

    def _watch_grad(self, i: int, value: Tensor) -> None:
        """Keep ``dL/d(value)`` when backward gets there.

        The hook goes on the autograd node that made ``value``: a pre-hook sees the gradient of each output of the
        node once it is complete, the gradient of ``value`` as it was when tapped, and costs less than
        ``Tensor.register_hook`` (which a leaf, having no node, still gets).
        """
        node = value.grad_fn
        if node is None:
            value.register_hook(lambda g: self._keep_grad(i, g))
            return
        k = value.output_nr
        node.register_prehook(lambda grads: None if grads[k] is None else self._keep_grad(i, grads[k]))

    def _keep_grad(self, i: int, g: Tensor) -> None:
        g, reduce = g.detach(), self.grad_reduce
        self._grads[i].append(g if reduce is None else sample_norms(g) if reduce == "norm" else reduce("grad", i, g))

    def _join(self, name: str, kept: list[Tensor]) -> Tensor:
        return torch.stack(kept) if name in self.per_forward else torch.cat(kept)

    def get(self, name: str) -> list[Tensor]:
        """Tensors tapped under ``name``, one per depth (in depth order), batches concatenated along dim 0
        (parameter-shaped taps: stacked, one per forward pass)."""
        depths = sorted(i for (n, i) in self._data if n == name)
        return [self._join(name, self._data[(name, i)]) for i in depths]

    def by_depth(self, name: str, n: int) -> list[Tensor | None]:
        """Tensors tapped under ``name`` at depths ``0..n-1`` (joined as by :meth:`get`), ``None`` where nothing
        was."""
        return [self._join(name, self._data[(name, i)]) if (name, i) in self._data else None for i in range(n)]

    def grads(self) -> list[Tensor]:
        """``dL/d(state_i)`` per depth, batches concatenated along dim 0."""
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
    rec = Recorder(names, reduce, grads, grad_reduce,
                   per_forward=("mix",) if trunk.scheme.capabilities.mix_per_forward else ())
    trunk.set_tap(rec)
    try:
        yield rec
    finally:
        trunk.set_tap(None)
