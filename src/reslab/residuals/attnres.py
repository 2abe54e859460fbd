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

Computation (the paper's two-phase form; custom autograd functions). When a source completes (``x0`` at
:meth:`begin`, a block sum when its block completes) its logits for every query still to read,
``w_q . RMSNorm(v) = r (v . w_q)`` with ``r = 1 / rms(v)``, are computed once, in one product
(:class:`SourceLogits`; no normalised key is formed). Phase 1, at a block's first read: the softmax over the
completed sources for all of the block's queries at once, each source read once (per query its output
``o = sum_j p_j v_j`` and log-sum-exp ``lse``). Phase 2, per site: the partial sum's logit
``z_p = w . RMSNorm(b_n^j)`` is merged online, ``h = o + sigmoid(z_p - lse) (b_n^j - o)``, equal to the softmax
over all sources (:class:`DepthRead`). A site whose branch runs out of depth order (:meth:`Trunk.set_order`)
takes the softmax over all its sources itself. Backward: with ``sum_s alpha_s v_s = h``, a logit's gradient is
``alpha_s (v_s - h) . dL/dh``; each read does its partial sum's share at once and leaves ``dL/dh`` and its
weights to the completed sources it read, and a source's backward, which runs after that of every read of it,
takes the products ``v . dL/dh_i`` and accumulates ``dL/dv = sum_i alpha_{v->i} dL/dh_i`` in one tensor. No
stacked copy of the sources is made and no second-order gradient is offered (``create_graph``).

Memory: each source is kept once (the tensor itself), a read saves only its weights, its output ``h`` (which the
pre-norm keeps anyway) and its partial sum, so saved activations grow as O(B M d) for B blocks (Full: O(L M d),
``M`` tokens), not as O(B^2 M d) as with stacked ``(M, n, d)`` key/value tensors re-made at every completion
(``benchmarks/bench_gpt.py`` keeps that computation as ``StackedAttnRes``: Full AttnRes saved 3.9x Pre-LN's
activations at 12 layers, now 1.1x).

Taps: ``mix`` at index ``i`` is ``alpha_{.->i}``, shape ``(*lead, num_sources)`` (``(N, T, S)`` tokens, ``(N, S)``
features), sources in depth order (partial sum last), and at index ``L`` the final read's weights;
``contribution`` is the raw output that joins the sources. :meth:`stream` is the latest aggregated read ``h``
(``x0`` before the first site): at ``resid_post`` of site ``i`` it is ``h_i``, the input branch ``i`` read.
Lesions: a deleted branch's source is absent (Full: later sites attend over fewer sources; Block: it adds nothing
to its block's sum, and a block left empty is no source). A ``post`` operation (the post-activation MLP's ReLU)
applies to every aggregated read; the decomposition then refuses.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from reslab.branch import BranchSpec
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual

PAPER = "Kimi Team 2026, Attention Residuals, arXiv 2603.15031"
EPS = 1e-6  # key RMSNorm epsilon


def key_norm(v: Tensor) -> Tensor:
    """``RMSNorm(v)`` over the last axis, no gain (the keys of depth attention)."""
    return F.rms_norm(v, (v.shape[-1],), None, EPS)


def _eager(fn: Any) -> Any:
    """``fn`` run eagerly under ``torch.compile`` (``torch.compiler.disable``: the depth-attention functions share
    state outside autograd), decorated on first call once the compiler is loaded: ``torch.compiler.disable`` imports
    the compiler, 2 s that a program which never compiles would pay at ``import reslab``."""
    disabled = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


