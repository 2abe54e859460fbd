"""Helpers shared by the diagnostics: channel axes, batch-statistics handling, error rates."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from reslab.diagnostics.recorder import trunk_of
from reslab.evaluation import errors, eval_mode


def channel_dim(model: nn.Module, i: int) -> int:
    """Axis of the channels of block ``i``'s tensors: 1 for maps ``(N, C, H, W)``, -1 for features."""
    return 1 if trunk_of(model).scheme.specs[i].layout == "conv" else -1


def flat(t: Tensor) -> Tensor:
    """One row per sample: ``(N, C, H, W) -> (N, CHW)``, ``(N, d)`` as it is; token streams ``(N, T, d)`` give one
    row per token, ``(N * T, d)`` (the unit in which transformer stream norms are stated)."""
    return t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t.reshape(t.shape[0], -1)


@torch.no_grad()
def error_rate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2000) -> float:
    """Classification error of ``model`` (eval mode) on prepared inputs ``x``."""
    with eval_mode(model):
        wrong = sum(int(errors(model(x[i:i + batch_size]), y[i:i + batch_size])) for i in range(0, len(y), batch_size))
    return wrong / max(1, y.numel())
