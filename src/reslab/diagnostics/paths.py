"""Gradient per path length: the exact polynomial decomposition and Veit et al.'s sampling estimate.

REFERENCE.md section 3 (Veit et al. 2016, arXiv 1605.06431, and the exact method). A trunk of ``n`` additive
blocks maps ``x_i`` to ``x_{i+1} = post(S_i(x_i) + B_i(x_i))`` with ``S_i = scheme.skip(., i)`` (the skip
path, shortcut and scale included) and ``B_i(x) = scheme.contribution(branch_i(scheme.read(x, i)), h, i)``
(what the branch adds); for ``plain`` ``S_i = 0``; ``post`` is the scheme's ``finish`` (post activation and post
norm, e.g. Post-LN's LayerNorm). Linearised at the forward pass (eval mode), and with every
branch Jacobian ``J_i`` scaled by a scalar ``t``, the input gradient for a cotangent ``g`` at the trunk output

    p(t) = prod_i (S_i + t J_i)^T D_i^T g            (D_i: the Jacobian of ``post`` at block i)

is a polynomial of degree ``n`` in ``t``; its coefficient ``c_k`` is exactly the vector sum over all paths
through exactly ``k`` branches, and ``sum_k c_k = p(1)`` is the true input gradient.

- :func:`path_coefficients` computes the ``c_k`` by a backward recurrence (``method="recurrence"``: one
  batched vector-Jacobian product per block on all coefficient vectors at once) or from ``n + 1`` evaluations
  on a circle and an FFT (``method="fft"``); both are exact up to float64 rounding.
- :func:`veit_sampling` is Veit et al.'s estimate: the mean norm of single-path gradients of each length.
  It ignores cancellation between paths, so ``mean * C(n, k)`` can be far above ``||c_k||``.

Conventions. ``x0`` is a whole batch ``(N, ...)`` and ``g`` has the trunk output's shape; a "gradient vector"
is the whole ``(N, ...)`` tensor, and every norm here is the Frobenius norm over that whole tensor (not a
per-sample norm). Everything is computed in float64 on a deep copy of the trunk in eval mode.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from reslab.losses import loss_fn
from reslab.residuals.base import AdditiveScheme, ResidualScheme
from reslab.trunk import Trunk

__all__ = ["PathProfile", "analyse_paths", "binomial_length_distribution", "binomial_path_counts",
           "check_paths", "model_cotangent", "path_coefficients", "plot_paths", "veit_sampling"]

# Largest number of float64 elements in one batched vector-Jacobian product (memory bound for sampling).
_MAX_BATCH_ELEMENTS = 1 << 23


# --- the profile ------------------------------------------------------------------------------------
@dataclass
class PathProfile:
    """Gradient magnitude per path length of one network and batch (REFERENCE.md section 3).

    Attributes:
        lengths: path lengths ``0..n`` (number of branches a path goes through).
        exact_norm: ``||c_k||``, the norm of the exact sum of all length-``k`` path gradients (float64).
        veit_mean: Veit et al.'s mean single-path gradient norm per length (NaN where not sampled), or
            ``None`` when sampling was skipped.
        veit_total: ``veit_mean * C(n, k)``, Veit's estimate of the gradient carried by length ``k``.
        path_counts: ``C(n, k)``.
        full_grad_norm: ``||sum_k c_k||``, the norm of the true input gradient of the trunk.
        backward_passes: cotangent vectors pushed backward by each method (``exact``: ``n + 1`` vectors in
            one batched pass per block; ``veit``: ``samples * len(lengths)`` single-path vectors).
        seconds: wall time of each method.
    """

    lengths: np.ndarray
    exact_norm: np.ndarray
    veit_mean: np.ndarray | None
    veit_total: np.ndarray | None
    path_counts: np.ndarray
    full_grad_norm: float
    backward_passes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def _weights(self, which: str) -> np.ndarray:
        if which == "exact":
            w = self.exact_norm
        elif which == "veit":
            if self.veit_total is None:
                raise ValueError("this profile has no Veit estimate (sampling was skipped)")
            w = self.veit_total
        else:
            raise ValueError(f"which must be 'exact' or 'veit', got {which!r}")
        w = np.nan_to_num(np.asarray(w, dtype=np.float64), nan=0.0)
        if not np.any(w > 0):
            raise ValueError(f"the {which} weights are all zero or unsampled")
        return w

    def effective_depth(self, which: str = "exact") -> float:
        """Mean path length weighted by ``exact_norm`` (``which="exact"``) or ``veit_total`` (``"veit"``).

        REFERENCE.md section 3: Veit et al. find the gradient of a 54-block ResNet carried by paths of
        5-17 blocks, far shorter than the 27 of the binomial count. Unsampled lengths weigh zero.
        """
        w = self._weights(which)
        return float(np.sum(w * self.lengths) / np.sum(w))

    def mass_range(self, which: str = "exact", mass: float = 0.9) -> tuple[int, int]:
        """Shortest contiguous window ``(lo, hi)`` of lengths (inclusive) holding ``>= mass`` of the weights.

        Weights as in :meth:`effective_depth` (REFERENCE.md section 3). Ties go to the window with the
        larger share, then to the shorter lengths.
        """
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        w = self._weights(which)
        total = w.sum()
        cum = np.concatenate([[0.0], np.cumsum(w)])
        best: tuple[int, float, int, int] | None = None
        for lo in range(len(w)):
            for hi in range(lo, len(w)):
                share = (cum[hi + 1] - cum[lo]) / total
                if share >= mass * (1.0 - 1e-12):
                    key = (hi - lo, -share, lo, hi)
                    if best is None or key[:3] < best[:3]:
                        best = key
                    break
        assert best is not None
        return int(self.lengths[best[2]]), int(self.lengths[best[3]])


# --- binomial path counts ---------------------------------------------------------------------------
def binomial_path_counts(n: int) -> np.ndarray:
    """``C(n, k)`` for ``k = 0..n``: how many of the ``2^n`` paths go through ``k`` branches.

    REFERENCE.md section 3. Float64, exact while ``C(n, k) < 2^53`` (``n <= 56``).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return np.array([math.comb(n, k) for k in range(n + 1)], dtype=np.float64)


