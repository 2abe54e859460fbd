"""The responses claim's ablation: the BN scale that sets each block's response."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reslab
from reslab.diagnostics.responses import response_magnitudes
from reslab.experiments.responses import last_bn_scale


def test_last_bn_scale_reads_each_branchs_last_bn_and_is_zero_with_zero_init():
    model = reslab.create_model("mlp8", "identity", num_classes=10, input_shape=(40,), width=4)
    for i, branch in enumerate(model.trunk.branches):
        branch.last_module().weight.data = torch.tensor([3.0, 4.0, 3.0, 4.0]) * (i + 1)
    assert last_bn_scale(model) == pytest.approx([np.sqrt(12.5) * (i + 1) for i in range(3)])
    zero = reslab.create_model("mlp8", "identity", num_classes=10, input_shape=(40,), width=4, zero_init_last=True)
    assert np.all(last_bn_scale(zero) == 0)


def test_a_branch_responds_by_its_bn_scale_when_the_bn_statistics_are_the_batchs():
    """In eval mode with running statistics equal to the batch's, BN's output std per channel is |gamma|."""
    torch.manual_seed(0)
    model = reslab.create_model("mlp8", "plain", num_classes=10, input_shape=(40,), width=16)
    x = torch.randn(4096, 40)
    for m in model.modules():  # running statistics = this batch's (momentum None: cumulative average)
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    for branch in model.trunk.branches:
        branch.last_module().weight.data.uniform_(0.1, 2.0)
    model.train()
    with torch.no_grad():
        model(x)
    assert response_magnitudes(model, x).std == pytest.approx(
        [float(b.last_module().weight.detach().abs().mean()) for b in model.trunk.branches], rel=1e-3)
