"""Taps, hook points and the recorder: what is tapped, that recording changes nothing, and detaching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.recorder import record
from reslab.trunk import BLOCK_TAPS

from conftest import TINY_FAMILIES, only_residuals, tiny_input, tiny_model


def _linear_trunk(scheme="identity", n=3, d=5, **kw):
    torch.manual_seed(0)
    branches = [nn.Linear(d, d, bias=False) for _ in range(n)]
    return Trunk(branches, create_residual(scheme, [BranchSpec(d, d, 1, "features")] * n, **kw))


def test_recorder_sees_every_tap_with_the_right_values():
    trunk = _linear_trunk()
    x = torch.randn(4, 5)
    with record(trunk) as rec:
        y = trunk(x)
    pre, post, outs = rec.get("resid_pre"), rec.get("resid_post"), rec.get("branch_out")
    assert len(pre) == len(post) == len(outs) == 3
    torch.testing.assert_close(pre[0], x)
    for i in range(3):
        torch.testing.assert_close(outs[i], trunk.branches[i](pre[i]))
        torch.testing.assert_close(post[i], pre[i] + outs[i])
        torch.testing.assert_close(rec.get("contribution")[i], outs[i])
    torch.testing.assert_close(rec.get("final")[0], y)
    assert rec.get("mix") == []  # identity has no mixing weights
    assert trunk.recorder is None


def test_contributions_of_an_additive_scheme_sum_to_the_final_stream():
    trunk = _linear_trunk("layerscale", n=4, init=0.7)
    x = torch.randn(3, 5)
    with record(trunk, names=("contribution", "final")) as rec:
        trunk(x)
    torch.testing.assert_close(x + sum(rec.get("contribution")), rec.get("final")[0])


def test_gated_scheme_taps_mix_and_contribution():
    trunk = _linear_trunk("highway", n=2, gate_bias=0.3)
    x = torch.randn(3, 5)
    with record(trunk, names=("mix", "contribution", "resid_pre")) as rec:
        trunk(x)
    t = torch.sigmoid(trunk.scheme.gates[0](x))
    torch.testing.assert_close(rec.get("mix")[0], t)
    torch.testing.assert_close(rec.get("contribution")[0], t * trunk.branches[0](x))


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
@pytest.mark.parametrize("scheme", ["identity", "plain", "highway", "rezero", "concat"])
def test_recording_changes_no_output_and_no_gradient(family, scheme):
    if scheme not in (only_residuals(family) or ("identity", "plain", "highway", "rezero")):
        pytest.skip(f"{scheme} cannot run on {family}")
    torch.manual_seed(1)
    m = tiny_model(family, scheme)
    x = tiny_input(family)

    def run():
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters()]

    y0, g0 = run()
    with record(m, grads=True):
        y1, g1 = run()
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_gradients_per_depth_match_autograd():
    trunk = _linear_trunk(n=3)
    x = torch.randn(4, 5, requires_grad=True)
    with record(trunk, names=("resid_pre",), grads=True) as rec:
        y = trunk(x)
        y.square().sum().backward()
    grads = rec.grads()
    assert len(grads) == 3
    torch.testing.assert_close(grads[0], x.grad)
    # dL/dx_2 = (I + A_2)^T dL/dy for the last block
    a2 = trunk.branches[2].weight
    torch.testing.assert_close(grads[2], (2 * y.detach()) @ (torch.eye(5) + a2.detach()))


def test_forward_hooks_on_named_hook_points():
    m = reslab.create_model("mlp8", width=6, input_shape=(4,))
    names = dict(m.named_modules())
    for tap in BLOCK_TAPS:
        assert f"trunk.blocks.2.hook_{tap}" in names
    assert "trunk.hook_final" in names
    seen = {}
    h = names["trunk.blocks.1.hook_branch_out"].register_forward_hook(lambda mod, i, o: seen.setdefault("v", o))
    x = torch.randn(3, 4)
    with record(m, names=("branch_out",)) as rec:
        m(x)
    torch.testing.assert_close(seen["v"], rec.get("branch_out")[1])
    h.remove()
    seen.clear()
    m(x)
    assert not seen


def test_recorder_always_detaches_and_refuses_two():
    trunk = _linear_trunk()
    with pytest.raises(RuntimeError):
        with record(trunk):
            raise RuntimeError("boom")
    assert trunk.recorder is None
    with record(trunk):
        with pytest.raises(ValueError, match="already attached"):
            with record(trunk):
                pass
    with pytest.raises(ValueError, match="unknown tap"):
        with record(trunk, names=("nope",)):
            pass


def test_reduce_keeps_only_reduced_values():
    trunk = _linear_trunk()
    x = torch.randn(4, 5)
    with record(trunk, names=("resid_pre",), reduce=lambda n, i, t: t.norm(dim=1)) as rec:
        trunk(x[:2])
        trunk(x[2:])
    torch.testing.assert_close(rec.get("resid_pre")[0], x.norm(dim=1))


def test_reorder_runs_blocks_in_order_and_refuses_shape_moves():
    trunk = _linear_trunk("plain", n=3)
    x = torch.randn(2, 5)
    trunk.set_order([2, 0, 1])
    b = trunk.branches
    torch.testing.assert_close(trunk(x), b[1](b[0](b[2](x))))
    trunk.set_order(None)
    torch.testing.assert_close(trunk(x), b[2](b[1](b[0](x))))
    with pytest.raises(ValueError, match="permutation"):
        trunk.set_order([0, 0, 1])
    net = reslab.create_model("resnet8", width=4, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="cannot run at position"):
        net.trunk.set_order([1, 0, 2])


@pytest.mark.parametrize("scheme", ["identity", "layerscale", "highway"])
def test_norm_reduction_equals_per_tap_norms(scheme):
    """The built-in "norm" (which reuses the norms of a tensor tapped twice in a row) equals a per-tap norm."""
    net = reslab.create_model("resnet8", residual=scheme, width=4, input_shape=(3, 8, 8))
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 10, (5,))
    per_sample = lambda n, i, t: t.flatten(1).norm(dim=1)  # noqa: E731
    taps = ("resid_pre", "branch_out", "contribution", "resid_post", "final")
    results = []
    for reduce in (per_sample, "norm"):
        net.zero_grad()
        with record(net, names=taps, reduce=reduce, grads=True, grad_reduce=reduce) as rec:
            for _ in range(2):  # two steps: batches concatenate
                torch.nn.functional.cross_entropy(net(x), y).backward()
            results.append([rec.get(t) for t in taps] + [rec.grads()])
            assert rec._last is None  # no tensor of a finished forward is held
    for a, b in zip(*results):
        assert len(a) == len(b) and len(a) in (1, 3)
        for ta, tb in zip(a, b):
            assert ta.shape == (10,)
            torch.testing.assert_close(ta, tb)
    with pytest.raises(ValueError, match="unknown reduction"):
        with record(net, reduce="mean"):
            pass
