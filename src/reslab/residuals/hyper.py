"""Hyper-connections (``hc``) and manifold-constrained hyper-connections (``mhc``): ``n`` parallel residual streams.

``hc`` (Zhu et al. 2024, arXiv 2409.19606, eqs. (2)-(5), (10)-(14)). The stream of one token is a matrix
``H in R^{n x d}``; the embedding is copied ``n`` times, ``H_0 = (x0, ..., x0)^T``. Branch ``k`` reads the width
connection ``h_k = A_m^T H`` (through the pre norm) and writes ``H' = A_r^T H + B^T T_k(h_k)``. Dynamic HC (DHC,
``dynamic=True``, the paper's main setting) adds per-token offsets ``A_m(H) = A_m + s_a tanh(norm(H) W_m)``,
``A_r(H) = A_r + s_a tanh(norm(H) W_r)``, ``B(H) = B + s_b tanh(norm(H) W_b)^T``, with ``norm`` over ``d`` of each
stream (the scheme's ``norm_type``; LayerNorm as in the paper's Algorithm 2). Init (eq. (14), Algorithm 2):
``A_m = e_{k mod n}``, ``A_r = I``, ``B = 1``, ``W = 0``, ``s_a = s_b = 0.01``. ``k`` is the **branch** index (each
attention and each MLP sublayer is one layer ``T^k`` with its own HC, as in the paper's Algorithm 3 and the mHC
paper's Fig. 3). Parameter names and shapes follow Algorithm 2 and the ``hyper-connections`` package
(``static_alpha = [A_m | A_r]`` of shape ``(n, n+1)``, ``static_beta``, ``dynamic_alpha_fn``, ...).

``mhc`` (Xie et al. 2025, DeepSeek, arXiv 2512.24880, eqs. (3), (7)-(9)):
``x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)`` with ``x' = RMSNorm(vec(x_l))`` over all ``n d`` entries (no weight:
it is absorbed into ``phi``), ``H_pre = sigmoid(a_pre (x' phi_pre) + b_pre)``, ``H_post = 2 sigmoid(a_post (x'
phi_post) + b_post)``, ``H_res = SinkhornKnopp(a_res mat(x' phi_res) + b_res)``: ``M = exp(.)`` then ``sinkhorn_iters``
rounds of column- then row-normalisation (eq. (9); rows end exact). Init: ``phi = 0``, ``a = 0.01`` (Appendix A.1);
the paper leaves the biases open, we take ``b_post = 0`` (``H_post = 1``), ``b_res = I`` (as the package's static
``I``), and ``b_pre = logit(p)`` with ``p = (e_{k mod n} + 1/n) / 2``: a soft one-hot whose entries sum to 1. It breaks
the symmetry between streams as HC's one-hot does (with a stream-symmetric init the streams could never differ).

Exact at init. Both rules keep the ``n`` streams equal to the Pre-LN stream ``x_l``: the branch reads
``sum(A_m) x_l = x_l``, doubly stochastic (or identity) mixing maps equal rows to themselves, and ``B = 1`` adds the
branch output to every stream. So the trunk output is ``n x_L`` with ``reduce="sum"`` (the paper's Algorithm 1 and the
package: sum the rows, then the head's final norm, which removes the factor up to its eps), and exactly Pre-LN's
``x_L`` with ``reduce="mean"``. For ``hc`` this is exact (up to the rounding of the final sum); for ``mhc`` it holds
to float rounding of the sigmoid and Sinkhorn (``sum(H_pre) = 1`` and the row sums of ``H_res`` are 1 to ~1e-7). With
``streams=1``, ``hc`` at init is Pre-LN exactly; ``mhc`` has ``H_res = 1`` (no parameters: the doubly stochastic
condition degenerates to the scalar 1), ``H_post = 1`` and ``H_pre = 1 - 1e-6`` (a sigmoid cannot reach 1). The
package's mHC (v0.4.11) is not Pre-LN at init: ``H_pre = sigmoid(e_k)``, ``H_post = 2 sigmoid(1) = 1.46``, with the
dynamic terms read per stream (HC-style norms) instead of from the flattened ``n d`` vector. A ``post`` op (the
post-activation MLP's ReLU) applies to every stream after each combination, ``H' = post(A_r^T H + B^T out)``; at init
this is the identity scheme with the same ``post``.

Taps and tools. State: :class:`Streams`, the streams ``(..., n, d)`` (on axis -2) and the coefficients that
:meth:`read` computed for :meth:`write` (per forward pass). ``stream(state)`` and ``end`` reduce over the streams
(``reduce``). ``mix`` (every branch ``i``): one tensor ``(..., n, n+2) = [A_r | A_m | B]`` per token, in HC's
convention ``H' = A_r^T H + B^T out``, ``h = A_m^T H`` (for ``mhc``: ``A_r = H_res^T``, ``A_m = H_pre^T``,
``B = H_post``). ``contribution``: the branch term as the reduced stream sees it, ``reduce(B) * out``. Lesion
(``skip``): the branch term is removed and the stream mixing kept, ``H' = post(A_r(H)^T H)``. :meth:`decompose` carries
each component's per-stream coefficients through the recorded ``A_r`` (exact without a ``post`` op).
:func:`composite_gain`: the mHC paper's Amax gain magnitude of ``prod_l H_res``.

Args:
    streams: expansion rate ``n`` (4 in both papers).
    dynamic: add the input-dependent terms (DHC / mHC's ``phi``); ``False`` keeps the static matrices only.
    reduce: ``"sum"`` (the paper) or ``"mean"`` (exactly Pre-LN at init) over the streams in ``end``.
    sinkhorn_iters: ``mhc`` only, Sinkhorn-Knopp iterations (20 in the paper).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchSpec
from reslab.norms import NORM_TYPES
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual

Coefs = tuple[Tensor, Tensor, Tensor]  # A_m (..., n), A_r (..., n, n), B (..., n), HC convention


class Streams:
    """The state of one forward pass: the streams ``h`` ``(..., n, d)`` and, between :meth:`MultiStreamScheme.read`
    and ``write`` of branch ``i``, the coefficients ``(i, (A_m, A_r, B))`` that the read computed (the write reuses
    them instead of computing them again)."""

    __slots__ = ("h", "coefs")

    def __init__(self, h: Tensor) -> None:
        self.h, self.coefs = h, None
MATMUL_MIX_WIDTH = 128  # from this width on, the stream mixing is a batched matmul (see MultiStreamScheme._mix)


def _positive_int(scheme: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or value.__index__() < 1:
        raise ValueError(f"residual scheme {scheme!r}: {name} must be a positive integer, got {value!r}")
    return value.__index__()


class _SinkhornKnopp(torch.autograd.Function):
    """Unrolled Sinkhorn-Knopp on ``(n, n, M)`` (tokens innermost) with a hand-written backward.

    The gradient is exactly autograd's through the unrolled loop: for ``m_k = m_{k-1} / s_k`` with
    ``s_k = sum(m_{k-1})`` over the normalised axis, ``dL/dm_{k-1} = (g - sum(g * m_k)) / s_k``. On a CPU it is about
    five times faster than autograd through the loop for ``n = 4`` (no graph of 80 tiny nodes, contiguous inner
    loops over the tokens)."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # noqa: D102
        m = torch.exp(logits - logits.amax(dim=(0, 1), keepdim=True))
        saved = [m]
        for _ in range(iters):
            for axis in (0, 1):  # columns, then rows (mHC eq. (9))
                s = m.sum(axis, keepdim=True)
                m = m / s
                saved += [m, s]
        ctx.save_for_backward(*saved)
        return m

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        saved = ctx.saved_tensors
        g = g.contiguous()
        for k in range(len(saved) - 2, 0, -2):
            m, s = saved[k], saved[k + 1]
            axis = 0 if (k // 2) % 2 == 0 else 1
            g = (g - (g * m).sum(axis, keepdim=True)) / s
        return g * saved[0], None


def sinkhorn_knopp(logits: Tensor, iters: int = 20) -> Tensor:
    """``M = exp(logits)``, then ``iters`` rounds of column- then row-normalisation (mHC eq. (9)) over the last two
    axes: rows sum to 1 exactly, columns to within the iteration's convergence. Differentiable (the gradient of
    the unrolled iterations)."""
    shape = logits.shape
    n1, n2 = shape[-2], shape[-1]
    flat = logits.reshape(-1, n1, n2).permute(1, 2, 0).contiguous()  # (n, n, tokens): tokens innermost
    return _SinkhornKnopp.apply(flat, iters).permute(2, 0, 1).reshape(shape)


def composite_gain(mix_list: Sequence[Tensor | None], backward: bool = False) -> Tensor:
    """Amax gain magnitude of the composite residual mapping (mHC paper, section 3.1 and Fig. 3).

    ``P_l = H_res_l ... H_res_0`` with ``H_res = A_r^T`` from each ``mix`` tensor ``(..., n, n+2)``; the gain at depth
    ``l`` is ``max_i |sum_j P_l[i, j]|`` (forward: row sums; ``backward=True``: column sums), averaged over tokens.
    Trailing ``None`` entries (such as the final index ``L`` of a recording) are ignored.

    Returns:
        ``(L,)``: the gain after each depth.
    """
    mixes = list(mix_list)
    while mixes and mixes[-1] is None:
        mixes.pop()
    if any(m is None for m in mixes):
        raise ValueError(f"composite_gain: no stream matrix recorded at depth {mixes.index(None)}")
    gains, prod = [], None
    for m in mixes:
        n = m.shape[-2]
        h_res = m[..., :n].transpose(-1, -2).double()
        prod = h_res if prod is None else h_res @ prod
        sums = prod.sum(dim=-2 if backward else -1)
        gains.append(sums.abs().amax(dim=-1).mean())
    return torch.stack(gains) if gains else torch.zeros(0, dtype=torch.float64)


class MultiStreamScheme(ResidualScheme):
    """``n`` streams mixed by per-branch coefficients ``(A_m, A_r, B)`` from :meth:`coefficients`."""

    capabilities = Capabilities(shape_change=False, multi_stream=True, exposes_mixing=True, uses_shortcut=False,
                                mix_shape=("N", "*lead", "n", "n + 2"))
    norm_placements = ("none", "pre")
    post_ops = ("none", "relu")  # the post op applies to every aggregated read, outside finish()

    def __init__(self, specs: Sequence[BranchSpec], streams: int = 4, dynamic: bool = True, reduce: str = "sum",
                 **kw: Any) -> None:
        super().__init__(specs, **kw)
        streams = _positive_int(self.name, "streams", streams)
        if reduce not in ("sum", "mean"):
            raise ValueError(f"residual scheme {self.name!r}: reduce must be 'sum' or 'mean', got {reduce!r}")
        if any(s.layout != "features" for s in self.specs) or len({s.in_dim for s in self.specs}) != 1:
            raise ValueError(f"residual scheme {self.name!r} needs feature streams of one width (transformers, MLPs)")
        self.streams, self.dynamic, self.reduce = streams, bool(dynamic), reduce
        self.dim = self.specs[0].in_dim

    def coefficients(self, state: Tensor, i: int) -> Coefs:
        """``(A_m, A_r, B)`` of branch ``i`` for the streams ``state`` (``(..., n, d)``), per token: the subclass's
        per-branch module ``sites[i]``."""
        return self.sites[i](state)


    def _reduce(self, x: Tensor, dim: int) -> Tensor:
        return x.sum(dim) if self.reduce == "sum" else x.mean(dim)

    @staticmethod
    def _mix(a_r: Tensor, state: Tensor) -> Tensor:
        """``A_r^T H`` per token: ``(..., s, t) x (..., s, d) -> (..., t, d)``. A batched matmul over the tokens
        has a per-token cost that does not depend on ``d``; broadcast-and-sum scales with ``d``. On a CPU
        (fwd + bwd, 1024 tokens, n = 4) broadcasting is 4x faster at d = 32 and the matmul 2x faster at d = 256,
        so the width picks."""
        if state.shape[-1] >= MATMUL_MIX_WIDTH:
            return torch.matmul(a_r.transpose(-1, -2), state)
        return (a_r.unsqueeze(-1) * state.unsqueeze(-2)).sum(-3)

    def begin(self, x0: Tensor) -> Streams:
        return Streams(x0.unsqueeze(-2).expand(*x0.shape[:-1], self.streams, x0.shape[-1]))

    def read(self, state: Streams, i: int, tap: Tap | None = None) -> Tensor:
        coefs = self.coefficients(state.h, i)
        state.coefs = (i, coefs)
        return self.norm_in(i, (coefs[0].unsqueeze(-1) * state.h).sum(-2))

    def write(self, state: Streams, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> Streams:
        a_m, a_r, b = state.coefs[1] if state.coefs and state.coefs[0] == i else self.coefficients(state.h, i)
        new = self._mix(a_r, state.h) + b.unsqueeze(-1) * out.unsqueeze(-2)
        if tap is not None:
            tap("mix", i, torch.cat((a_r, a_m.unsqueeze(-1), b.unsqueeze(-1)), dim=-1))
            tap("contribution", i, self._reduce(b, -1).unsqueeze(-1) * out)
        return Streams(self.post(new))

    def skip(self, state: Streams, i: int) -> Streams:
        """Lesion: ``H' = post(A_r(H)^T H)``, the stream mixing without the branch term."""
        return Streams(self.post(self._mix(self.coefficients(state.h, i)[1], state.h)))

    def end(self, state: Streams, tap: Tap | None = None) -> Tensor:
        return self._reduce(state.h, -2)

    def stream(self, state: Streams) -> Tensor:
        """The reduced stream (what :meth:`end` returns), shaped like ``x0``."""
        return self._reduce(state.h, -2)

    def carrier(self, state: Streams) -> Tensor:
        """All ``n`` streams: the reduced stream is a summary no later depth reads, so it carries no gradient."""
        return state.h

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """Carry each component's per-stream coefficients through the recorded ``A_r``: ``x0`` starts at ``1`` on every
        stream, ``out_i`` enters with ``B_i``; each contribution is ``reduce(coefficients) * component``."""
        self._check_linear()
        n = self.streams
        coef = x0.new_ones(1, *x0.shape[:-1], n)
        for i, _ in enumerate(outs):
            m = mix[i]
            if m is None:
                raise ValueError(f"residual scheme {self.name!r}: no mix recorded for branch {i}")
            coef = torch.einsum("...st,k...s->k...t", m[..., :n], coef)
            coef = torch.cat((coef, m[..., n + 1].expand(*x0.shape[:-1], n).unsqueeze(0)))
        return self._reduce(coef, -1).unsqueeze(-1) * torch.stack([x0, *outs])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, streams={self.streams}, dynamic={self.dynamic}, reduce={self.reduce}"


def site_mixing(site: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """A site's static ``(alpha, beta)`` plus, when dynamic, ``s tanh(norm(h) W)`` (Algorithm 2 of Zhu et al.): the
    rule of hyper-connections' sites and of Frac-connections' (the same parameters, over fractions)."""
    tokens = h.shape[:-2]
    alpha, beta = site.static_alpha.expand(*tokens, -1, -1), site.static_beta.expand(*tokens, -1)
    if site.dynamic:
        hn = site.norm(h)
        alpha = alpha + site.dynamic_alpha_scale * torch.tanh(hn @ site.dynamic_alpha_fn)
        beta = beta + site.dynamic_beta_scale * torch.tanh(hn @ site.dynamic_beta_fn)
    return alpha, beta


class HyperConnection(nn.Module):
    """The (dynamic) hyper-connection of one branch, Algorithm 2 of Zhu et al.: returns ``A_m, A_r, B``."""

    def __init__(self, dim: int, n: int, layer_index: int, dynamic: bool, norm_type: str) -> None:
        super().__init__()
        alpha = torch.cat((torch.zeros(n, 1), torch.eye(n)), dim=1)
        alpha[layer_index % n, 0] = 1.0
        self.static_alpha = nn.Parameter(alpha)  # [A_m | A_r], (n, n+1)
        self.static_beta = nn.Parameter(torch.ones(n))  # B
        self.dynamic = dynamic
        if dynamic:
            self.norm = NORM_TYPES[norm_type](dim)
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, n + 1))  # [W_m | W_r]
            self.dynamic_alpha_scale = nn.Parameter(torch.tensor(0.01))  # s_alpha
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))  # W_beta
            self.dynamic_beta_scale = nn.Parameter(torch.tensor(0.01))  # s_beta

    def forward(self, h: Tensor) -> Coefs:
        alpha, beta = site_mixing(self, h)
        return alpha[..., 0], alpha[..., 1:], beta


