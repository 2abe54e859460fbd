"""Residual decomposition, direct logit attribution and the logit lens (REFERENCE.md section 11).

The final stream is what every component wrote: ``x_final = sum_c contribution_c`` over the embedding ``x0``
and every branch, where a contribution is what was *actually* added: after gates and scales, through the
depth weights of Attention Residuals and DenseFormer, through the stream matrices of hyper-connections. The
scheme replays its own rule on the recorded tensors (:meth:`ResidualScheme.decompose`), so the decomposition is
right for every scheme and sums exactly to the final stream; schemes that renormalise the stream after each
sublayer (Post-LN, DeepNorm) have no such decomposition and say so.

- :func:`decompose`: the contributions, their shares of the final stream, their projections onto it and their
  pairwise cosines; :func:`share_under_cosine`: the share that equal-norm contributions of a given mean pairwise
  cosine have (``K^-1/2`` when orthogonal, ``1/K`` when coherent).
- :func:`direct_logit_attribution`: each component's direct effect on a target logit, through the head's final
  norm with its scale frozen from the full forward pass (the terms add up to the logit exactly).
- :func:`logit_lens`: decode every intermediate stream with the model's own head (final norm + unembedding);
  KL divergence to the final distribution and loss per depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor, nn

from reslab.branch import layer_of
from reslab.diagnostics.common import flat
from reslab.diagnostics.recorder import record, trunk_of
from reslab.evaluation import eval_mode
from reslab.losses import loss_fn
from reslab.norms import RMSNorm


@dataclass
class Decomposition:
    """Contributions of ``[x0, branch_0, ..., branch_{L-1}]`` to the final stream.

    Attributes:
        components: ``(1 + L, *final.shape)``; ``components.sum(0) == final``.
        final: the trunk's output.
        sources: ``[x0, out_0, ..., out_{L-1}]``, what each component started as (the raw branch outputs).
    """

    components: Tensor
    final: Tensor
    sources: list[Tensor]

    def _live_rows(self) -> tuple[Tensor, Tensor]:
        """The components ``(K, R, D)`` and the final stream ``(R, D)``, one row per sample (per token for token
        streams, :func:`~reslab.diagnostics.common.flat`), in float64, on the rows whose final stream is not
        exactly zero (e.g. a plain net's dead ReLU output): those have no shares and are left out everywhere."""
        f = flat(self.final).double()
        live = f.norm(dim=1) > 0
        return torch.stack([flat(c).double()[live] for c in self.components]), f[live]

    def shares(self) -> np.ndarray:
        """``E ||c_j|| / ||x_final||`` per component (per sample, or per token for token streams; rows whose final
        stream is exactly zero are left out)."""
        c, f = self._live_rows()
        return (c.norm(dim=2) / f.norm(dim=1)).mean(1).numpy()

    def weights(self) -> np.ndarray:
        """``E ||c_j|| / ||v_j||``: the weight each component gets in the final stream relative to its raw source
        (exactly 1 for every component of the standard residual)."""
        return np.asarray([float((c.double().norm(dim=-1) / v.double().norm(dim=-1).clamp_min(1e-30)).mean())
                           for c, v in zip(self.components, self.sources)])

    def projections(self) -> np.ndarray:
        """``E <c_j, x_final> / ||x_final||^2``: the fraction of the final stream each component explains
        (they add up to 1; rows with a zero final stream are left out, as in :meth:`shares`)."""
        c, f = self._live_rows()
        return ((c * f).sum(2) / (f * f).sum(1)).mean(1).numpy()

    def cosines(self) -> np.ndarray:
        """The ``(K, K)`` matrix ``E cos(c_i, c_j) = E <c_i, c_j> / (||c_i|| ||c_j||)`` between the components'
        contributions, averaged over rows (the rows of :meth:`shares`: per token for token streams, per sample
        otherwise; rows whose final stream is zero are left out). A contribution that is exactly zero on a row has
        no direction: its cosines there count as 0 (it adds no cross term to ``||x_final||^2``)."""
        c, _ = self._live_rows()
        u = c / c.norm(dim=2, keepdim=True).clamp_min(1e-300)
        return torch.einsum("ird,jrd->ij", u, u).div(c.shape[1]).numpy()

    def pairwise_cosine(self) -> float:
        """The mean pairwise cosine between the ``K`` contributions, over rows and over the pairs ``i != j``:

        ``rho = E_rows [ 1 / (K (K - 1)) sum_{i != j} <c_i, c_j> / (||c_i|| ||c_j||) ]``

        It decides how the shares dilute with ``K`` (:func:`share_under_cosine`): ``rho = 0`` (near-orthogonal
        contributions) gives ``K^-1/2``, ``rho = 1`` (coherent ones) gives ``1/K``.
        """
        m, k = self.cosines(), len(self.components)
        return float((m.sum() - np.trace(m)) / (k * (k - 1))) if k > 1 else float("nan")

    def share_from_cosine(self, rho: float | None = None) -> float:
        """The mean share :meth:`shares` predicts when every pairwise cosine is replaced by one mean ``rho``
        (default: the measured :meth:`pairwise_cosine`), keeping each row's measured norms ``n_j = ||c_j||``:

        ``||x_final||^2 = sum_{i, j} n_i n_j cos_ij ~ sum_j n_j^2 + rho ((sum_j n_j)^2 - sum_j n_j^2)``,
        ``share = E_rows [ (1/K) sum_j n_j / ||x_final|| ]``

        With equal norms this is :func:`share_under_cosine`; the norms' spread lowers it (``rho = 0`` gives
        ``K^-1/2 mean(n) / rms(n)``). Matching the measured mean share, it says the cosine is what sets the law.
        """
        rho = self.pairwise_cosine() if rho is None else rho
        n = self._live_rows()[0].norm(dim=2)
        s1, s2 = n.sum(0), n.pow(2).sum(0)
        return float((s1 / len(n) / (s2 + rho * (s1 * s1 - s2)).sqrt()).mean())

    def labels(self, model: nn.Module) -> list[str]:
        """``embed``, then ``attn0, mlp0, attn1, ...`` for transformers or ``block0, block1, ...``."""
        return ["embed"] + branch_labels(model)


def branch_labels(model: nn.Module) -> list[str]:
    """A name per branch: ``attn0, mlp0, attn1, ...`` for transformers (role and layer), else ``block0, ...``."""
    specs = trunk_of(model).scheme.specs
    return [f"{s.role or 'block'}{k}" for s, k in zip(specs, layer_of(specs))]


def share_under_cosine(k: ArrayLike, rho: ArrayLike) -> np.ndarray:
    """The share of the final stream each of ``K`` equal-norm contributions has when their mean pairwise cosine
    is ``rho`` (pass the measured :meth:`Decomposition.pairwise_cosine` for the equal-norm model's prediction):

    ``||sum_j c_j||^2 = sum_{i, j} <c_i, c_j> = K n^2 (1 + (K - 1) rho)``, so
    ``share = n / ||sum_j c_j|| = 1 / sqrt(K (1 + (K - 1) rho))``:

    ``K^-1/2`` for orthogonal contributions (``rho = 0``), ``1/K`` for identical ones (``rho = 1``); the
    coherent term ``(K - 1) rho`` against 1 says which law holds.
    """
    k, rho = np.asarray(k, dtype=float), np.asarray(rho, dtype=float)
    return 1 / np.sqrt(k * (1 + (k - 1) * rho))


@torch.no_grad()
def decompose(model: nn.Module, x: Tensor) -> Decomposition:
    """Decompose ``model``'s final stream on input batch ``x`` (eval mode) into per-component contributions.

    Raises:
        ValueError: the scheme has no exact decomposition (it renormalises the stream after combining).
    """
    trunk = trunk_of(model)
    with eval_mode(model):
        x0 = model.stem(x)
        with record(trunk, names=("branch_out", "mix", "final")) as rec:
            trunk(x0)
    mix = rec.by_depth("mix", len(trunk) + 1)
    if trunk.scheme.capabilities.mix_per_forward:  # one forward pass: its parameter-shaped weights
        mix = [None if m is None else m[0] for m in mix]
    outs = rec.get("branch_out")
    return Decomposition(trunk.scheme.decompose(x0, outs, mix), rec.get("final")[0], [x0, *outs])


def _frozen_norm(norm: nn.Module, x: Tensor) -> tuple[bool, Tensor, Tensor | None]:
    """A head norm's action frozen at the stream ``x``: ``norm(z) = (z - [mean z]) * scale + bias``.

    Returns ``(centred, scale, bias)``; a component ``c`` then maps to ``(c - [mean c]) * scale``, and the terms
    of all components plus ``bias`` add up to ``norm(x)``.
    """
    if isinstance(norm, nn.LayerNorm):
        scale = (x.var(-1, keepdim=True, unbiased=False) + norm.eps).rsqrt()
        return True, scale if norm.weight is None else scale * norm.weight, norm.bias
    if isinstance(norm, RMSNorm):
        scale = x.pow(2).mean(-1, keepdim=True).add(norm.eps).rsqrt()
        return False, scale if norm.weight is None else scale * norm.weight, None
    if isinstance(norm, nn.Identity):
        return False, torch.ones((), device=x.device), None
    raise ValueError(f"direct logit attribution cannot freeze a {type(norm).__name__} head norm")


@torch.no_grad()
def direct_logit_attribution(model: nn.Module, x: Tensor, target: Tensor) -> tuple[np.ndarray, float]:
    """Each component's direct effect on the ``target`` logit (language models: ``target`` ``(N, T)`` token ids).

    ``logit_t = sum_c W_U[t] . norm_frozen(c) + W_U[t] . bias``: the final norm's centring and scale are taken
    from the full forward pass, so the per-component terms plus the bias term add up to the logit exactly.

    Returns:
        ``(terms, bias_term)``: ``terms[j]`` is the mean over tokens of component ``j``'s direct effect.
    """
    dec = decompose(model, x)
    head = model.head
    if not (hasattr(head, "norm") and hasattr(head, "unembed")):
        raise ValueError("direct logit attribution needs a head with a final norm and an unembedding (gpt family)")
    centred, scale, bias = _frozen_norm(head.norm, dec.final)
    w = head.unembed.weight[target]  # (N, T, d)
    terms = []
    for c in dec.components:
        if centred:
            c = c - c.mean(-1, keepdim=True)
        terms.append(float(((c * scale) * w).sum(-1).mean()))
    bias_term = float((bias * w).sum(-1).mean()) if bias is not None else 0.0
    return np.asarray(terms), bias_term


@dataclass
class LensProfile:
    """Logit lens per depth: index 0 decodes the embedding, index ``i + 1`` the stream after branch ``i``.

    Attributes:
        kl: mean KL(final distribution || depth distribution) per target (sample or token), in nats.
        loss: mean cross-entropy of the decoded distribution against the targets (NaN without targets, and NaN
            at depths whose stream has another shape than the final one).
    """

    kl: np.ndarray
    loss: np.ndarray

    def plot(self, ax, label: str = "", **kw) -> None:
        """The loss per depth (the KL to the final distribution when there were no targets)."""
        has_loss = bool(np.isfinite(self.loss).any())
        ax.plot(np.arange(len(self.kl)), self.loss if has_loss else self.kl, label=label, **kw)
        ax.set(xlabel="depth (sublayer)", ylabel="loss of the decoded stream (nats)" if has_loss
               else "KL(final || decoded stream) (nats)")


@torch.no_grad()
def logit_lens(model: nn.Module, x: Tensor, target: Tensor | None = None) -> LensProfile:
    """Decode the stream at every depth with the model's own head (nostalgebraist 2020, "logit lens").

    The loss is the training loss (:func:`reslab.train.loss_fn`, nats per target). Streams whose shape differs
    from the final stream's (the earlier stages of a CNN that grows its channels) cannot be decoded: NaN there.
    """
    trunk = trunk_of(model)
    with eval_mode(model):
        with record(trunk, names=("resid_pre", "final")) as rec:
            logits = model(x)
        streams = rec.get("resid_pre") + rec.get("final")
        final_logp = F.log_softmax(logits.float(), -1)
        kl, loss = [], []
        for s in streams:
            if s.shape != streams[-1].shape:  # an earlier stage of a network that changes width: no decoding
                kl.append(float("nan"))
                loss.append(float("nan"))
                continue
            logits_s = model.head(s)
            logp = F.log_softmax(logits_s.float(), -1)
            kl.append(float(F.kl_div(logp, final_logp, log_target=True, reduction="none").sum(-1).mean()))
            loss.append(float(loss_fn(logits_s, target)) if target is not None else float("nan"))
    return LensProfile(np.asarray(kl), np.asarray(loss))
