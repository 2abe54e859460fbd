"""LAuReL (Menghani et al. 2024, arXiv 2411.07501): ``laurel`` (RW, LR, RW+LR) and ``laurel_pa`` (the PA variants)
against the paper's equations written out here, identity at init, the init of A and B, taps, lesions, conv stages,
gradients, bad arguments and the parameter overhead."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reslab
from reslab.branch import BranchSpec
from reslab.diagnostics.decomposition import decompose
from reslab.diagnostics.recorder import record
from reslab.residuals import create_residual
from reslab.residuals.laurel import PA_VARIANTS, VARIANTS
from reslab.trunk import Trunk

from conftest import TanhBranch, tiny_input, tiny_model

D = 6


def feature_trunk(name: str, n: int = 5, seed: int = 0, **kw) -> Trunk:
    """``n`` known tanh branches of width ``D`` under ``name``, every parameter moved off its init, in float64."""
    torch.manual_seed(seed)
    t = Trunk([TanhBranch(i, D) for i in range(n)], create_residual(name, [BranchSpec(D, D, 1, "features")] * n,
                                                                   **kw)).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in t.scheme.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return t


def ab(s, i: int) -> tuple:
    """``(alpha_i, beta_i)`` from the raw parameters: softmax / sigmoid / raw, written out."""
    if s.rw is None:
        return 1.0, 1.0
    a, b = s.rw[i]
    if s.rw_norm == "softmax":
        return torch.exp(a) / (torch.exp(a) + torch.exp(b)), torch.exp(b) / (torch.exp(a) + torch.exp(b))
    if s.rw_norm == "sigmoid":
        return 1 / (1 + torch.exp(-a)), 1 / (1 + torch.exp(-b))
    return a, b


def laurel_by_hand(t: Trunk, x: torch.Tensor, skip: frozenset = frozenset()) -> torch.Tensor:
    """Eq. (2.1) / (3) / (5): ``x <- alpha F(x) + beta (x + x A B)`` (``A: D x r`` down, ``B: r x D`` up)."""
    s = t.scheme
    for i, f in enumerate(t.branches):
        alpha, beta = ab(s, i)
        g = x if s.lowrank is None else x + torch.matmul(torch.matmul(x, s.lowrank[i].a), s.lowrank[i].b)
        x = beta * g if i in skip else alpha * f(x) + beta * g
    return x


def pa_by_hand(t: Trunk, x: torch.Tensor, skip: frozenset = frozenset()) -> torch.Tensor:
    """Eq. (4) / (6): ``x_{i+1} = alpha F(x_i) + beta (x_i + sum_{j < min(k, i+1)} gamma_ij h_ij(x_{i-j}))``, with the
    whole history kept (the scheme keeps only the last k)."""
    s, xs = t.scheme, [x]
    for i, f in enumerate(t.branches):
        alpha, beta = ab(s, i)
        g = xs[i]
        for j in range(min(s.k, i + 1)):
            h = xs[i - j]
            if s.lowrank is not None:
                h = torch.matmul(torch.matmul(h, s.lowrank[i][j].a), s.lowrank[i][j].b)
            g = g + s.gammas[i][j] * h
        xs.append(beta * g if i in skip else alpha * f(xs[i]) + beta * g)
    return xs[-1]


def x_in(n: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("variant,rw_norm", [("lr", None)] + [(v, n) for v in ("rw", "rw_lr")
                                                               for n in ("softmax", "sigmoid", "none")])
def test_laurel_is_its_equation(variant, rw_norm):
    kw = {"variant": variant, **({"rank": 2} if "lr" in variant else {}), **({"rw_norm": rw_norm} if rw_norm else {})}
    t, x = feature_trunk("laurel", **kw), x_in()
    with torch.no_grad():
        diff = (t(x) - laurel_by_hand(t, x)).abs().max().item()
    assert diff < 1e-12


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("variant", PA_VARIANTS)
def test_laurel_pa_is_its_equation(variant, k):
    t, x = feature_trunk("laurel_pa", variant=variant, k=k, **({"rank": 2} if "lr" in variant else {})), x_in()
    assert [len(g) for g in t.scheme.gammas] == [min(k, i + 1) for i in range(5)]
    with torch.no_grad():
        diff = (t(x) - pa_by_hand(t, x)).abs().max().item()
    assert diff < 1e-12


def test_rw_lr_pa_with_one_stream_is_rw_lr():
    """k = 1 and gamma = 1: eq. (6) is eq. (5)."""
    pa = feature_trunk("laurel_pa", variant="rw_lr_pa", k=1, rank=2)
    rl = feature_trunk("laurel", variant="rw_lr", rank=2)
    with torch.no_grad():
        rl.scheme.rw.copy_(pa.scheme.rw)
        for i in range(5):
            pa.scheme.gammas[i].fill_(1.0)
            rl.scheme.lowrank[i].load_state_dict(pa.scheme.lowrank[i][0].state_dict())
        torch.testing.assert_close(pa(x_in()), rl(x_in()), rtol=0, atol=1e-13)


@pytest.mark.parametrize("family", ["gpt2", "mlp8", "resnet8"])
def test_starts_as_the_plain_residual_up_to_the_rw_weights(family):
    """B = 0 (and gamma = 0 with h the identity): LR and PA start as ``x + F(x)``; with RW under softmax at zero
    logits, as ``(x + F(x)) / 2`` (the scaled residual a = b = 1/2); with raw weights at (1, 1), as ``x + F(x)``."""
    x = tiny_input(family)

    def out(name, **kw):
        torch.manual_seed(0)
        return tiny_model(family, name, residual_kwargs=kw).eval()(x)

    plain, half = out("identity"), out("scaled", a=0.5, b=0.5)
    assert torch.equal(out("laurel", variant="lr"), plain)
    assert torch.equal(out("laurel", variant="rw_lr", rw_norm="none"), plain)
    assert torch.equal(out("laurel"), half)
    assert torch.equal(out("laurel", variant="rw"), half)
    if family != "resnet8":  # PA refuses the stage changes
        for variant in ("pa", "lr_pa"):
            assert torch.equal(out("laurel_pa", variant=variant), plain)
        assert torch.equal(out("laurel_pa"), half)


def test_init_of_a_and_b_and_the_default_rank():
    s = create_residual("laurel", [BranchSpec(64, 64, 1, "features")] * 2)
    a, b = s.lowrank[0].a, s.lowrank[0].b
    assert a.shape == (64, 4) and b.shape == (4, 64) and not b.any()  # r = D // 16, B = 0
    want = torch.zeros(64, 4)
    for d in range(64):
        want[d, d % 4] = 1 / math.sqrt(4 * 64)  # the paper's column-orthogonal A (footnote 2)
    assert torch.equal(a, want)
    torch.testing.assert_close(a.T @ a, torch.eye(4) / 16)  # orthogonal columns, each of norm 1/r
    conv = create_residual("laurel", [BranchSpec(32, 32, 1, "conv")], rank=8)
    bound = math.sqrt(6 / (32 + 8))  # Xavier on conv maps (the paper's ResNet)
    ca = conv.lowrank[0].a
    assert ca.shape == (32, 8) and ca.abs().max() <= bound and ca.std() > bound / 4
    assert create_residual("laurel", [BranchSpec(8, 8, 1, "features")]).lowrank[0].a.shape == (8, 1)
    assert create_residual("laurel", [BranchSpec(64, 64, 1, "features")], a_init="xavier").lowrank[0].a.std() > 0.05


def test_mix_tap_contribution_and_lesions():
    for name, kw, by_hand in (("laurel", {}, laurel_by_hand), ("laurel_pa", {"k": 2}, pa_by_hand)):
        t, x = feature_trunk(name, **kw), x_in()
        s = t.scheme
        with torch.no_grad(), record(t, names=("mix", "contribution", "branch_out")) as rec:
            t(x)
        for i, (m, c, o) in enumerate(zip(rec.get("mix"), rec.get("contribution"), rec.get("branch_out"))):
            alpha, beta = ab(s, i)
            assert m.shape == ((1, 2) if name == "laurel" else (1, 2 + min(2, i + 1)))
            torch.testing.assert_close(m[0, :2], torch.stack([alpha, beta]))
            assert m[0, :2].sum().item() == pytest.approx(1.0)
            torch.testing.assert_close(c, alpha * o)
        for lesion in ({1}, {0, 3}, {4}):
            t.set_lesion(lesion)
            with torch.no_grad():
                torch.testing.assert_close(t(x), by_hand(t, x, frozenset(lesion)), rtol=0, atol=1e-12)
        t.set_lesion([])


def test_conv_stages():
    """``laurel`` on a ResNet: ``relu(alpha F + beta (S(x) + B A S(x)))`` at the stage changes too (option A
    shortcut, A: C_out -> r on channels); ``laurel_pa`` refuses them, and runs on maps of one shape."""
    torch.manual_seed(0)
    m = tiny_model("resnet8", "laurel", residual_kwargs={"rank": 2}).eval()
    s = m.trunk.scheme
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.3 * torch.randn_like(p))
        with record(m, names=("resid_pre", "branch_out", "resid_post")) as rec:
            m(tiny_input("resnet8"))
    for i, (pre, out, post) in enumerate(zip(rec.get("resid_pre"), rec.get("branch_out"), rec.get("resid_post"))):
        alpha, beta = ab(s, i)
        sx = s.shortcuts[i](pre)
        bas = torch.einsum("nchw,cr,rd->ndhw", sx, s.lowrank[i].a, s.lowrank[i].b)
        torch.testing.assert_close(post, torch.relu(alpha * out + beta * (sx + bas)))
    assert [tuple(lr.a.shape) for lr in s.lowrank] == [(4, 2), (8, 2), (16, 2)]
    with pytest.raises(ValueError, match="laurel_pa.*cannot combine branches that change shape"):
        tiny_model("resnet8", "laurel_pa")
    torch.manual_seed(0)
    convs = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()) for _ in range(4)]
    t = Trunk(convs, create_residual("laurel_pa", [BranchSpec(4, 4, 1, "conv")] * 4, rank=2)).double()
    with torch.no_grad():
        for p in t.scheme.parameters():
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        xs, sc = [x], t.scheme
        for i, f in enumerate(convs):
            alpha, beta = ab(sc, i)
            g = xs[i] + sum(sc.gammas[i][j] * torch.einsum("nchw,cr,rd->ndhw", xs[i - j], sc.lowrank[i][j].a,
                                                            sc.lowrank[i][j].b) for j in range(min(3, i + 1)))
            xs.append(alpha * f(xs[i]) + beta * g)
        torch.testing.assert_close(t(x), xs[-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "preact_mlp8"])  # no post ReLU: a linear stream
@pytest.mark.parametrize("name,variant", [("laurel", v) for v in VARIANTS] + [("laurel_pa", v) for v in PA_VARIANTS])
def test_every_variant_trains_decomposes_and_lesions(family, name, variant):
    torch.manual_seed(0)
    m = tiny_model(family, name, residual_kwargs={"variant": variant})
    x = tiny_input(family)
    m(x).logsumexp(-1).sum().backward()  # at init: B (zero) and the RW weights learn first; A waits for B (LoRA)
    s = m.trunk.scheme
    for n, p in s.named_parameters():
        if n.endswith(".b") or n == "rw" or (n.startswith("gammas") and "lr" not in variant):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m.zero_grad()
    m(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    dec = decompose(m, x)
    torch.testing.assert_close(dec.components.sum(0), dec.final, rtol=1e-4, atol=1e-5)
    m.eval()
    m.trunk.set_lesion([1])
    assert torch.isfinite(m(x)).all()


def test_pa_runs_blocks_in_another_order():
    torch.manual_seed(0)
    m = tiny_model("mlp8", "laurel_pa").eval()
    y = m(tiny_input("mlp8"))
    m.trunk.set_order([2, 0, 1])
    z = m(tiny_input("mlp8"))
    assert torch.isfinite(z).all() and not torch.equal(y, z)


FEAT = [BranchSpec(8, 8, 1, "features")] * 3


@pytest.mark.parametrize("name,kw,match", [
    ("laurel", {"variant": "pa"}, "variant must be one of 'rw', 'lr', 'rw_lr'"),
    ("laurel_pa", {"variant": "rw_lr"}, "variant must be one of"),
    ("laurel", {"rank": 0}, r"rank must be an integer in 1\.\.8"),
    ("laurel", {"rank": 9}, "rank must be an integer"),
    ("laurel", {"rank": 2.0}, "rank must be an integer"),
    ("laurel", {"rank": True}, "rank must be an integer"),
    ("laurel", {"a_init": "zeros"}, "a_init must be one of"),
    ("laurel", {"rw_norm": "tanh"}, "rw_norm must be one of"),
    ("laurel", {"rw_init": (0.3, 0.3)}, "positive and sum to 1"),
    ("laurel", {"rw_init": (1.0, 0.0)}, "positive and sum to 1"),
    ("laurel", {"rw_init": (0.5, 0.5, 0.0)}, "pair"),
    ("laurel", {"rw_init": "ab"}, "pair"),
    ("laurel", {"rw_init": 0.5}, "pair"),
    ("laurel", {"rw_init": (float("nan"), 0.5), "rw_norm": "none"}, "pair"),
    ("laurel", {"rw_init": (1.0, 0.5), "rw_norm": "sigmoid"}, r"in \(0, 1\)"),
    ("laurel", {"variant": "rw", "rank": 2}, "low-rank variants only"),
    ("laurel", {"variant": "lr", "rw_norm": "sigmoid"}, "RW variants only"),
    ("laurel_pa", {"variant": "pa", "a_init": "xavier"}, "low-rank variants only"),
    ("laurel_pa", {"k": 0}, "k must be an integer >= 1"),
    ("laurel_pa", {"k": 2.5}, "k must be an integer >= 1"),
    ("laurel_pa", {"shortcut": "B"}, "takes no shortcut option"),
    ("laurel", {"gamma": 1}, "unexpected keyword"),
])
def test_bad_arguments_are_one_line_errors(name, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        create_residual(name, FEAT, **kw)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_parameter_overhead_on_the_gpt_family():
    """Per branch: RW 2, LR 2rD, PA min(k, i+1) (2rD + 1 with low-rank h, 1 without); GPT d = 128, 8 layers."""
    def count(name, **kw):
        torch.manual_seed(0)
        m = reslab.create_model("gpt", name, depth=8, d_model=128, n_heads=4, num_classes=64, input_shape=(32,),
                                residual_kwargs=kw)
        return sum(p.numel() for p in m.parameters())

    base, r, n = count("identity"), 8, 16
    assert count("laurel") - base == n * (2 * r * 128 + 2)
    assert count("laurel", variant="rw") - base == 2 * n
    assert count("laurel", variant="lr", rank=4) - base == n * 2 * 4 * 128
    ks = [min(3, i + 1) for i in range(n)]
    assert count("laurel_pa") - base == sum(k * (2 * r * 128 + 1) for k in ks) + 2 * n
    assert count("laurel_pa", variant="pa") - base == sum(ks)