def binomial_length_distribution(n: int) -> np.ndarray:
    """``C(n, k) / 2^n``: the path-length distribution Binomial(n, 1/2) (REFERENCE.md section 3)."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return np.array([math.comb(n, k) / 2 ** n for k in range(n + 1)], dtype=np.float64)


# --- the linearised trunk ---------------------------------------------------------------------------
def _check_trunk(trunk: Trunk) -> None:
    scheme = trunk.scheme
    caps = scheme.capabilities
    if not (isinstance(scheme, AdditiveScheme) or not caps.skip_path):
        raise ValueError(f"path analysis needs an additive scheme; {scheme.name or type(scheme).__name__} is not")
    overridden = [m for m in ("begin", "end") if getattr(type(scheme), m) is not getattr(ResidualScheme, m)]
    if caps.multi_stream or caps.keeps_history or overridden:
        raise ValueError(f"path analysis needs a single-stream additive scheme; {scheme.name} is not")
    if trunk.lesioned:
        raise ValueError(f"path analysis runs the full trunk; blocks {sorted(trunk.lesioned)} are lesioned")
    if trunk.order is not None:
        raise ValueError("path analysis runs blocks in depth order; the trunk has a custom order")


@dataclass
class _Block:
    x: Tensor            # block input, a leaf that requires grad
    s: Tensor | None     # skip path S_i(x) (None for plain)
    b: Tensor            # contribution B_i(x)
    z: Tensor            # S_i(x) + B_i(x), a leaf
    y: Tensor | None     # post(z), None when post is the identity


class _Linearised:
    """A float64 eval-mode copy of a trunk, run once at ``x0`` with each block's graph kept.

    Its ``vjp`` pushes a batch of cotangents ``(K, *shape)`` through one block (REFERENCE.md section 3).
    """

    def __init__(self, trunk: Trunk, x0: Tensor) -> None:
        _check_trunk(trunk)
        memo: dict[int, Any] = {} if trunk.recorder is None else {id(trunk.recorder): None}  # do not copy a recorder
        net = copy.deepcopy(trunk, memo)
        net.recorder = None
        net.double().eval().requires_grad_(False)
        self.trunk, self.scheme = net, net.scheme
        self.plain = not net.scheme.capabilities.skip_path  # each branch replaces the stream
        self.post_identity = net.scheme.post_op == "none" and net.scheme.post_norms is None
        self.batched = True
        self.blocks: list[_Block] = []
        scheme = self.scheme
        state = scheme.begin(x0.detach().to(torch.float64))
        with torch.enable_grad():
            for i, branch in enumerate(net.branches):
                x = state.detach().requires_grad_(True)
                h = scheme.read(x, i)
                out = branch(h)
                if self.plain:
                    s, b = None, out
                else:
                    s, b = scheme.skip(x, i), scheme.contribution(scheme.norm_out(i, out), h, i)
                z = (b if s is None else s + b).detach().requires_grad_(True)
                y = None if self.post_identity else scheme.finish(i, z)
                self.blocks.append(_Block(x, s, b, z, y))
                state = z.detach() if y is None else y.detach()
        self.output = scheme.end(state).detach()

    def __len__(self) -> int:
        return len(self.blocks)

    def check_cotangent(self, g: Tensor) -> Tensor:
        if tuple(g.shape) != tuple(self.output.shape):
            raise ValueError(f"cotangent g has shape {tuple(g.shape)}, the trunk output {tuple(self.output.shape)}")
        return g.detach().to(torch.float64)

    def _grad(self, outputs: Sequence[Tensor | None], inp: Tensor, cots: Sequence[Tensor | None]) -> Tensor:
        """``sum_j (d outputs_j / d inp)^T cots_j`` for a leading batch of cotangents."""
        k = next(c.shape[0] for c in cots if c is not None)
        pairs = [(o, c) for o, c in zip(outputs, cots) if o is not None and c is not None and o.requires_grad]
        if not pairs:
            return inp.new_zeros((k, *inp.shape))
        outs, cs = [o for o, _ in pairs], [c for _, c in pairs]
        if self.batched:
            try:
                (r,) = torch.autograd.grad(outs, inp, cs, retain_graph=True, allow_unused=True,
                                           is_grads_batched=True)
                return inp.new_zeros((k, *inp.shape)) if r is None else r
            except RuntimeError:  # an op without a batching rule: fall back to a loop
                self.batched = False
        rows = []
        for j in range(k):
            (r,) = torch.autograd.grad(outs, inp, [c[j] for c in cs], retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(inp) if r is None else r)
        return torch.stack(rows)

    def post_vjp(self, i: int, c: Tensor) -> Tensor:
        """``D_i^T c``: through ``post`` at block ``i``'s operating point."""
        blk = self.blocks[i]
        return c if blk.y is None else self._grad([blk.y], blk.z, [c])

    def vjp(self, i: int, skip_cot: Tensor | None, branch_cot: Tensor | None) -> Tensor:
        """``S_i^T skip_cot + J_i^T branch_cot`` (cotangents after ``post``), one batched pass."""
        blk = self.blocks[i]
        return self._grad([blk.s, blk.b], blk.x, [skip_cot, branch_cot])


