"""nGPT (Loshchilov et al. 2024, arXiv 2410.01131): the hypersphere residual rule, its step sizes, unit-norm weights."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.recorder import record
from reslab.train import TrainConfig, load_model, train

from conftest import TanhBranch

D = 6
ROLES = ("attn", "mlp", "attn", "mlp")


def specs(n: int = 4, d: int = D) -> list[BranchSpec]:
    return [BranchSpec(d, d, 1, "features", role=ROLES[i % 2]) for i in range(n)]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def trunk(n: int = 4, seed: int = 0, **kw) -> Trunk:
    """A trunk of ``TanhBranch`` branches under ``ngpt``, its step sizes moved off their init (drawn from ``seed``)."""
    scheme = create_residual("ngpt", specs(n), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scheme.alphas.copy_(scheme.alpha_scale * (1 + 4 * torch.randn(scheme.alphas.shape, generator=g)))
    return Trunk([TanhBranch(i, D) for i in range(n)], scheme)


def x_in(seed: int = 99) -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(seed))


def by_hand(t: Trunk, x: torch.Tensor, skip: tuple[int, ...] = ()) -> torch.Tensor:
    """nGPT section 2: ``h_0 = Norm(x)``, then ``h <- Norm(h + alpha_i (Norm(F_i(h)) - h))``, skipping ``skip``."""
    s = t.scheme
    h = unit(x)
    for i, b in enumerate(t.branches):
        if i in skip:
            continue
        a = s.alphas[i] * s.alpha_init / s.alpha_scale
        a = a.abs() if s.positive else a
        h = unit(h + a * (unit(b(h)) - h))
    return h


@pytest.mark.parametrize("positive", [False, True])
def test_trunk_is_the_paper_equation(positive):
    t = trunk(positive=positive)
    x = x_in()
    diff = (t(x) - by_hand(t, x)).abs().max().item()
    assert diff < 1e-6, diff
    assert (t.scheme.alphas < 0).any()  # so that |alpha| makes a difference
    s, h, fx = t.scheme, unit(x), torch.randn(3, 5, D)
    for i in range(len(t)):  # the scheme's equation is its skip + contribution, and write is Norm of it
        torch.testing.assert_close(s.equation(h, fx, i), s.skip(h, i) + s.contribution(fx, h, i))
        torch.testing.assert_close(s.write(h, i, fx, h), unit(s.equation(h, fx, i)))


def test_positive_takes_the_absolute_step_size():
    a, b = trunk(positive=False), trunk(positive=True)
    x = x_in()
    assert not torch.allclose(a(x), b(x))
    with torch.no_grad():
        a.scheme.alphas.abs_()
    torch.testing.assert_close(a(x), b(x))


def test_stream_is_unit_norm_at_every_depth():
    t = trunk()
    with record(t, names=("resid_pre", "resid_post", "final")) as rec:
        t(x_in() * 7)
    for name in ("resid_pre", "resid_post", "final"):
        for v in rec.get(name):
            torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 5))


def test_step_sizes_init_and_scaled_parametrisation():
    s = create_residual("ngpt", specs())
    assert s.alpha_init == 0.05 and s.alpha_scale == pytest.approx(1 / math.sqrt(D))
    assert torch.allclose(s.alphas, torch.full((4, D), 1 / math.sqrt(D)))  # the stored parameter starts at the scale
    for i in range(4):
        torch.testing.assert_close(s.alpha(i), torch.full((D,), 0.05))
    s = create_residual("ngpt", specs(), alpha_init=0.2, alpha_scale=0.5)
    assert torch.allclose(s.alphas, torch.full((4, D), 0.5)) and torch.allclose(s.alpha(0), torch.full((D,), 0.2))


def test_zero_step_sizes_keep_the_normalised_input():
    t = trunk(alpha_init=0.0)
    x = x_in()
    torch.testing.assert_close(t(x), unit(x))  # re-normalising a unit vector: rounding only


def test_lesion_leaves_the_stream_unchanged():
    t = trunk()
    x = x_in()
    for lesion in ((1,), (0, 3), (0, 1, 2, 3)):
        t.set_lesion(lesion)
        torch.testing.assert_close(t(x), by_hand(t, x, skip=lesion))
        assert torch.equal(t.scheme.skip(unit(x), lesion[0]), unit(x))


def test_every_parameter_gets_a_gradient():
    t = trunk()
    t(x_in()).square().sum().backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def gpt(depth: int = 2, **kw) -> reslab.ResidualNet:
    torch.manual_seed(0)
    return reslab.create_model(f"gpt{depth}", "ngpt", num_classes=5, d_model=8, n_heads=2, input_shape=(7,), **kw)


@torch.no_grad()
def sphere_errors(m: reslab.ResidualNet) -> list[float]:
    """How far every branch matrix is from unit norm along its embedding axis: rows of what reads the stream
    (qkv, fc), columns of what writes to it (both proj)."""
    errs = []
    for b in m.trunk.branches:
        if hasattr(b, "qkv"):
            errs += [b.qkv.weight.norm(dim=1), b.proj.weight.norm(dim=0)]
        else:
            errs += [b.fc.weight.norm(dim=1), b.proj.weight.norm(dim=0)]
    return [(e - 1).abs().max().item() for e in errs]


def test_gpt_branch_weights_are_on_the_sphere_at_init_and_after_each_step():
    m = gpt()
    assert max(sphere_errors(m)) < 1e-6
    emb = m.stem.tok.weight.detach().clone()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.7).add_(0.1)
    assert min(sphere_errors(m)) > 0.1
    alphas = m.trunk.scheme.alphas.detach().clone()
    m.trunk.scheme.after_optimizer_step()
    assert max(sphere_errors(m)) < 1e-6
    assert torch.equal(m.trunk.scheme.alphas, alphas)  # step sizes and the family's other weights are left alone
    assert torch.equal(m.stem.tok.weight, emb * 1.7 + 0.1)


def test_gpt_forward_is_the_paper_equation_on_its_branches():
    m = gpt(depth=3).eval()
    with torch.no_grad():
        m.trunk.scheme.alphas.mul_(torch.rand(m.trunk.scheme.alphas.shape) * 8)
    idx = torch.randint(0, 5, (4, 7), generator=torch.Generator().manual_seed(1))
    with record(m, names=("final",)) as rec:
        m(idx)
    got = rec.get("final")[0]
    diff = (got - by_hand(m.trunk, m.stem(idx))).abs().max().item()
    assert diff < 1e-6, diff


def test_training_keeps_the_branch_weights_on_the_sphere(tmp_path):
    """The training loop calls the scheme's hook after every step: the saved weights are unit-norm, alphas moved."""
    cfg = TrainConfig(model="gpt1", residual="ngpt", model_kwargs={"d_model": 16, "n_heads": 2}, data="pydoc:16",
                      epochs=1, batch_size=16, optimizer="adamw", lr=1e-2, seed=0, device="cpu", train_samples=64,
                      eval_train=False)
    assert train(cfg, tmp_path / "run", quiet=True).status == "completed"
    m, _ = load_model(tmp_path / "run")
    assert max(sphere_errors(m)) < 1e-6
    assert (m.trunk.scheme.alphas - m.trunk.scheme.alpha_scale).abs().max() > 1e-3
    off = train(replace(cfg, residual="preln"), tmp_path / "preln", quiet=True)  # no hook: weights drift off
    assert off.status == "completed"
    m, _ = load_model(tmp_path / "preln")
    assert min(sphere_errors(m)) > 1e-2


