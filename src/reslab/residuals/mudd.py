"""MUDD connections: multiway dynamic dense connections over every earlier layer output (MUDDFormer).

Xiao, Meng, Li & Yuan 2025 (ICML 2025), arXiv 2502.12170, section 2 (REFERENCE.md section 14). With ``X_0`` the stem
output and ``X_i`` the output of layer ``i = 1..L`` (a layer as :func:`reslab.branch.layer_of` says: on ``gpt`` an
attention sublayer and an MLP sublayer), a depth-wise aggregate ``DA_i`` follows every layer. From the layer's own
output it makes, per token, ``C`` ways of ``i + 1`` weights each::

    A_i = GELU(RMSNorm(X_i) W_1^i) W_2^i + a_i            (C x (i+1) per token; RMSNorm without gain)
    Xbar_i^c = sum_{j=0..i} A_i[c, j] X_j,                 c in (Q, K, V, R)

and the next layer reads the four ways: queries, keys and values each from its own way through its own pre-norm,
the residual stream from the ``R`` way (Pre-LN block)::

    X^A     = Xbar_i^R + Attn(N^Q(Xbar_i^Q), N^K(Xbar_i^K), N^V(Xbar_i^V))
    X_{i+1} = X^A + MLP(N(X^A))

``Xbar_0^c = X_0``; the last aggregate ``DA_L`` has one way (``C = 1``), whose ``Xbar_L`` is the trunk's output (the
family's head applies the final norm). The first layer's three inputs are all ``X_0``: it keeps one norm for them.

Initialisation (the authors' training code): ``W_1 ~ N(0, 1/D)``, ``W_2 = 0`` and ``a_i[c, j] = 1`` for ``j = i``
else 0, so every way is ``X_i`` and MUDD starts as exactly the Pre-LN transformer (its norms ``N^Q, N^K, N^V`` start
equal). Hidden width of ``DA_i``: ``C (i+1)``, times ``last_expand`` for ``DA_L`` (4 in the authors' released
config), rounded to the next multiple of ``hidden_round`` strictly above it (their ``round64``: 64 -> 128).

Variants (the paper's ablations): ``dynamic=False`` keeps the static ``a_i`` alone (no MLP); ``multiway=False``
has one way, ``R``, that the next layer reads whole (``C = 1`` everywhere, one pre-norm per sublayer).

State: :class:`MuddState`, the layer outputs so far, the residual stream ``x`` (``Xbar^R``, then ``X^A`` inside a
layer) and the next attention's ``Q, K, V`` ways. :meth:`stream` (and the tapped ``state``) is ``x``; gradients to
earlier layers also pass the ``Q, K, V`` ways and the history, so that tap's gradient is a partial one, as for
DenseFormer. Taps: ``contribution`` is each branch's output as added; ``mix`` is ``A_i`` ``(N, *lead, C, i+1)`` at
the index of layer ``i``'s last branch. Lesion: a deleted sublayer's term is missing from its layer's output (both
deleted: ``X_{i+1} = Xbar_i^R``); ``DA_i`` still runs on that output. A deleted attention leaves its ``Q, K, V`` ways
unread.

Args:
    dynamic: the per-token MLP part of ``A_i`` (else static weights only).
    multiway: four ways (Q, K, V, R) or one (R).
    hidden_round: round each hidden width up to the next multiple of this above it; ``None``: no rounding.
    last_expand: widening of ``DA_L``'s hidden layer.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchCall, BranchSpec, layer_of
from reslab.norms import NORM_TYPES
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual

#: the ways of a multiway aggregate, in the order of ``A_i``'s way axis (the authors' ``qkvr``)
WAYS = ("query", "key", "value", "residual")


def hidden_width(ways: int, sources: int, expand: float = 1.0, round_to: int | None = 64) -> int:
    """The hidden width of a DA over ``sources`` layer outputs with ``ways`` ways (see the module docstring)."""
    k = max(1, int(ways * sources * expand))
    return k if round_to is None else (k // round_to + 1) * round_to


class DepthAggregate(nn.Module):
    """``A = GELU(RMSNorm(X) W_1) W_2 + a``, ``(*lead, ways, sources)`` per token of ``X`` ``(*lead, d)``."""

    def __init__(self, d: int, ways: int, sources: int, hidden: int | None, eps: float = 1e-6) -> None:
        super().__init__()
        self.ways, self.sources, self.eps = ways, sources, eps
        static = torch.zeros(ways, sources)
        static[:, -1] = 1.0  # the authors' "current_only": every way starts as the latest layer output
        self.static = nn.Parameter(static)
        self.w1 = nn.Linear(d, hidden, bias=False) if hidden else None
        self.w2 = nn.Linear(hidden, ways * sources, bias=False) if hidden else None
        if hidden:
            nn.init.normal_(self.w1.weight, 0.0, d ** -0.5)
            nn.init.zeros_(self.w2.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.w1 is None:
            return self.static.expand(*x.shape[:-1], self.ways, self.sources)
        z = F.rms_norm(x, x.shape[-1:], None, self.eps)
        return self.w2(F.gelu(self.w1(z))).unflatten(-1, (self.ways, self.sources)) + self.static


class MuddState:
    """One forward pass's state: ``history`` (the layer outputs ``X_0..X_i``), the stream ``x`` and the next
    attention's ``(Q, K, V)`` ways (``None``: it reads ``x``)."""

    __slots__ = ("history", "x", "qkv")

    def __init__(self, history: tuple[Tensor, ...], x: Tensor, qkv: tuple[Tensor, Tensor, Tensor] | None) -> None:
        self.history, self.x, self.qkv = history, x, qkv


