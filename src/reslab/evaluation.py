"""What training, the schemes and every diagnostic share when they run a model aside: eval mode for a while, the
model given back as it was (mode and buffers), and the error count.

    errors(z, y) = #{n : argmax_c z_n[c] != y_n}

over every target: one per sample for a classifier, one per token for a language model (logits ``(N, T, V)``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def eval_mode(model: nn.Module, mode: bool = False) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode (``mode=True``: train mode) and give its mode back after, also on
    error."""
    was = model.training
    model.train(mode)
    try:
        yield model
    finally:
        model.train(was)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run in the model's current mode and give back every buffer (BatchNorm statistics) and the mode after."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.train(training)


def errors(logits: Tensor, y: Tensor) -> Tensor:
    """The number of targets whose top logit is not the label (a 0-dim integer tensor)."""
    return (logits.detach().argmax(-1) != y).sum()