# --- (a) recurrence and (b) FFT -----------------------------------------------------------------------
def _recurrence(lin: _Linearised, g: Tensor) -> Tensor:
    c = g.unsqueeze(0)  # after m blocks (from the end) only c_0..c_m can be non-zero
    for i in reversed(range(len(lin))):
        u = lin.post_vjp(i, c)
        zero = torch.zeros_like(u[:1])
        c = lin.vjp(i, None if lin.plain else torch.cat([u, zero]), torch.cat([zero, u]))
    return c


def _fft(lin: _Linearised, g: Tensor, radius: float) -> Tensor:
    n = len(lin)
    m = n + 1
    t = radius * torch.exp(2j * math.pi * torch.arange(m, dtype=torch.float64) / m)
    v = g.to(torch.complex128).unsqueeze(0).expand(m, *g.shape).clone()
    for i in reversed(range(len(lin))):
        u = _complex_post(lin, i, v)
        tu = t.reshape(m, *([1] * (u.dim() - 1))) * u  # t J^T u = J^T (t u): VJPs are real-linear
        skip = None if lin.plain else torch.cat([u.real, u.imag])
        r = lin.vjp(i, skip, torch.cat([tu.real, tu.imag]))
        v = torch.complex(r[:m], r[m:])
    coeffs = torch.fft.fft(v, dim=0) / m
    scale = radius ** torch.arange(m, dtype=torch.float64)
    return coeffs.real / scale.reshape(m, *([1] * (coeffs.dim() - 1)))


def _complex_post(lin: _Linearised, i: int, v: Tensor) -> Tensor:
    """``D_i^T v`` for complex ``v``: real and imaginary parts in one batch."""
    m = v.shape[0]
    r = lin.post_vjp(i, torch.cat([v.real, v.imag]))
    return torch.complex(r[:m], r[m:])