@register_residual("mudd", paper="Xiao et al. 2025 (MUDDFormer), arXiv 2502.12170")
class Mudd(ResidualScheme):
    """Multiway dynamic dense connections; see the module docstring."""

    capabilities = Capabilities(shape_change=False, keeps_history=True, exposes_mixing=True, uses_shortcut=False,
                                needs_roles=("attn", "mlp"), mix_shape=("N", "*lead", "ways", "sources"))
    default_norm = "pre"
    norm_placements = ("none", "pre")
    post_ops = ("none",)

    def __init__(self, specs: Sequence[BranchSpec], dynamic: bool = True, multiway: bool = True,
                 hidden_round: int | None = 64, last_expand: float = 4.0, **kw: Any) -> None:
        super().__init__(specs, **kw)
        for name, v in (("dynamic", dynamic), ("multiway", multiway)):
            if not isinstance(v, bool):
                raise ValueError(f"mudd: {name} must be True or False, got {v!r}")
        if hidden_round is not None and (isinstance(hidden_round, bool) or not isinstance(hidden_round, int)
                                         or hidden_round < 1):
            raise ValueError(f"mudd: hidden_round must be a positive integer or None, got {hidden_round!r}")
        if (isinstance(last_expand, bool) or not isinstance(last_expand, numbers.Real)
                or not 0 < float(last_expand) < float("inf")):
            raise ValueError(f"mudd: last_expand must be a positive number, got {last_expand!r}")
        if any(s.layout != "features" for s in self.specs) or len({s.in_dim for s in self.specs}) != 1:
            raise ValueError("mudd needs feature streams of one width (transformer tokens)")
        layers = layer_of(self.specs)
        starts = [b for b in range(len(layers)) if b == 0 or layers[b] != layers[b - 1]]
        bad = [b for b in starts if self.specs[b].role != "attn"] + [
            b for b in range(len(layers)) if b not in starts and self.specs[b].role != "mlp"]
        if bad:
            raise ValueError(f"mudd needs layers that start with one attention sublayer followed by MLP sublayers; "
                             f"branch {bad[0]} has role {self.specs[bad[0]].role!r}")
        self.dynamic, self.multiway = dynamic, multiway
        self.hidden_round, self.last_expand = hidden_round, float(last_expand)
        d, n_layers = self.specs[0].in_dim, layers[-1] + 1
        self.n_layers = n_layers
        #: branch index -> 0-based layer, for the branches that close a layer
        self.layer_end = {b: layers[b] for b in range(len(layers))
                          if b == len(layers) - 1 or layers[b + 1] != layers[b]}
        self.attn = tuple(starts)
        self.da = nn.ModuleList()
        for i in range(n_layers):  # DA after layer i + 1 (1-based) reads X_0..X_{i+1}
            ways = len(WAYS) if multiway and i < n_layers - 1 else 1
            expand = self.last_expand if i == n_layers - 1 else 1.0
            hidden = hidden_width(ways, i + 2, expand, hidden_round) if dynamic else None
            self.da.append(DepthAggregate(d, ways, i + 2, hidden))
        kv = multiway and self.norm_placement == "pre"
        make = NORM_TYPES[self.norm_type]
        later = [str(b) for b in self.attn[1:]]  # the first layer keeps one norm (its three inputs are X_0)
        self.key_norms = nn.ModuleDict({b: make(d) for b in later}) if kv else None
        self.value_norms = nn.ModuleDict({b: make(d) for b in later}) if kv else None

    def bind(self, branches: Sequence[nn.Module]) -> None:
        """Check that every attention branch takes ``key_input`` and ``value_input`` (multiway only)."""
        if not self.multiway:
            return
        for b in self.attn[1:]:
            params = inspect.signature(branches[b].forward).parameters
            if "key_input" not in params or "value_input" not in params:
                raise ValueError(f"residual scheme 'mudd': attention branch {b} ({type(branches[b]).__name__}) takes "
                                 "no key_input / value_input (use multiway=False)")

    def _norm(self, norms: nn.ModuleDict | None, i: int, x: Tensor) -> Tensor:
        """A way's pre-norm: the branch's own key / value norm, else its query norm (the first layer's one norm)."""
        return norms[str(i)](x) if norms is not None and str(i) in norms else self.norm_in(i, x)

    # --- the protocol ------------------------------------------------------------------------
    def begin(self, x0: Tensor) -> MuddState:
        return MuddState((x0,), x0, None)

    def read(self, state: MuddState, i: int, tap: Tap | None = None) -> Tensor | BranchCall:
        if state.qkv is None or i not in self.attn:
            return self.norm_in(i, state.x)
        q, k, v = state.qkv
        return BranchCall(self.norm_in(i, q), {"key_input": self._norm(self.key_norms, i, k),
                                               "value_input": self._norm(self.value_norms, i, v)})

    def write(self, state: MuddState, i: int, out: Tensor, h: Any, tap: Tap | None = None) -> MuddState:
        if tap is not None:
            tap("contribution", i, out)
        return self._close(state.history, state.x + out, state.qkv, i, tap)

    def skip(self, state: MuddState, i: int) -> MuddState:
        return self._close(state.history, state.x, state.qkv, i)

    def _close(self, history: tuple[Tensor, ...], x: Tensor, qkv: Any, b: int, tap: Tap | None = None) -> MuddState:
        """After branch ``b``: at a layer end keep ``X_i = x`` and aggregate the ways, else carry on."""
        if b not in self.layer_end:
            return MuddState(history, x, qkv)
        history = history + (x,)
        w = self.da[len(history) - 2](x)  # (*lead, C, n): by position, also under a custom block order
        if tap is not None:
            tap("mix", b, w)
        ways = torch.matmul(w, torch.stack(history, dim=-2)).unbind(-2)  # sum_j A[c, j] X_j, each (*lead, d)
        return MuddState(history, ways[-1], tuple(ways[:3]) if len(ways) == len(WAYS) else None)

    def end(self, state: MuddState, tap: Tap | None = None) -> Tensor:
        return state.x

    def stream(self, state: MuddState) -> Tensor:
        return state.x

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """Replay on per-token coefficient vectors over ``[x0, out_0, ...]``: every ``X_i`` and the stream are sums of
        components with per-token weights; a layer end mixes them with the recorded ``R`` way of ``A_i``."""
        self._check_linear()
        comps = torch.stack([x0, *outs])
        lead = x0.shape[:-1]
        eye = torch.eye(len(comps), dtype=x0.dtype, device=x0.device).view(len(comps), len(comps), *[1] * len(lead))
        y = eye[0].expand(len(comps), *lead)
        history = [y]
        for b in range(len(outs)):
            y = y + eye[1 + b]
            if b not in self.layer_end:
                continue
            history.append(y)
            if b >= len(mix) or mix[b] is None:
                raise ValueError(f"mudd: decomposition needs the recorded mix at branch {b}")
            r = mix[b][..., -1, :].to(x0.dtype)  # the R way, (*lead, n)
            y = sum(r[..., j] * h for j, h in enumerate(history))
        return y.unsqueeze(-1) * comps

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, layers={self.n_layers}, dynamic={self.dynamic}, multiway={self.multiway}, "
                f"hidden_round={self.hidden_round}, last_expand={self.last_expand:g}")
