"""Hyper-connections (Zhu et al. 2024) and mHC (Xie et al. 2025) against their equations, written out per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.decomposition import decompose
from reslab.diagnostics.recorder import record
from reslab.residuals.hyper import Streams, composite_gain, sinkhorn_knopp

from conftest import TanhBranch, tiny_input, tiny_model

D = 6
SCHEMES = ("hc", "mhc")


def specs(n: int = 4) -> list[BranchSpec]:
    return [BranchSpec(D, D, 1, "features", role="attn" if k % 2 == 0 else "mlp") for k in range(n)]


def tokens(seed: int = 99) -> torch.Tensor:
    return torch.randn(2, 3, D, generator=torch.Generator().manual_seed(seed))


def trunk_of(name: str, n_branches: int = 4, **kw) -> Trunk:
    return Trunk([TanhBranch(k) for k in range(n_branches)], create_residual(name, specs(n_branches), norm="pre", **kw))


def pre_ln(n_branches: int = 4) -> Trunk:
    return trunk_of("identity", n_branches)


def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --- equivalence with Pre-LN at init -----------------------------------------------------------
@pytest.mark.parametrize("name", SCHEMES)
def test_one_stream_is_pre_ln(name):
    x = tokens()
    atol = 0 if name == "hc" else 1e-5  # mhc: H_pre = sigmoid(b) = 1 - 1e-6 with one stream
    torch.testing.assert_close(trunk_of(name, streams=1)(x), pre_ln()(x), rtol=0, atol=atol)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dynamic", [True, False])
def test_init_is_pre_ln(name, n, dynamic):
    """Every stream holds the Pre-LN stream at init: ``mean`` gives x_L, the paper's ``sum`` gives n x_L."""
    x = tokens()
    ref = pre_ln()(x)
    mean = trunk_of(name, streams=n, dynamic=dynamic, reduce="mean")
    total = trunk_of(name, streams=n, dynamic=dynamic)
    tol = 1e-6 if name == "hc" else 1e-5  # mhc: sigmoid and Sinkhorn rounding (sum(H_pre) = 1 to ~1e-7)
    torch.testing.assert_close(mean(x), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(total(x), n * ref, rtol=tol, atol=tol)
    state = total.scheme.begin(x)
    for i, b in enumerate(total.branches):
        state = total.scheme.write(state, i, b(total.scheme.read(state, i)), None)
        torch.testing.assert_close(state.h, state.h[..., :1, :].expand_as(state.h), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", SCHEMES)
def test_post_relu_at_init_is_the_original_unit(name):
    """With ``post="relu"`` and no norm, HC / mHC at init are ``x = relu(x + F(x))`` (He et al. 2015)."""
    bs = [TanhBranch(k) for k in range(4)]
    x = tokens()
    ref = Trunk(bs, create_residual("identity", specs(), post="relu"))(x)
    t = Trunk(bs, create_residual(name, specs(), post="relu", reduce="mean"))
    torch.testing.assert_close(t(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a sum of components"):
        with record(t, names=("branch_out", "mix")) as rec:
            t(x)
        t.scheme.decompose(x, rec.get("branch_out"), rec.get("mix"))


@pytest.mark.parametrize("name", SCHEMES)
def test_gpt_model_at_init_is_pre_ln(name):
    """Same seed, same branches: the gpt2 model with HC / mHC (reduce="mean") is the Pre-LN model at init."""
    x = tiny_input("gpt2")
    torch.manual_seed(3)
    ref = tiny_model("gpt2", "identity").eval()(x)
    torch.manual_seed(3)
    m = tiny_model("gpt2", name, residual_kwargs={"reduce": "mean"}).eval()
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_hc_static_init_matches_paper():
    """Eq. (14): ``A_m = e_{k mod n}`` (k = branch index), ``A_r = I``, ``B = 1``; W = 0, s = 0.01."""
    n, t = 3, trunk_of("hc", n_branches=5, streams=3)
    for k, site in enumerate(t.scheme.sites):
        torch.testing.assert_close(site.static_alpha[:, 0], torch.eye(n)[k % n])
        torch.testing.assert_close(site.static_alpha[:, 1:], torch.eye(n))
        torch.testing.assert_close(site.static_beta, torch.ones(n))
        assert not site.dynamic_alpha_fn.any() and not site.dynamic_beta_fn.any()
        assert site.dynamic_alpha_scale.item() == pytest.approx(0.01)
        assert site.dynamic_beta_scale.item() == pytest.approx(0.01)


def test_mhc_init_mappings():
    """H_post = 1, sum(H_pre) = 1 with its largest weight on stream k mod n, H_res doubly stochastic."""
    n, t = 4, trunk_of("mhc", n_branches=5, streams=4)
    h = t.scheme.begin(tokens()).h
    for k in range(5):
        a_m, a_r, b = t.scheme.coefficients(h, k)
        torch.testing.assert_close(b, torch.ones_like(b))
        torch.testing.assert_close(a_m.sum(-1), torch.ones(a_m.shape[:-1]))
        assert (a_m.argmax(-1) == k % n).all()
        torch.testing.assert_close(a_r.sum(-1), torch.ones(a_r.shape[:-1]))
        torch.testing.assert_close(a_r.sum(-2), torch.ones(a_r.shape[:-1]))


# --- the equations, per token, after perturbing every parameter --------------------------------
def naive_hc(t: Trunk, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (2)-(5), (10)-(13) of Zhu et al., one token at a time, sum of rows at the end (Algorithm 1)."""
    sch, n = t.scheme, t.scheme.streams
    y = torch.empty_like(x)
    for a in range(x.shape[0]):
        for p in range(x.shape[1]):
            H = x[a, p].repeat(n, 1)  # (n, d)
            for k, br in enumerate(t.branches):
                s = sch.sites[k]
                mu, var = H.mean(-1, keepdim=True), H.var(-1, unbiased=False, keepdim=True)
                Hb = (H - mu) / torch.sqrt(var + s.norm.eps) * s.norm.weight + s.norm.bias
                A_m = s.static_alpha[:, 0] + s.dynamic_alpha_scale * torch.tanh(Hb @ s.dynamic_alpha_fn[:, 0])
                A_r = s.static_alpha[:, 1:] + s.dynamic_alpha_scale * torch.tanh(Hb @ s.dynamic_alpha_fn[:, 1:])
                B = s.static_beta + s.dynamic_beta_scale * torch.tanh(Hb @ s.dynamic_beta_fn)
                h0 = torch.einsum("s,sd->d", A_m, H)
                out = br(sch.in_norms[k](h0))
                H = torch.einsum("st,sd->td", A_r, H) + torch.einsum("s,d->sd", B, out)
            y[a, p] = H.sum(0)
    return y


def naive_mhc(t: Trunk, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (3), (7)-(9) of Xie et al., one token at a time (explicit Sinkhorn loops)."""
    sch, n = t.scheme, t.scheme.streams
    y = torch.empty_like(x)
    for a in range(x.shape[0]):
        for p in range(x.shape[1]):
            X = x[a, p].repeat(n, 1)
            for k, br in enumerate(t.branches):
                s = sch.sites[k]
                v = X.reshape(-1)
                z = (v / torch.sqrt((v * v).mean() + 1e-6)) @ s.phi
                H_pre = torch.sigmoid(s.alpha[0] * z[:n] + s.pre_bias)
                H_post = 2 * torch.sigmoid(s.alpha[1] * z[n:2 * n] + s.post_bias)
                if n == 1:  # the doubly stochastic condition degenerates to the scalar 1 (mHC section 4.1)
                    assert s.res_bias is None
                    M = torch.ones(1, 1)
                else:
                    M = torch.exp(s.alpha[2] * z[2 * n:].reshape(n, n) + s.res_bias)
                for _ in range(sch.sinkhorn_iters if n > 1 else 0):
                    M = torch.stack([M[:, j] / M[:, j].sum() for j in range(n)], dim=1)  # columns
                    M = torch.stack([M[i, :] / M[i, :].sum() for i in range(n)], dim=0)  # rows
                out = br(sch.in_norms[k](H_pre @ X))
                X = M @ X + torch.outer(H_post, out)
            y[a, p] = X.sum(0)
    return y


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("scheme, reference", [("hc", naive_hc), ("mhc", naive_mhc)])
def test_matches_per_token_reference(scheme, reference, n):
    t = trunk_of(scheme, streams=n)
    perturb(t.scheme)
    x = tokens()
    torch.testing.assert_close(t(x), reference(t, x), rtol=1e-5, atol=1e-5)


def test_mhc_residual_matrix_is_doubly_stochastic():
    t = trunk_of("mhc", streams=4)
    perturb(t.scheme, scale=0.3)
    with record(t, names=("mix",)) as rec:
        t(tokens())
    for m in rec.get("mix"):
        a_r, a_m, b = m[..., :4], m[..., 4], m[..., 5]
        assert (a_r >= 0).all() and (a_m >= 0).all() and (a_m <= 1).all() and (b >= 0).all() and (b <= 2).all()
        torch.testing.assert_close(a_r.sum(-1), torch.ones(a_r.shape[:-1]), rtol=0, atol=1e-4)
        torch.testing.assert_close(a_r.sum(-2), torch.ones(a_r.shape[:-1]), rtol=0, atol=1e-4)
        assert torch.linalg.matrix_norm(a_r, ord=2).max() <= 1 + 1e-4


def test_sharp_logits_need_more_iterations():
    """Near-permutation logits: rows of H_res stay exact, columns converge only as iterations grow (the finite
    Sinkhorn gap mHC-lite, arXiv 2601.05732, points out)."""
    gaps = []
    for iters in (20, 200):
        t = trunk_of("mhc", streams=4, sinkhorn_iters=iters)
        perturb(t.scheme, scale=1.0)
        with record(t, names=("mix",)) as rec:
            t(tokens())
        h_res = [m[..., :4].transpose(-1, -2) for m in rec.get("mix")]
        assert max(float((h.sum(-1) - 1).abs().max()) for h in h_res) < 1e-5
        gaps.append(max(float((h.sum(-2) - 1).abs().max()) for h in h_res))
    assert gaps[1] < gaps[0] / 5


def test_sinkhorn_rows_exact_and_iterations_count():
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0))
    m = sinkhorn_knopp(logits, iters=20)
    torch.testing.assert_close(m.sum(-1), torch.ones(5, 4), rtol=0, atol=1e-6)
    one = sinkhorn_knopp(logits, iters=1)
    e = logits.exp()
    e = e / e.sum(-2, keepdim=True)
    torch.testing.assert_close(one, e / e.sum(-1, keepdim=True))


# --- taps, decomposition, lesions, gradients -------------------------------------------------------
def test_mix_layout_at_init():
    """``mix`` is ``[A_r | A_m | B]``, ``(..., n, n+2)``, per token."""
    n, t, x = 3, trunk_of("hc", streams=3), tokens()
    with record(t, names=("mix", "contribution", "resid_post", "final")) as rec:
        y = t(x)
    for k, m in enumerate(rec.get("mix")):
        assert m.shape == (*x.shape[:-1], n, n + 2)
        torch.testing.assert_close(m[..., :n], torch.eye(n).expand_as(m[..., :n]))
        torch.testing.assert_close(m[..., n], torch.eye(n)[k % n].expand_as(m[..., n]))
        torch.testing.assert_close(m[..., n + 1], torch.ones_like(m[..., n + 1]))
    assert all(c.shape == x.shape for c in rec.get("contribution") + rec.get("resid_post"))
    torch.testing.assert_close(rec.get("resid_post")[-1], y)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("name", SCHEMES)
def test_decomposition_sums_to_final_stream(name, reduce):
    torch.manual_seed(0)
    m = tiny_model("gpt2", name, residual_kwargs={"reduce": reduce, "streams": 3})
    perturb(m.trunk.scheme)
    dec = decompose(m, tiny_input("gpt2"))
    assert dec.components.shape == (1 + len(m.trunk), *dec.final.shape)
    torch.testing.assert_close(dec.components.sum(0), dec.final, rtol=1e-5, atol=1e-5)


def test_decomposition_at_init_weights_every_component_by_n():
    t, x = trunk_of("hc", streams=4), tokens()
    with record(t, names=("branch_out", "mix", "final")) as rec:
        t(x)
    comps = t.scheme.decompose(x, rec.get("branch_out"), rec.by_depth("mix", len(t) + 1))
    torch.testing.assert_close(comps, 4 * torch.stack([x, *rec.get("branch_out")]))


@pytest.mark.parametrize("name", SCHEMES)
def test_lesion_removes_the_branch_term(name):
    t, x = trunk_of(name, streams=3), tokens()
    perturb(t.scheme)
    state = Streams(torch.randn(2, 3, 3, D, generator=torch.Generator().manual_seed(5)))
    for i in range(len(t)):
        h = t.scheme.read(state, i)
        torch.testing.assert_close(t.scheme.skip(state, i).h, t.scheme.write(state, i, torch.zeros_like(h), h).h)
    y = t(x)
    t.set_lesion([1])
    lesioned = t(x)
    t.set_lesion([])
    hook = t.branches[1].register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    torch.testing.assert_close(lesioned, t(x))
    hook.remove()
    assert not torch.allclose(lesioned, y)


@pytest.mark.parametrize("kw", [dict(), dict(dynamic=False), dict(streams=1), dict(streams=2, reduce="mean")])
@pytest.mark.parametrize("name", SCHEMES)
def test_every_parameter_gets_a_gradient(name, kw):
    t = trunk_of(name, **kw)
    perturb(t.scheme)
    (t(tokens()) * tokens(seed=7)).sum().backward()
    for pname, p in t.scheme.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} got no gradient"


def test_static_has_no_dynamic_parameters():
    names = {n.split(".")[-1] for n, _ in trunk_of("hc", dynamic=False).scheme.sites.named_parameters()}
    assert names == {"static_alpha", "static_beta"}
    names = {n.split(".")[-1] for n, _ in trunk_of("mhc", dynamic=False).scheme.sites.named_parameters()}
    assert names == {"pre_bias", "post_bias", "res_bias"}


def test_stream_is_the_reduced_state():
    t, x = trunk_of("mhc", streams=3), tokens()
    state = t.scheme.begin(x)
    assert state.h.shape == (*x.shape[:-1], 3, D)
    torch.testing.assert_close(t.scheme.stream(state), 3 * x)
    torch.testing.assert_close(t.scheme.end(state), 3 * x)


# --- composite gain -------------------------------------------------------------------------------
def test_composite_gain_by_hand():
    n = 2
    mix = torch.zeros(3, n, n + 2)  # 3 tokens
    mix[..., :n] = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # A_r; H_res = A_r^T = [[2, 1], [0, 1]]
    gains = composite_gain([mix, mix, None])
    # H_res row sums: (3, 1); H_res^2 = [[4, 3], [0, 1]]: row sums (7, 1)
    torch.testing.assert_close(gains, torch.tensor([3.0, 7.0], dtype=torch.float64))
    # column sums: H_res (2, 2); H_res^2 (4, 4)
    torch.testing.assert_close(composite_gain([mix, mix], backward=True),
                               torch.tensor([2.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        composite_gain([mix, None, mix])


def test_composite_gain_identity_for_hc_init_and_bounded_for_mhc():
    x = tokens()
    for name, scale in (("hc", 0.0), ("mhc", 1.0)):
        t = trunk_of(name, n_branches=6)
        perturb(t.scheme, scale=scale)
        with record(t, names=("mix",)) as rec:
            t(x)
        gains = composite_gain(rec.by_depth("mix", len(t) + 1))
        assert gains.shape == (6,)
        torch.testing.assert_close(gains, torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-4)


# --- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("kw", [dict(streams=0), dict(streams=-2), dict(streams=2.5), dict(streams=True),
                                dict(reduce="max"), dict(norm="post"), dict(shortcut="B")])
def test_bad_arguments_are_one_line_errors(name, kw):
    with pytest.raises(ValueError) as e:
        create_residual(name, specs(), **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        reslab.create_model("gpt2", name, num_classes=5, d_model=8, n_heads=2, input_shape=(7,),
                            residual_kwargs=kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("iters", [0, -1, 1.5])
def test_bad_sinkhorn_iters(iters):
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        create_residual("mhc", specs(), sinkhorn_iters=iters)


def test_capabilities_and_conv_refusal():
    for name in SCHEMES:
        caps = reslab.residuals.residual_class(name).capabilities
        assert caps.multi_stream and caps.exposes_mixing and not caps.shape_change and not caps.uses_shortcut
        with pytest.raises(ValueError, match="feature streams"):
            create_residual(name, [BranchSpec(4, 4, 1, "conv")])


def test_sinkhorn_gradient_equals_autograd_through_the_unrolled_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, 4, dtype=torch.float64)

    def loop(lg, iters=7):
        m = torch.exp(lg - lg.amax(dim=(-2, -1), keepdim=True).detach())
        for _ in range(iters):
            m = m / m.sum(-2, keepdim=True)
            m = m / m.sum(-1, keepdim=True)
        return m

    torch.testing.assert_close(sinkhorn_knopp(logits, 7), loop(logits))
    g_ref, = torch.autograd.grad((loop(logits) * w).sum(), logits)
    g, = torch.autograd.grad((sinkhorn_knopp(logits, 7) * w).sum(), logits)
    torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(lambda lg: sinkhorn_knopp(lg, 3), (logits[:1, :2],))


def test_both_mixing_paths_agree():
    from reslab.residuals.hyper import MATMUL_MIX_WIDTH, MultiStreamScheme

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, 4, generator=g)
    for d in (8, MATMUL_MIX_WIDTH):
        s = torch.randn(5, 4, d, generator=g)
        ref = torch.einsum("...st,...sd->...td", a, s)
        torch.testing.assert_close(MultiStreamScheme._mix(a, s), ref)