@register_residual("hc", paper="Zhu et al. 2024, Hyper-Connections, arXiv 2409.19606")
class HyperConnections(MultiStreamScheme):
    """``h = A_m^T H``, ``H' = A_r^T H + B^T T(h)``, static + dynamic (tanh) matrices."""

    def __init__(self, specs: Sequence[BranchSpec], streams: int = 4, dynamic: bool = True, reduce: str = "sum",
                 **kw: Any) -> None:
        super().__init__(specs, streams=streams, dynamic=dynamic, reduce=reduce, **kw)
        self.sites = nn.ModuleList(HyperConnection(self.dim, streams, k, self.dynamic, self.norm_type)
                                   for k in range(len(self.specs)))


class ManifoldHyperConnection(nn.Module):
    """The mHC mappings of one branch (eqs. (7)-(9)): returns ``A_m = H_pre``, ``A_r = H_res^T``, ``B = H_post``."""

    def __init__(self, dim: int, n: int, layer_index: int, dynamic: bool, iters: int) -> None:
        super().__init__()
        self.n, self.iters, self.dynamic = n, iters, dynamic
        p = torch.full((n,), 0.5 / n, dtype=torch.float64)
        p[layer_index % n] += 0.5
        p = p.clamp(max=1 - 1e-6)
        self.pre_bias = nn.Parameter(torch.log(p / (1 - p)).float())  # b_pre: sigmoid(b_pre) = p, sum 1
        self.post_bias = nn.Parameter(torch.zeros(n))  # b_post: H_post = 2 sigmoid(0) = 1
        mixes = n > 1  # one stream: H_res is the scalar 1 whatever its logits, so it has no parameters
        self.res_bias = nn.Parameter(torch.eye(n)) if mixes else None  # b_res
        if dynamic:
            self.phi = nn.Parameter(torch.zeros(n * dim, (n * n if mixes else 0) + 2 * n))  # [pre | post | res]
            self.alpha = nn.Parameter(torch.full((3 if mixes else 2,), 0.01))  # a_pre, a_post, a_res

    def forward(self, h: Tensor) -> Coefs:
        n, tokens = self.n, h.shape[:-2]
        pre, post, res = self.pre_bias, self.post_bias, self.res_bias
        if self.dynamic:
            flat = h.flatten(-2)
            z = F.rms_norm(flat, (flat.shape[-1],), eps=1e-6) @ self.phi
            pre = pre + self.alpha[0] * z[..., :n]
            post = post + self.alpha[1] * z[..., n:2 * n]
            if res is not None:
                res = res + self.alpha[2] * z[..., 2 * n:].unflatten(-1, (n, n))
        if res is None:
            h_res = h.new_ones(*tokens, 1, 1)
        else:
            h_res = sinkhorn_knopp(res.expand(*tokens, n, n), self.iters)
        a_m, b = torch.sigmoid(pre).expand(*tokens, n), 2 * torch.sigmoid(post).expand(*tokens, n)
        return a_m, h_res.transpose(-1, -2), b


@register_residual("mhc", paper="Xie et al. 2025 (DeepSeek), mHC: Manifold-Constrained Hyper-Connections, "
                                "arXiv 2512.24880")
class ManifoldHyperConnections(MultiStreamScheme):
    """``x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)``, sigmoid / 2 sigmoid / Sinkhorn-Knopp mappings."""

    def __init__(self, specs: Sequence[BranchSpec], streams: int = 4, dynamic: bool = True, reduce: str = "sum",
                 sinkhorn_iters: int = 20, **kw: Any) -> None:
        super().__init__(specs, streams=streams, dynamic=dynamic, reduce=reduce, **kw)
        self.sinkhorn_iters = sinkhorn_iters = _positive_int(self.name, "sinkhorn_iters", sinkhorn_iters)
        self.sites = nn.ModuleList(ManifoldHyperConnection(self.dim, streams, k, self.dynamic, sinkhorn_iters)
                                   for k in range(len(self.specs)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn_iters}"


__all__ = ["HyperConnections", "ManifoldHyperConnections", "MultiStreamScheme", "composite_gain", "sinkhorn_knopp"]