def _exact(t: Tensor) -> contextlib.AbstractContextManager:
    """No autocast inside the depth-attention functions: they compute in their inputs' (promoted) dtype, so that
    forward and backward agree (under bfloat16 autocast the float32 embedding promotes every read to float32)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


def _rms_inv(v: Tensor, eps: Tensor) -> Tensor:
    """``r = 1 / sqrt(mean(v^2) + eps)`` per row, so that ``RMSNorm(v) = r v`` (one reduction, no temporary;
    ``eps`` a 0-dim tensor)."""
    n = torch.linalg.vector_norm(v, dim=-1)
    return torch.addcmul(eps, n, n, value=1 / v.shape[-1]).rsqrt_()


class ReadRecord:
    """What one read leaves, in backward, for the completed sources it read: its query ``q``, its number of
    completed sources ``n``, ``gh = dL/dh`` (or ``None``), the sources' weights ``alpha`` (``n`` tensors
    ``(*lead, 1)``) and ``base (*lead)``, the term that every completed source's logit gradient shares:
    ``dL/dz_j = alpha_j (v_j . gh + galpha_j - base)``, ``base = h . gh + sum_s alpha_s galpha_s`` (``galpha``: the
    weights' own gradient when the ``mix`` tap is differentiated, else ``None``)."""

    __slots__ = ("task", "q", "n", "gh", "alpha", "base", "galpha")

    def __init__(self, q: int, n: int, gh: Tensor | None, alpha: tuple[Tensor, ...], base: Tensor,
                 galpha: Tensor | None) -> None:
        self.task = torch._C._current_graph_task_id()  # the backward pass (as torch.utils.checkpoint tells them)
        self.q, self.n, self.gh, self.alpha, self.base, self.galpha = q, n, gh, alpha, base, galpha


class DepthMemory:
    """What the reads and sources of one forward pass share outside autograd: the queries read so far; every
    completed source's logits in one tensor, ``logits[q, j]`` (``(Q, sources, *lead)``, rows ``q`` from the
    source's first reading query on); the phase-1 results of the running block, ``cache[(n, q)] = (o, p, lse)``
    for its later queries (``o`` ``None`` when ``x0`` is the only completed source); the reads' records for the
    backward of the sources they read (a record of an earlier backward pass over the same graph, with
    ``retain_graph``, is ignored and dropped); a scratch ``(M, d)`` tensor for row products."""

    __slots__ = ("num_queries", "max_sources", "used", "logits", "cache", "reads", "_scratch", "_eps")

    def __init__(self, num_queries: int, max_sources: int) -> None:
        self.num_queries, self.max_sources = num_queries, max_sources
        self.used: set[int] = set()
        self.logits: Tensor | None = None
        self.cache: dict[tuple[int, int], tuple[Tensor | None, Tensor, Tensor]] = {}
        self.reads: list[ReadRecord] = []
        self._scratch: Tensor | None = None
        self._eps: Tensor | None = None

    def rms_inv(self, v: Tensor) -> Tensor:
        """``1 / sqrt(mean(v^2) + EPS)`` per row (:func:`_rms_inv`)."""
        if self._eps is None or self._eps.dtype != v.dtype or self._eps.device != v.device:
            self._eps = torch.tensor(EPS, dtype=v.dtype, device=v.device)
        return _rms_inv(v, self._eps)

    def first_unread(self) -> int:
        """``k`` when queries ``0..k-1`` and no other have been read (depth order), else 0: a source completed now
        needs logits for queries ``k..Q-1`` only, as no query reads twice."""
        k = len(self.used)
        return k if k == 0 or max(self.used) == k - 1 else 0

    def store(self, j: int, lo: int, z: Tensor) -> None:
        """Keep source ``j``'s logits ``z (Q - lo, *lead)`` for queries ``lo..Q-1``."""
        if self.logits is None:
            self.logits = z.new_empty(self.num_queries, self.max_sources, *z.shape[1:])
        self.logits[lo:, j] = z

    def add(self, rec: ReadRecord) -> None:
        if self.reads and self.reads[0].task != rec.task:
            self.reads = [r for r in self.reads if r.task == rec.task]
        self.reads.append(rec)

    def of(self, j: int) -> list[ReadRecord]:
        """This backward pass's records of the reads that saw source ``j``, by query."""
        task = torch._C._current_graph_task_id()
        return sorted((r for r in self.reads if r.n > j and r.task == task), key=lambda r: r.q)

    def rowdot(self, a: Tensor, b: Tensor) -> Tensor:
        """``(a * b).sum(-1)`` per row, through the scratch tensor (no fresh ``(M, d)`` tensor per product)."""
        t = self._scratch
        if t is None or t.shape != a.shape or t.dtype != a.dtype or t.device != a.device:
            t = self._scratch = torch.empty_like(a)
        return torch.mul(a, b, out=t).sum(-1)


class SourceLogits(torch.autograd.Function):
    """A completed source ``v (*lead, d)``: its logits ``z[q - lo] = w_q . RMSNorm(v) = r (v . w_q)`` for the
    queries ``q >= lo`` that can still read it (``(Q - lo, *lead)``, from the queries ``W (Q, d)``), computed once
    (and kept in ``memory.logits`` for the reads); and in backward the source's whole gradient. Inputs ``(W, v,
    prev, memory, j, lo)``: ``j`` the source's index, ``prev`` the previous source's logits (``None`` for ``x0``).

    Saves ``v`` (a source, kept anyway), ``r`` and ``z``: no normalised key is formed or kept. The reads pass no
    gradient to their sources: a read takes the latest source's ``z`` as input and each source the previous
    one's, which only orders this backward after that of every read of ``v``. Each read leaves a
    :class:`ReadRecord`, and here, per read of ``v``, ``dL/dz_q = alpha_j (v . gh + galpha_j - base)`` and
    ``dL/dv += alpha_j gh`` (``v`` is read while in cache, no per-read gradient tensor is made). Through the key,
    ``dz_q/dv = r w_q - z_q r^2 v / d`` and ``dz_q/dw_q = r v``.
    """

    @staticmethod
    def forward(ctx: Any, W: Tensor, v: Tensor, prev: Tensor | None, memory: DepthMemory, j: int, lo: int) -> Tensor:
        Wl = W[lo:] if lo else W
        if Wl.dtype != v.dtype:
            dt = torch.promote_types(W.dtype, v.dtype)
            Wl, v = Wl.to(dt), v.to(dt)
        with _exact(v):
            r = memory.rms_inv(v)
            z = torch.mm(Wl, v.reshape(-1, v.shape[-1]).t()).view(Wl.shape[0], *r.shape).mul_(r)
        memory.store(j, lo, z)
        ctx.memory, ctx.j, ctx.lo, ctx.num_queries = memory, j, lo, W.shape[0]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(Wl, v, r, z)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor | None) -> tuple[Tensor | None, ...]:
        W, v, r, z = ctx.saved_tensors
        j, lo, memory, (need_w, need_v) = ctx.j, ctx.lo, ctx.memory, ctx.needs_input_grad[:2]
        gv = gz = None
        recs = memory.of(j)
        if recs:
            e = []  # per read: v . gh + galpha_j
            for rec in recs:
                a = rec.alpha[j]
                ek = torch.zeros_like(r) if rec.gh is None else memory.rowdot(v, rec.gh)
                if rec.gh is not None and need_v:
                    gv = rec.gh * a if gv is None else gv.addcmul_(rec.gh, a)
                e.append(ek if rec.galpha is None else ek + rec.galpha[j, ..., 0])
            e = torch.stack(e).sub_(torch.stack([rec.base for rec in recs]))
            e.mul_(torch.stack([rec.alpha[j] for rec in recs]).squeeze(-1))  # dL/dz of the reads' rows
            rows = [rec.q - lo for rec in recs]
            if g is None and rows == list(range(z.shape[0])):  # every query read (depth order, no lesion)
                gz = e
            else:
                gz = torch.zeros_like(z) if g is None else g.clone()
                gz.index_add_(0, torch.tensor(rows, device=z.device), e)
        elif g is not None:
            gz = g.clone()
        if gz is None:
            gz = torch.zeros_like(z)
        gs = gz.mul_(r).view(z.shape[0], -1)  # dL/d(v . w_q), in place over dL/dz
        v2 = v.reshape(-1, v.shape[-1])
        gW = None
        if need_w and lo == 0:
            gW = torch.mm(gs, v2)
        elif need_w:
            gW = torch.zeros(ctx.num_queries, W.shape[1], dtype=W.dtype, device=W.device)
            torch.mm(gs, v2, out=gW[lo:])
        if need_v:
            if gv is None:
                gv = torch.mm(gs.t(), W).view(v.shape)
            else:
                gv.view(v2.shape).addmm_(gs.t(), W)
            # the rms factor's part, -(sum_q dL/dz_q z_q) r^2 v / d, with gz now holding dL/dz_q r
            gv.addcmul_(v, (torch.linalg.vecdot(gz, z, dim=0) * r / -v.shape[-1]).unsqueeze(-1))
        return gW, gv, None, None, None, None


