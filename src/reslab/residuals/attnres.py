"""Attention Residuals: softmax attention over depth replaces the fixed residual sum.

Kimi Team, "Attention Residuals", March 2026, arXiv 2603.15031 (REFERENCE.md section 8). Every branch (on
``gpt`` each attention and each MLP sublayer) is one *site*. Sources are ``v_0 = x0`` (the stem output, the
token embedding) and ``v_{j+1} = out_j``, the **raw** output of branch ``j`` (not an accumulated stream).
Branch ``i`` reads ``N_i(h_i)`` (the per-sublayer pre-norm of PreNorm layers; identity with no norm), with

    h_i = sum_j alpha_{j->i} v_j,   alpha_{j->i} = softmax_j( w_i . RMSNorm(v_j) )      (``attnres``, Full)

over the sources present before site ``i``: per token, shared over channels, no ``1/sqrt(d)``, values not
normalised. ``w_i`` in R^d is a learned pseudo-query per site, **initialised to zero**, so every site starts by
reading the uniform mean of its sources (the first site reads ``x0`` alone, so ``w_0`` is inert: a softmax over
one source). A final read with its own query ``w_L`` (also zero) gives what
:meth:`end` returns (the head's input). The key RMSNorm has **no learnable gain**: a gain ``g`` would only
reparametrise the query (``w . (g * k) = (w * g) . k``), and without one a key is computed once and shared by
every later site.

Block AttnRes (``block_attnres``): sites are grouped into blocks of ``block_size`` sublayers (the unit is
branches, i.e. sublayers). ``b_0 = x0``; ``b_n`` is the plain sum of the outputs of block ``n``'s branches. A site
after ``j`` branches of its block reads over ``[b_0, b_1 .. b_{n-1}]`` plus the partial sum ``b_n^j`` when
``j >= 1`` (the first site of a block sees completed blocks only; the paper's reading, Fig. 2 / its pseudocode).
The final read sees every block, the last one as it stands. ``block_size=1`` is Full AttnRes exactly
(``attnres`` *is* this rule with ``block_size=1``); one block of every sublayer is a standard residual with the
embedding kept apart.

Computation (the paper's two-phase form). When a block completes, its key ``RMSNorm(b_n)`` is computed once and
appended to stacked ``(M, n, d)`` key/value tensors (``M`` = tokens). Phase 1, at a block's first read: one batched
product of all the block's queries against the cached keys gives, per query, the softmax over completed blocks,
its output ``o`` and log-sum-exp ``lse``. Phase 2, per site: the partial sum's logit ``z_p = w . RMSNorm(b_n^j)``
is merged online, ``h = o + sigmoid(z_p - lse) (b_n^j - o)``, equal to the softmax over all sources. A site whose
branch runs out of depth order (:meth:`Trunk.set_order`) does its own phase 1. Memory: each completion makes new
stacks that the reads keep for backward, O(B^2 M d) for B blocks (Full: O(L^2 M d), the price of the full rule).

Taps: ``mix`` at index ``i`` is ``alpha_{.->i}``, shape ``(*lead, num_sources)`` (``(N, T, S)`` tokens, ``(N, S)``
features), sources in depth order (partial sum last), and at index ``L`` the final read's weights;
``contribution`` is the raw output that joins the sources. :meth:`stream` is the latest aggregated read ``h``
(``x0`` before the first site): at ``resid_post`` of site ``i`` it is ``h_i``, the input branch ``i`` read.
Lesions: a deleted branch's source is absent (Full: later sites attend over fewer sources; Block: it adds nothing
to its block's sum, and a block left empty is no source). A ``post`` operation (the post-activation MLP's ReLU)
applies to every aggregated read; the decomposition then refuses.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.residuals.base import Capabilities, ResidualScheme, register_residual

PAPER = "Kimi Team 2026, Attention Residuals, arXiv 2603.15031"
EPS = 1e-6  # key RMSNorm epsilon


def key_logit(v: Tensor, w: Tensor) -> Tensor:
    """``w . RMSNorm(v)`` per row without forming ``RMSNorm(v)``: ``(v . w) / sqrt(mean(v^2) + eps)`` (the partial
    sum's logit, needed once per site; saves a normalised copy of ``v`` and its memory for backward)."""
    return (v @ w) * torch.rsqrt(torch.linalg.vecdot(v, v) / v.shape[-1] + EPS)


def key_norm(v: Tensor) -> Tensor:
    """``RMSNorm(v)`` over the last axis, no gain (the keys of depth attention)."""
    return F.rms_norm(v, (v.shape[-1],), None, EPS)


class AttnResState:
    """The running state: completed sources, the current block's partial sum, the phase-1 cache.

    ``keys``/``values`` are ``(M, n, d)`` (tokens flattened), ``partial`` is ``(M, d)`` or ``None`` (empty
    block), ``pos`` counts the sites passed (run or lesioned), ``last`` is the latest aggregated read (for taps),
    ``cache`` is ``(block, queries' first index, p, o, lse)`` of the running block's phase 1.
    """

    __slots__ = ("pos", "shape", "keys", "values", "partial", "last", "cache")

    def __init__(self, pos: int, shape: torch.Size, keys: Tensor, values: Tensor, partial: Tensor | None,
                 last: Tensor, cache: tuple | None) -> None:
        self.pos, self.shape, self.keys, self.values = pos, shape, keys, values
        self.partial, self.last, self.cache = partial, last, cache


class BlockAttnResBase(ResidualScheme):
    """Depth attention over block sums; see the module docstring."""

    capabilities = Capabilities(shape_change=False, keeps_history=True, exposes_mixing=True, uses_shortcut=False)
    norm_placements = ("none", "pre")
    post_ops = ("none", "relu")  # the post op applies to every aggregated read, outside finish()

    def __init__(self, specs: Sequence[BranchSpec], block_size: int = 4, **kw: Any) -> None:
        super().__init__(specs, **kw)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{self.name}: block_size must be a positive integer (sublayers), got {block_size!r}")
        if any(s.layout != "features" for s in self.specs):
            raise ValueError(f"residual scheme {self.name!r} needs feature streams (tokens, MLP features)")
        dims = {s.in_dim for s in self.specs}
        if len(dims) != 1:
            raise ValueError(f"residual scheme {self.name!r} needs one width for every branch, got {sorted(dims)}")
        self.block_size = block_size
        #: pseudo-queries ``w_0..w_{L-1}`` of the sites and ``w_L`` of the final read, zero at init
        self.queries = nn.Parameter(torch.zeros(len(self.specs) + 1, dims.pop()))

    # --- the two phases ---------------------------------------------------------------------------
    def _phase1(self, state: AttnResState, first: int, count: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Queries ``first .. first+count-1`` against the completed sources: softmax ``p (M, n, S)``,
        outputs ``o (M, S, d)`` and, when a partial sum can follow, ``lse (M, S)``."""
        z = state.keys @ self.queries[first:first + count].t().to(state.keys.dtype)  # (M, n, S)
        p = torch.softmax(z, dim=1)
        o = p.transpose(1, 2).to(state.values.dtype) @ state.values
        lse = torch.logsumexp(z, dim=1) if self.block_size > 1 else None
        return p, o, lse

    def _aggregate(self, state: AttnResState, q: int) -> tuple[Tensor, Tensor]:
        """``h`` (``(M, d)``) read with query ``q`` at the current position, and its weights ``(M, S)``."""
        pos, bs = state.pos, self.block_size
        if q == pos:  # depth order: the block's queries share one phase 1
            block, start = pos // bs, pos // bs * bs
            if state.cache is None or state.cache[0] != block:
                count = min(start + bs, len(self.specs) + 1) - start
                state.cache = (block, start, *self._phase1(state, start, count))
            _, first, p, o, lse = state.cache
            s = q - first
        else:
            p, o, lse = self._phase1(state, q, 1)
            s = 0
        p, o = p[:, :, s], o[:, s]
        P = state.partial
        if P is None:
            return o, p
        zp = key_logit(P, self.queries[q].to(P.dtype))  # (M,)
        sig = torch.sigmoid(zp - lse[:, s]).unsqueeze(-1)  # the partial sum's weight, merged online
        h = torch.lerp(o, P.to(o.dtype), sig.to(o.dtype))
        return h, torch.cat([p * (1.0 - sig), sig], dim=-1)

    # --- the protocol -----------------------------------------------------------------------------
    def begin(self, x0: Tensor) -> AttnResState:
        v = x0.reshape(-1, 1, x0.shape[-1])
        return AttnResState(0, x0.shape, key_norm(v), v, None, x0, None)

    def read(self, state: AttnResState, i: int) -> Tensor:
        h, alpha = self._aggregate(state, i)
        if self.tap is not None:
            self.tap("mix", i, alpha.reshape(*state.shape[:-1], alpha.shape[-1]))
        state.last = self.post(h.reshape(state.shape))
        return self.norm_in(i, state.last)

    def _advance(self, state: AttnResState, partial: Tensor | None) -> AttnResState:
        pos, keys, values, cache = state.pos + 1, state.keys, state.values, state.cache
        if pos % self.block_size == 0:  # the block is complete: its key is computed once, here
            if partial is not None:
                keys = torch.cat([keys, key_norm(partial).unsqueeze(1)], dim=1)
                values = torch.cat([values, partial.unsqueeze(1)], dim=1)
            partial, cache = None, None
        return AttnResState(pos, state.shape, keys, values, partial, state.last, cache)

    def write(self, state: AttnResState, i: int, out: Tensor, h: Tensor) -> AttnResState:
        if self.tap is not None:
            self.tap("contribution", i, out)
        v = out.reshape(-1, out.shape[-1])
        return self._advance(state, v if state.partial is None else state.partial + v)

    def skip(self, state: AttnResState, i: int) -> AttnResState:
        """Lesion: branch ``i``'s source is absent (it adds nothing to its block)."""
        return self._advance(state, state.partial)

    def end(self, state: AttnResState) -> Tensor:
        L = len(self.specs)
        h, alpha = self._aggregate(state, L)
        if self.tap is not None:
            self.tap("mix", L, alpha.reshape(*state.shape[:-1], alpha.shape[-1]))
        return self.post(h.reshape(state.shape))

    def stream(self, state: AttnResState) -> Tensor:
        """The latest aggregated read ``h`` (``x0`` before the first site)."""
        return state.last

    def depth_weights(self, mix: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Per-site depth weights averaged over tokens: ``mix[i].mean`` over all axes but the sources."""
        return [None if m is None else m.reshape(-1, m.shape[-1]).mean(0) for m in mix]

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """The final read's weights over block sums, given to each member: ``x0 -> alpha_0 x0``,
        ``out_j -> alpha_{n(j)} out_j`` with ``n(j) = j // block_size + 1`` (Full: ``alpha_{j+1} out_j``)."""
        self._check_linear()
        L, bs = len(outs), self.block_size
        alpha = mix[L]
        blocks = -(-L // bs)
        if alpha is None or alpha.shape[-1] != blocks + 1:
            raise ValueError(f"{self.name}: the final read's weights (mix[{L}]) must cover {blocks + 1} sources")
        comps = [alpha[..., :1] * x0] + [alpha[..., j // bs + 1:j // bs + 2] * o for j, o in enumerate(outs)]
        return torch.stack(comps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


@register_residual("block_attnres", paper=PAPER)
class BlockAttnRes(BlockAttnResBase):
    """Block AttnRes: depth attention over ``[b_0, completed blocks, partial sum]``, ``block_size`` sublayers
    per block (default 4)."""


@register_residual("attnres", paper=PAPER)
class AttnRes(BlockAttnResBase):
    """Full AttnRes: every site attends over the embedding and every earlier raw branch output."""

    def __init__(self, specs: Sequence[BranchSpec], **kw: Any) -> None:
        super().__init__(specs, block_size=1, **kw)

    def extra_repr(self) -> str:
        return ResidualScheme.extra_repr(self)
