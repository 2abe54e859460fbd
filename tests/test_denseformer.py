"""DenseFormer (Pagliardini et al. 2024, arXiv 2402.02622; REFERENCE.md section 10) against hand-written DWA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reslab import BranchSpec, Trunk, create_residual
from reslab.residuals.denseformer import dwa_sources

from conftest import TanhBranch, tiny_input, tiny_model

D = 6


def feat_trunk(n: int, **kw) -> Trunk:
    """``n`` role-less feature branches: every branch is one layer."""
    specs = [BranchSpec(D, D, 1, "features")] * n
    return Trunk([TanhBranch(i) for i in range(n)], create_residual("denseformer", specs, **kw))


def x_in() -> torch.Tensor:
    return torch.randn(4, D, generator=torch.Generator().manual_seed(99))


def perturb_(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def collect(trunk: Trunk) -> dict[str, dict[int, torch.Tensor]]:
    seen: dict[str, dict[int, torch.Tensor]] = {}
    trunk.set_tap(lambda name, i, t: seen.setdefault(name, {}).__setitem__(i, t))
    return seen


def naive(trunk: Trunk, x0: torch.Tensor, layers: list[list[int]], k: int = 1, p: int = 1,
          lesioned: frozenset[int] = frozenset()) -> torch.Tensor:
    """The paper's equations, written out: inside layer i, x <- x + F(N(x)) over its branches (a deleted branch
    adds nothing); X_i = x; Y_i = sum_{j <= i, j = i mod k} alpha_{i,j} X_j when p | i, else Y_i = X_i."""
    s = trunk.scheme
    xs, y = [x0], x0
    for i, branch_ids in enumerate(layers, start=1):
        x = y
        for b in branch_ids:
            if b not in lesioned:
                x = x + trunk.branches[b](s.norm_in(b, x))
        xs.append(x)
        if i % p:
            y = x
            continue
        alpha = s.alphas[str(i)]
        js = [j for j in range(i + 1) if j % k == i % k]
        assert alpha.shape == (len(js),)
        y = sum(a * xs[j] for a, j in zip(alpha, js))
    return y


GPT_LAYERS = [[0, 1], [2, 3]]  # gpt2: (attention, MLP) per layer


# --- identity at initialisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "mlp8", "preact_mlp8"])
def test_at_init_equals_the_identity_scheme_exactly(family):
    torch.manual_seed(0)
    ref = tiny_model(family, "identity").eval()
    torch.manual_seed(0)
    m = tiny_model(family, "denseformer").eval()
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert all(k.startswith("trunk.scheme.alphas.") for k in missing) and not unexpected
    x = tiny_input(family)
    assert torch.equal(m(x), ref(x))
    assert torch.equal(m.trunk.scheme.dwa_matrix(), torch.eye(m.trunk.scheme.n_layers + 1))


def test_init_weights_and_parameter_count():
    s = feat_trunk(5).scheme
    assert s.n_layers == 5 and sum(p.numel() for p in s.parameters()) == 5 * (5 + 3) // 2  # d(d+3)/2
    for i in range(1, 6):
        assert s.alphas[str(i)].tolist() == [0.0] * i + [1.0]


# --- the equation ---------------------------------------------------------------------------------------------------
def test_gpt_matches_hand_written_dwa_after_perturbing():
    torch.manual_seed(0)
    m = tiny_model("gpt2", "denseformer").eval()
    perturb_(m)
    x0 = m.stem(tiny_input("gpt2"))
    torch.testing.assert_close(m.trunk(x0), naive(m.trunk, x0, GPT_LAYERS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,p", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (2, 3), (7, 1)])
def test_sparse_variants_match_hand_written_dwa(k, p):
    trunk = feat_trunk(6, dilation=k, period=p)
    perturb_(trunk)
    x = x_in()
    torch.testing.assert_close(trunk(x), naive(trunk, x, [[b] for b in range(6)], k, p), rtol=1e-5, atol=1e-6)


def test_dilation_and_period_sparsity_pattern():
    # k = 2, p = 2, 6 layers: steps after layers 2, 4, 6 over X_j with j even (Figure 1b style, 2x2-DenseFormer)
    s = feat_trunk(6, dilation=2, period=2).scheme
    assert sorted(s.alphas.keys(), key=int) == ["2", "4", "6"]
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [1, 0, 1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(s.connectivity(), expect)
    # k = 3, p = 1, 5 layers: every layer, sources j = i (mod 3)
    s = feat_trunk(5, dilation=3).scheme
    assert [s.alphas[str(i)].numel() for i in range(1, 6)] == [1, 1, 2, 2, 2]
    assert dwa_sources(5, 3) == [2, 5] and dwa_sources(4, 3) == [1, 4] and dwa_sources(3, 3) == [0, 3]
    # the authors' DWAModules: floor(i/k) + 1 weights after layer i when p | i
    for k, p in [(1, 1), (2, 3), (4, 2)]:
        s = feat_trunk(9, dilation=k, period=p).scheme
        assert {int(i): a.numel() for i, a in s.alphas.items()} == {i: i // k + 1 for i in range(1, 10) if i % p == 0}


def test_dwa_matrix_is_lower_triangular_with_the_weights():
    s = feat_trunk(4, dilation=2, period=1).scheme
    perturb_(s)
    w = s.dwa_matrix()
    assert w.shape == (5, 5) and torch.equal(w, w.tril()) and not w.requires_grad
    for i in range(1, 5):
        torch.testing.assert_close(w[i, dwa_sources(i, 2)], s.alphas[str(i)].detach())
    assert torch.equal(w != 0, s.connectivity())
    assert w[0].tolist() == [1.0, 0, 0, 0, 0]


# --- taps, stream, lesions ------------------------------------------------------------------------------------------
def test_mix_tap_emits_alpha_at_each_layer_end_and_stream_is_the_running_stream():
    torch.manual_seed(0)
    m = tiny_model("gpt2", "denseformer").eval()
    perturb_(m)
    seen = collect(m.trunk)
    x0 = m.stem(tiny_input("gpt2"))
    y = m.trunk(x0)
    s = m.trunk.scheme
    assert sorted(seen["mix"]) == [1, 3]
    assert torch.equal(seen["mix"][1], s.alphas["1"]) and torch.equal(seen["mix"][3], s.alphas["2"])
    torch.testing.assert_close(seen["resid_post"][1], naive(m.trunk, x0, GPT_LAYERS[:1]))
    torch.testing.assert_close(seen["resid_pre"][2], seen["resid_post"][1])
    assert torch.equal(seen["resid_post"][3], y)
    torch.testing.assert_close(seen["contribution"][0], seen["branch_out"][0])


def test_period_emits_mix_only_where_a_step_happens():
    trunk = feat_trunk(5, period=2)
    seen = collect(trunk)
    trunk(x_in())
    assert sorted(seen["mix"]) == [1, 3]  # layers 2 and 4 end at branches 1 and 3


@pytest.mark.parametrize("lesion", [0, 1, 3])
def test_lesion_removes_only_the_branch_term(lesion):
    torch.manual_seed(0)
    m = tiny_model("gpt2", "denseformer").eval()
    perturb_(m)
    m.trunk.set_lesion([lesion])
    x0 = m.stem(tiny_input("gpt2"))
    expect = naive(m.trunk, x0, GPT_LAYERS, lesioned=frozenset([lesion]))
    torch.testing.assert_close(m.trunk(x0), expect, rtol=1e-5, atol=1e-6)


def test_lesion_with_dilation_and_period():
    trunk = feat_trunk(6, dilation=2, period=2)
    perturb_(trunk)
    trunk.set_lesion([1, 2])
    x = x_in()
    expect = naive(trunk, x, [[b] for b in range(6)], 2, 2, lesioned=frozenset([1, 2]))
    torch.testing.assert_close(trunk(x), expect, rtol=1e-5, atol=1e-6)


# --- decomposition --------------------------------------------------------------------------------------------------
def _decompose(trunk: Trunk, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = collect(trunk)
    y = trunk(x0)
    trunk.set_tap(None)
    n = len(trunk)
    outs = [seen["branch_out"][i] for i in range(n)]
    mix = [seen.get("mix", {}).get(i) for i in range(n + 1)]
    return trunk.scheme.decompose(x0, outs, mix), y


def test_decomposition_sums_to_the_final_stream_on_gpt():
    torch.manual_seed(0)
    m = tiny_model("gpt2", "denseformer").eval()
    perturb_(m)
    comps, y = _decompose(m.trunk, m.stem(tiny_input("gpt2")))
    assert comps.shape == (5, *y.shape)
    torch.testing.assert_close(comps.sum(0), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,p", [(1, 1), (2, 1), (2, 3)])
def test_decomposition_sums_with_sparse_variants(k, p):
    trunk = feat_trunk(6, dilation=k, period=p)
    perturb_(trunk)
    comps, y = _decompose(trunk, x_in())
    torch.testing.assert_close(comps.sum(0), y, rtol=1e-5, atol=1e-5)


def test_decomposition_coefficients_by_hand():
    # two role-less layers: Y_1 = a10 X0 + a11 X1, X1 = X0 + c0; X2 = Y_1 + c1; Y_2 = a20 X0 + a21 X1 + a22 X2
    trunk = feat_trunk(2)
    s = trunk.scheme
    with torch.no_grad():
        s.alphas["1"].copy_(torch.tensor([0.3, 0.5]))
        s.alphas["2"].copy_(torch.tensor([0.2, -0.4, 0.9]))
    x0 = x_in()
    comps, y = _decompose(trunk, x0)
    c0, c1 = trunk.branches[0](x0), trunk.branches[1](0.3 * x0 + 0.5 * (x0 + trunk.branches[0](x0)))
    w_x0 = 0.2 + (-0.4) + 0.9 * (0.3 + 0.5)
    w_c0 = -0.4 + 0.9 * 0.5
    torch.testing.assert_close(comps[0], w_x0 * x0)
    torch.testing.assert_close(comps[1], w_c0 * c0)
    torch.testing.assert_close(comps[2], 0.9 * c1)


def test_decomposition_refused_after_a_post_relu():
    m = tiny_model("mlp8", "denseformer")
    with pytest.raises(ValueError, match="not a sum of components"):
        _decompose(m.trunk, m.stem(tiny_input("mlp8")))


# --- gradients and arguments ----------------------------------------------------------------------------------------
def test_every_alpha_gets_a_gradient_in_sparse_variants():
    trunk = feat_trunk(6, dilation=2, period=2)
    perturb_(trunk)
    trunk(x_in()).square().sum().backward()
    for name, p in trunk.scheme.named_parameters():
        assert p.grad is not None and (p.grad != 0).all(), name


@pytest.mark.parametrize("kw", [dict(dilation=0), dict(period=-1), dict(dilation=1.5), dict(period=True),
                                dict(norm="post"), dict(shortcut="B"), dict(gamma=1)])
def test_bad_arguments_are_one_line_errors(kw):
    with pytest.raises(ValueError) as e:
        create_residual("denseformer", [BranchSpec(D, D, 1, "features")] * 3, **kw)
    assert "\n" not in str(e.value)


def test_works_without_grad_and_repeatedly():
    torch.manual_seed(0)
    m = tiny_model("gpt2", "denseformer").eval()
    perturb_(m)
    x = tiny_input("gpt2")
    y = m(x)
    with torch.no_grad():
        assert torch.equal(m(x), y.detach())
    torch.testing.assert_close(m(x[:2]), y[:2])
