"""Frac-connections (Zhu et al. 2025, arXiv 2503.14125) against their equations, written out per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.decomposition import decompose
from reslab.diagnostics.recorder import record
from reslab.residuals.frac import FracConnection
from reslab.residuals.hyper import Streams, composite_gain

from conftest import TanhBranch, tiny_input, tiny_model

D = 12


def specs(n: int = 4, d: int = D) -> list[BranchSpec]:
    return [BranchSpec(d, d, 1, "features", role="attn" if k % 2 == 0 else "mlp") for k in range(n)]


def tokens(seed: int = 99, d: int = D) -> torch.Tensor:
    return torch.randn(2, 3, d, generator=torch.Generator().manual_seed(seed))


def trunk_of(name: str, n_branches: int = 4, d: int = D, **kw) -> Trunk:
    return Trunk([TanhBranch(k, d) for k in range(n_branches)],
                 create_residual(name, specs(n_branches, d), norm=kw.pop("norm", "pre"), **kw))


def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --- equivalence with Pre-LN (and with one-stream HC) at init -----------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4, 12])
@pytest.mark.parametrize("dynamic", [True, False])
def test_init_is_pre_ln_bit_for_bit(m, dynamic):
    """Eq. (15): ``Y = A = I``, ``B = 1``, ``W = 0``: the branch reads ``h`` and the stream is ``x + F(x)``."""
    x = tokens()
    t = trunk_of("frac", fracs=m, dynamic=dynamic)
    torch.testing.assert_close(t(x), trunk_of("identity")(x), rtol=0, atol=0)
    state = t.scheme.begin(x)
    assert state.h.shape == (*x.shape[:-1], m, D // m) and state.h.data_ptr() == x.data_ptr()  # no copy, no growth


def test_gpt_model_at_init_is_pre_ln():
    x = tiny_input("gpt2")
    torch.manual_seed(3)
    ref = tiny_model("gpt2", "identity").eval()(x)
    for m in (2, 4):
        torch.manual_seed(3)
        torch.testing.assert_close(tiny_model("gpt2", "frac", residual_kwargs={"fracs": m}).eval()(x), ref,
                                   rtol=0, atol=0)


def test_post_relu_at_init_is_the_original_unit():
    """With ``post="relu"`` and no norm, frac at init is ``x = relu(x + F(x))``; no exact decomposition then."""
    bs, x = [TanhBranch(k, D) for k in range(4)], tokens()
    ref = Trunk(bs, create_residual("identity", specs(), post="relu"))(x)
    t = Trunk(bs, create_residual("frac", specs(), post="relu", fracs=3))
    torch.testing.assert_close(t(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a sum of components"):
        with record(t, names=("branch_out", "mix")) as rec:
            t(x)
        t.scheme.decompose(x, rec.get("branch_out"), rec.get("mix"))


@pytest.mark.parametrize("dynamic", [True, False])
def test_one_fraction_is_hc_with_one_stream(dynamic):
    """``m = n = 1``: frac-connections are hyper-connections (the paper's Fig. 1), with the same parameters."""
    hc, fc = trunk_of("hc", streams=1, dynamic=dynamic), trunk_of("frac", fracs=1, dynamic=dynamic)
    perturb(hc.scheme)
    fc.scheme.load_state_dict(hc.scheme.state_dict())
    x = tokens()
    torch.testing.assert_close(fc(x), hc(x), rtol=0, atol=1e-7)


def test_static_init_matches_paper():
    """Eq. (15) and Algorithm 2: ``static_alpha = [Y | A] = [I | I]``, ``B = 1``, ``W = 0``, ``s = 0.01``."""
    m, t = 3, trunk_of("frac", n_branches=5, fracs=3)
    for site in t.scheme.sites:
        torch.testing.assert_close(site.static_alpha, torch.cat((torch.eye(m), torch.eye(m)), 1))
        torch.testing.assert_close(site.static_beta, torch.ones(m))
        assert site.dynamic_alpha_fn.shape == (D // m, 2 * m) and site.dynamic_beta_fn.shape == (D // m,)
        assert not site.dynamic_alpha_fn.any() and not site.dynamic_beta_fn.any()
        assert site.dynamic_alpha_scale.item() == pytest.approx(0.01)
        assert site.dynamic_beta_scale.item() == pytest.approx(0.01)
        assert isinstance(site.norm, nn.LayerNorm) and site.norm.normalized_shape == (D // m,)


def test_parameter_counts_are_the_papers():
    """Eq. (16): ``m (2m + 1)`` per static FC (OLMoE-1B-7B-SFCx4: 1152 extra for 32 sites); eq. (19) with RMSNorm:
    ``d/m + (d/m)(2m + 1) + m (2m + 1) + 2`` (OLMo-1B-DFCx4, d = 2048, 32 sites: 165,056)."""
    def extra(d: int, dynamic: bool) -> int:
        s = create_residual("frac", specs(32, d), norm="none", norm_type="rmsnorm", fracs=4, dynamic=dynamic)
        return sum(p.numel() for p in s.sites.parameters())

    assert extra(64, dynamic=False) == 1152
    assert extra(2048, dynamic=True) == 165_056


# --- the equations, per token, after perturbing every parameter --------------------------------
def naive_frac(t: Trunk, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (6)-(14) and Algorithm 1, one token at a time: ``H = Reshape(h, (m, d/m))``, LayerNorm over each
    fraction, ``h_in = Reshape(Y^T H, (d,))``, ``H' = B^T o Reshape(T(h_in), (m, d/m)) + A^T H``."""
    sch, m = t.scheme, t.scheme.fracs
    y = torch.empty_like(x)
    for a in range(x.shape[0]):
        for p in range(x.shape[1]):
            H = x[a, p].reshape(m, -1)
            for k, br in enumerate(t.branches):
                s = sch.sites[k]
                Y, A, B = s.static_alpha[:, :m], s.static_alpha[:, m:], s.static_beta
                if s.dynamic:
                    mu, var = H.mean(-1, keepdim=True), H.var(-1, unbiased=False, keepdim=True)
                    Hb = (H - mu) / torch.sqrt(var + s.norm.eps) * s.norm.weight + s.norm.bias
                    Y = Y + s.dynamic_alpha_scale * torch.tanh(Hb @ s.dynamic_alpha_fn[:, :m])
                    A = A + s.dynamic_alpha_scale * torch.tanh(Hb @ s.dynamic_alpha_fn[:, m:])
                    B = B + s.dynamic_beta_scale * torch.tanh(Hb @ s.dynamic_beta_fn)
                h_in = torch.stack([sum(Y[j, i] * H[j] for j in range(m)) for i in range(m)]).reshape(-1)
                out = br(sch.in_norms[k](h_in)).reshape(m, -1)
                H = torch.stack([B[i] * out[i] + sum(A[j, i] * H[j] for j in range(m)) for i in range(m)])
            y[a, p] = H.reshape(-1)
    return y


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("dynamic", [True, False])
def test_matches_per_token_reference(m, dynamic):
    t = trunk_of("frac", fracs=m, dynamic=dynamic)
    perturb(t.scheme)
    x = tokens()
    torch.testing.assert_close(t(x), naive_frac(t, x), rtol=1e-5, atol=1e-5)


def test_equation_is_the_write():
    t, x = trunk_of("frac", fracs=3), tokens()
    perturb(t.scheme)
    s, state = t.scheme, t.scheme.begin(x)
    for i, br in enumerate(t.branches):
        h = s.read(state, i)
        out = br(h)
        new = s.write(state, i, out, h)
        torch.testing.assert_close(s.stream(new), s.equation(s.stream(state), out, i))
        state = new


# --- taps, decomposition, lesions, gradients -------------------------------------------------------
def test_mix_and_contribution_taps():
    """``mix`` is ``[A | Y | B]``, ``(..., m, 2m + 1)``, per token; ``contribution`` is ``Reshape(B^T o T, (d,))``."""
    m, t, x = 3, trunk_of("frac", fracs=3), tokens()
    with record(t, names=("mix", "contribution", "branch_out", "resid_post", "final")) as rec:
        y = t(x)
    eye = torch.eye(m).expand(*x.shape[:-1], m, m)
    for mx, c, out in zip(rec.get("mix"), rec.get("contribution"), rec.get("branch_out")):
        assert mx.shape == (*x.shape[:-1], m, 2 * m + 1)
        torch.testing.assert_close(mx[..., :m], eye)
        torch.testing.assert_close(mx[..., m:2 * m], eye)
        torch.testing.assert_close(mx[..., 2 * m], torch.ones(*x.shape[:-1], m))
        assert torch.equal(c, out)
    torch.testing.assert_close(rec.get("resid_post")[-1], y)
    gains = composite_gain(rec.by_depth("mix", len(t) + 1))
    torch.testing.assert_close(gains, torch.ones(len(t), dtype=torch.float64))
    perturb(t.scheme)
    with record(t, names=("mix", "contribution", "branch_out")) as rec:
        t(x)
    for mx, c, out in zip(rec.get("mix"), rec.get("contribution"), rec.get("branch_out")):
        torch.testing.assert_close(c, (mx[..., 2 * m:] * out.unflatten(-1, (m, -1))).flatten(-2))


@pytest.mark.parametrize("m", [2, 4])
def test_decomposition_sums_to_final_stream(m):
    torch.manual_seed(0)
    model = tiny_model("gpt2", "frac", residual_kwargs={"fracs": m})
    perturb(model.trunk.scheme)
    dec = decompose(model, tiny_input("gpt2"))
    assert dec.components.shape == (1 + len(model.trunk), *dec.final.shape)
    torch.testing.assert_close(dec.components.sum(0), dec.final, rtol=1e-5, atol=1e-5)


def test_decomposition_at_init_is_pre_lns():
    """``A = I``, ``B = 1``: each component is added once, as in Pre-LN."""
    t, x = trunk_of("frac", fracs=4), tokens()
    with record(t, names=("branch_out", "mix")) as rec:
        t(x)
    comps = t.scheme.decompose(x, rec.get("branch_out"), rec.by_depth("mix", len(t) + 1))
    torch.testing.assert_close(comps, torch.stack([x, *rec.get("branch_out")]), rtol=0, atol=0)


def test_lesion_removes_the_branch_term_and_keeps_the_mixing():
    t, x = trunk_of("frac", fracs=3), tokens()
    perturb(t.scheme)
    s = t.scheme
    state = Streams(torch.randn(2, 3, 3, D // 3, generator=torch.Generator().manual_seed(5)))
    for i in range(len(t)):
        h = s.read(state, i)
        skipped = s.skip(state, i).h
        torch.testing.assert_close(skipped, s.write(state, i, torch.zeros_like(h), h).h)
        a = s.coefficients(state.h, i)[1]
        torch.testing.assert_close(skipped, torch.einsum("...ji,...jd->...id", a, state.h))
    y = t(x)
    t.set_lesion([1])
    lesioned = t(x)
    t.set_lesion([])
    hook = t.branches[1].register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    torch.testing.assert_close(lesioned, t(x))
    hook.remove()
    assert not torch.allclose(lesioned, y)


@pytest.mark.parametrize("kw", [dict(), dict(dynamic=False), dict(fracs=1), dict(fracs=12, norm_type="rmsnorm")])
def test_every_parameter_gets_a_gradient(kw):
    t = trunk_of("frac", **kw)
    perturb(t.scheme)
    (t(tokens()) * tokens(seed=7)).sum().backward()
    for pname, p in t.scheme.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} got no gradient"


def test_static_has_no_dynamic_parameters():
    names = {n.split(".")[-1] for n, _ in trunk_of("frac", dynamic=False).scheme.sites.named_parameters()}
    assert names == {"static_alpha", "static_beta"}


def test_stream_and_carrier():
    t, x = trunk_of("frac", fracs=4), tokens()
    state = t.scheme.begin(x)
    assert torch.equal(t.scheme.stream(state), x) and torch.equal(t.scheme.end(state), x)
    assert t.scheme.carrier(state) is state.h


# --- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(fracs=0), dict(fracs=-2), dict(fracs=2.5), dict(fracs=True), dict(fracs=5),
                                dict(reduce="mean"), dict(streams=2), dict(norm="post"), dict(norm="sandwich"),
                                dict(shortcut="B"), dict(post="bn_relu")])
def test_bad_arguments_are_one_line_errors(kw):
    with pytest.raises(ValueError) as e:
        create_residual("frac", specs(), **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        reslab.create_model("gpt2", "frac", num_classes=5, d_model=8, n_heads=2, input_shape=(7,),
                            residual_kwargs=kw)
    assert "\n" not in str(e.value)


def test_width_must_divide():
    with pytest.raises(ValueError, match="fracs=5 does not divide the width 12"):
        create_residual("frac", specs(), fracs=5)


def test_capabilities_and_conv_refusal():
    caps = reslab.residuals.residual_class("frac").capabilities
    assert caps.multi_stream and caps.exposes_mixing and not caps.shape_change and not caps.uses_shortcut
    assert caps.mix_shape == ("N", "*lead", "m", "2m + 1")
    with pytest.raises(ValueError, match="feature streams"):
        create_residual("frac", [BranchSpec(4, 4, 1, "conv")])


# --- the hyper-connections package (num_fracs) ----------------------------------------------------------
def package_site(site: FracConnection, d: int, m: int) -> nn.Module:
    """The package's ``HyperConnections(1, num_fracs=m)`` holding ``site``'s weights: its ``static_alpha`` and
    ``dynamic_alpha_fn`` columns interleave (fraction, read / residual), its RMSNorm gain is ``gamma + 1``, and its
    ``(d/m, m)`` ``dynamic_beta_fn`` gets our ``W_beta`` in every column (so its diagonal ``beta`` is ours)."""
    hyper_connections = pytest.importorskip("hyper_connections")
    pkg = hyper_connections.HyperConnections(1, dim=d, num_fracs=m, layer_index=0)
    with torch.no_grad():
        pkg.static_alpha.copy_(torch.stack((site.static_alpha[:, :m], site.static_alpha[:, m:]), -1).flatten(-2))
        w = site.dynamic_alpha_fn
        pkg.dynamic_alpha_fn.copy_(torch.stack((w[:, :m], w[:, m:]), -1).flatten(-2))
        pkg.dynamic_alpha_scale.copy_(site.dynamic_alpha_scale)
        pkg.static_beta.copy_(site.static_beta)
        pkg.dynamic_beta_fn.copy_(site.dynamic_beta_fn.unsqueeze(-1).expand(-1, m))
        pkg.dynamic_beta_scale.copy_(site.dynamic_beta_scale)
        pkg.norm.gamma.copy_(site.norm.weight - 1)
    return pkg


@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_width_connection_equals_the_package_on_identical_weights(scale):
    """What the branch reads and the mixed residual ``A^T H`` are the package's on the same weights; its depth
    connection adds, beyond ours, every other output fraction ``f1`` to fraction ``f2`` with its off-diagonal
    ``beta[f1, f2] = beta_ours[f1] - B[f1] + B[f2]`` (at init: ``1``)."""
    d, m = 16, 4
    s = create_residual("frac", specs(2, d), norm="none", norm_type="rmsnorm", fracs=m)
    perturb(s, scale)
    pkg = package_site(s.sites[0], d, m)
    x, out = tokens(d=d), tokens(seed=5, d=d)
    state = s.begin(x)
    with torch.no_grad():
        branch_in, add_residual = pkg(x)
        torch.testing.assert_close(branch_in, s.read(state, 0), rtol=0, atol=1e-6)
        torch.testing.assert_close(add_residual(torch.zeros_like(x)), s.stream(s.skip(state, 0)), rtol=0, atol=1e-6)
        ours = s.stream(s.write(state, 0, out, branch_in))
        _, _, b = s.coefficients(state.h, 0)
        big_b, fr = s.sites[0].static_beta, out.unflatten(-1, (m, -1))
        extra = torch.stack([sum((b[..., f1] - big_b[f1] + big_b[f2]).unsqueeze(-1) * fr[..., f1, :]
                                 for f1 in range(m) if f1 != f2) for f2 in range(m)], -2).flatten(-2)
        torch.testing.assert_close(add_residual(out) - ours, extra, rtol=0, atol=1e-5)


def test_parameter_count_against_the_package():
    """Per branch the package holds ``(d/m)(m - 1)`` more (its ``dynamic_beta_fn`` is ``(d/m, m)``, ours ``(d/m,)``,
    eq. (12))."""
    d, m = 16, 4
    s = create_residual("frac", specs(1, d), norm="none", norm_type="rmsnorm", fracs=m)
    pkg = package_site(s.sites[0], d, m)
    ours, theirs = (sum(p.numel() for p in mod.parameters()) for mod in (s.sites[0], pkg))
    assert theirs - ours == (d // m) * (m - 1)


def test_the_package_at_its_own_init_is_not_the_papers():
    """What the module docstring says of ``hyper-connections`` (v0.4.11) with ``num_fracs=4`` at its own init: the
    branch reads ``(h_1, h_1, h_1, h_3)``, the residual is ``(h_1, h_1, h_2, h_4)``, and every fraction receives the sum
    of the branch output's fractions (ours at init: ``h``, ``H`` and ``out``)."""
    hyper_connections = pytest.importorskip("hyper_connections")
    pkg = hyper_connections.HyperConnections(1, dim=8, num_fracs=4, layer_index=0)
    x, out = tokens(d=8), tokens(seed=5, d=8)
    h, o = x.unflatten(-1, (4, 2)), out.unflatten(-1, (4, 2))
    with torch.no_grad():
        branch_in, add_residual = pkg(x)
        torch.testing.assert_close(branch_in.unflatten(-1, (4, 2)), h[..., [0, 0, 0, 2], :])
        residual = h[..., [0, 0, 1, 3], :]
        torch.testing.assert_close(add_residual(torch.zeros_like(x)).unflatten(-1, (4, 2)), residual)
        torch.testing.assert_close(add_residual(out).unflatten(-1, (4, 2)), residual + o.sum(-2, keepdim=True))
