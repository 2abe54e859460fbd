"""The one loss of reslab, for training and for every diagnostic that differentiates it.

    L = -(1/N) sum_n log softmax(z_n)[y_n]

in nats and in float32, over every target: one per sample for a classifier (logits ``(N, C)``, labels ``(N,)``),
one per token for a language model (logits ``(N, T, V)``, next-token targets ``(N, T)``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def loss_fn(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy in nats, in float32: logits ``(N, C)`` with labels ``(N,)``, or a language model's
    ``(N, T, V)`` with next-token targets ``(N, T)`` (one term per token)."""
    return F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction=reduction)
