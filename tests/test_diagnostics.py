"""Diagnostics on cases with known answers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.gates import gate_profile
from reslab.diagnostics.gradients import gradient_profile
from reslab.diagnostics.lesion import kendall_tau, lesion_random, lesion_reorder, lesion_single, random_swaps
from reslab.diagnostics.responses import response_magnitudes
from reslab.diagnostics.stream import stream_profile
from reslab.diagnostics.update_size import effective_update_size, update_sizes
from reslab.models.base import ResidualNet

D = 5


def linear_net(scheme="identity", n=4, d=D, seed=0, **kw) -> ResidualNet:
    """logits = trunk(x): a residual net of fixed linear blocks, stem and head the identity."""
    torch.manual_seed(seed)
    branches = [nn.Linear(d, d, bias=False) for _ in range(n)]
    for b in branches:
        nn.init.normal_(b.weight, std=0.3)
    trunk = Trunk(branches, create_residual(scheme, [BranchSpec(d, d, 1, "features")] * n, **kw))
    return ResidualNet(nn.Identity(), trunk, nn.Identity(), {})


def test_gradient_norms_match_the_closed_form():
    net = linear_net(n=4)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, D, (7,), generator=torch.Generator().manual_seed(2))
    out = net(x).detach()
    g = (F.softmax(out, 1) - F.one_hot(y, D).float()) / len(y)  # dL/dlogits of the mean cross-entropy
    expected = []
    for i in range(4):  # dL/dx_i = g (I + A_{n-1}) ... (I + A_i)
        m = torch.eye(D)
        for j in range(i, 4):
            m = (torch.eye(D) + net.trunk.branches[j].weight.detach()) @ m
        expected.append(float((g @ m).norm()))
    prof = gradient_profile(net, x, y)
    np.testing.assert_allclose(prof.stream, expected, rtol=1e-5)
    xin = x
    for j in range(3):
        xin = xin + net.trunk.branches[j](xin)
    np.testing.assert_allclose(prof.params[3], float((g.T @ xin).detach().norm()), rtol=1e-5)


def test_gradient_profile_leaves_model_untouched():
    net = reslab.create_model("mlp8", width=8, input_shape=(6,))
    x, y = torch.randn(16, 6), torch.randint(0, 10, (16,))
    before = copy.deepcopy(net.state_dict())
    gradient_profile(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_response_std_matches_direct_computation_streamed_over_batches():
    net = reslab.create_model("resnet8", width=4, input_shape=(3, 8, 8)).eval()
    x = torch.randn(30, 3, 8, 8)
    prof = response_magnitudes(net, x, batch_size=7)
    from reslab.diagnostics.recorder import record

    with torch.no_grad(), record(net, names=("branch_out",)) as rec:
        net(x)
    direct = [float(t.transpose(0, 1).reshape(t.shape[1], -1).double().std(1, unbiased=False).mean())
              for t in rec.get("branch_out")]
    np.testing.assert_allclose(prof.std, direct, rtol=1e-6)
    np.testing.assert_allclose(prof.sorted, sorted(direct, reverse=True), rtol=1e-6)


def test_response_of_scaled_identity_branches():
    """Plain net of branches F_i(x) = c_i x on unit-variance input: response std = c_i * prod_{j<i} c_j."""
    c = [2.0, 0.5, 3.0]
    branches = [nn.Linear(D, D, bias=False) for _ in c]
    for b, ci in zip(branches, c):
        nn.init.eye_(b.weight)
        b.weight.data *= ci
    net = ResidualNet(nn.Identity(), Trunk(branches, create_residual("plain", [BranchSpec(D, D, 1, "features")] * 3)),
                      nn.Identity(), {})
    x = torch.randn(4000, D, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    np.testing.assert_allclose(response_magnitudes(net, x).std, [2.0, 1.0, 3.0], rtol=1e-5)


def test_projections_of_an_additive_scheme_add_up_to_one():
    net = linear_net("layerscale", n=5, init=0.5)
    x = torch.randn(9, D)
    prof = stream_profile(net, x)
    x0 = x.double()
    final = net(x).detach().double()
    p0 = float(((x0 * final).sum(1) / (final * final).sum(1)).mean())
    assert p0 + prof.projection.sum() == pytest.approx(1.0, abs=1e-6)  # float32 forward
    np.testing.assert_allclose(prof.norm[0], float(x0.norm(dim=1).mean()), rtol=1e-9)
    np.testing.assert_allclose(prof.norm[-1], float(final.norm(dim=1).mean()), rtol=1e-6)


def test_gate_statistics_on_constant_gates():
    net = reslab.create_model("mlp8", "highway", width=8, input_shape=(6,), residual_kwargs={"gate_bias": 0.7})
    for g in net.trunk.scheme.gates:
        nn.init.zeros_(g.weight)
    x, y = torch.randn(40, 6), torch.arange(40) % 4
    prof = gate_profile(net, x, y, num_classes=4, bins=10)
    t = 1 / (1 + np.exp(-0.7))
    np.testing.assert_allclose(prof.mean, t, rtol=1e-6)
    np.testing.assert_allclose(prof.per_class, t, rtol=1e-6)
    assert (prof.hist[:, 6] == 1).all()  # every value in the bin [0.6, 0.7)
    for other in ("identity", "hc"):  # hc exposes mixing matrices, which are not gates
        with pytest.raises(ValueError, match="no highway gates"):
            gate_profile(reslab.create_model("mlp8", other, width=8, input_shape=(6,)), x, y, 4)


def test_kendall_tau():
    assert kendall_tau([0, 1, 2, 3]) == 1.0
    assert kendall_tau([3, 2, 1, 0]) == -1.0
    assert kendall_tau([1, 0, 2, 3]) == pytest.approx(1 - 2 / 6)


def test_single_lesion_of_a_plain_net_removes_that_layer():
    net = linear_net("plain", n=3)
    x = torch.randn(50, D)
    y = net(x).argmax(1)  # labels the intact net gets right
    errs = lesion_single(net, x, y)
    b = net.trunk.branches
    with torch.no_grad():
        manual = [(b[2](b[1](x)).argmax(1) != y).float().mean(), (b[2](b[0](x)).argmax(1) != y).float().mean(),
                  (b[1](b[0](x)).argmax(1) != y).float().mean()]
    np.testing.assert_allclose(errs, [float(m) for m in manual])
    assert net.trunk.lesioned == frozenset()


def test_random_lesions_and_reorders_restore_the_trunk_and_are_seeded():
    net = linear_net(n=6)
    x = torch.randn(40, D)
    y = net(x).argmax(1)
    a = lesion_random(net, x, y, [0, 2, 6], 3, torch.Generator().manual_seed(0))
    b = lesion_random(net, x, y, [0, 2, 6], 3, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a, b)
    assert (a[0] == 0).all()  # deleting nothing: the net's own labels
    taus, errs = lesion_reorder(net, x, y, [0, 3], 2, torch.Generator().manual_seed(1))
    assert list(taus[:2]) == [1.0, 1.0] and list(errs[:2]) == [0.0, 0.0]
    assert net.trunk.lesioned == frozenset() and net.trunk.order is None


def test_random_swaps_keep_shapes():
    net = reslab.create_model("resnet20", width=4, input_shape=(3, 8, 8))
    order = random_swaps(net, 20, torch.Generator().manual_seed(0))
    specs = net.trunk.scheme.specs
    assert all(specs[i] == specs[p] for p, i in enumerate(order))
    assert order != list(range(len(order)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_size_equals_a_real_step_on_one_block(optimizer):
    torch.manual_seed(0)
    net = reslab.create_model("mlp8", width=8, input_shape=(6,)).eval()
    x, y = torch.randn(32, 6), torch.randint(0, 10, (32,))
    sizes = effective_update_size(net, x, y, lr=0.01, optimizer=optimizer)
    f0 = net(x).detach()
    for i in range(len(net.trunk)):
        other = copy.deepcopy(net)
        params = list(other.trunk.branches[i].parameters())
        opt = torch.optim.SGD(params, lr=0.01) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.01, eps=1e-8)
        F.cross_entropy(other(x), y).backward()
        opt.step()
        ref = float((other(x).detach() - f0).norm() / f0.norm())
        assert sizes[i] == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("residual", ["identity", "scaled", "block_attnres"])
def test_update_sizes_at_the_stream_equal_a_real_step(residual):
    """``at="stream"`` measures the trunk's output; ``whole`` is one SGD step on every branch at once, and
    ``share`` the per-block size over it."""
    torch.manual_seed(0)
    net = reslab.create_model("preact_mlp10", residual, width=8, norm="ln", input_shape=(6,)).eval()
    x, y = torch.randn(32, 6), torch.randint(0, 10, (32,))
    got = update_sizes(net, x, y, lr=0.05, optimizer="sgd", at="stream")

    def stream(m):
        return m.trunk(m.stem(x)).detach()

    s0 = stream(net)

    def stepped(blocks):
        other = copy.deepcopy(net)
        params = [p for i in blocks for p in other.trunk.branches[i].parameters()]
        F.cross_entropy(other(x), y).backward()
        torch.optim.SGD(params, lr=0.05).step()
        return float((stream(other) - s0).norm() / s0.norm())

    for i in range(len(net.trunk)):
        assert got.per_block[i] == pytest.approx(stepped([i]), rel=1e-3)
    assert got.whole == pytest.approx(stepped(range(len(net.trunk))), rel=1e-3)
    assert np.allclose(got.share, got.per_block / got.whole)
    with pytest.raises(ValueError, match="at must be"):
        update_sizes(net, x, y, at="logits")
