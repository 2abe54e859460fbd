"""The residual-scheme protocol, its capabilities and the scheme registry.

A residual scheme is the rule that combines a stack of branches ``F_1..F_L`` over depth. The shared
trunk (``reslab.trunk``) runs one loop for every scheme::

    state = scheme.begin(x0)
    for i, branch in enumerate(branches):
        h = scheme.read(state, i, tap)
        out = branch(h)
        state = scheme.write(state, i, out, h, tap)
    y = scheme.end(state, tap)

A scheme is an ``nn.Module`` that owns the rule's parameters (gates, scales, shortcut projections), never state
of one forward pass: that lives in the state :meth:`~ResidualScheme.begin` makes and the trunk hands from call to
call (x-transformers' prepare/forward split), and ``tap`` (the recorder and hook points of this pass, or ``None``
when nobody listens) is an argument too, so a scheme can run in several forward passes at once.
Each scheme lives in its own module, subclasses :class:`ResidualScheme`, registers itself with
:func:`register_residual` and carries its paper equation in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from reslab.branch import BranchSpec, layer_of
from reslab.norms import NORM_TYPES
from reslab.shortcuts import ZeroPadShortcut, make_shortcut

Tap = Callable[[str, int, Tensor], None]


#: ``mix_shape`` of a gate per entry of the branch output (:class:`Capabilities`)
GATE_MIX = ("N", "*branch_out")


@dataclass(frozen=True)
class Capabilities:
    """What a scheme supports, checked when it is built.

    Attributes:
        shape_change: can combine branches whose output shape differs from their input.
        multi_stream: carries several parallel streams (hyper-connections).
        keeps_history: keeps earlier outputs (DenseNet, DenseFormer, Attention Residuals).
        exposes_mixing: emits mixing weights (gates, depth weights, stream matrices) on the ``mix`` tap.
        mix_shape: the shape of what it emits on the ``mix`` tap, by axis name (``None`` with no ``mix`` tap): a
            first axis ``"N"`` is the batch (one entry per sample: a recorder joins batches along it), else the
            tensor is parameter-shaped, the same for every sample (a recorder keeps it once per forward pass).
            :data:`GATE_MIX` is a gate ``T`` in [0, 1] per entry of the branch output, weighing the skip path by
            ``1 - T`` (highway networks and the gated shortcuts of He et al. 2016).
        skip_path: a skip path runs around each branch; ``False``: each branch's output replaces the stream (the
            plain twin), ``y = finish(F(x))``.
        uses_shortcut: combines through a shortcut object, so a shortcut option applies.
        owns_shortcut: builds its own skip projection; no shortcut option may be given.
        reorder: blocks of identical shapes may run in another order (:meth:`reslab.trunk.Trunk.set_order`); not
            where each branch reads the outputs of the very branches before it (concatenation).
        needs_roles: branch roles (:attr:`BranchSpec.role`) the rule works on, e.g. ``("attn",)`` for the value
            residual; a model with no branch of such a role is refused when it is built.
        family_only: the rule runs only on the families built for it (those that name it in their
            ``residuals``: concatenation on DenseNet), whose branches read what it hands them.
    """

    shape_change: bool = True
    multi_stream: bool = False
    keeps_history: bool = False
    exposes_mixing: bool = False
    uses_shortcut: bool = True
    owns_shortcut: bool = False
    reorder: bool = True
    needs_roles: tuple[str, ...] = ()
    family_only: bool = False
    mix_shape: tuple[str, ...] | None = None
    skip_path: bool = True

    @property
    def mix_per_forward(self) -> bool:
        """The ``mix`` tap is parameter-shaped: one tensor per forward pass, not one entry per sample."""
        return self.mix_shape is not None and self.mix_shape[0] != "N"


class ResidualScheme(nn.Module):
    """Base class of every residual scheme.

    Args:
        specs: one :class:`BranchSpec` per branch, in depth order.
        shortcut: shortcut option (``"A"``, ``"B"``, ``"C"``, ``"D"``) for schemes that use one;
            ``None`` picks ``"A"`` (parameter-free) for them.
        post: operation applied after the combination: ``"relu"`` (the original post-activation ResNet of He et
            al. 2015), ``"bn_relu"`` (``relu(BN_i(y))`` with one BatchNorm per branch, owned by the scheme: He et
            al. 2016's "BN after addition", Fig. 4(b)), or ``None``. A lesioned block leaves its skip path without
            it (:meth:`skip`), for every post op.
        norm: where a normalisation sits on feature streams (transformers), one of :data:`NORM_PLACEMENTS`:
            ``"pre"`` normalises what each branch reads, ``x + F(N(x))`` (Pre-LN, Xiong et al. 2020);
            ``"post"`` normalises the stream after each combination, ``N(x + F(x))`` (Post-LN, Vaswani et al.
            2017); ``"sandwich"`` normalises both the branch input and its output, ``x + N'(F(N(x)))``
            (Ding et al. 2021, CogView); ``None`` / ``"none"``: no norm. ``None`` takes the scheme's
            :attr:`default_norm`. The final norm of Pre-LN models belongs to the family's head (it is also the
            logit lens's decoder).
        norm_type: ``"layernorm"`` or ``"rmsnorm"``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: norm placement used when none is given; ``None`` lets the model family choose (Pre-LN for transformers)
    default_norm: ClassVar[str | None] = None
    #: placements the rule supports
    norm_placements: ClassVar[tuple[str, ...]] = ("none", "pre", "post", "sandwich")
    #: post-combination ops the rule supports (``"bn_relu"`` needs the per-branch :meth:`finish`)
    post_ops: ClassVar[tuple[str, ...]] = ("none", "relu", "bn_relu")

    def __init__(self, specs: Sequence[BranchSpec], shortcut: str | None = None,
                 post: str | None = None, norm: str | None = None, norm_type: str = "layernorm") -> None:
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
            self._identity = tuple(isinstance(m, nn.Identity) for m in self.shortcuts)
        else:
            self.shortcut_option = None
        if post not in (None, *POST_OPS):
            raise ValueError(f"unknown post-combination op {post!r}; expected {', '.join(POST_OPS[1:])} or None")
        if post is not None and post not in self.post_ops:
            raise ValueError(f"residual scheme {self.name!r} supports the post-combination ops "
                             f"{' / '.join(self.post_ops)}, not {post!r}")
        self.post_op = post or "none"
        self.post_bns = nn.ModuleList(
            (nn.BatchNorm2d if s.layout == "conv" else nn.BatchNorm1d)(s.out_dim) for s in self.specs
        ) if post == "bn_relu" else None
        self._init_norms(norm if norm is not None else (self.default_norm or "none"), norm_type)

    def _init_norms(self, norm: str, norm_type: str) -> None:
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"unknown norm placement {norm!r}; expected one of {', '.join(NORM_PLACEMENTS)}")
        if norm not in self.norm_placements:
            raise ValueError(f"residual scheme {self.name!r} supports norm placement "
                             f"{' / '.join(self.norm_placements)}, not {norm!r}")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"unknown norm_type {norm_type!r}; expected one of {', '.join(NORM_TYPES)}")
        if norm != "none" and any(s.layout != "features" for s in self.specs):
            raise ValueError(f"norm placement {norm!r} needs feature streams (transformer tokens, MLPs); "
                             "convolutional branches carry their own BatchNorm")
        self.norm_placement, self.norm_type = norm, norm_type
        make = NORM_TYPES[norm_type]
        self.in_norms = nn.ModuleList(make(s.in_dim) for s in self.specs) if norm in ("pre", "sandwich") else None
        self.out_norms = nn.ModuleList(make(s.out_dim) for s in self.specs) if norm == "sandwich" else None
        self.post_norms = nn.ModuleList(make(s.out_dim) for s in self.specs) if norm == "post" else None

    # --- norm placement, for every rule ------------------------------------------------------
    def norm_in(self, i: int, x: Tensor) -> Tensor:
        """What branch ``i`` reads from stream ``x``: ``N_i(x)`` with a pre or sandwich norm, else ``x``."""
        return x if self.in_norms is None else self.in_norms[i](x)

    def norm_out(self, i: int, out: Tensor) -> Tensor:
        """Branch ``i``'s output as the rule uses it: ``N'_i(out)`` with a sandwich norm, else ``out``."""
        return out if self.out_norms is None else self.out_norms[i](out)

    def post(self, y: Tensor) -> Tensor:
        """The post-combination operation without a per-branch part: ReLU (post-activation ResNets) or nothing
        (rules that apply it outside :meth:`finish` support no ``"bn_relu"``: :attr:`post_ops`)."""
        return torch.relu(y) if self.post_op == "relu" else y

    def finish(self, i: int, y: Tensor) -> Tensor:
        """The stream after combination ``i``: the post operation (``relu(BN_i(y))`` for ``"bn_relu"``), then the
        post norm ``N_i`` if any."""
        y = torch.relu(self.post_bns[i](y)) if self.post_bns is not None else self.post(y)
        return y if self.post_norms is None else self.post_norms[i](y)

    def shortcut(self, i: int, x: Tensor) -> Tensor:
        """Branch ``i``'s shortcut applied to ``x`` (an identity shortcut without a module call: the trunk runs this
        once per block, and on a small net each call into a module costs about 1% of the step)."""
        return x if self._identity[i] else self.shortcuts[i](x)

    def bind(self, branches: Sequence[nn.Module]) -> None:
        """Meet the branches once, after the family built them (called by :func:`reslab.create_model`):
        re-initialise what the rule prescribes (DeepNorm's beta) or wire per-branch hooks (value residual).
        Default: nothing. Weights are selected by the role a branch declares
        (:func:`reslab.branch.weights_by_role`), never by parameter name."""

    # --- the protocol ------------------------------------------------------------------------
    def begin(self, x0: Tensor) -> Any:
        """Turn the stem output into the scheme's state (default: the stream itself)."""
        return x0

    def read(self, state: Any, i: int, tap: Tap | None = None) -> Tensor:
        """What branch ``i`` sees (default: the stream, through the pre norm if any). A rule that reads with
        weights of its own reports them as ``tap("mix", i, weights)``."""
        return self.norm_in(i, state)

    def write(self, state: Any, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Any:
        """Combine branch ``i``'s output ``out`` (computed from ``h``) into the state; report what is actually
        added as ``tap("contribution", i, c)`` (and gates or mixing weights as ``tap("mix", i, m)``)."""
        raise NotImplementedError

    def end(self, state: Any, tap: Tap | None = None) -> Tensor:
        """Final read of the state (default: the stream)."""
        return state

    def skip(self, state: Any, i: int) -> Any:
        """Lesion: the state after branch ``i`` when that branch is deleted (its skip path alone).

        For an additive scheme this is ``y_i = shortcut(y_{i-1})`` (Veit et al. 2016); a scheme whose
        skip path carries a scale keeps it, so that deleting the branch removes exactly its term.
        """
        return self.shortcut(i, state)

    def deletable(self, keep_shape_changes: bool = False) -> list[int]:
        """The branches a lesion may delete (:meth:`skip`): every one, less those that change shape with
        ``keep_shape_changes`` (random lesions keep a ResNet's stage boundaries, as Veit et al. do)."""
        return [i for i, s in enumerate(self.specs) if not (keep_shape_changes and s.changes_shape)]

    def stream(self, state: Any) -> Tensor:
        """The residual stream held in ``state`` as one tensor, for taps."""
        return state

    def carrier(self, state: Any) -> Tensor:
        """The tensor of ``state`` that every gradient to earlier depths passes through (tapped as ``state``; the
        recorder's gradients are taken with respect to it): the stream itself unless that is only a summary of the
        state."""
        return self.stream(state)

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """Replay the rule on recorded tensors: what each component contributes to the final stream.

        Args:
            x0: the trunk input (the stem output).
            outs: every branch's raw output (the ``branch_out`` taps), in depth order.
            mix: what the scheme emitted on the ``mix`` tap at each depth ``0..L`` (``None`` where nothing),
                index ``L`` being a final read (Attention Residuals).

        Returns:
            ``(1 + L, *final.shape)``: the contributions of ``x0, out_0, ..., out_{L-1}`` as actually added (after
            gates, scales, depth weights, stream mixing), summing exactly to what :meth:`end` returns.

        Raises:
            ValueError: the final stream is not a sum of per-component terms (a post norm or activation).
        """
        raise ValueError(f"residual scheme {self.name!r} does not decompose its stream")

    def _check_linear(self) -> None:
        """Refuse a decomposition where the rule renormalises or activates the stream after combining."""
        if self.post_norms is not None or self.post_op != "none":
            raise ValueError(f"residual scheme {self.name!r} normalises or activates the stream after each "
                             "combination, so the final stream is not a sum of components")
        if self.shortcut_option not in (None, "A") and any(s.changes_shape for s in self.specs):
            raise ValueError(f"shortcut {self.shortcut_option!r} is affine, not linear: no exact decomposition")

    def extra_repr(self) -> str:
        norm = "" if self.norm_placement == "none" else f", norm={self.norm_placement} ({self.norm_type})"
        drop = getattr(self, "drop_path", 0.0)
        drop = f", drop_path={drop:g} ({self.drop_path_spread}, {self.drop_path_mode})" if drop else ""
        return f"branches={len(self.specs)}, shortcut={self.shortcut_option}{norm}{drop}"


DROP_PATH_MODES = ("row", "batch")
DROP_PATH_SPREADS = ("timm", "linear")


def drop_rates(rate: float, layers: int, spread: str) -> list[float]:
    """Drop probability of each layer ``l = 0..L-1`` under stochastic depth with final rate ``rate``:
    ``"timm"``: ``linspace(0, rate, L)`` (timm's ``drop_path_rate``: the first layer is never dropped);
    ``"linear"``: Huang et al. 2016's survival rule ``p_l = 1 - (l/L)(1 - p_L)`` for ``l = 1..L``, ``p_L = 1 - rate``,
    i.e. drop ``(l/L) rate`` (the first layer drops ``rate / L``)."""
    if spread == "timm":
        return [rate * l / (layers - 1) if layers > 1 else 0.0 for l in range(layers)]
    return [rate * (l + 1) / layers for l in range(layers)]


class AdditiveScheme(ResidualScheme):
    """``y = finish_i(skip_i(x) + contribution_i(F(x)))``: the family of additive combinations.

    Subclasses override :meth:`skip` (the skip path, which is also what a lesion leaves) and
    :meth:`contribution` (what is actually added from the branch). ``finish_i`` is the post operation and
    post norm (:meth:`ResidualScheme.finish`); a sandwich norm applies to the branch output first.

    Stochastic depth (every additive scheme; Huang et al. 2016, arXiv 1603.09382; timm's ``DropPath``): in training,
    branch ``i``'s contribution is kept with probability ``1 - d_l`` (``l`` its layer: a residual block, or a
    transformer layer's two sublayers together) and divided by it,
    ``y = finish(skip(x) + m c / (1 - d_l))``, ``m ~ Bernoulli(1 - d_l)`` per sample (``"row"``, timm) or for the whole
    batch (``"batch"``, Huang et al.); in eval mode ``y = finish(skip(x) + c)``, the expectation of the training
    output (Huang et al. scale by ``p_l`` at test time instead, the same in expectation; dividing in training keeps
    the eval model the deterministic net every diagnostic reads). A dropped branch is still computed (its term is
    multiplied by zero), so its parameters stay in the graph with a zero gradient (DDP needs no unused-parameter
    search).

    Args:
        drop_path: the final layer's drop probability ``d_L`` in ``[0, 1)`` (0: off).
        drop_path_spread: ``"timm"`` (``linspace(0, d_L, L)``) or ``"linear"`` (Huang et al.'s survival rule).
        drop_path_mode: ``"row"`` (per sample) or ``"batch"``.
    """

    def __init__(self, specs: Sequence[BranchSpec], drop_path: float = 0.0, drop_path_spread: str = "timm",
                 drop_path_mode: str = "row", **kw: Any) -> None:
        super().__init__(specs, **kw)
        if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0.0 <= drop_path < 1.0:
            raise ValueError(f"{self.name}: drop_path must be a probability in [0, 1), got {drop_path!r}")
        if drop_path_spread not in DROP_PATH_SPREADS:
            raise ValueError(f"{self.name}: drop_path_spread must be one of {', '.join(DROP_PATH_SPREADS)}, "
                             f"got {drop_path_spread!r}")
        if drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"{self.name}: drop_path_mode must be one of {', '.join(DROP_PATH_MODES)}, "
                             f"got {drop_path_mode!r}")
        self.drop_path, self.drop_path_spread, self.drop_path_mode = float(drop_path), drop_path_spread, drop_path_mode
        layer = layer_of(self.specs)
        rates = drop_rates(self.drop_path, layer[-1] + 1, drop_path_spread)
        #: drop probability of each branch (its layer's)
        self.drop_rates = tuple(rates[k] for k in layer)

    def dropped(self, c: Tensor, i: int) -> Tensor:
        """Branch ``i``'s term under stochastic depth: ``m c / (1 - d)`` in training, ``c`` in eval mode."""
        d = self.drop_rates[i] if self.drop_path else 0.0
        if not (self.training and d > 0.0):
            return c
        shape = (c.shape[0],) + (1,) * (c.dim() - 1) if self.drop_path_mode == "row" else (1,) * c.dim()
        keep = torch.empty(shape, dtype=c.dtype, device=c.device).bernoulli_(1.0 - d)
        return c * keep.div_(1.0 - d)

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return out

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        """The paper's combination at branch ``i``, written out plainly: the stream after it from the stream ``x``
        before it and the branch output ``fx`` (after a sandwich norm), with the scheme's own parameters, before
        the post operation and post norm. Every additive scheme states it apart from :meth:`skip` and
        :meth:`contribution`; the contract tests run the trunk against it, so a wrong equation in either, or in a
        :meth:`write` of its own, fails there."""
        raise NotImplementedError(f"residual scheme {self.name!r} states no equation")

    def write(self, state: Tensor, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Tensor:
        c = self.dropped(self.contribution(self.norm_out(i, out), h, i), i)
        if tap is not None:
            tap("contribution", i, c)
        return self.finish(i, self.skip(state, i) + c)

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """``x_L = S(x0) + sum_i S_{>i}(c_i)``: each term carried through the (linear) skip paths after it."""
        self._check_linear()
        comps = [x0]
        for i, out in enumerate(outs):
            comps = [self.skip(c, i) for c in comps]
            comps.append(self.contribution(self.norm_out(i, out), out, i))
        return torch.stack(comps)


NORM_PLACEMENTS = ("none", "pre", "post", "sandwich")
#: post-combination ops (``post``); ``None`` means ``"none"``
POST_OPS = ("none", "relu", "bn_relu")


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
