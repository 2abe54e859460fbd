"""Stream norm per depth and each block's share of the final stream (REFERENCE.md sections 2, 7, 11).

``norm[i]`` is the mean per-sample L2 norm of the stream entering block ``i`` (``norm[L]``: the final stream),
``norm_sq_per_dim[i] = E||x_i||^2 / d``. For each block, ``share[i] = E ||c_i|| / ||x_final||`` and
``projection[i] = E <c_i, x_final> / ||x_final||^2`` where ``c_i`` is the tapped contribution (what was
actually added). For an additive scheme without post-activation the projections of the input and all
contributions add up to 1. Blocks whose contribution has another shape than the final stream, or that add nothing
(DenseNet's concatenation taps no contribution), get NaN; samples (tokens) whose final stream is exactly zero are
left out of the shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from reslab.diagnostics.common import flat
from reslab.diagnostics.recorder import record
from reslab.evaluation import eval_mode


@dataclass
class StreamProfile:
    norm: np.ndarray
    norm_sq_per_dim: np.ndarray
    share: np.ndarray
    projection: np.ndarray

    def plot(self, ax, label: str = "", **kw) -> None:
        ax.plot(np.arange(len(self.norm)), self.norm_sq_per_dim, label=label, **kw)
        ax.set(xlabel="depth (block)", ylabel="E||x||^2 / d")


@torch.no_grad()
def stream_profile(model: nn.Module, x: Tensor) -> StreamProfile:
    """Stream norms and contribution shares of ``model`` (eval mode) on ``x`` (one batch)."""
    with eval_mode(model), record(model, names=("resid_pre", "contribution", "final")) as rec:
        model(x)
    final = flat(rec.get("final")[0]).double()
    streams = [flat(t).double() for t in rec.get("resid_pre")] + [final]
    norm = np.asarray([float(s.norm(dim=1).mean()) for s in streams])
    nsq = np.asarray([float((s * s).sum(1).mean() / s.shape[1]) for s in streams])
    fn2 = (final * final).sum(1)
    live = fn2 > 0  # rows with a zero final stream (a plain net's dead ReLU output) have no shares
    fn2 = fn2[live]
    share, proj = [], []
    for c in rec.by_depth("contribution", len(streams) - 1):
        c = None if c is None else flat(c).double()
        if c is None or c.shape != final.shape:
            share.append(np.nan)
            proj.append(np.nan)
            continue
        share.append(float((c[live].norm(dim=1) / fn2.sqrt()).mean()))
        proj.append(float(((c * final).sum(1)[live] / fn2).mean()))
    return StreamProfile(norm, nsq, np.asarray(share), np.asarray(proj))
