"""The shared trunk: the one loop that runs every residual scheme over a stack of branches.

Families build branches; the scheme owns the rule; the trunk runs::

    state = scheme.begin(x0)
    for i, branch in enumerate(branches):
        h = scheme.read(state, i, tap)
        out = branch(h)
        state = scheme.write(state, i, out, h, tap)
    y = scheme.end(state, tap)

Taps. At each depth ``i`` the trunk reports ``resid_pre``, ``state`` (what carries the gradient back past depth
``i``: the stream itself, or all of hyper-connections' streams), ``branch_in``, ``branch_out`` and
``resid_post``; the scheme reports ``contribution`` (what was actually added, after gates and scales) and ``mix``
(gates, mixing weights); ``final`` is reported once with index ``len(trunk)`` (as is ``mix`` by a scheme that
reads the stream once more at the end, AttnRes). They reach an attached recorder (:meth:`Trunk.set_tap`, or
``reslab.diagnostics.record``) and the TransformerLens-style hook points ``trunk.blocks.{i}.hook_resid_pre`` ...
``trunk.hook_final`` (and ``trunk.hook_final_mix``), so that a plain ``register_forward_hook`` on a hook point
sees the tensor. Hooks observe: a value they return is ignored. With no recorder attached and no hook registered,
nothing is stored or computed.

A scheme may hand a branch several tensors that it reads as one (:class:`~reslab.branch.Sources`: DenseNet's
concatenation of every earlier output, which the branch joins itself); ``branch_in`` taps them joined. It may also
hand a branch keyword inputs of this forward pass (:class:`~reslab.branch.BranchCall`: the value residual's value
mix), called as ``branch(x, **kwargs)``.

Lesions and reordering. Branches in :attr:`Trunk.lesioned` are deleted at run time and the scheme's ``skip``
decides what the state becomes without them, so "remove block i" is right for every scheme;
:meth:`Trunk.set_order` runs the blocks in another order (each block keeps its own parameters).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor, nn

from reslab.branch import branch_input, call_branch
from reslab.residuals.base import ResidualScheme, Tap

BLOCK_TAPS = ("resid_pre", "state", "branch_in", "branch_out", "contribution", "resid_post", "mix")


class HookPoint(nn.Identity):
    """A named place in the trunk where ``register_forward_hook`` sees a tapped tensor."""


class BlockHooks(nn.Module):
    """The hook points of one depth: ``hook_resid_pre``, ``hook_branch_in``, ... ``hook_mix``."""

    def __init__(self) -> None:
        super().__init__()
        for name in BLOCK_TAPS:
            self.add_module(f"hook_{name}", HookPoint())


class Trunk(nn.Module):
    """Runs ``scheme`` over ``branches``; see the module docstring.

    Args:
        branches: the residual functions ``F_1..F_L``, in depth order.
        scheme: the residual rule, built for these branches.
    """

    def __init__(self, branches: Sequence[nn.Module], scheme: ResidualScheme) -> None:
        super().__init__()
        if len(branches) != len(scheme.specs):
            raise ValueError(f"scheme was built for {len(scheme.specs)} branches, got {len(branches)}")
        self.branches = nn.ModuleList(branches)
        self.scheme = scheme
        self.blocks = nn.ModuleList(BlockHooks() for _ in branches)
        self.hook_final = HookPoint()
        self.hook_final_mix = HookPoint()  # the weights of a final read of the stream (AttnRes), tapped at depth L
        self._hook_points = [m for m in self.modules() if isinstance(m, HookPoint)]
        self.lesioned: frozenset[int] = frozenset()
        self.order: tuple[int, ...] | None = None
        self.recorder: Tap | None = None

    def __len__(self) -> int:
        return len(self.branches)

    def forward(self, x: Tensor) -> Tensor:
        scheme, lesioned = self.scheme, self.lesioned
        tap = self._tap()
        state = scheme.begin(x)
        for i in self.order if self.order is not None else range(len(self.branches)):
            if tap is not None:
                tap("resid_pre", i, scheme.stream(state))
                tap("state", i, scheme.carrier(state))
            if lesioned and i in lesioned:
                state = scheme.skip(state, i)
            else:
                h = scheme.read(state, i, tap)
                out = call_branch(self.branches[i], h)
                if tap is not None:
                    tap("branch_in", i, branch_input(h))
                    tap("branch_out", i, out)
                state = scheme.write(state, i, out, h, tap)
            if tap is not None:
                tap("resid_post", i, scheme.stream(state))
        y = scheme.end(state, tap)
        if tap is not None:
            tap("final", len(self.branches), y)
        return y

    def _tap(self) -> Tap | None:
        """The function taps go to in this forward pass, or ``None`` when nobody listens."""
        hooked = any(h._forward_hooks or h._forward_pre_hooks for h in self._hook_points)
        if not hooked:
            return self.recorder
        recorder = self.recorder

        def emit(name: str, i: int, value: Tensor) -> None:
            if recorder is not None:
                recorder(name, i, value)
            point = (getattr(self, f"hook_{name}" if name == "final" else f"hook_final_{name}")
                     if i == len(self.blocks) else getattr(self.blocks[i], f"hook_{name}"))
            if point._forward_hooks or point._forward_pre_hooks:
                point(value)

        return emit

    def set_tap(self, tap: Tap | None) -> None:
        """Attach (or with ``None`` detach) a recorder ``tap(name, i, tensor)``."""
        self.recorder = tap

    def set_lesion(self, blocks: Iterable[int] = ()) -> None:
        """Delete the given branches at run time (an empty set restores the full net)."""
        blocks = frozenset(int(b) for b in blocks)
        bad = [b for b in blocks if not 0 <= b < len(self.branches)]
        if bad:
            raise ValueError(f"cannot lesion block {bad[0]}: the trunk has {len(self.branches)} blocks")
        self.lesioned = blocks

    def set_order(self, order: Sequence[int] | None = None) -> None:
        """Run the blocks in ``order`` (a permutation of ``range(len(self))``); ``None`` restores depth order.

        Raises:
            ValueError: not a permutation, one that moves a block to a position whose input or output
                shape differs (e.g. across a downsampling stage boundary), or a reordering under a scheme that has
                none (``capabilities.reorder``: concatenation).
        """
        if order is None:
            self.order = None
            return
        order = tuple(int(i) for i in order)
        if sorted(order) != list(range(len(self.branches))):
            raise ValueError(f"order must be a permutation of 0..{len(self.branches) - 1}, got {order}")
        if order != tuple(range(len(order))) and not self.scheme.capabilities.reorder:
            raise ValueError(f"residual scheme {self.scheme.name!r} cannot run its blocks in another order: each "
                             "reads the outputs of the very blocks before it")
        specs = self.scheme.specs
        for pos, i in enumerate(order):
            if specs[i] != specs[pos]:
                raise ValueError(f"block {i} ({specs[i]}) cannot run at position {pos} ({specs[pos]})")
        self.order = None if order == tuple(range(len(order))) else order
