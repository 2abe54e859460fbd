"""DenseFormer: depth-weighted averaging (DWA) of every earlier layer output after each layer.

Pagliardini et al. 2024 (arXiv 2402.02622), eq. (1)-(2) (REFERENCE.md section 10). With ``X_0`` the stem
output (the embedding) and ``B_i`` the ``i``-th *layer*::

    X_i = B_i(Y_{i-1}),    Y_i = sum_{j in S_i} alpha_{i,j} X_j,    Y_0 = X_0,    output Y_L

with scalar weights ``alpha_{i,j}`` initialised to ``alpha_{i,i} = 1`` and ``0`` elsewhere, so that at
initialisation the net is exactly the standard (Pre-LN) transformer. A layer is what
:func:`reslab.branch.layer_of` says: on a transformer an attention and an MLP sublayer, joined by the ordinary
additive residual ``x + F(N(x))`` (Pre-LN); on families without roles (MLPs) each branch is its own layer.
The DWA step runs after the last branch of each layer.

Sparse variants (the "k x p DenseFormer" of section 3.2, checked against the authors' ``DWAModules``):

- dilation ``k``: ``S_i = {j <= i : j = i (mod k)}`` (``floor(i/k) + 1`` weights); ``k = 1`` is dense;
- period ``p``: a DWA step only after layers ``i`` with ``p | i``; elsewhere ``Y_i = X_i`` (no weights).

State: ``(history, y)`` with ``history = (X_0, ..., X_i)`` the raw layer outputs (before averaging) and ``y``
the running stream (``Y_i``, or the partial sum inside a layer); :meth:`stream` is ``y``. Taps: ``mix`` emits
``alpha_i`` (1-D, over ``S_i`` in increasing ``j``) at the index of layer ``i``'s last branch, only where a DWA
step happens; ``contribution`` emits each branch's additive term. Lesion: deleting branch ``i`` removes its
additive term only; the DWA step at a layer end still runs (on what the layer holds without that branch).
:meth:`dwa_matrix` gives the weights as an ``(L+1) x (L+1)`` lower-triangular matrix for heatmaps.

Args:
    dilation: ``k >= 1``.
    period: ``p >= 1``.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reslab.branch import BranchSpec, layer_of
from reslab.residuals.base import Capabilities, ResidualScheme, Tap, register_residual

State = tuple[tuple[Tensor, ...], Tensor]


def dwa_sources(i: int, dilation: int = 1) -> list[int]:
    """``S_i``: the layer outputs ``X_j`` that the DWA step after layer ``i`` averages, in increasing ``j``."""
    return [j for j in range(i + 1) if (i - j) % dilation == 0]


@register_residual("denseformer", paper="Pagliardini et al. 2024, arXiv 2402.02622")
class DenseFormer(ResidualScheme):
    """``X_i = B_i(Y_{i-1})``, ``Y_i = sum_{j in S_i} alpha_{i,j} X_j``; inside a layer ``x + F(N(x))``."""

    capabilities = Capabilities(shape_change=False, keeps_history=True, exposes_mixing=True,
                                uses_shortcut=False, mix_shape=("sources",))  # alpha_i, at each layer end
    norm_placements = ("none", "pre")

    def __init__(self, specs: Sequence[BranchSpec], dilation: int = 1, period: int = 1, **kw: Any) -> None:
        super().__init__(specs, **kw)
        for name, v in (("dilation", dilation), ("period", period)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"denseformer: {name} must be an integer >= 1, got {v!r}")
        self.dilation, self.period = int(dilation), int(period)
        layers = layer_of(self.specs)
        self.n_layers = layers[-1] + 1
        #: branch index -> 1-based layer i, for the branches that close a layer
        self.layer_end = {b: layers[b] + 1 for b in range(len(layers))
                          if b == len(layers) - 1 or layers[b + 1] != layers[b]}
        self.alphas = nn.ParameterDict({
            str(i): nn.Parameter(self._init_alpha(i)) for i in range(1, self.n_layers + 1) if self.has_dwa(i)})

    def _init_alpha(self, i: int) -> Tensor:
        a = torch.zeros(len(dwa_sources(i, self.dilation)))
        a[-1] = 1.0  # alpha_{i,i} = 1: the identity
        return a

    def has_dwa(self, i: int) -> bool:
        """Whether a DWA step follows layer ``i`` (1-based): ``p | i``."""
        return i % self.period == 0

    def alpha(self, i: int) -> Tensor | None:
        """The DWA weights after layer ``i`` (over :func:`dwa_sources`), or ``None`` where there is no step."""
        return self.alphas[str(i)] if self.has_dwa(i) else None

    # --- the protocol ------------------------------------------------------------------------
    def begin(self, x0: Tensor) -> State:
        return (x0,), x0

    def read(self, state: State, i: int, tap: Tap | None = None) -> Tensor:
        return self.norm_in(i, state[1])

    def write(self, state: State, i: int, out: Tensor, h: Tensor, tap: Tap | None = None) -> State:
        history, y = state
        c = self.norm_out(i, out)
        if tap is not None:
            tap("contribution", i, c)
        return self._close(history, self.finish(i, y + c), i, tap)

    def skip(self, state: State, i: int) -> State:
        return self._close(*state, i)

    def _close(self, history: tuple[Tensor, ...], x: Tensor, b: int, tap: Tap | None = None) -> State:
        """After branch ``b``: at a layer end keep ``X_i = x`` and take the DWA step, else carry on."""
        if b not in self.layer_end:
            return history, x
        history = history + (x,)
        i = len(history) - 1  # layers closed so far (the position, also under a custom block order)
        a = self.alpha(i)
        if a is None:
            return history, x
        if tap is not None:
            tap("mix", b, a)
        src = dwa_sources(i, self.dilation)
        y = a[0] * history[src[0]]
        for m in range(1, len(src)):
            y = y + a[m] * history[src[m]]
        return history, y

    def end(self, state: State, tap: Tap | None = None) -> Tensor:
        return state[1]

    def stream(self, state: State) -> Tensor:
        return state[1]

    def decompose(self, x0: Tensor, outs: Sequence[Tensor], mix: Sequence[Tensor | None]) -> Tensor:
        """Replay on coefficient vectors: every ``X_j`` and the running stream are ``sum_c w_c comp_c`` over the
        components ``[x0, out_0, ...]``; a DWA step mixes the vectors with ``alpha_i`` (``mix[b]``, or the
        current weights where nothing was recorded)."""
        self._check_linear()
        comps = torch.stack([x0, *(self.norm_out(b, o) for b, o in enumerate(outs))])
        eye = torch.eye(len(comps), dtype=x0.dtype, device=x0.device)
        history, y = [eye[0]], eye[0]
        for b in range(len(outs)):
            y = y + eye[1 + b]
            if b not in self.layer_end:
                continue
            history.append(y)
            i = len(history) - 1
            if not self.has_dwa(i):
                continue
            a = mix[b] if b < len(mix) and mix[b] is not None else self.alpha(i)
            a = a.to(dtype=x0.dtype, device=x0.device)
            y = sum(a[m] * history[j] for m, j in enumerate(dwa_sources(i, self.dilation)))
        return y.view(-1, *[1] * x0.dim()) * comps

    # --- inspection --------------------------------------------------------------------------
    def connectivity(self) -> Tensor:
        """``(L+1, L+1)`` booleans: ``[i, j]`` is True where ``Y_i`` reads ``X_j`` (row 0 and rows without a
        DWA step read only the diagonal)."""
        n = self.n_layers + 1
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            if self.has_dwa(i):
                mask[i, dwa_sources(i, self.dilation)] = True
        return mask

    @torch.no_grad()
    def dwa_matrix(self) -> Tensor:
        """The learned weights as an ``(L+1, L+1)`` lower-triangular matrix, ``[i, j] = alpha_{i,j}``.

        Row 0 is ``Y_0 = X_0``; rows without a DWA step (period) are ``Y_i = X_i`` (1 on the diagonal);
        weights that the dilation leaves out are 0 (see :meth:`connectivity` to tell them from learned 0s).
        """
        n = self.n_layers + 1
        m = torch.eye(n)
        for i in range(1, n):
            a = self.alpha(i)
            if a is not None:
                m[i, i] = 0.0
                m[i, dwa_sources(i, self.dilation)] = a.detach().float().cpu()
        return m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={self.n_layers}, dilation={self.dilation}, period={self.period}"