@pytest.mark.parametrize("kw, match", [
    (dict(alpha_init="0.05"), "alpha_init must be a finite number"),
    (dict(alpha_init=float("nan")), "alpha_init must be a finite number"),
    (dict(alpha_init=True), "alpha_init must be a finite number"),
    (dict(alpha_scale=0.0), "alpha_scale must be a positive number"),
    (dict(alpha_scale="1/d"), "alpha_scale must be a positive number"),
    (dict(positive=1), "positive must be True or False"),
    (dict(norm="pre"), "supports norm placement none"),
    (dict(post="relu"), "supports the post-combination ops none"),
    (dict(shortcut="B"), "takes no shortcut option"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        create_residual("ngpt", specs(), **kw)
    assert "\n" not in str(e.value)


def test_families_without_token_sublayers_are_refused():
    with pytest.raises(ValueError, match="ngpt.*attention sublayers") as e:
        reslab.create_model("mlp8", "ngpt", num_classes=5, width=8, input_shape=(12,))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="feature streams") as e:
        create_residual("ngpt", [BranchSpec(4, 4, 1, "conv", role="attn")])
    assert "\n" not in str(e.value)


def test_a_weight_without_an_embedding_axis_is_refused():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 5))

        def projections(self):
            return {"query": [self.w]}

    with pytest.raises(ValueError, match="no axis 1 of the stream's width 6") as e:
        create_residual("ngpt", specs(1)).bind([Odd()])
    assert "\n" not in str(e.value)


