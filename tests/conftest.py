"""Shared fixtures: small models of every family, built fast."""

from __future__ import annotations

import pytest
import torch

import reslab

# Tiny instances of every family: (model name, family kwargs, input shape).
TINY_FAMILIES = {
    "resnet8": dict(width=4, input_shape=(3, 8, 8)),
    "preact_resnet8": dict(width=4, input_shape=(3, 8, 8)),
    "mlp8": dict(width=8, input_shape=(12,)),
    "preact_mlp8": dict(width=8, input_shape=(12,)),
}


def tiny_model(name: str, residual: str = "identity", **kw) -> reslab.ResidualNet:
    opts = dict(TINY_FAMILIES[name])
    opts.update(kw)
    return reslab.create_model(name, residual, num_classes=5, **opts)


def tiny_input(name: str, batch: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *TINY_FAMILIES[name]["input_shape"], generator=g)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Never touch the user's data cache from tests."""
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