def path_coefficients(trunk: Trunk, x0: Tensor, g: Tensor, method: str = "recurrence",
                      radius: float = 1.0) -> Tensor:
    """The exact gradient per path length: ``c_k``, the sum of all length-``k`` path gradients at ``x0``.

    REFERENCE.md section 3 ("exact alternative"). ``c_k`` is the coefficient of ``t^k`` in the input
    gradient of the trunk linearised at ``x0`` (eval mode, float64) with every branch Jacobian scaled by
    ``t``; ``sum_k c_k`` is the true gradient of ``<g, trunk(x0)>`` with respect to ``x0``.

    Args:
        trunk: a trunk with an additive scheme (any :class:`AdditiveScheme`) or ``plain``.
        x0: the trunk input, a whole batch ``(N, ...)``.
        g: the cotangent at the trunk output (same shape as ``trunk(x0)``).
        method: ``"recurrence"`` (backward recurrence ``c_k <- S^T D^T c_k + J^T D^T c_{k-1}``, one batched
            vector-Jacobian product per block) or ``"fft"`` (evaluate at ``t_j = r exp(2 pi i j/(n+1))``
            and invert by FFT).
        radius: ``r`` of the FFT circle (only for ``method="fft"``).

    Returns:
        Float64 tensor ``(n + 1, *x0.shape)``; row ``k`` is ``c_k``.

    Raises:
        ValueError: a non-additive scheme (e.g. highway), lesioned or reordered blocks, a bad method or shape.
    """
    if method not in ("recurrence", "fft"):
        raise ValueError(f"method must be 'recurrence' or 'fft', got {method!r}")
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    lin = _Linearised(trunk, x0)
    g = lin.check_cotangent(g)
    return _recurrence(lin, g) if method == "recurrence" else _fft(lin, g, radius)


