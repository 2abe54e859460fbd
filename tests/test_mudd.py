"""MUDD connections (Xiao et al. 2025, MUDDFormer, arXiv 2502.12170; REFERENCE.md section 14) against the paper's
equations written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.decomposition import decompose
from reslab.models.gpt import CausalSelfAttention
from reslab.residuals.mudd import hidden_width

from conftest import TanhBranch, tiny_input

D = 6


class QKVBranch(nn.Module):
    """A known attention-like branch: ``tanh(q Wq) * tanh(k Wk) + tanh(v Wv)``, per token (``k, v`` default ``q``)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, D, D, generator=g) / math.sqrt(D))

    def forward(self, x, key_input=None, value_input=None):
        k = x if key_input is None else key_input
        v = x if value_input is None else value_input
        return torch.tanh(x @ self.w[0].T) * torch.tanh(k @ self.w[1].T) + torch.tanh(v @ self.w[2].T)


def trunk(layers: int = 3, **kw) -> Trunk:
    specs = [BranchSpec(D, D, 1, "features", role=r) for _ in range(layers) for r in ("attn", "mlp")]
    branches = [m for i in range(layers) for m in (QKVBranch(10 + i), TanhBranch(20 + i, D))]
    scheme = create_residual("mudd", specs, **kw)
    scheme.bind(branches)
    return Trunk(branches, scheme)


