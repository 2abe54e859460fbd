"""The recorder: collects the trunk's taps, and the gradient that flows back into the stream at each depth.

Usage::

    with record(model, names=("resid_pre", "branch_out"), grads=True) as rec:
        loss = criterion(model(x), y)
        loss.backward()
    rec.get("branch_out")       # list over depth of tensors, batches concatenated
    rec.grads()                 # list over depth of dL/d(resid_pre_i)

``reduce`` turns each tapped tensor into something smaller before it is kept, so a recorder can run over a whole
dataset: a function ``reduce(name, i, tensor)``, or ``"norm"`` for per-sample L2 norms over all non-batch axes.
``"norm"`` is computed in one batched operation per forward pass (when ``final`` is tapped) and per backward pass
(when every stream gradient has arrived) instead of once per tap, which matters on small, launch-bound models.
The context manager always detaches, also on error.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from reslab.trunk import BLOCK_TAPS, Trunk

Reduce = Callable[[str, int, Tensor], Tensor]


# Tensors up to this size are stacked and reduced together (small models are bound by per-op overhead);
# larger ones are reduced one by one (stacking them would only copy memory).
_STACK_LIMIT = 1 << 18


def _sample_norms(t: Tensor, first: int = 1) -> Tensor:
    return torch.linalg.vector_norm(t, dim=tuple(range(first, t.dim()))) if t.dim() > first else t.abs()


def _batched_norms(items: list[tuple[Any, Tensor]]) -> list[tuple[Any, Tensor]]:
    """Per-sample L2 norms of many tensors: small ones in one stacked operation per distinct shape."""
    by_shape: dict[tuple[int, ...], list[tuple[Any, Tensor]]] = defaultdict(list)
    out = []
    for key, t in items:
        if t.numel() <= _STACK_LIMIT:
            by_shape[tuple(t.shape)].append((key, t))
        else:
            out.append((key, _sample_norms(t)))
    for group in by_shape.values():
        norms = _sample_norms(torch.stack([t for _, t in group]), first=2)
        out += [(key, norms[j]) for j, (key, _) in enumerate(group)]
    return out


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
        self.reduce, self.want_grads, self.grad_reduce = reduce, grads, grad_reduce
        self._data: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        self._grads: dict[int, list[Tensor]] = defaultdict(list)
        self._pending: list[tuple[tuple[str, int], Tensor]] = []      # forward taps awaiting "norm"
        self._pending_grads: list[tuple[int, Tensor]] = []           # gradients awaiting "norm"
        self._expected_grads = 0

    def __call__(self, name: str, i: int, value: Tensor) -> None:
        if self.want_grads and name == "resid_pre" and value.requires_grad:
            self._expected_grads += 1
            value.register_hook(lambda g, i=i: self._keep_grad(i, g))
        if name in self.names:
            v = value.detach()
            if self.reduce == "norm":
                self._pending.append(((name, i), v))
            else:
                self._data[(name, i)].append(self.reduce(name, i, v) if self.reduce is not None else v)
        if name == "final":
            self._flush()

    def _keep_grad(self, i: int, g: Tensor) -> None:
        g = g.detach()
        if self.grad_reduce == "norm":
            self._pending_grads.append((i, g))
            if len(self._pending_grads) >= self._expected_grads:
                self._flush()
        else:
            self._grads[i].append(self.grad_reduce("grad", i, g) if self.grad_reduce is not None else g)

    def _flush(self) -> None:
        """Compute pending ``"norm"`` reductions in batched form."""
        for key, v in _batched_norms(self._pending):
            self._data[key].append(v)
        self._pending.clear()
        if self._pending_grads:
            for i, v in _batched_norms(self._pending_grads):
                self._grads[i].append(v)
            self._pending_grads.clear()
            self._expected_grads = 0

    def get(self, name: str) -> list[Tensor]:
        """Tensors tapped under ``name``, one per depth (in depth order), batches concatenated along dim 0."""
        self._flush()
        depths = sorted(i for (n, i) in self._data if n == name)
        return [torch.cat(self._data[(name, i)]) for i in depths]

    def grads(self) -> list[Tensor]:
        """``dL/d(resid_pre_i)`` per depth, batches concatenated along dim 0."""
        self._flush()
        return [torch.cat(self._grads[i]) for i in sorted(self._grads)]

    def clear(self) -> None:
        self._data.clear()
        self._grads.clear()
        self._pending.clear()
        self._pending_grads.clear()
        self._expected_grads = 0


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
