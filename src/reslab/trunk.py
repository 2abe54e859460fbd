"""The shared trunk: the one loop that runs every residual scheme over a stack of branches.

Families build branches; the scheme owns the rule; the trunk runs::

    state = scheme.begin(x0)
    for i, branch in enumerate(branches):
        h = scheme.read(state, i)
        out = branch(h)
        state = scheme.write(state, i, out, h)
    y = scheme.end(state)

Taps: when a recorder ``tap(name, i, tensor)`` is attached the trunk reports ``resid_pre``, ``branch_in``,
``branch_out`` and ``resid_post`` at each depth and ``final`` once (index = number of branches); the scheme
reports ``contribution`` and ``mix``. With no recorder attached nothing is stored or computed.

Lesions: branches listed in :attr:`Trunk.lesioned` are deleted at run time; the scheme's ``skip`` decides
what the state becomes without them, so "remove block i" means the right thing for every scheme.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor, nn

from reslab.residuals.base import ResidualScheme, Tap


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
        self.lesioned: frozenset[int] = frozenset()
        self.tap: Tap | None = None

    def __len__(self) -> int:
        return len(self.branches)

    def forward(self, x: Tensor) -> Tensor:
        scheme, tap, lesioned = self.scheme, self.tap, self.lesioned
        state = scheme.begin(x)
        for i, branch in enumerate(self.branches):
            if tap is not None:
                tap("resid_pre", i, scheme.stream(state))
            if lesioned and i in lesioned:
                state = scheme.skip(state, i)
            else:
                h = scheme.read(state, i)
                out = branch(h)
                if tap is not None:
                    tap("branch_in", i, h)
                    tap("branch_out", i, out)
                state = scheme.write(state, i, out, h)
            if tap is not None:
                tap("resid_post", i, scheme.stream(state))
        y = scheme.end(state)
        if tap is not None:
            tap("final", len(self.branches), y)
        return y

    def set_tap(self, tap: Tap | None) -> None:
        """Attach (or with ``None`` detach) a recorder to the trunk and its scheme."""
        self.tap = tap
        self.scheme.tap = tap

    def set_lesion(self, blocks: Iterable[int] = ()) -> None:
        """Delete the given branches at run time (an empty set restores the full net)."""
        blocks = frozenset(int(b) for b in blocks)
        bad = [b for b in blocks if not 0 <= b < len(self.branches)]
        if bad:
            raise ValueError(f"cannot lesion block {bad[0]}: the trunk has {len(self.branches)} blocks")
        self.lesioned = blocks
