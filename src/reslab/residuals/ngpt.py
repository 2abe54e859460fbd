"""nGPT: the residual stream on the unit hypersphere, moved by learned per-dimension step sizes.

Loshchilov, Hsieh, Sun & Ginsburg 2024, "nGPT: Normalized Transformer with Representation Learning on the
Hypersphere" (arXiv 2410.01131), section 2. Every token's stream is a unit vector; each sublayer pulls it towards
its own normalised output and the result is put back on the sphere::

    h_A = Norm(ATTN(h)),   h <- Norm(h + alpha_A * (h_A - h))      (attention sublayers, role "attn")
    h_M = Norm(MLP(h)),    h <- Norm(h + alpha_M * (h_M - h))      (MLP sublayers, role "mlp")

``Norm(x) = x / ||x||_2`` over the embedding dimension (not LayerNorm: no centring, no gain; the result has norm 1,
not ``sqrt(d)``) and ``*`` is elementwise. ``alpha_A, alpha_M in R^d`` are the "eigen learning rates", one vector
per sublayer. They are stored in the paper's scaled form (section 2.5): the trained parameter starts at
``alpha_scale`` and the rule uses ``alpha = param * (alpha_init / alpha_scale)``, so that Adam moves ``alpha`` with
an effective step ``alpha_init / alpha_scale`` times the global one; the paper's values are ``alpha_init = 0.05``
("of order 1/n_layers") and ``alpha_scale = 1/sqrt(d)``. ``alpha = 0`` keeps the stream, ``alpha = 1`` replaces it
by the branch's direction. ``begin`` normalises the stem output, ``h_0 = Norm(x_0)``.

Weights on the sphere. nGPT keeps every matrix unit-norm along the embedding dimension, re-normalised after every
optimiser step. This scheme does it for the branch weights it is given by role
(:func:`reslab.branch.weights_by_role`), in :meth:`NGPT.bind` (at init) and in :meth:`NGPT.after_optimizer_step`
(called by the training loop after each step): matrices that read the stream (``query``, ``key``, ``value`` and
``ffn`` weights that are not ``out``) get unit rows in ``R^d`` (``nn.Linear`` weight ``(k, d)``, normalised over
dim 1); matrices that write to it (``out``: attention projection and the MLP's second layer) get unit columns in
``R^d`` (weight ``(d, k)``, normalised over dim 0), as in the authors' code.

What this scheme covers, and what it leaves out. It implements the update rule above, the unit-norm stream
(normalised stem output), the eigen learning rates with their init/scale parametrisation, and the normalisation of
the branch weight matrices. Everything else nGPT changes lives in the model family (``reslab.models.gpt``), which
this scheme does not touch, so ``gpt`` + ``ngpt`` is NOT the paper's nGPT:

- attention: nGPT normalises q and k per head, scales them by a learned ``s_qk`` and uses the softmax scale
  ``sqrt(d_k)`` instead of ``1/sqrt(d_k)``; the GPT family's attention does none of this. With unit-norm rows and a
  unit-norm stream the queries and keys have entries of order ``1/sqrt(d)``, so its attention is close to uniform
  (logit std about 0.008 at init for ``d = 128``, 4 heads) and its logits can never exceed ``sqrt(d_k)``;
- MLP: nGPT uses SwiGLU with learned ``s_u``, ``s_v`` (and ``sqrt(d)`` on the gate); the family's GELU MLP is used
  as it is, and its pre-activations stay within ``[-1, 1]``;
- embeddings and head: nGPT normalises the input and output embedding matrices after each step (here only their
  output is normalised, by ``begin``: the same values for token embeddings, not the same training dynamics; added
  learned positions are normalised together with the token, use ``positions="rotary"`` for the paper's RoPE) and
  scales the logits by a learned ``s_z`` with no final norm (the family's head keeps its final norm unless
  ``final_norm="none"``);
- training: the paper uses no weight decay and no warm-up (set ``weight_decay=0`` in the run's config).

No norm placement applies (the branches read ``h`` itself); deleting a sublayer (a lesion) leaves ``h`` unchanged.
The stream is not a sum of components, so there is no decomposition.

Args:
    alpha_init: ``alpha_init`` of every sublayer (the value each ``alpha`` entry starts at).
    alpha_scale: the stored parameter's initial value, a positive number or ``"1/sqrt(d)"``.
    positive: use ``|alpha|``, as the authors' code does, so that a step size cannot turn negative.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import BranchSpec, weights_by_role
from reslab.residuals.base import AdditiveScheme, Capabilities, ResidualScheme, register_residual

#: roles of the weights that read the stream (unit rows) and write to it (unit columns)
READ_ROLES = ("query", "key", "value", "ffn")
WRITE_ROLES = ("out",)


def sphere(x: Tensor, dim: int = -1) -> Tensor:
    """``x / ||x||_2`` along ``dim`` (a zero vector stays zero)."""
    return F.normalize(x, p=2.0, dim=dim)


@register_residual("ngpt", paper="Loshchilov et al. 2024 (nGPT), arXiv 2410.01131")
class NGPT(AdditiveScheme):
    """``h <- Norm(h + alpha_i * (Norm(F_i(h)) - h))`` on a unit-norm stream, weights kept unit-norm."""

    capabilities = Capabilities(shape_change=False, uses_shortcut=False, needs_roles=("attn", "mlp"))
    default_norm = "none"
    norm_placements = ("none",)
    post_ops = ("none",)

    def __init__(self, specs: Sequence[BranchSpec], alpha_init: float = 0.05, alpha_scale: float | str = "1/sqrt(d)",
                 positive: bool = False, **kw) -> None:
        super().__init__(specs, **kw)
        if any(s.layout != "features" for s in self.specs):
            raise ValueError("residual scheme 'ngpt' needs feature streams (tokens): it normalises each token's "
                             "vector onto the unit sphere")
        d = self.specs[0].out_dim
        if not _finite(alpha_init):
            raise ValueError(f"ngpt: alpha_init must be a finite number, got {alpha_init!r}")
        if isinstance(alpha_scale, str):
            if alpha_scale.replace(" ", "") != "1/sqrt(d)":
                raise ValueError(f"ngpt: alpha_scale must be a positive number or '1/sqrt(d)', got {alpha_scale!r}")
            alpha_scale = 1.0 / math.sqrt(d)
        elif not _finite(alpha_scale) or alpha_scale <= 0:
            raise ValueError(f"ngpt: alpha_scale must be a positive number or '1/sqrt(d)', got {alpha_scale!r}")
        if not isinstance(positive, bool):
            raise ValueError(f"ngpt: positive must be True or False, got {positive!r}")
        self.d, self.alpha_init, self.alpha_scale, self.positive = d, float(alpha_init), float(alpha_scale), positive
        #: the stored eigen learning rates, one row per sublayer, in the paper's scaled form (see :meth:`alpha`)
        self.alphas = nn.Parameter(torch.full((len(self.specs), d), self.alpha_scale))
        self._branches: tuple[nn.Module, ...] = ()  # bound by :meth:`bind` (a tuple: not registered twice)

    # --- the rule ------------------------------------------------------------------------------
    def alpha(self, i: int) -> Tensor:
        """Sublayer ``i``'s step sizes ``alpha_i = param_i * alpha_init / alpha_scale`` (``|.|`` with ``positive``)."""
        a = self.alphas[i] * (self.alpha_init / self.alpha_scale)
        return a.abs() if self.positive else a

    def begin(self, x0: Tensor) -> Tensor:
        """``h_0 = Norm(x_0)``: the stem output on the unit sphere."""
        return sphere(x0)

    def skip(self, state: Tensor, i: int) -> Tensor:
        return state

    def contribution(self, out: Tensor, h: Tensor, i: int) -> Tensor:
        return self.alpha(i) * (sphere(out) - h)

    def finish(self, i: int, y: Tensor) -> Tensor:
        """Back onto the sphere: ``Norm(y)``."""
        return sphere(y)

    def equation(self, x: Tensor, fx: Tensor, i: int) -> Tensor:
        """``x + alpha_i * (fx / ||fx|| - x)``: the update before the final ``Norm`` (:meth:`finish`)."""
        a = self.alphas[i] * (self.alpha_init / self.alpha_scale)
        if self.positive:
            a = a.abs()
        return x + a * (fx / fx.norm(dim=-1, keepdim=True) - x)

    decompose = ResidualScheme.decompose  # a renormalised stream is no sum of components

    # --- weights on the sphere -----------------------------------------------------------------
    def bind(self, branches: Sequence[nn.Module]) -> None:
        """Keep the branches (their weights are re-normalised after each optimiser step) and normalise them now.

        Raises:
            ValueError: a weight with a role whose embedding axis is not of the stream's width.
        """
        self._branches = tuple(branches)
        for w, dim in self._sphere_weights():
            if w.dim() != 2 or w.shape[dim] != self.d:
                raise ValueError(f"ngpt: a branch weight of shape {tuple(w.shape)} has no axis {dim} of the stream's "
                                 f"width {self.d} to normalise")
        self.after_optimizer_step()

    def _sphere_weights(self) -> list[tuple[Tensor, int]]:
        """Each bound weight with the axis it is normalised over: writers over dim 0, readers over dim 1."""
        writers = weights_by_role(self._branches, *WRITE_ROLES)
        written = {(w.data_ptr(), tuple(w.shape)) for w in writers}
        readers = [w for w in weights_by_role(self._branches, *READ_ROLES)
                   if (w.data_ptr(), tuple(w.shape)) not in written]
        return [(w, 0) for w in writers] + [(w, 1) for w in readers]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put every bound weight back on the sphere along its embedding axis (the training loop calls this after
        each optimiser step)."""
        for w, dim in self._sphere_weights():
            w.copy_(sphere(w, dim))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, alpha_init={self.alpha_init:g}, alpha_scale={self.alpha_scale:.4g}, "
                f"positive={self.positive}")


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