# --- (c) Veit et al. sampling ---------------------------------------------------------------------------
def veit_sampling(trunk: Trunk, x0: Tensor, g: Tensor, samples: int = 1000,
                  lengths: Sequence[int] | None = None, generator: torch.Generator | None = None) -> np.ndarray:
    """Veit et al.'s estimate: the mean norm of a single path's input gradient, per path length.

    REFERENCE.md section 3 ("their method"). For each length ``k`` draw ``samples`` random ``k``-subsets of
    blocks; push ``g`` back through ``post`` and then only through the branch (``J_i^T``) at the chosen
    blocks and only through the skip (``S_i^T``) elsewhere; record the Frobenius norm of the resulting
    ``(N, ...)`` input gradient. Samples are pushed as one batch per length (masked cotangents: one batched
    vector-Jacobian product per block). Unlike :func:`path_coefficients` this averages norms, so it ignores
    cancellation between paths; ``mean * C(n, k)`` estimates the gradient carried by length ``k``.

    Args:
        samples: subsets drawn per length (with replacement).
        lengths: the lengths to sample (default ``0..n``).
        generator: source of the random subsets (default: a fresh one seeded 0).

    Returns:
        Float64 array of length ``n + 1``: the mean single-path norm per length, NaN where not sampled.
    """
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    lin = _Linearised(trunk, x0)
    g = lin.check_cotangent(g)
    n = len(lin)
    ks = list(range(n + 1)) if lengths is None else [int(k) for k in lengths]
    bad = [k for k in ks if not 0 <= k <= n]
    if bad:
        raise ValueError(f"path length {bad[0]} is outside 0..{n}")
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    chunk = max(1, _MAX_BATCH_ELEMENTS // max(1, max(b.x.numel() for b in lin.blocks) if n else g.numel()))
    result = np.full(n + 1, np.nan)
    for k in ks:
        order = torch.rand(samples, n, generator=gen).argsort(dim=1)
        chosen = torch.zeros(samples, n, dtype=torch.bool)
        chosen.scatter_(1, order[:, :k], True)
        total = 0.0
        for start in range(0, samples, chunk):
            mask = chosen[start:start + chunk].to(torch.float64)
            v = g.unsqueeze(0).expand(mask.shape[0], *g.shape)
            for i in reversed(range(n)):
                u = lin.post_vjp(i, v)
                m = mask[:, i].reshape(-1, *([1] * (u.dim() - 1)))
                v = lin.vjp(i, None if lin.plain else u * (1.0 - m), u * m)
            total += float(v.flatten(1).norm(dim=1).sum())
        result[k] = total / samples
    return result


# --- models --------------------------------------------------------------------------------------------
def model_cotangent(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``x0 = stem(inputs)`` (detached) and ``g = dL/d(trunk output)`` for the training loss via the head.

    REFERENCE.md section 3: the point and cotangent at which the trunk's paths are measured. ``L`` is
    :func:`reslab.train.loss_fn`, the loss the model was trained with (mean cross-entropy per target: per sample
    for classifiers, per token for language models with ``(N, T)`` targets). The model (a
    :class:`~reslab.models.base.ResidualNet`) runs in eval mode; each submodule's mode is restored after.
    """

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            x0 = model.stem(inputs).detach()
            out = model.trunk(x0).detach()
        with torch.enable_grad():
            out.requires_grad_(True)
            loss = loss_fn(model.head(out), targets)
            (g,) = torch.autograd.grad(loss, out)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return x0, g.detach()


def check_paths(model: nn.Module) -> None:
    """Raise ``ValueError`` (one line) unless ``model``'s trunk can be analysed by path length: a single-stream
    additive scheme (or ``plain``) run in full and in depth order."""
    _check_trunk(model.trunk)


def analyse_paths(model: nn.Module, inputs: Tensor, targets: Tensor, samples: int = 1000,
                  lengths: Sequence[int] | None = None, generator: torch.Generator | None = None) -> PathProfile:
    """Exact and sampled gradient per path length of ``model``'s trunk on one batch (REFERENCE.md section 3).

    Uses :func:`model_cotangent`, then :func:`path_coefficients` (recurrence) and, unless ``samples == 0``,
    :func:`veit_sampling` with ``samples`` subsets per length.

    Raises:
        ValueError: the trunk has no path decomposition (:func:`check_paths`), before anything is computed.
    """
    check_paths(model)
    x0, g = model_cotangent(model, inputs, targets)
    trunk = model.trunk
    n = len(trunk)
    t0 = time.perf_counter()
    coeffs = path_coefficients(trunk, x0, g)
    seconds = {"exact": time.perf_counter() - t0}
    counts = binomial_path_counts(n)
    ks = list(range(n + 1)) if lengths is None else [int(k) for k in lengths]
    passes = {"exact": n + 1}
    veit_mean = veit_total = None
    if samples > 0:
        t0 = time.perf_counter()
        veit_mean = veit_sampling(trunk, x0, g, samples=samples, lengths=ks, generator=generator)
        seconds["veit"] = time.perf_counter() - t0
        veit_total = veit_mean * counts
        passes["veit"] = samples * len(ks)
    return PathProfile(
        lengths=np.arange(n + 1), exact_norm=coeffs.flatten(1).norm(dim=1).numpy(),
        veit_mean=veit_mean, veit_total=veit_total, path_counts=counts,
        full_grad_norm=float(coeffs.sum(0).norm()), backward_passes=passes, seconds=seconds)


def plot_paths(profile: PathProfile, ax: Any = None) -> Any:
    """Plot gradient magnitude per path length, log scale (REFERENCE.md section 3; Veit et al. Fig. 6).

    Draws ``||c_k||`` (exact), Veit's ``mean * C(n, k)`` and mean single-path norm when present. Returns the
    figure (a new one from :func:`reslab.report.plots.new_figure` when ``ax`` is ``None``).
    """
    if ax is None:
        from reslab.report.plots import new_figure  # lazy: pulls matplotlib in with the Agg backend

        fig, ax = new_figure()
    else:
        fig = ax.figure
    k = profile.lengths
    ax.semilogy(k, np.where(profile.exact_norm > 0, profile.exact_norm, np.nan), "o-", ms=3,
                label=r"exact $\|c_k\|$")
    if profile.veit_total is not None and profile.veit_mean is not None:
        ax.semilogy(k, profile.veit_total, "s--", ms=3, label=r"Veit: mean $\times\ C(n,k)$")
        ax.semilogy(k, profile.veit_mean, ":", label="Veit: mean single path")
    ax.set_xlabel("path length k (branches on the path)")
    ax.set_ylabel("gradient norm at trunk input")
    ax.set_title(f"gradient per path length (n = {len(k) - 1}, full {profile.full_grad_norm:.3g})")
    ax.legend(fontsize=8)
    return fig