# --- against lucidrains' nGPT-pytorch (installed with ``pip install --no-deps nGPT-pytorch rotary-embedding-torch``)
def test_residual_step_matches_ngpt_pytorch():
    peer = pytest.importorskip("nGPT_pytorch")
    t = trunk()
    s = t.scheme
    steps = []
    for i, b in enumerate(t.branches):
        res = peer.Residual(b, D, init=s.alpha_init, scale=s.alpha_scale)
        with torch.no_grad():
            res.branch_scale.scale.copy_(s.alphas[i])
        steps.append(res)
    h = unit(x_in())
    for i, res in enumerate(steps):  # one sublayer step on the same stream, branch and alpha
        out = t.branches[i](h)
        diff = (s.write(h, i, out, h) - res(h)).abs().max().item()
        assert diff < 1e-6, (i, diff)
    x = x_in(5)
    h = unit(x)  # the peer's tokens are rows of its normalised embedding: our begin
    for res in steps:
        h = res(h)
    diff = (t(x) - h).abs().max().item()
    assert diff < 1e-6, diff
    at_init = create_residual("ngpt", specs(1))  # the same init: scale 1/sqrt(d), alpha 0.05
    res = peer.Residual(t.branches[0], D, init=0.05)
    torch.testing.assert_close(at_init.alphas[0], res.branch_scale.scale.detach())
    torch.testing.assert_close(at_init.alpha(0), res.branch_scale().detach())


def test_weight_axes_match_ngpt_pytorch():
    """The peer's NormLinear: unit rows for what reads the stream, unit columns for what writes to it."""
    peer = pytest.importorskip("nGPT_pytorch")
    m = gpt(depth=1)
    with torch.no_grad():
        for p in m.trunk.branches.parameters():
            p.mul_(1.7).add_(0.1)
    attn, mlp = m.trunk.branches
    pairs = [(attn.qkv.weight, peer.NormLinear(8, 24, parametrize=False)),
             (attn.proj.weight, peer.NormLinear(8, 8, norm_dim_in=False, parametrize=False)),
             (mlp.fc.weight, peer.NormLinear(8, 32, parametrize=False)),
             (mlp.proj.weight, peer.NormLinear(32, 8, norm_dim_in=False, parametrize=False))]
    for w, lin in pairs:
        with torch.no_grad():
            lin.weight.copy_(w)
        lin.norm_weights_()
    m.trunk.scheme.after_optimizer_step()
    diff = max((w - lin.weight).abs().max().item() for w, lin in pairs)
    assert diff < 1e-6, diff
