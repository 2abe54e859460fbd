"""LAuReL, learned augmented residual layers: ``x_{i+1} = alpha f(x_i) + g(x_i, x_{i-1}, ..., x_0)``.

Menghani, Kumar & Kumar 2024 (ICML 2025), arXiv 2411.07501, eq. (2): ``alpha`` a learned scalar and ``g`` a learned
linear function of the stream ``x_i`` and earlier streams (``x_j`` is the stream after ``j`` residual connections,
``x_0`` the stem output). Here every residual connection of the trunk (every branch: on ``gpt`` each attention and
each MLP sublayer, which read ``N(x)`` under Pre-LN, the norm being part of ``f``) gets its own LAuReL. The paper's
variants (section 2), with ``i`` the branch::

    RW      x_{i+1} = alpha_i f(x_i) + beta_i x_i                                             (2.1)
    LR      x_{i+1} = f(x_i) + x_i + B_i A_i x_i                                               (3)
    RW+LR   x_{i+1} = alpha_i f(x_i) + beta_i (x_i + B_i A_i x_i)                              (5)
    PA      x_{i+1} = f(x_i) + x_i + sum_{j<k} gamma_{i,j} x_{i-j}                             (4), h = identity
    LR+PA   x_{i+1} = f(x_i) + x_i + sum_{j<k} gamma_{i,j} B_{i,j} A_{i,j} x_{i-j}
    RW+PA   x_{i+1} = alpha_i f(x_i) + beta_i (x_i + sum_{j<k} gamma_{i,j} x_{i-j})
    RW+LR+PA  x_{i+1} = alpha_i f(x_i) + beta_i (x_i + sum_{j<k} gamma_{i,j} B_{i,j} A_{i,j} x_{i-j})   (6)

- RW: the paper "cannot let alpha and beta grow unbounded" and bounds them with "softmax or sigmoid"; it gives no
  init. ``rw_norm="softmax"`` (default): ``(alpha, beta) = softmax(a_i, b_i)``, so ``alpha + beta = 1`` (its
  one-parameter form ``alpha = sigmoid(c), beta = 1 - alpha`` is the same map); ``"sigmoid"``: each squashed
  alone; ``"none"``: raw, unbounded. Our init: zero logits, ``alpha = beta = 1/2`` (``1, 1`` for ``"none"``).
  Bounded weights keep ``beta < 1``, so the skip path carries ``x_0`` scaled by ``prod_i beta_i`` (``2^-L`` at init).
- LR: ``A_i: D -> r`` and ``B_i: r -> D`` act on channels (the last dimension of tokens, a 1x1 map on conv
  maps); the paper's ``W = A B + I`` with ``A, B^T`` of shape ``D x r`` acting on row vectors, ``x A B``. ``B``
  starts at zero (as in LoRA, Hu et al. 2022), so the block starts as the plain residual; ``A`` is Xavier (the
  paper's ResNet) or "column orthogonal", ``A[d, j] = 1/sqrt(rD)`` if ``d mod r = j`` else 0 (its LLMs).
- PA: the last ``k`` streams ``x_i, ..., x_{i-k+1}`` (fewer in the first blocks; only those are kept: the paper's
  Theta(kD) memory). With ``h`` the identity (Table 4's PA, ``k`` parameters) ``gamma`` starts at 0; with low-rank
  ``h`` (one pair ``A_{i,j}, B_{i,j}`` per earlier stream: Table 4's ``2rkD + k``, eq. (6)) ``gamma`` starts at 1
  and ``B`` at 0 (zero gammas would leave ``gamma`` and ``B`` without gradient). Eq. (6) as printed omits the
  ``x_i`` of ``g``; without it the skip path would be zero at init (B = 0), so we keep eq. (4)'s ``x_i``. With
  ``k = 1`` RW+LR+PA is RW+LR with one more scalar.

Two names. ``laurel`` (``variant`` ``"rw" | "lr" | "rw_lr"``, default ``"rw_lr"``: the paper's recommended
trade-off and the form of both its LLM runs) is additive in ``(x, F(x))``; on a branch that changes shape (a ResNet
stage) ``g`` acts on the shortcut's output, ``beta (S(x) + B A S(x))`` with ``A: C_out -> r``, so the shortcut
option is the projection. ``laurel_pa`` (``"pa" | "lr_pa" | "rw_pa" | "rw_lr_pa"``, default ``"rw_lr_pa"``) keeps
the last ``k`` streams and refuses shape changes (earlier streams have other shapes).

Taps: ``contribution`` is ``alpha_i F``; ``mix`` at branch ``i`` is ``[alpha_i, beta_i]`` (``laurel``) or
``[alpha_i, beta_i, gamma_{i,0}, ...]`` (``laurel_pa``), with ``alpha = beta = 1`` without RW. Lesion: a deleted
branch leaves ``g`` alone (``beta_i (S(x) + B A S(x))``, or the PA sum), exactly without ``alpha_i F``.

Not here: per-dimension ``alpha, beta`` (section 2.4); Gemma 3n's form, ``(x + attn(N(x)) + N(x) + RMSNorm(B A
N(x))) / sqrt(2)`` on the attention sublayer only (reads the normed stream, normalises the low-rank output); one
LAuReL around a whole transformer layer (the paper counts ``2N(4D + 1)`` RW+LR parameters for ``N`` layers, r = 4;
here it is per sublayer, twice that).

Args:
    variant: see above.
    rank: ``r``; ``None``: ``max(1, D // 16)`` per branch (our rule: r = 16 at D = 256, the paper's ResNet-50 rank;
        it uses 4, 32 and 64 on LLMs).
    a_init: ``"xavier"`` or ``"orthogonal"``; ``None``: Xavier on conv maps, orthogonal on features.
    rw_norm: ``"softmax"``, ``"sigmoid"`` or ``"none"``.
    rw_init: ``(alpha, beta)`` at init.
    k: (``laurel_pa``) number of streams the PA sum reads, 3 by default (the paper's).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.residuals.base import AdditiveScheme, Capabilities, ResidualScheme, Tap, register_residual

PAPER = "Menghani et al. 2024 (LAuReL), arXiv 2411.07501"
VARIANTS = ("rw", "lr", "rw_lr")
PA_VARIANTS = ("pa", "lr_pa", "rw_pa", "rw_lr_pa")
RW_NORMS = ("softmax", "sigmoid", "none")
A_INITS = ("xavier", "orthogonal")


def column_orthogonal(dim: int, rank: int) -> Tensor:
    """The paper's LLM init of ``A`` (footnote 2): ``A[d, j] = 1/sqrt(rank * dim)`` if ``d mod rank = j``, else 0."""
    a = torch.zeros(dim, rank)
    a[torch.arange(dim), torch.arange(dim) % rank] = 1.0 / math.sqrt(rank * dim)
    return a


