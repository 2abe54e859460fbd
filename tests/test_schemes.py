"""Each scheme against its paper equation, written out here, on tiny tensors (REFERENCE.md sections 1-7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab import BranchSpec, Trunk, create_residual
from reslab.shortcuts import AvgDownShortcut, ProjectionShortcut, ZeroPadShortcut

D = 6


def feat_specs(n: int = 3, d: int = D) -> list[BranchSpec]:
    return [BranchSpec(d, d, 1, "features") for _ in range(n)]


class Affine(nn.Module):
    """A fixed, known branch: F(x) = tanh(x W^T) (random W)."""

    def __init__(self, d_in: int, d_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))

    def forward(self, x):
        return torch.tanh(x @ self.w.T)


def branches(n: int = 3, d: int = D) -> list[nn.Module]:
    return [Affine(d, d, seed=i) for i in range(n)]


def x_in(d: int = D, n: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(99))


def run(name: str, n: int = 3, **kw):
    bs = branches(n)
    trunk = Trunk(bs, create_residual(name, feat_specs(n), **kw))
    return trunk, bs


def test_identity_is_sum_of_branches():
    trunk, bs = run("identity")
    x = x_in()
    h = x
    for b in bs:
        h = h + b(h)
    torch.testing.assert_close(trunk(x), h, rtol=0, atol=0)


def test_identity_post_relu_is_original_resnet_unit():
    trunk, bs = run("identity", post="relu")
    x = x_in()
    h = x
    for b in bs:
        h = torch.relu(h + b(h))  # He et al. 2015: ReLU after the addition
    torch.testing.assert_close(trunk(x), h, rtol=0, atol=0)


def test_plain_has_no_skip():
    trunk, bs = run("plain")
    x = x_in()
    h = x
    for b in bs:
        h = b(h)
    torch.testing.assert_close(trunk(x), h, rtol=0, atol=0)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1.0, 0.25), (2.0, 1.0)])
def test_constant_scaling(a, b):
    trunk, bs = run("scaled", a=a, b=b)
    x = x_in()
    h = x
    for br in bs:
        h = a * h + b * br(h)  # He et al. 2016 Table 1b: h(x) = a x
    torch.testing.assert_close(trunk(x), h)


def test_scaled_one_over_sqrt_depth():
    n = 4
    trunk, bs = run("scaled", n=n)
    assert trunk.scheme.b == pytest.approx(1 / math.sqrt(n))
    x = x_in()
    h = x
    for br in bs:
        h = h + br(h) / math.sqrt(n)
    torch.testing.assert_close(trunk(x), h)


def test_scaled_rejects_unknown_rule():
    with pytest.raises(ValueError, match="1/sqrt"):
        create_residual("scaled", feat_specs(), b="1/L")


@pytest.mark.parametrize("name", ["rezero", "skipinit"])
def test_zero_init_scalar_is_identity_and_alpha_learns(name):
    trunk, _ = run(name, n=3)
    x = x_in().requires_grad_(True)
    y = trunk(x)
    torch.testing.assert_close(y, x, rtol=0, atol=0)  # every layer is the identity at init
    (y ** 3).sum().backward()
    alpha = trunk.scheme.alpha
    assert alpha.grad is not None and (alpha.grad.abs() > 1e-6).all()


def test_rezero_alpha_gradient_equals_formula():
    """dL/dalpha_i = <dL/dx_{i+1}, F(x_i)>; at init x_i = x for every i and dL/dx_{i+1} = dL/dy."""
    trunk, bs = run("rezero", n=2)
    x = x_in()
    y = trunk(x)
    target = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    ((y - target) ** 2).sum().backward()
    g = 2 * (x - target)
    expected = torch.stack([(g * b(x)).sum() for b in bs])
    torch.testing.assert_close(trunk.scheme.alpha.grad, expected.detach())


def test_skipinit_init_value():
    trunk, bs = run("skipinit", n=2, init=0.3)
    x = x_in()
    h = x
    for b in bs:
        h = h + 0.3 * b(h)
    torch.testing.assert_close(trunk(x), h)


def test_layerscale_per_channel():
    trunk, bs = run("layerscale", n=2, init=1e-2)
    with torch.no_grad():
        trunk.scheme.scales[1].copy_(torch.arange(D, dtype=torch.float))
    x = x_in()
    h = x + 1e-2 * bs[0](x)
    h = h + torch.arange(D, dtype=torch.float) * bs[1](h)  # x + diag(lambda) F(x)
    torch.testing.assert_close(trunk(x), h)


def test_layerscale_conv_broadcasts_over_channels():
    spec = BranchSpec(3, 3, 1, "conv")
    scheme = create_residual("layerscale", [spec], init=0.0)
    with torch.no_grad():
        scheme.scales[0].copy_(torch.tensor([1.0, 0.0, 2.0]))
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    y = scheme.write(x, 0, out, x)
    torch.testing.assert_close(y, x + torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1) * out)


def _gate(scheme, i, x):
    g = scheme.gates[i]
    return torch.sigmoid(x @ g.weight.T + g.bias)


@pytest.mark.parametrize("name,gate_branch", [("highway", True), ("exclusive_gating", True),
                                              ("shortcut_gating", False)])
def test_gating_equations(name, gate_branch):
    trunk, bs = run(name, n=2, gate_bias=0.5)
    x = x_in()
    h = x
    for i, b in enumerate(bs):
        t = _gate(trunk.scheme, i, h)
        # Srivastava et al. 2015: T H + (1 - T) x;  He et al. 2016 Table 1d: (1 - g) x + F
        h = (t * b(h) if gate_branch else b(h)) + (1 - t) * h
    torch.testing.assert_close(trunk(x), h)


def test_highway_closed_gate_carries_input():
    trunk, _ = run("highway", n=5, gate_bias=-40.0)
    x = x_in()
    torch.testing.assert_close(trunk(x), x, rtol=0, atol=1e-6)


def test_highway_open_gate_is_plain():
    trunk, bs = run("highway", n=3, gate_bias=40.0)
    x = x_in()
    h = x
    for b in bs:
        h = b(h)
    torch.testing.assert_close(trunk(x), h, rtol=0, atol=1e-6)


def test_gating_default_biases():
    assert create_residual("highway", feat_specs()).gate_bias == -2.0
    assert create_residual("exclusive_gating", feat_specs()).gate_bias == -6.0


def test_dropout_shortcut():
    trunk, bs = run("dropout_shortcut", n=1, p=0.5)
    x = x_in()
    trunk.eval()
    torch.testing.assert_close(trunk(x), x + bs[0](x))
    trunk.train()
    torch.manual_seed(7)
    y = trunk(x)
    torch.manual_seed(7)
    expected = F.dropout(x, 0.5, True) + bs[0](x)
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, x + bs[0](x))


def test_conv_shortcut_projects_every_block():
    spec = BranchSpec(2, 4, 2, "conv")
    scheme = create_residual("conv_shortcut", [spec, BranchSpec(4, 4, 1, "conv")])
    x, out = torch.randn(2, 2, 6, 6), torch.randn(2, 4, 3, 3)
    w = scheme.projections[0].weight  # (4, 2, 1, 1)
    expected = torch.einsum("oi,nihw->nohw", w[:, :, 0, 0], x[:, :, ::2, ::2]) + out
    torch.testing.assert_close(scheme.write(x, 0, out, x), expected)
    assert isinstance(scheme.projections[1], nn.Conv2d)
    with pytest.raises(ValueError, match="no shortcut option"):
        create_residual("conv_shortcut", [spec], shortcut="B")


# --- shortcuts ---------------------------------------------------------------------------------------
def test_option_a_zero_pads_exactly():
    spec = BranchSpec(2, 5, 2, "conv")
    sc = ZeroPadShortcut(spec)
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float).view(2, 2, 4, 4)
    y = sc(x)
    assert y.shape == (2, 5, 2, 2)
    torch.testing.assert_close(y[:, :2], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert (y[:, 2:] == 0).all()
    assert sum(p.numel() for p in sc.parameters()) == 0


def test_option_a_features_pads_features():
    y = ZeroPadShortcut(BranchSpec(2, 4, 1, "features"))(torch.ones(3, 2))
    torch.testing.assert_close(y, torch.tensor([[1.0, 1, 0, 0]] * 3))


def test_option_a_cannot_shrink():
    with pytest.raises(ValueError, match="cannot shrink"):
        create_residual("identity", [BranchSpec(4, 2, 1, "conv")], shortcut="A")


@pytest.mark.parametrize("option,where", [("A", []), ("B", [0]), ("C", [0, 1]), ("D", [0])])
def test_shortcut_options_place_projections(option, where):
    specs = [BranchSpec(2, 4, 2, "conv"), BranchSpec(4, 4, 1, "conv")]
    scheme = create_residual("identity", specs, shortcut=option)
    projected = [i for i, s in enumerate(scheme.shortcuts) if isinstance(s, (ProjectionShortcut, AvgDownShortcut))]
    assert projected == where


def test_option_b_uses_projection_equation():
    spec = BranchSpec(2, 4, 2, "conv")
    scheme = create_residual("identity", [spec], shortcut="B").eval()
    x, out = torch.randn(2, 2, 6, 6), torch.randn(2, 4, 3, 3)
    conv, bn = scheme.shortcuts[0].proj
    expected = bn(conv(x)) + out  # y = W_s x + F(x), W_s a strided 1x1 conv + BN
    torch.testing.assert_close(scheme.write(x, 0, out, x), expected)


def test_option_d_averages_before_projecting():
    spec = BranchSpec(1, 1, 2, "conv")
    sc = AvgDownShortcut(spec).eval()
    with torch.no_grad():
        sc.proj[1].weight.fill_(1.0)
    x = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    expected = F.avg_pool2d(x, 2)
    bn = sc.proj[2]
    expected = (expected - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(sc(x), expected)


def test_option_d_needs_maps():
    with pytest.raises(ValueError, match="spatial maps"):
        create_residual("identity", feat_specs(), shortcut="D")


def test_unknown_shortcut_and_scheme_and_kwarg():
    with pytest.raises(ValueError, match="unknown shortcut"):
        create_residual("identity", feat_specs(), shortcut="E")
    with pytest.raises(ValueError, match="unknown residual scheme"):
        create_residual("nope", feat_specs())
    with pytest.raises(ValueError, match="rezero"):
        create_residual("rezero", feat_specs(), gate_bias=1.0)
    with pytest.raises(ValueError, match="no shortcut option"):
        create_residual("plain", feat_specs(), shortcut="B")


# --- lesions ---------------------------------------------------------------------------------------
def test_lesion_plain_removes_that_layer():
    trunk, bs = run("plain", n=3)
    x = x_in()
    trunk.set_lesion([1])
    torch.testing.assert_close(trunk(x), bs[2](bs[0](x)), rtol=0, atol=0)


def test_lesion_identity_is_skip_path():
    trunk, bs = run("identity", n=3)
    x = x_in()
    trunk.set_lesion([0])
    h = x + bs[1](x)
    torch.testing.assert_close(trunk(x), h + bs[2](h), rtol=0, atol=0)


def test_lesion_out_of_range():
    trunk, _ = run("identity", n=3)
    with pytest.raises(ValueError, match="cannot lesion block 3"):
        trunk.set_lesion([3])
