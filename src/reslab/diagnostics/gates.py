"""Highway gate statistics (Srivastava et al. 2015, section 4; REFERENCE.md section 4).

From the ``mix`` tap of a gated scheme: the mean transform-gate value ``T`` per layer, its distribution
(histogram per layer) and its mean per class. ``T`` near 0 means "carry" (the branch is closed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from reslab.diagnostics.common import flat
from reslab.diagnostics.recorder import record, trunk_of
from reslab.evaluation import eval_mode
from reslab.residuals.base import GATE_MIX


@dataclass
class GateProfile:
    mean: np.ndarray          # (L,)
    hist: np.ndarray          # (L, bins): fraction of gate values per bin
    bins: np.ndarray          # (bins + 1,) edges on [0, 1]
    per_class: np.ndarray     # (L, classes)

    def plot(self, ax, **kw) -> None:
        ax.imshow(self.hist.T, origin="lower", aspect="auto", extent=(0.5, len(self.mean) + 0.5, 0, 1), **kw)
        ax.plot(np.arange(1, len(self.mean) + 1), self.mean, color="w")
        ax.set(xlabel="layer", ylabel="gate T")


def check_gates(model: nn.Module) -> None:
    """Raise ``ValueError`` (one line) unless ``model``'s scheme has highway gates (``mix_shape`` is a gate)."""
    if trunk_of(model).scheme.capabilities.mix_shape != GATE_MIX:
        raise ValueError(f"scheme {trunk_of(model).scheme.name!r} has no highway gates to measure")


@torch.no_grad()
def gate_profile(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, bins: int = 20) -> GateProfile:
    """Gate statistics of a gated scheme on ``(x, y)`` (eval mode).

    ``per_class`` averages the gates by target class: one target per sample for classifiers, one per token for
    language models (targets ``(N, T)``, each token's gate row goes to the class of its next token).
    """
    check_gates(model)
    with eval_mode(model), record(model, names=("mix",)) as rec:
        model(x)
    edges = np.linspace(0, 1, bins + 1)
    means, hists, per_class = [], [], []
    targets = y.reshape(-1)  # one target per row of flat(): per sample, or per token for (N, T) targets
    for t in rec.get("mix"):
        t = flat(t).double()
        means.append(float(t.mean()))
        hists.append(np.histogram(t.numpy().ravel(), bins=edges)[0] / t.numel())
        per_sample = t.mean(1)
        per_class.append([float(per_sample[targets == c].mean()) if (targets == c).any() else np.nan
                          for c in range(num_classes)])
    return GateProfile(np.asarray(means), np.asarray(hists), edges, np.asarray(per_class))
