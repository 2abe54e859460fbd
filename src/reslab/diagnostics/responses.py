"""Residual response magnitudes (He et al. 2015, Fig. 7; REFERENCE.md section 1).

The response of block ``i`` is its branch output ``F_i(x)`` (after the branch's last norm, before the addition
and any post-activation). Its magnitude is the standard deviation of each channel over samples (and positions),
averaged over channels. ResNets respond less than plain nets, and deeper ResNets respond less per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from reslab.diagnostics.common import channel_dim
from reslab.diagnostics.recorder import record
from reslab.evaluation import eval_mode


@dataclass
class ResponseProfile:
    """Per-block response std in layer order; ``sorted`` gives them in descending order (Fig. 7, bottom)."""

    std: np.ndarray

    @property
    def sorted(self) -> np.ndarray:
        return np.sort(self.std)[::-1]

    def plot(self, ax, label: str = "", **kw) -> None:
        ax.plot(np.arange(1, len(self.std) + 1), self.std, label=label, **kw)
        ax.set(xlabel="block (layer order)", ylabel="response std")


@torch.no_grad()
def response_magnitudes(model: nn.Module, x: Tensor, batch_size: int = 500) -> ResponseProfile:
    """Measure per-block response std of ``model`` (eval mode) over inputs ``x``, streaming over batches."""

    def moments(name: str, i: int, t: Tensor) -> Tensor:
        d = channel_dim(model, i)
        t = t.movedim(d, -1).reshape(-1, t.shape[d]).double()
        return torch.stack([t.sum(0), (t * t).sum(0), torch.full_like(t[0], t.shape[0])])[None]

    with eval_mode(model), record(model, names=("branch_out",), reduce=moments) as rec:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    stds = []
    for m in rec.get("branch_out"):
        s, s2, n = m.sum(0)
        var = (s2 / n - (s / n) ** 2).clamp_min(0)
        stds.append(float(var.sqrt().mean()))
    return ResponseProfile(np.asarray(stds))
