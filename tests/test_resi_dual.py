"""ResiDual (Xie et al. 2023, arXiv 2304.14802) against its equations written out here, on tiny tensors: the two
streams, the output, taps and gradients of both streams, lesions, and the refusals."""

from __future__ import annotations

import pytest
import torch

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.recorder import record

from conftest import TanhBranch, tiny_input, tiny_model

D, L = 6, 4


def specs(n: int = L, d: int = D) -> list[BranchSpec]:
    return [BranchSpec(d, d, 1, "features") for _ in range(n)]


def make(name: str = "resi_dual", n: int = L, branches=None, **kw) -> Trunk:
    """A trunk of known tanh branches; every norm moved off its init, so that each one is tested."""
    torch.manual_seed(0)
    trunk = Trunk(branches or [TanhBranch(seed=i, dim=D) for i in range(n)], create_residual(name, specs(n), **kw))
    with torch.no_grad():
        for p in trunk.scheme.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return trunk


def x_in() -> torch.Tensor:
    return torch.randn(5, 3, D, generator=torch.Generator().manual_seed(99))


def by_hand(trunk: Trunk, x: torch.Tensor, deleted=()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_{k+1} = LN_k(x_k + F_k(x_k))``, ``d_{k+1} = d_k + F_k(x_k)``, ``x_0 = d_0 = x``; ``y = x_L + LN_f(d_L)``."""
    s = trunk.scheme
    xs, ds = x, x
    for k, branch in enumerate(trunk.branches):
        if k in deleted:
            continue
        f = branch(xs)
        ds = ds + f
        xs = s.post_norms[k](xs + f)
    return xs + s.final_norm(ds), xs, ds


def test_trunk_follows_the_paper_equations():
    trunk, x = make(), x_in()
    with torch.no_grad():
        y, _, _ = by_hand(trunk, x)
        got = trunk(x)
    print(f"resi_dual equation: max abs diff {float((got - y).abs().max()):.3g}")
    torch.testing.assert_close(got, y, rtol=0, atol=1e-6)


def test_the_x_stream_is_postln_and_the_output_adds_the_normalised_sum():
    """Drop ``LN_f(d_L)`` and ResiDual is Post-LN: same branches, same post norms."""
    trunk, x = make(), x_in()
    post = Trunk(list(trunk.branches), create_residual("postln", specs()))
    post.scheme.post_norms.load_state_dict(trunk.scheme.post_norms.state_dict())
    s = trunk.scheme
    state = s.begin(x)
    for i, branch in enumerate(trunk.branches):
        h = s.read(state, i)
        state = s.write(state, i, branch(h), h)
    torch.testing.assert_close(state.x, post(x), rtol=0, atol=1e-6)  # a strided view: the norm may round apart
    _, _, d = by_hand(trunk, x)
    torch.testing.assert_close(state.d, d, rtol=0, atol=1e-6)
    torch.testing.assert_close(trunk(x), post(x) + s.final_norm(d), rtol=0, atol=1e-6)


def test_taps_stream_is_the_early_exit_and_the_carrier_holds_both_streams():
    trunk, x = make(), x_in()
    with record(trunk) as rec:
        y = trunk(x)
    s = trunk.scheme
    torch.testing.assert_close(rec.get("resid_pre")[0], x + s.final_norm(x))  # x_0 = d_0 = x
    torch.testing.assert_close(rec.get("resid_post")[-1], y, rtol=0, atol=0)  # the last stream is the output
    state0 = rec.get("state")[0]
    assert state0.shape == (5, 3, 2, D)
    torch.testing.assert_close(state0, torch.stack((x, x), dim=-2))
    for i in range(L):
        torch.testing.assert_close(rec.get("contribution")[i], rec.get("branch_out")[i])


def test_recorded_gradients_cover_both_streams():
    """``dL/dx0`` is the sum over the two streams of ``dL/d(state_0)`` (``x0`` enters both), and every later
    ``state`` gradient has a non-zero part on each stream."""
    trunk = make()
    x = x_in().requires_grad_(True)
    with record(trunk, names=(), grads=True) as rec:
        trunk(x).square().mean().backward()
    grads = rec.grads()
    assert len(grads) == L and all(g.shape == (5, 3, 2, D) for g in grads)
    torch.testing.assert_close(grads[0].sum(-2), x.grad)
    assert all(float(g[..., k, :].abs().sum()) > 0 for g in grads for k in (0, 1))


def test_lesion_removes_the_branch_from_both_streams():
    trunk, x = make(), x_in()
    for deleted in ([1], [0, 3]):
        trunk.set_lesion(deleted)
        y, _, _ = by_hand(trunk, x, deleted)
        torch.testing.assert_close(trunk(x), y, rtol=0, atol=1e-6)
    trunk.set_lesion([])
    torch.testing.assert_close(trunk(x), by_hand(trunk, x)[0], rtol=0, atol=1e-6)


def test_every_parameter_gets_a_gradient_and_no_tensor_is_kept_on_the_scheme():
    trunk = make()
    trunk(x_in()).square().mean().backward()
    for name, p in trunk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    s = trunk.scheme
    assert {n.split(".")[0] for n, _ in s.named_parameters()} == {"post_norms", "final_norm"}
    assert not [k for k, v in vars(s).items() if isinstance(v, torch.Tensor)]  # per-forward state lives in the state


def test_rmsnorm_runs_both_norms_as_rmsnorm():
    trunk = make(norm_type="rmsnorm")
    assert type(trunk.scheme.final_norm) is type(trunk.scheme.post_norms[0]) is reslab.norms.RMSNorm
    torch.testing.assert_close(trunk(x_in()), by_hand(trunk, x_in())[0], rtol=0, atol=1e-6)


def test_gpt_family_runs_post_norm_by_default():
    torch.manual_seed(0)
    m = tiny_model("gpt2", "resi_dual")
    assert m.trunk.scheme.norm_placement == "post" and m.trunk.scheme.in_norms is None
    x = tiny_input("gpt2")
    torch.testing.assert_close(m(x), m.head(by_hand(m.trunk, m.stem(x))[0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("build, match", [
    (lambda: tiny_model("resnet8", "resi_dual"), "needs feature streams|cannot combine branches"),
    (lambda: tiny_model("preact_resnet8", "resi_dual"), "needs feature streams|cannot combine branches"),
    (lambda: create_residual("resi_dual", specs(), norm="pre"), "supports norm placement post"),
    (lambda: create_residual("resi_dual", specs(), shortcut="B"), "takes no shortcut"),
    (lambda: create_residual("resi_dual", [BranchSpec(6, 6, 1, "features"), BranchSpec(8, 8, 1, "features")]),
     "one width"),
    (lambda: create_residual("resi_dual", specs(), alpha=2), "unexpected keyword"),
])
def test_refusals_are_one_line(build, match):
    with pytest.raises(ValueError, match=match) as e:
        build()
    assert "\n" not in str(e.value)


def test_decomposition_is_refused_in_one_line():
    trunk = make()
    with pytest.raises(ValueError, match="not a sum of components") as e:
        trunk.scheme.decompose(x_in(), [x_in()] * L, [None] * (L + 1))
    assert "\n" not in str(e.value)
