"""Admin (Liu et al. 2020, arXiv 2004.08249) against its equation and its profiling rule written out here, on tiny
tensors; the closed forms and equality with the ``admin-torch`` package; profiling without side effects; the
state dict; the refusals."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from reslab import BranchSpec, Trunk, create_residual
from reslab.residuals.admin import CLOSED_FORMS, closed_form_omega

from conftest import TanhBranch, tiny_input, tiny_model

D, L = 6, 4


def specs(n: int = L, d: int = D) -> list[BranchSpec]:
    return [BranchSpec(d, d, 1, "features") for _ in range(n)]


def make(n: int = L, perturb: bool = True, **kw) -> Trunk:
    """A trunk of known tanh branches; with ``perturb`` every norm (and omega) moved off its init."""
    torch.manual_seed(0)
    trunk = Trunk([TanhBranch(seed=i, dim=D) for i in range(n)], create_residual("admin", specs(n), **kw))
    if perturb:
        with torch.no_grad():
            for p in trunk.scheme.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return trunk


def x_in(scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(5, 3, D, generator=torch.Generator().manual_seed(99))


def by_hand(trunk: Trunk, x: torch.Tensor, deleted=()) -> torch.Tensor:
    """``x_i = LN_i(omega_i * x_{i-1} + F_i(x_{i-1}))`` (eq. 5); a deleted branch leaves ``omega_i * x_{i-1}``."""
    s = trunk.scheme
    for i, branch in enumerate(trunk.branches):
        x = s.omega[i] * x if i in deleted else s.post_norms[i](s.omega[i] * x + branch(x))
    return x


def test_trunk_follows_the_paper_equation():
    trunk, x = make(), x_in()
    assert not torch.equal(trunk.scheme.omega, torch.ones_like(trunk.scheme.omega))
    with torch.no_grad():
        diff = float((trunk.eval()(x) - by_hand(trunk, x)).abs().max())
    print(f"admin equation: max abs diff {diff:.3g}")
    assert diff <= 1e-6


def test_lesion_leaves_the_weighted_skip():
    trunk, x = make(), x_in()
    trunk.eval().set_lesion([1, 2])
    torch.testing.assert_close(trunk(x), by_hand(trunk, x, deleted=(1, 2)), rtol=0, atol=1e-6)


def test_unprofiled_is_postln_and_warns_in_training_mode():
    trunk, x = make(perturb=False), x_in()
    s = trunk.scheme
    assert not s.profiled and torch.equal(s.omega, torch.ones(L, D))
    post = Trunk(list(trunk.branches), create_residual("postln", specs()))
    post.scheme.post_norms.load_state_dict(s.post_norms.state_dict())
    with pytest.warns(UserWarning, match="not profiled"):
        y = trunk.train()(x)
    torch.testing.assert_close(y, post(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trunk.eval()(x)  # no warning in eval mode
        s.profile(trunk, x)
        trunk.train()(x)  # nor once profiled


def profile_by_hand(trunk: Trunk, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """The authors' rule (Transformer-Clinic, ``adaptive-profiling``): ``omega_1 = 1``, ``omega_{i+1} =
    sqrt(Var[omega_i x_{i-1}] + Var[F_i(x_{i-1})])``, each omega set before branch ``i`` combines; returns the omegas
    and the branch output variances."""
    s = trunk.scheme
    omegas, variances, ratio = [], [], 1.0
    with torch.no_grad():
        for i, branch in enumerate(trunk.branches):
            f = branch(x)
            omegas.append(ratio)
            variances.append(float(f.double().var(correction=0)))
            ratio = math.sqrt(float((ratio * x).double().var(correction=0)) + variances[-1])
            x = s.post_norms[i](omegas[-1] * x + f)
    return omegas, variances


def test_profile_follows_the_authors_rule_and_the_papers_sum():
    trunk, x = make(perturb=False), x_in(scale=2.0)
    omegas, variances = profile_by_hand(trunk, x)
    got = trunk.scheme.profile(trunk, x)
    assert trunk.scheme.profiled
    want = torch.tensor(omegas).unsqueeze(1).expand(L, D)
    print(f"admin profile: omegas {[round(o, 4) for o in omegas]}, max abs diff {float((got - want).abs().max()):.3g}")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(trunk.scheme.omega.detach(), got, rtol=0, atol=0)
    # the paper's omega_i = sqrt(sum_{j<i} Var[F_j]), the stem output counted as F_0 (post-norm outputs have Var 1)
    var0 = float(x.double().var(correction=0))
    for i in range(1, L):
        assert omegas[i] ** 2 == pytest.approx(var0 + sum(variances[:i]), rel=1e-3)
    assert omegas[0] == 1.0 and all(a < b for a, b in zip(omegas, omegas[1:]))


@pytest.mark.parametrize("family", ["mlp8", "gpt2"])
def test_profile_has_no_side_effect_but_the_omegas_and_is_reproducible(family):
    torch.manual_seed(0)
    m = tiny_model(family, "admin").eval()
    s, x = m.trunk.scheme, tiny_input(family)
    params = {k: v.clone() for k, v in m.named_parameters() if not k.endswith("omega")}
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    rng = torch.get_rng_state()
    first = s.profile(m, x)
    assert torch.equal(torch.get_rng_state(), rng) and not m.training and s.profiled
    assert all(torch.equal(v, params[k]) for k, v in m.named_parameters() if k in params)
    assert all(torch.equal(v, buffers[k]) for k, v in m.named_buffers()  # BatchNorm statistics given back
               if not k.endswith("profiled_flag"))
    assert not torch.equal(first, torch.ones_like(first))
    assert torch.equal(s.profile(m, x), first)  # again: the same omegas
    m.trunk.set_lesion([1])
    assert torch.equal(s.profile(m, x), first)  # the whole trunk is profiled, whatever the lesion


@pytest.mark.parametrize("learnable", [True, False])
def test_state_dict_round_trips_omegas_and_profiled(learnable):
    def fresh():
        torch.manual_seed(0)
        return tiny_model("gpt2", "admin", residual_kwargs={"learnable": learnable}).eval()

    a, b, x = fresh(), fresh(), tiny_input("gpt2")
    assert ("trunk.scheme.omega" in dict(a.named_parameters())) == learnable
    a.trunk.scheme.profile(a, x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.trunk.scheme.profiled
    assert torch.equal(b.trunk.scheme.omega, a.trunk.scheme.omega)
    assert torch.equal(b(x), a(x))
    b.load_state_dict(fresh().state_dict())  # an unprofiled state makes it unprofiled again
    assert not b.trunk.scheme.profiled and torch.equal(b.trunk.scheme.omega, torch.ones_like(b.trunk.scheme.omega))


def test_closed_forms_are_admin_torch_calculate_init():
    n = L
    assert closed_form_omega(n, "O(logn)") == pytest.approx(math.sqrt((n + 1) / math.log(n + 1) - 1))
    assert closed_form_omega(n, "O(n)") == 1.0 and closed_form_omega(n, "O(1)") == pytest.approx(math.sqrt(n))
    for scale in CLOSED_FORMS:
        s = create_residual("admin", specs(), init=scale)
        assert s.profiled and torch.equal(s.omega, torch.full((L, D), closed_form_omega(L, scale)))
        with pytest.raises(ValueError, match="init='profile'"):
            s.profile(Trunk([TanhBranch(i, D) for i in range(L)], s), x_in())


@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("scale", CLOSED_FORMS)
def test_equal_to_admin_torch_at_init(scale, learnable):
    """The package's residual (``as_module``: ``x * omega + f_x``, a vector parameter or a scalar buffer) in a
    Post-LN loop with the same branches and norms gives the same output."""
    admin_torch = pytest.importorskip("admin_torch")
    trunk, x = make(perturb=False, init=scale, learnable=learnable), x_in()
    with torch.no_grad():  # norms off their init, the same in both
        for p in trunk.scheme.post_norms.parameters():
            p.add_(0.3 * torch.randn_like(p))
    residuals = [admin_torch.as_module(L, scale, as_parameter=learnable, embed_dim=D) for _ in range(L)]
    norms = [nn.LayerNorm(D) for _ in range(L)]
    for ln, mine in zip(norms, trunk.scheme.post_norms):
        ln.load_state_dict(mine.state_dict())
    with torch.no_grad():
        ref = x
        for branch, res, ln in zip(trunk.branches, residuals, norms):
            ref = ln(res(ref, branch(ref)))
        diff = float((trunk(x) - ref).abs().max())
    print(f"admin vs admin-torch {scale} learnable={learnable}: max abs diff {diff:.3g}")
    assert diff == 0.0


@pytest.mark.filterwarnings("ignore:admin. the omegas are not profiled")
def test_every_parameter_gets_a_gradient():
    trunk = make()
    trunk.train()(x_in()).square().mean().backward()
    for name, p in trunk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw, match", [
    (dict(init="O(log n)"), "init must be"), (dict(init=-1.0), "init must be"), (dict(init=True), "init must be"),
    (dict(init=float("nan")), "init must be"), (dict(norm="pre"), "supports norm placement post"),
    (dict(shortcut="B"), "takes no shortcut"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        create_residual("admin", specs(), **kw)
    assert "\n" not in str(e.value)


def test_refusals_are_one_line_errors():
    for family in ("resnet8", "preact_resnet8"):
        with pytest.raises(ValueError, match="needs feature streams|cannot combine branches") as e:
            tiny_model(family, "admin")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="one width"):
        create_residual("admin", [BranchSpec(6, 6, 1, "features"), BranchSpec(8, 8, 1, "features")])
    s = create_residual("admin", specs())
    with pytest.raises(ValueError, match="one trunk running this scheme") as e:
        s.profile(nn.Linear(D, D), x_in())
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a sum of components"):
        s.decompose(x_in(), [x_in()] * L, [None] * (L + 1))


def test_reslab_train_profiles_a_fresh_run_once(tmp_path):
    """``reslab train`` profiles Admin's omegas on a fresh run's first batch (the training loop's init_from_batch
    hook): the run's model is profiled, its (fixed) omegas are those of ``profile()`` on that batch, and training
    it raises no "not profiled" warning."""
    import warnings

    from reslab.data import load_dataset
    from reslab.train import TrainConfig, build_model, load_model, train

    cfg = TrainConfig(model="gpt1", residual="admin", residual_kwargs={"learnable": False},  # omegas: buffers
                      model_kwargs={"d_model": 16, "n_heads": 2}, data="pydoc:16", epochs=1, batch_size=16,
                      optimizer="sgd", lr=0.01, seed=0, device="cpu", train_samples=32, eval_train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(cfg, tmp_path / "run", quiet=True).status == "completed"
    trained, _ = load_model(tmp_path / "run")
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg, data)
    expected = fresh.trunk.scheme.profile(fresh, data.prepare(data.x_train[:cfg.batch_size], train=False))
    assert trained.trunk.scheme.profiled
    assert not torch.allclose(expected, torch.ones_like(expected))
    torch.testing.assert_close(trained.trunk.scheme.omega, expected)  # buffers: the profiled omegas, untouched