class LowRank(nn.Module):
    """``x -> B A x`` over channels (the last dimension of features, dimension 1 of conv maps); ``B`` starts at 0."""

    def __init__(self, dim: int, rank: int, a_init: str, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.a = nn.Parameter(torch.empty(dim, rank))
        self.b = nn.Parameter(torch.zeros(rank, dim))
        with torch.no_grad():
            if a_init == "xavier":
                nn.init.xavier_uniform_(self.a)
            else:
                self.a.copy_(column_orthogonal(dim, rank))

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "features":
            return x @ self.a @ self.b
        r, d = self.b.shape
        return F.conv2d(F.conv2d(x, self.a.t().reshape(r, d, 1, 1)), self.b.t().reshape(d, r, 1, 1))


class _Parts:
    """What both schemes share: argument checks, the RW weights and the low-rank maps' sizes."""

    specs: tuple[BranchSpec, ...]
    name: str

    def _setup(self, variant: str, variants: tuple[str, ...], rank: Any, a_init: Any, rw_norm: Any,
               rw_init: Any) -> None:
        if variant not in variants:
            raise ValueError(f"{self.name}: variant must be one of {', '.join(map(repr, variants))}, got {variant!r}")
        parts = variant.split("_")
        self.variant, self.has_rw, self.has_lr = variant, "rw" in parts, "lr" in parts
        if not self.has_lr and (rank is not None or a_init is not None):
            raise ValueError(f"{self.name}: rank and a_init apply to the low-rank variants only, not {variant!r}")
        if not self.has_rw and (rw_norm is not None or rw_init is not None):
            raise ValueError(f"{self.name}: rw_norm and rw_init apply to the RW variants only, not {variant!r}")
        width = min(s.out_dim for s in self.specs)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)
                                 or not 1 <= rank <= width):
            raise ValueError(f"{self.name}: rank must be an integer in 1..{width} (the stream width), got {rank!r}")
        if a_init is not None and a_init not in A_INITS:
            raise ValueError(f"{self.name}: a_init must be one of {', '.join(map(repr, A_INITS))}, got {a_init!r}")
        self.rank, self.a_init = rank, a_init
        self.rw_norm = "softmax" if rw_norm is None else rw_norm
        if self.rw_norm not in RW_NORMS:
            raise ValueError(f"{self.name}: rw_norm must be one of {', '.join(map(repr, RW_NORMS))}, got {rw_norm!r}")
        rw = nn.Parameter(self._rw_logits(rw_init).repeat(len(self.specs), 1)) if self.has_rw else None
        self.register_parameter("rw", rw)  # (L, 2): logits of (alpha_i, beta_i), or the weights under "none"

    def _rw_logits(self, rw_init: Any) -> Tensor:
        bad = f"{self.name}: rw_init must be a pair (alpha, beta) of finite numbers"
        if rw_init is None:
            pair = (1.0, 1.0) if self.rw_norm == "none" else (0.5, 0.5)
        else:
            try:
                pair = tuple(float(v) for v in rw_init)
            except (TypeError, ValueError):
                raise ValueError(f"{bad}, got {rw_init!r}") from None
            if isinstance(rw_init, str) or len(pair) != 2 or not all(map(math.isfinite, pair)):
                raise ValueError(f"{bad}, got {rw_init!r}")
        w = torch.tensor(pair, dtype=torch.float64)
        if self.rw_norm == "softmax":
            if not (w.min() > 0 and abs(float(w.sum()) - 1.0) < 1e-6):
                raise ValueError(f"{self.name}: under softmax rw_init must be positive and sum to 1, got {rw_init!r}")
            w = w.log() - w.log().mean()
        elif self.rw_norm == "sigmoid":
            if not (w.min() > 0 and w.max() < 1):
                raise ValueError(f"{self.name}: under sigmoid rw_init must lie in (0, 1), got {rw_init!r}")
            w = torch.logit(w)
        return w.float()

    def rw_weights(self, i: int) -> Tensor:
        """``[alpha_i, beta_i]`` (requires an RW variant)."""
        p = self.rw[i]
        return p.softmax(0) if self.rw_norm == "softmax" else p.sigmoid() if self.rw_norm == "sigmoid" else p

    def _rank_of(self, dim: int) -> int:
        return int(self.rank) if self.rank is not None else max(1, dim // 16)

    def _a_init_of(self, spec: BranchSpec) -> str:
        return self.a_init or ("xavier" if spec.layout == "conv" else "orthogonal")

    def _repr(self) -> str:
        out = f", variant={self.variant}"
        if self.has_lr:
            out += f", rank={self.rank if self.rank is not None else 'D//16'}, a_init={self.a_init or 'by layout'}"
        return out + (f", rw_norm={self.rw_norm}" if self.has_rw else "")


@register_residual("laurel", paper=PAPER.replace("LAuReL", "LAuReL-RW/LR"))
class Laurel(_Parts, AdditiveScheme):
    """``x_{i+1} = post(alpha_i F(x_i) + beta_i (S(x_i) + B_i A_i S(x_i)))``: RW, LR or RW+LR (``S``: shortcut)."""

    capabilities = Capabilities(exposes_mixing=True, mix_shape=("alpha, beta",))  # 1, 1 without RW

    def __init__(self, specs: Sequence[BranchSpec], variant: str = "rw_lr", rank: int | None = None,
                 a_init: str | None = None, rw_norm: str | None = None, rw_init: Any = None, **kw: Any) -> None:
        super().__init__(specs, **kw)
        self._setup(variant, VARIANTS, rank, a_init, rw_norm, rw_init)
        self.lowrank = nn.ModuleList(
            LowRank(s.out_dim, self._rank_of(s.out_dim), self._a_init_of(s), s.layout) for s in self.specs
        ) if self.has_lr else None

    def skip(self, state: Tensor, i: int) -> Tensor:
        s = self.shortcut(i, state)
        g = s if self.lowrank is None else s + self.lowrank[i](s)
        return g if self.rw is None else self.rw_weights(i)[1] * g

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return out if self.rw is None else self.rw_weights(i)[0] * out

    def mixing(self, i: int) -> Tensor:
        """``[alpha_i, beta_i]`` (``1, 1`` for LR alone)."""
        return self.rw_weights(i) if self.rw is not None else self.lowrank[i].a.new_ones(2)

    def write(self, state: Tensor, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Tensor:
        if tap is not None:
            tap("mix", i, self.mixing(i))
        return super().write(state, i, out, h, tap)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        s = self.shortcut(i, x)
        alpha, beta = self.rw_weights(i) if self.rw is not None else (1.0, 1.0)
        if self.lowrank is None:
            return alpha * fx + beta * s  # (2.1) RW
        a, b = self.lowrank[i].a, self.lowrank[i].b
        bas = torch.einsum("...c,cr,rd->...d" if self.specs[i].layout == "features" else "nc...,cr,rd->nd...", s, a, b)
        return alpha * fx + beta * (s + bas)  # (5) RW+LR; (3) LR with alpha = beta = 1

    def extra_repr(self) -> str:
        return super().extra_repr() + self._repr()


@register_residual("laurel_pa", paper=PAPER.replace("LAuReL", "LAuReL-PA"))
class LaurelPA(_Parts, ResidualScheme):
    """``x_{i+1} = post(alpha_i F(x_i) + beta_i (x_i + sum_{j<k} gamma_{i,j} h_{i,j}(x_{i-j})))``: PA variants.

    State: the last ``k`` streams, oldest first (:meth:`stream` is the newest).
    """

    capabilities = Capabilities(shape_change=False, keeps_history=True, exposes_mixing=True, uses_shortcut=False,
                                mix_shape=("alpha, beta, gamma_i",))

    def __init__(self, specs: Sequence[BranchSpec], variant: str = "rw_lr_pa", k: int = 3, rank: int | None = None,
                 a_init: str | None = None, rw_norm: str | None = None, rw_init: Any = None, **kw: Any) -> None:
        super().__init__(specs, **kw)
        self._setup(variant, PA_VARIANTS, rank, a_init, rw_norm, rw_init)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{self.name}: k must be an integer >= 1, got {k!r}")
        self.k = int(k)
        sizes = [min(self.k, i + 1) for i in range(len(self.specs))]
        self.gammas = nn.ParameterList(nn.Parameter(torch.full((n,), 1.0 if self.has_lr else 0.0)) for n in sizes)
        self.lowrank = nn.ModuleList(nn.ModuleList(
            LowRank(s.out_dim, self._rank_of(s.out_dim), self._a_init_of(s), s.layout) for _ in range(n))
            for s, n in zip(self.specs, sizes)) if self.has_lr else None

    def carry(self, history: Sequence[Tensor | None], i: int) -> Tensor:
        """Branch ``i``'s skip path ``beta_i (x_i + sum_j gamma_{i,j} h_{i,j}(x_{i-j}))`` from ``history``
        (``history[-1 - j]`` is ``x_{i-j}``; ``None`` adds nothing)."""
        g, y = self.gammas[i], history[-1]
        for j in range(min(len(g), len(history))):
            v = history[-1 - j]
            if v is not None:
                y = y + g[j] * (v if self.lowrank is None else self.lowrank[i][j](v))
        return y if self.rw is None else self.rw_weights(i)[1] * y

    def mixing(self, i: int) -> Tensor:
        """``[alpha_i, beta_i, gamma_{i,0}, ...]`` (``alpha = beta = 1`` without RW)."""
        g = self.gammas[i]
        return torch.cat([self.rw_weights(i) if self.rw is not None else g.new_ones(2), g])

    def _push(self, state: tuple[Tensor, ...], y: Tensor) -> tuple[Tensor, ...]:
        return (*state, y)[-self.k:]

    def begin(self, x0: Tensor) -> tuple[Tensor, ...]:
        return (x0,)

    def read(self, state: tuple[Tensor, ...], i: int, tap: Tap | None = None) -> Tensor:
        return self.norm_in(i, state[-1])

    def write(self, state: tuple[Tensor, ...], i: int, out: Tensor, h: Tensor,
              tap: Tap | None = None) -> tuple[Tensor, ...]:
        c = self.norm_out(i, out)
        if self.rw is not None:
            c = self.rw_weights(i)[0] * c
        if tap is not None:
            tap("mix", i, self.mixing(i))
            tap("contribution", i, c)
        return self._push(state, self.finish(i, self.carry(state, i) + c))

    def skip(self, state: tuple[Tensor, ...], i: int) -> tuple[Tensor, ...]:
        return self._push(state, self.carry(state, i))

    def end(self, state: tuple[Tensor, ...], tap: Tap | None = None) -> Tensor:
        return state[-1]

    def stream(self, state: tuple[Tensor, ...]) -> Tensor:
        return state[-1]

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """Replay the (linear) rule on each component alone: component ``c`` of ``x_{i-j}`` is absent (zero) when it
        joined the stream later (``c > i - j``)."""
        self._check_linear()
        window: list[list[Tensor]] = [[x0]]  # per kept stream, its components [x0, c_0, c_1, ...] so far
        for i, out in enumerate(outs):
            comps = [self.carry([w[c] if c < len(w) else None for w in window], i) for c in range(i + 1)]
            c = self.norm_out(i, out)
            comps.append(c if self.rw is None else self.rw_weights(i)[0] * c)
            window = (window + [comps])[-self.k:]
        return torch.stack(window[-1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{self._repr()}, k={self.k}"