def perturb_(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def x_in() -> torch.Tensor:
    return torch.randn(3, 4, D, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def weights(da: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``A = GELU(RMSNorm(X) W_1) W_2 + a`` (RMSNorm without gain, eps 1e-6), as ``(*lead, C, n)``."""
    a = da.static
    if da.w1 is None:
        return a.expand(*x.shape[:-1], *a.shape)
    z = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (F.gelu(z @ da.w1.weight.T) @ da.w2.weight.T).view(*x.shape[:-1], *a.shape) + a


def naive(t: Trunk, x0: torch.Tensor, attend, lesioned: frozenset[int] = frozenset()) -> torch.Tensor:
    """The paper's equations: X^A = R + Attn(N^Q(Q), N^K(K), N^V(V)); X_{i+1} = X^A + MLP(N(X^A)) (a deleted
    sublayer adds nothing); A_i from X_{i+1}; each way sum_j A_i[c, j] X_j; output the last R way.
    ``attend(b, q, k, v)`` is attention branch ``b`` on normed inputs."""
    s = t.scheme
    xs, q, k, v, r = [x0], x0, x0, x0, x0
    for layer in range(len(t) // 2):
        a, m = 2 * layer, 2 * layer + 1
        xa = r
        if a not in lesioned:
            nq = s.norm_in(a, q)
            kn = s.key_norms[str(a)] if s.key_norms is not None and layer else (lambda z: s.norm_in(a, z))
            vn = s.value_norms[str(a)] if s.value_norms is not None and layer else (lambda z: s.norm_in(a, z))
            xa = r + attend(a, nq, kn(k), vn(v))
        x = xa if m in lesioned else xa + t.branches[m](s.norm_in(m, xa))
        xs.append(x)
        w = weights(s.da[layer], x)
        assert w.shape == (*x.shape[:-1], 4 if s.multiway and layer < len(t) // 2 - 1 else 1, layer + 2)
        ways = [sum(w[..., c, j, None] * xs[j] for j in range(layer + 2)) for c in range(w.shape[-2])]
        q, k, v, r = ways if len(ways) == 4 else ways * 4
    return r


def known(t: Trunk):
    return lambda b, q, k, v: t.branches[b](q, key_input=k, value_input=v)


VARIANTS = [dict(), dict(dynamic=False), dict(multiway=False), dict(norm="none"), dict(norm_type="rmsnorm"),
            dict(hidden_round=None, last_expand=1.0)]


@pytest.mark.parametrize("kw", VARIANTS)
def test_trunk_follows_the_paper_equations(kw):
    t = trunk(**kw).double().eval()
    perturb_(t)
    x0 = x_in()
    torch.testing.assert_close(t(x0), naive(t, x0, known(t)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lesioned", [{0}, {2}, {3}, {2, 3}, {1, 4}, {5}])
def test_deleting_a_sublayer_removes_exactly_its_term(lesioned):
    """A deleted sublayer's term is missing from its layer's output (both: X_{i+1} = Xbar_i^R); the DA still runs."""
    t = trunk().double().eval()
    perturb_(t)
    x0 = x_in()
    t.set_lesion(lesioned)
    torch.testing.assert_close(t(x0), naive(t, x0, known(t), frozenset(lesioned)), rtol=1e-12, atol=1e-12)


def gpt(depth: int = 3, residual: str = "mudd", **kw) -> reslab.ResidualNet:
    torch.manual_seed(0)
    return reslab.create_model(f"gpt{depth}", residual, num_classes=5, d_model=8, n_heads=2, input_shape=(7,), **kw)


def attention(branch: CausalSelfAttention, q_in, k_in, v_in) -> torch.Tensor:
    """Causal multi-head attention by explicit softmax, queries / keys / values from their own inputs."""
    N, T, d = q_in.shape
    H = branch.n_heads
    wq, wk, wv = branch.qkv.weight.split(d)
    q, k, v = ((z @ w.T).view(N, T, H, d // H).transpose(1, 2) for z, w in ((q_in, wq), (k_in, wk), (v_in, wv)))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d // H)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                      float("-inf"))
    return branch.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(N, T, d))


def test_gpt_against_a_hand_written_forward():
    m = gpt().double().eval()
    perturb_(m)
    idx = tiny_input("gpt2")
    t = m.trunk
    want = m.head(naive(t, m.stem(idx), lambda b, q, k, v: attention(t.branches[b], q, k, v)))
    torch.testing.assert_close(m(idx), want, rtol=1e-12, atol=1e-12)


def test_it_starts_as_the_pre_ln_transformer():
    """W_2 = 0 and a_i one-hot on the latest output: every way is X_i, so MUDD at init is Pre-LN on any branch
    weights (and its mix is one-hot on the latest source for every token)."""
    pre, mudd = gpt(residual="identity"), gpt()
    for part in (pre.stem, pre.trunk.branches, pre.head):
        perturb_(part)
    mudd.load_state_dict(pre.state_dict(), strict=False)  # stem, branches, head (and the pre-norms, at init)
    s = mudd.trunk.scheme
    for i, da in enumerate(s.da):
        assert torch.equal(da.w2.weight, torch.zeros_like(da.w2.weight))
        assert torch.equal(da.static, F.one_hot(torch.full((da.ways,), i + 1), i + 2).float())
    idx = tiny_input("gpt2")
    seen = {}
    mudd.trunk.set_tap(lambda name, i, t: seen.__setitem__(i, t) if name == "mix" else None)
    torch.testing.assert_close(mudd(idx), pre(idx), rtol=0, atol=1e-6)
    assert sorted(seen) == [1, 3, 5]
    for b, w in seen.items():
        assert torch.equal(w, F.one_hot(torch.full(w.shape[:-1], b // 2 + 1), b // 2 + 2).float())


def test_the_mix_tap_is_the_per_token_weights():
    m = gpt().eval()
    perturb_(m)
    seen = {}
    m.trunk.set_tap(lambda name, i, t: seen.setdefault(name, {}).__setitem__(i, t))
    m(tiny_input("gpt2", batch=3))
    s = m.trunk.scheme
    assert [tuple(seen["mix"][b].shape) for b in (1, 3, 5)] == [(3, 7, 4, 2), (3, 7, 4, 3), (3, 7, 1, 4)]
    for layer, b in enumerate((1, 3, 5)):
        x = seen["resid_pre"][b] + seen["contribution"][b]  # X_{layer + 1}
        torch.testing.assert_close(seen["mix"][b], weights(s.da[layer], x))
    assert seen["mix"][3].std(dim=(0, 1)).min() > 0  # dynamic: the weights differ between tokens


def test_the_decomposition_replays_the_per_token_weights():
    m = gpt().eval()
    perturb_(m)
    dec = decompose(m, tiny_input("gpt2"))
    torch.testing.assert_close(dec.components.sum(0), dec.final, rtol=1e-5, atol=1e-5)


def test_hidden_widths_follow_the_authors_rounding():
    assert hidden_width(4, 2) == 64 and hidden_width(4, 16) == 128 and hidden_width(4, 17) == 128
    assert hidden_width(1, 9, 4.0) == 64 and hidden_width(4, 3, round_to=None) == 12
    s = gpt(depth=3, residual_kwargs=dict(hidden_round=None)).trunk.scheme
    assert [da.w1.out_features for da in s.da] == [8, 12, 16]  # C (i+1), last C = 1 times last_expand 4
    assert [da.w2.out_features for da in s.da] == [8, 12, 4]
    assert s.da[0].w1.weight.std().item() == pytest.approx(8 ** -0.5, rel=0.3)  # N(0, 1/D)


@pytest.mark.parametrize("kw", VARIANTS)
def test_every_parameter_gets_a_gradient(kw):
    m = gpt(residual_kwargs=kw)
    perturb_(m)
    m(tiny_input("gpt2")).logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_reads_keys_and_values_from_their_inputs():
    torch.manual_seed(0)
    att = CausalSelfAttention(8, 2, bias=True)
    x, k, v = torch.randn(3, 2, 5, 8).unbind(0)
    torch.testing.assert_close(att(x, key_input=x, value_input=x), att(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        att.qkv.bias.zero_()
    torch.testing.assert_close(att(x, key_input=k, value_input=v), attention(att, x, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att(x, key_input=k), attention(att, x, k, x), rtol=1e-5, atol=1e-6)


def test_blocks_can_run_in_another_order():
    m = gpt().eval()
    perturb_(m)
    idx = tiny_input("gpt2")
    y = m(idx)
    m.trunk.set_order([2, 3, 0, 1, 4, 5])  # the first layer's attention runs second, with its one norm
    y2 = m(idx)
    assert torch.isfinite(y2).all() and not torch.allclose(y, y2)


class NoKV(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("kw, match", [
    (dict(dynamic="yes"), "dynamic must be True or False"),
    (dict(multiway=1), "multiway must be True or False"),
    (dict(hidden_round=0), "hidden_round must be a positive integer"),
    (dict(hidden_round=True), "hidden_round must be a positive integer"),
    (dict(last_expand=0), "last_expand must be a positive number"),
    (dict(last_expand="4"), "last_expand must be a positive number"),
    (dict(norm="post"), "supports norm placement"),
    (dict(post="relu"), "supports the post-combination ops"),
    (dict(shortcut="B"), "takes no shortcut option"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    specs = [BranchSpec(D, D, 1, "features", role=r) for r in ("attn", "mlp")]
    with pytest.raises(ValueError, match=match) as e:
        create_residual("mudd", specs, **kw)
    assert "\n" not in str(e.value)


def test_refusals():
    for roles in (("mlp", "attn"), ("attn", "mlp", ""), ("attn", "transition")):
        with pytest.raises(ValueError, match="start with one attention sublayer") as e:
            create_residual("mudd", [BranchSpec(D, D, 1, "features", role=r) for r in roles])
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="one width"):
        create_residual("mudd", [BranchSpec(D, D, 1, "features", "attn"), BranchSpec(4, 4, 1, "features", "mlp")])
    with pytest.raises(ValueError, match="needs attention sublayers"):
        reslab.create_model("mlp8", "mudd", num_classes=5, width=8, input_shape=(12,))
    specs = [BranchSpec(D, D, 1, "features", role=r) for _ in range(2) for r in ("attn", "mlp")]
    with pytest.raises(ValueError, match="takes no key_input / value_input") as e:
        create_residual("mudd", specs).bind([NoKV()] * 4)
    assert "\n" not in str(e.value)
    create_residual("mudd", specs, multiway=False).bind([NoKV()] * 4)  # one way: nothing to check
