"""Value residual learning (Zhou et al. 2024, ResFormer, arXiv 2410.17897; REFERENCE.md section 10)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import reslab
from reslab.diagnostics.paths import path_coefficients
from reslab.models.gpt import CausalSelfAttention

from conftest import tiny_input, tiny_model


def perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def gpt(depth: int = 2, residual: str = "value_residual", **kw) -> reslab.ResidualNet:
    """A tiny GPT of ``depth`` layers (the contract's gpt2 sizes), seeded so that twins share their weights."""
    torch.manual_seed(0)
    return reslab.create_model(f"gpt{depth}", residual, num_classes=5, d_model=8, n_heads=2, input_shape=(7,), **kw)


def set_lambdas(m: reslab.ResidualNet, values: list[float]) -> None:
    with torch.no_grad():
        m.trunk.scheme.lambdas.copy_(torch.tensor(values))


def naive_forward(m: reslab.ResidualNet, idx: torch.Tensor) -> torch.Tensor:
    """The GPT written out by hand: Pre-LN layers, attention by explicit softmax, V_n' = l_n V_n + (1-l_n) V_1."""
    s = m.trunk.scheme
    x = m.stem(idx)
    v1, n = None, 0
    for b, branch in enumerate(m.trunk.branches):
        h = s.in_norms[b](x)
        if isinstance(branch, CausalSelfAttention):
            N, T, d = h.shape
            q, k, v = (h @ branch.qkv.weight.T).split(d, dim=-1)
            if v1 is None:
                v1 = v
            else:
                lam = s.lambdas[n]
                v = lam * v + (1 - lam) * v1
                n += 1
            H = branch.n_heads
            q, k, v = (z.view(N, T, H, d // H).transpose(1, 2) for z in (q, k, v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // H)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out = branch.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(N, T, d))
        else:
            out = branch(h)
        x = x + out
    return m.head(x)


def test_values_used_by_layer_two_are_the_mix_by_hooks():
    m = gpt().eval()
    perturb_(m)
    set_lambdas(m, [0.3])
    raw, used = {}, {}
    for b in (0, 2):
        m.trunk.branches[b].qkv.register_forward_hook(lambda mod, i, o, b=b: raw.__setitem__(b, o[..., 16:]))
    m.trunk.branches[2].register_forward_pre_hook(  # wrap the value mix the scheme hands the branch
        lambda mod, args, kw: (args, {"value_mix": lambda v: used.setdefault(2, kw["value_mix"](v))}), with_kwargs=True)
    m(tiny_input("gpt2"))
    torch.testing.assert_close(used[2], 0.3 * raw[2] + 0.7 * raw[0])


@pytest.mark.parametrize("lams", [[0.5, 0.5], [0.2, 1.3]])
def test_equation_against_a_hand_written_forward(lams):
    m = gpt(depth=3).eval()
    perturb_(m)
    set_lambdas(m, lams)
    idx = tiny_input("gpt2")
    torch.testing.assert_close(m(idx), naive_forward(m, idx), rtol=1e-5, atol=1e-5)


def test_lambda_one_is_pre_ln_exactly_and_init_is_not():
    ref = gpt(residual="identity").eval()
    m = gpt().eval()
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert missing == ["trunk.scheme.lambdas"] and not unexpected
    idx = tiny_input("gpt2")
    assert m.trunk.scheme.value_lambdas() == {2: 0.5}
    assert not torch.allclose(m(idx), ref(idx))
    set_lambdas(m, [1.0])
    assert torch.equal(m(idx), ref(idx))


def test_every_lambda_gets_a_gradient():
    m = gpt(depth=3)
    perturb_(m)
    m(tiny_input("gpt2")).logsumexp(-1).sum().backward()
    lam = m.trunk.scheme.lambdas
    assert lam.shape == (2,) and lam.grad is not None and (lam.grad != 0).all()


def test_fixed_mix_of_the_first_version():
    m = gpt(residual_kwargs={"learnable": False}).eval()
    assert "trunk.scheme.lambdas" not in dict(m.named_parameters())
    assert m.trunk.scheme.value_lambdas() == {2: 0.5}  # U_n = A_n (V_n + V_1) / 2
    idx = tiny_input("gpt2")
    torch.testing.assert_close(m(idx), naive_forward(m, idx), rtol=1e-5, atol=1e-5)


def test_no_grad_repeated_forwards_and_no_reference_kept():
    m = gpt().eval()
    perturb_(m)
    idx = tiny_input("gpt2")
    y = m(idx)
    assert not [k for k, v in vars(m.trunk.scheme).items() if isinstance(v, torch.Tensor)]  # nothing of a forward
    with torch.no_grad():
        assert torch.equal(m(idx), y.detach())
    torch.testing.assert_close(m(idx[:2, :5]), naive_forward(m, idx[:2, :5]))  # another shape next
    assert torch.equal(m(idx), y)


def test_branch_called_outside_a_forward_sees_its_own_values():
    m = gpt().eval()
    perturb_(m)
    attn, ref = m.trunk.branches[2], gpt(residual="identity").eval().trunk.branches[2]
    ref.load_state_dict(attn.state_dict())
    h = torch.randn(3, 7, 8)
    assert torch.equal(attn(h), ref(h))


def test_lesion_of_the_first_attention_layer_leaves_later_values_unmixed():
    ref = gpt(3, residual="identity").eval()
    m = gpt(3).eval()
    m.load_state_dict(ref.state_dict(), strict=False)
    perturb_(m.trunk.branches)
    ref.trunk.branches.load_state_dict(m.trunk.branches.state_dict())
    idx = tiny_input("gpt2")
    m.trunk.set_lesion([0])
    ref.trunk.set_lesion([0])
    assert torch.equal(m(idx), ref(idx))
    m.trunk.set_lesion([2])  # deleting the second attention layer: the third is still mixed
    ref.trunk.set_lesion([2])
    assert not torch.allclose(m(idx), ref(idx))


def test_decomposition_sums_to_the_final_stream():
    m = gpt().eval()
    perturb_(m)
    seen = {}
    m.trunk.set_tap(lambda name, i, t: seen.__setitem__((name, i), t))
    x0 = m.stem(tiny_input("gpt2"))
    y = m.trunk(x0)
    comps = m.trunk.scheme.decompose(x0, [seen[("branch_out", i)] for i in range(4)], [None] * 5)
    torch.testing.assert_close(comps.sum(0), y, rtol=1e-5, atol=1e-5)


def test_deepcopy_follows_the_copied_scheme():
    m = gpt().eval()
    idx = tiny_input("gpt2")
    twin = copy.deepcopy(m)
    assert torch.equal(twin(idx), m(idx))
    set_lambdas(twin, [1.0])
    assert not torch.equal(twin(idx), m(idx))


@pytest.mark.parametrize("family", ["mlp8", "preact_mlp8", "resnet8"])
def test_refused_without_attention_branches(family):
    with pytest.raises(ValueError, match="value_residual") as e:
        tiny_model(family, "value_residual")
    assert "\n" not in str(e.value) and "attention" in str(e.value)


def test_bad_init_is_refused():
    with pytest.raises(ValueError, match="init"):
        gpt(residual_kwargs={"init": float("nan")})


def test_path_analysis_refuses_the_cross_layer_value_path():
    m = gpt().eval()
    x0 = m.stem(tiny_input("gpt2")).detach()
    with pytest.raises(ValueError, match="single-stream additive"):
        path_coefficients(m.trunk, x0, torch.ones_like(x0))


def test_single_attention_layer_is_the_identity_scheme():
    ref, m = gpt(1, residual="identity").eval(), gpt(1).eval()
    assert m.trunk.scheme.lambdas is None and m.trunk.scheme.value_lambdas() == {}
    m.load_state_dict(ref.state_dict())
    idx = tiny_input("gpt2")
    assert torch.equal(m(idx), ref(idx))
