"""Shared fixtures: small models of every family, built fast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reslab

# Tiny instances of every family: (model name, family kwargs, input shape).
TINY_FAMILIES = {
    "resnet8": dict(width=4, input_shape=(3, 8, 8)),
    "preact_resnet8": dict(width=4, input_shape=(3, 8, 8)),
    "mlp8": dict(width=8, input_shape=(12,)),
    "preact_mlp8": dict(width=8, input_shape=(12,)),
    "gpt2": dict(d_model=8, n_heads=2, input_shape=(7,)),
    "densenet10": dict(growth=4, input_shape=(3, 8, 8)),  # two dense layers per block: block 1 is a layer
    "densenet_bc16": dict(growth=4, input_shape=(3, 8, 8)),
}
NUM_CLASSES = 5  # also the vocabulary of the tiny language models


def tiny_model(name: str, residual: str | None = None, **kw) -> reslab.ResidualNet:
    """A tiny instance of family ``name`` with ``residual`` (default: the family's, ``identity`` but for DenseNet)."""
    opts = dict(TINY_FAMILIES[name])
    opts.update(kw)
    return reslab.create_model(name, residual, num_classes=NUM_CLASSES, **opts)


def is_lm(name: str) -> bool:
    return name.startswith("gpt")


def only_residuals(name: str) -> tuple[str, ...]:
    """The only schemes family ``name`` works with (DenseNet: ``concat``); empty for the additive families."""
    return reslab.models.parse_model_name(name)[0].residuals


class TanhBranch(nn.Module):
    """A fixed, known per-token branch for equation tests: ``F(x) = tanh(x W^T)``, ``W`` drawn from ``seed``."""

    def __init__(self, seed: int, dim: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g) / math.sqrt(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w.T)


def tiny_input(name: str, batch: int = 6, seed: int = 0) -> torch.Tensor:
    """Random inputs: token ids for language models, standard normal values otherwise."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *TINY_FAMILIES[name]["input_shape"])
    if is_lm(name):
        return torch.randint(0, NUM_CLASSES, shape, generator=g)
    return torch.randn(*shape, generator=g)


def tiny_output_shape(name: str, batch: int = 6) -> tuple[int, ...]:
    """Logits: ``(batch, classes)``, or ``(batch, context, vocab)`` for language models."""
    if is_lm(name):
        return (batch, *TINY_FAMILIES[name]["input_shape"], NUM_CLASSES)
    return (batch, NUM_CLASSES)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Never touch the user's data cache from tests, nor find a CIFAR archive of theirs (which would switch the conv
    claims' full profile to CIFAR-10)."""
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path_factory.getbasetemp() / "no-data"))