class DepthRead(torch.autograd.Function):
    """One read ``h = sum_s alpha_s v_s``, ``alpha = softmax_s(z_s)``, over the completed sources (their logits
    from :class:`SourceLogits`, in ``memory.logits``) and, when there is one, the partial sum ``P``, whose logit
    ``z_P = w . RMSNorm(P) = r (P . w)`` is computed here (``w`` the read's query). Inputs ``(w, P, memory, q,
    ahead, want_alpha, sources, last)`` (``w``, ``P`` ``None`` without a partial sum; ``sources`` a tuple, outside
    autograd; ``last`` the latest source's logits, an input for the order of backward only); output
    ``h (*lead, d)``, and with ``want_alpha`` the weights ``alpha (S, *lead, 1)`` too, the partial sum last (for
    the ``mix`` tap).

    Forward, the paper's two phases: without a partial sum (a block's first read) the softmax over the completed
    sources is taken for this query and the ``ahead`` next ones at once, each source read once for all of them
    (``o = sum_j p_j v_j``, ``lse``, kept in ``memory.cache``); a later read of the block merges its partial sum,
    ``h = o + sigmoid(z_P - lse) (P - o)`` (written over ``o``). Without a phase-1 result (a read out of depth
    order) it takes the softmax over all its sources. No stacked copy of the sources is made.

    Backward saves the weights, ``h`` (the pre-norm keeps it anyway) and the partial sum: O(M d) of its own. With
    ``sum_s alpha_s v_s = h``, the softmax's gradient is ``dL/dz_s = alpha_s (v_s . gh - h . gh)``; the partial
    sum's part is done here (``dL/dP = alpha_P gh + dz_P r (w - z_P r P / d)``, ``dL/dw = dz_P r P``), the
    completed sources' in :class:`SourceLogits`.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor | None, partial: Tensor | None, memory: DepthMemory, q: int, ahead: int,
                want_alpha: bool, sources: tuple[Tensor, ...], last: Tensor) -> Any:
        n = len(sources)
        values = sources if partial is None else (*sources, partial)
        dt = values[0].dtype
        if any(t.dtype != dt for t in values):
            dt = functools.reduce(torch.promote_types, (t.dtype for t in values))
            values = tuple(t.to(dt) for t in values)
        logits = memory.logits if memory.logits.dtype == dt else memory.logits.to(dt)
        hit = None
        with _exact(values[0]):
            if partial is None:  # phase 1, for this query and the next ``ahead``
                zc = logits[q:q + 1 + ahead, :n]  # (1 + ahead, n, *lead)
                if ahead:  # the softmax and, for the later queries' merges, its log-sum-exp
                    zm = zc.amax(dim=1, keepdim=True)
                    p = torch.sub(zc, zm).exp_()
                    den = p.sum(dim=1, keepdim=True)
                    p = p.div_(den).unsqueeze(-1)  # the softmax over the completed sources, (1 + ahead, n, *lead, 1)
                else:
                    p = torch.softmax(zc, dim=1).unsqueeze(-1)
                if n == 1:  # x0 alone (weight 1): the block's later reads merge into x0 itself, out of place
                    o = [torch.mul(values[0], p[0, 0])] + [None] * ahead
                else:  # o = sum_j p_j v_j as a running mean: o <- o + (p_j / sum_{k <= j} p_k) (v_j - o)
                    t = p.cumsum(dim=1).clamp_min_(torch.finfo(dt).tiny)
                    t = torch.div(p, t, out=t).unbind(1)  # per source, (1 + ahead, *lead, 1)
                    o = [torch.lerp(values[0], values[1], ts) for ts in t[1]]
                    for j in range(2, n):
                        for s, ts in enumerate(t[j]):
                            o[s].lerp_(values[j], ts)
                if ahead:
                    lse = den.log_().add_(zm)[:, 0]  # log-sum-exp, (1 + ahead, *lead)
                    for s in range(1, 1 + ahead):
                        memory.cache[(n, q + s)] = (o[s], p[s], lse[s])
                h, p, sig, saved = o[0], p[0], None, ()
            else:
                P = values[-1]
                w = w if w.dtype == dt else w.to(dt)
                r = memory.rms_inv(P)
                zp = torch.matmul(P, w).mul_(r)
                hit = memory.cache.pop((n, q), None)
                if hit is not None:  # phase 2: merge the partial sum into the block's phase-1 result
                    o, p, lse = hit  # p: the softmax over the completed sources alone
                    sig = torch.sigmoid(zp - lse)[..., None]  # the partial sum's weight
                    h = torch.lerp(values[0], P, sig) if o is None else o.lerp_(P, sig)
                else:
                    p = torch.softmax(torch.cat([logits[q, :n], zp.unsqueeze(0)]), dim=0).unsqueeze(-1)
                    h = torch.mul(values[0], p[0])
                    for s in range(1, n + 1):
                        h.addcmul_(values[s], p[s])
                    p, sig = p[:n], p[n]  # the completed sources' weights already carry (1 - sig)
                saved = (P, w, r, zp, sig, torch.mul(sig[..., 0], r))
        ctx.memory, ctx.q, ctx.n, ctx.merged = memory, q, n, hit is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, p, *saved)
        if not want_alpha:
            return h
        return h, (p if sig is None else torch.cat([p * (1 - sig) if hit is not None else p, sig.unsqueeze(0)]))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gh: Tensor | None, galpha: Tensor | None = None) -> tuple[Tensor | None, ...]:
        h, p, *saved = ctx.saved_tensors
        n, memory, (need_w, need_p) = ctx.n, ctx.memory, ctx.needs_input_grad[:2]
        alpha = p * (1 - saved[4]) if ctx.merged else p  # the completed sources' weights, (n, *lead, 1)
        base = torch.zeros_like(h[..., 0]) if gh is None else memory.rowdot(h, gh)  # sum_s alpha_s v_s . gh
        if galpha is not None:
            full = torch.cat([alpha, saved[4].unsqueeze(0)]) if saved else alpha
            base = base + torch.linalg.vecdot(full, galpha, dim=0).squeeze(-1)
        memory.add(ReadRecord(ctx.q, n, gh, alpha.unbind(0), base, galpha))
        gw = gP = None
        if saved:  # the partial sum: its share of h and its key
            P, w, r, zp, sig, sr = saved
            if gh is None:
                e = -base if galpha is None else galpha[n, ..., 0] - base
            else:
                e = memory.rowdot(P, gh).sub_(base)
                if galpha is not None:
                    e += galpha[n, ..., 0]
            c = e.mul_(sr)  # dL/dz_P * r = dL/d(P . w)
            if need_w:
                gw = torch.tensordot(c, P, dims=c.dim())
            if need_p:
                k = (c * zp).mul_(r).div_(-P.shape[-1]).unsqueeze(-1)
                gP = torch.mul(P, k).addcmul_(c.unsqueeze(-1), w)
                if gh is not None:
                    gP.addcmul_(gh, sig)
        return (gw, gP, None, None, None, None, None, None)


class AttnResState:
    """The running state: completed sources and the latest one's logits, the current block's partial sum.

    ``sources`` are the completed sources ``(*lead, d)`` in depth order, ``last`` the latest one's logits
    (:class:`SourceLogits`); ``partial`` is ``(*lead, d)`` or ``None`` (empty block), ``pos`` counts the sites passed
    (run or lesioned), ``read`` is the latest aggregated read (for taps), ``memory`` the forward pass's
    :class:`DepthMemory`, ``queries`` the pseudo-queries as rows.
    """

    __slots__ = ("pos", "memory", "queries", "sources", "last", "partial", "read")

    def __init__(self, pos: int, memory: DepthMemory, queries: tuple[Tensor, ...], sources: tuple[Tensor, ...],
                 last: Tensor | None, partial: Tensor | None, read: Tensor) -> None:
        self.pos, self.memory, self.queries = pos, memory, queries
        self.sources, self.last, self.partial, self.read = sources, last, partial, read


class BlockAttnResBase(ResidualScheme):
    """Depth attention over block sums; see the module docstring."""

    capabilities = Capabilities(shape_change=False, keeps_history=True, exposes_mixing=True, uses_shortcut=False,
                                mix_shape=("N", "*lead", "sources"))
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

    @_eager
    def _aggregate(self, state: AttnResState, q: int, weights: bool) -> tuple[Tensor, Tensor | None]:
        """``h`` (``(*lead, d)``) read with query ``q`` at the current position, and with ``weights`` (a tap
        listens) its weights ``(S, *lead, 1)``."""
        P, pos, bs, memory = state.partial, state.pos, self.block_size, state.memory
        # a block's first read in depth order does phase 1 for the block's later queries too
        ahead = min(pos // bs * bs + bs, len(self.specs) + 1) - pos - 1 if P is None and q == pos else 0
        memory.used.add(q)
        w = None if P is None else state.queries[q]
        out = DepthRead.apply(w, P, memory, q, ahead, weights, state.sources, state.last)
        return out if weights else (out, None)

    @_eager
    def _complete(self, state: AttnResState, v: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """The sources with ``v`` completed, and its logits for the queries still to read."""
        memory, j = state.memory, len(state.sources)
        return (*state.sources, v), SourceLogits.apply(self.queries, v, state.last, memory, j, memory.first_unread())

    # --- the protocol -----------------------------------------------------------------------------
    def begin(self, x0: Tensor) -> AttnResState:
        memory = DepthMemory(len(self.specs) + 1, -(-len(self.specs) // self.block_size) + 1)
        state = AttnResState(0, memory, self.queries.unbind(0), (), None, None, x0)
        state.sources, state.last = self._complete(state, x0)
        return state

    def read(self, state: AttnResState, i: int, tap: Tap | None = None) -> Tensor:
        h, alpha = self._aggregate(state, i, tap is not None)
        if tap is not None:
            tap("mix", i, alpha.squeeze(-1).movedim(0, -1))
        state.read = self.post(h)
        return self.norm_in(i, state.read)

    def _advance(self, state: AttnResState, partial: Tensor | None) -> AttnResState:
        pos, sources, last = state.pos + 1, state.sources, state.last
        if pos % self.block_size == 0:  # the block is complete: its logits are computed once, here
            if partial is not None:
                sources, last = self._complete(state, partial)
            partial = None
            state.memory.cache.clear()  # phase-1 results left by lesioned sites
        return AttnResState(pos, state.memory, state.queries, sources, last, partial, state.read)

    def write(self, state: AttnResState, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> AttnResState:
        if tap is not None:
            tap("contribution", i, out)
        return self._advance(state, out if state.partial is None else state.partial + out)

    def skip(self, state: AttnResState, i: int) -> AttnResState:
        """Lesion: branch ``i``'s source is absent (it adds nothing to its block)."""
        return self._advance(state, state.partial)

    def end(self, state: AttnResState, tap: Tap | None = None) -> Tensor:
        L = len(self.specs)
        h, alpha = self._aggregate(state, L, tap is not None)
        if tap is not None:
            tap("mix", L, alpha.squeeze(-1).movedim(0, -1))
        return self.post(h)

    def stream(self, state: AttnResState) -> Tensor:
        """The latest aggregated read ``h`` (``x0`` before the first site)."""
        return state.read

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
