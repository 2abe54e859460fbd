"""The residual-scheme protocol, its capabilities and the scheme registry.

A residual scheme is the rule that combines a stack of branches ``F_1..F_L`` over depth. The shared
trunk (``reslab.trunk``) runs one loop for every scheme::

    state = scheme.begin(x0)
    for i, branch in enumerate(branches):
        h = scheme.read(state, i)
        out = branch(h)
        state = scheme.write(state, i, out, h)
    y = scheme.end(state)

A scheme is an ``nn.Module`` that owns the rule's parameters (gates, scales, shortcut projections).
Each scheme lives in its own module, subclasses :class:`ResidualScheme`, registers itself with
:func:`register_residual` and carries its paper equation in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.shortcuts import ZeroPadShortcut, make_shortcut

Tap = Callable[[str, int, Tensor], None]


@dataclass(frozen=True)
class Capabilities:
    """What a scheme supports, checked when it is built.

    Attributes:
        shape_change: can combine branches whose output shape differs from their input.
        multi_stream: carries several parallel streams (hyper-connections).
        keeps_history: keeps earlier outputs (DenseNet, DenseFormer, Attention Residuals).
        exposes_mixing: emits mixing weights (gates, depth weights, stream matrices) on the ``mix`` tap.
        uses_shortcut: combines through a shortcut object, so a shortcut option applies.
        owns_shortcut: builds its own skip projection; no shortcut option may be given.
    """

    shape_change: bool = True
    multi_stream: bool = False
    keeps_history: bool = False
    exposes_mixing: bool = False
    uses_shortcut: bool = True
    owns_shortcut: bool = False


class ResidualScheme(nn.Module):
    """Base class of every residual scheme.

    Args:
        specs: one :class:`BranchSpec` per branch, in depth order.
        shortcut: shortcut option (``"A"``, ``"B"``, ``"C"``, ``"D"``) for schemes that use one;
            ``None`` picks ``"A"`` (parameter-free) for them.
        post: operation applied after the combination (``"relu"`` for the original post-activation
            ResNet of He et al. 2015), or ``None``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, specs: Sequence[BranchSpec], shortcut: str | None = None,
                 post: str | None = None) -> None:
        super().__init__()
        self.specs = tuple(specs)
        if not self.specs:
            raise ValueError(f"residual scheme {self.name!r} needs at least one branch")
        caps = self.capabilities
        changing = [i for i, s in enumerate(self.specs) if s.changes_shape]
        if changing and not caps.shape_change:
            raise ValueError(
                f"residual scheme {self.name!r} cannot combine branches that change shape "
                f"(branch {changing[0]}: {self.specs[changing[0]]})")
        if shortcut is not None and not caps.uses_shortcut:
            raise ValueError(f"residual scheme {self.name!r} takes no shortcut option "
                             f"(got {shortcut!r})")
        if caps.uses_shortcut and not caps.owns_shortcut:
            option = "A" if shortcut is None else shortcut
            self.shortcut_option: str | None = option
            self.shortcuts = nn.ModuleList(make_shortcut(option, s) for s in self.specs)
        else:
            self.shortcut_option = None
        self.post = _make_post(post)
        self.tap: Tap | None = None

    # --- the protocol ------------------------------------------------------------------------
    def begin(self, x0: Tensor) -> Any:
        """Turn the stem output into the scheme's state (default: the stream itself)."""
        return x0

    def read(self, state: Any, i: int) -> Tensor:
        """What branch ``i`` sees (default: the stream)."""
        return state

    def write(self, state: Any, i: int, out: Tensor, h: Tensor) -> Any:
        """Combine branch ``i``'s output ``out`` (computed from ``h``) into the state."""
        raise NotImplementedError

    def end(self, state: Any) -> Tensor:
        """Final read of the state (default: the stream)."""
        return state

    def skip(self, state: Any, i: int) -> Any:
        """Lesion: the state after branch ``i`` when that branch is deleted (its skip path alone).

        For an additive scheme this is ``y_i = shortcut(y_{i-1})`` (Veit et al. 2016); a scheme whose
        skip path carries a scale keeps it, so that deleting the branch removes exactly its term.
        """
        return self.shortcuts[i](state)

    def stream(self, state: Any) -> Tensor:
        """The residual stream held in ``state`` as one tensor, for taps."""
        return state

    def extra_repr(self) -> str:
        return f"branches={len(self.specs)}, shortcut={self.shortcut_option}"


class AdditiveScheme(ResidualScheme):
    """``y = post(skip_i(x) + contribution_i(F(x)))``: the family of additive combinations.

    Subclasses override :meth:`skip` (the skip path, which is also what a lesion leaves) and
    :meth:`contribution` (what is actually added from the branch).
    """

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return out

    def write(self, state: Tensor, i: int, out: Tensor, h: Tensor) -> Tensor:
        c = self.contribution(out, h, i)
        if self.tap is not None:
            self.tap("contribution", i, c)
        return self.post(self.skip(state, i) + c)


def _make_post(post: str | None) -> nn.Module:
    if post is None or post == "none":
        return nn.Identity()
    if post == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown post-combination op {post!r}; expected 'relu' or None")


class ParameterFreeSkip(nn.Module):
    """Shape-matching skip used to lesion schemes that have no skip path of their own."""

    def __init__(self, spec: BranchSpec) -> None:
        super().__init__()
        self.pad = ZeroPadShortcut(spec) if spec.changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.pad is None else self.pad(x)


# --- registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[ResidualScheme]] = {}


def register_residual(name: str, paper: str) -> Callable[[type[ResidualScheme]], type[ResidualScheme]]:
    """Class decorator: register a scheme under ``name`` with its paper reference."""

    def deco(cls: type[ResidualScheme]) -> type[ResidualScheme]:
        if name in _REGISTRY:
            raise ValueError(f"residual scheme {name!r} is already registered")
        cls.name, cls.paper = name, paper
        _REGISTRY[name] = cls
        return cls

    return deco


def list_residuals() -> list[str]:
    """Names of all registered residual schemes."""
    return sorted(_REGISTRY)


def residual_class(name: str) -> type[ResidualScheme]:
    """The class registered under ``name``; a clear error otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown residual scheme {name!r}; known: {', '.join(list_residuals())}") from None


def create_residual(name: str, specs: Sequence[BranchSpec], **kwargs: Any) -> ResidualScheme:
    """Build the scheme ``name`` for the given branches.

    Raises:
        ValueError: unknown name, unknown keyword, or a pairing the scheme cannot support.
    """
    cls = residual_class(name)
    try:
        return cls(specs, **kwargs)
    except TypeError as e:
        raise ValueError(f"residual scheme {name!r}: {e}") from None
