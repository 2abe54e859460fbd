"""Contract tests over both registries: every scheme x every family, picked up with no edit."""

from __future__ import annotations

import pytest
import torch

import reslab
from reslab.diagnostics.decomposition import decompose
from reslab.diagnostics.recorder import record
from reslab.branch import branch_input, call_branch
from reslab.models import list_families
from reslab.residuals import AdditiveScheme, ResidualScheme, residual_class

from conftest import TINY_FAMILIES, is_lm, only_residuals, tiny_input, tiny_model, tiny_output_shape

SCHEMES = reslab.list_residuals()
#: the schemes that state their combination as ``equation(x, fx, i)``: every additive one, and others whose rule is
#: a function of the stream and the branch output alone
STATED = [s for s in SCHEMES if getattr(residual_class(s), "equation", None) is not None]
FAMILIES = list(TINY_FAMILIES)
CONV_FAMILIES = ("resnet8", "preact_resnet8")


def refused(family: str, scheme: str) -> bool:
    """The pairs a scheme must refuse at construction, from what the family and the scheme declare (no scheme named
    here): a family built for other rules only (``Family.residuals``: DenseNet), a scheme that runs only on the
    families built for it (``capabilities.family_only``), a branch role the scheme needs and the family lacks
    (``capabilities.needs_roles``), a norm placement on convolutional maps, or shape-changing branches for a scheme
    that cannot combine them."""
    if only_residuals(family):
        return scheme not in only_residuals(family)
    caps = residual_class(scheme).capabilities
    if caps.family_only:
        return True
    if set(caps.needs_roles) - {s.role for s in tiny_model(family).trunk.scheme.specs}:
        return True
    norm = residual_class(scheme).default_norm or ("pre" if is_lm(family) else "none")
    return family in CONV_FAMILIES and (norm != "none" or not caps.shape_change)


def build(family: str, scheme: str, **kw):
    """A tiny model of the pair, or a skip for the pairs the scheme refuses (pinned by test_refusals)."""
    if refused(family, scheme):
        pytest.skip(f"{scheme} cannot run on {family}")
    return tiny_model(family, scheme, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_refusals_are_clear_one_line_errors(family, scheme):
    if not refused(family, scheme):
        tiny_model(family, scheme)
        return
    with pytest.raises(ValueError) as e:
        tiny_model(family, scheme)
    assert "\n" not in str(e.value) and ("norm placement" in str(e.value) or scheme in str(e.value))


def test_every_family_has_a_tiny_instance():
    assert {f.name for f in list_families()} == {n.rstrip("0123456789") for n in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_shape_and_finite(family, scheme):
    m = build(family, scheme)
    y = m(tiny_input(family))
    assert y.shape == tiny_output_shape(family)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_parameter_gets_a_gradient(family, scheme):
    torch.manual_seed(0)
    m = build(family, scheme)
    perturb(m)
    m(tiny_input(family)).logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_state_dict_holds_tensors_only(family, scheme):
    """A reslab checkpoint holds tensors only (``runs.load_checkpoint`` refuses anything else in a model's state):
    a scheme keeps whatever it saves (flags included) as tensors, not as ``get_extra_state`` objects."""
    state = build(family, scheme).state_dict()
    assert all(torch.is_tensor(v) for v in state.values()), [k for k, v in state.items() if not torch.is_tensor(v)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_model(family, scheme):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = build(family, scheme).eval()
        outs.append(m(tiny_input(family)))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    other = build(family, scheme).eval()(tiny_input(family))
    assert not torch.equal(outs[0], other)


def perturb(model):
    """Move every parameter off its special init (zero alphas, zero-init scales), so that nothing is zero
    or switched off by construction."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.3 * torch.randn_like(p))


def _zero_branches(model):
    """Make every branch output exactly zero (forward hooks), whatever the scheme."""
    return [b.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out)) for b in model.trunk.branches]


def additive(family: str) -> str:
    """``family``, or a skip for the families without a plain twin (DenseNet: pinned by test_refusals)."""
    if only_residuals(family):
        pytest.skip(f"{family} works only with {', '.join(only_residuals(family))}: no skip path, no plain twin")
    return family


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_twin_has_no_skip_path(family):
    """With every branch silenced, the plain twin's output no longer depends on its input; the residual
    net's still does (through its skip path)."""
    additive(family)
    torch.manual_seed(0)
    res = tiny_model(family, "identity").eval()
    twin = reslab.plain_twin(res).eval()
    assert twin.config["residual"] == "plain"
    for model, has_skip in ((res, True), (twin, False)):
        _zero_branches(model)
        y1, y2 = model(tiny_input(family, seed=1)), model(tiny_input(family, seed=2))
        assert (not torch.allclose(y1, y2)) == has_skip


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_twin_same_branches(family):
    additive(family)
    res = tiny_model(family, "identity")
    twin = reslab.plain_twin(res)
    shapes = lambda m: [p.shape for p in m.trunk.branches.parameters()]  # noqa: E731
    assert shapes(res) == shapes(twin)
    scheme = twin.trunk.scheme  # the plain rule has no parameters; the family's norm placement is kept
    assert scheme.norm_placement == res.trunk.scheme.norm_placement
    norms = [m for m in (scheme.in_norms, scheme.out_norms, scheme.post_norms) if m is not None]
    assert sum(p.numel() for p in scheme.parameters()) == sum(p.numel() for m in norms for p in m.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lesioning_nothing_changes_nothing(family, scheme):
    torch.manual_seed(0)
    m = build(family, scheme).eval()
    perturb(m)
    x = tiny_input(family)
    y = m(x)
    m.trunk.set_lesion([])
    assert torch.equal(m(x), y)
    m.trunk.set_lesion([1])
    assert not torch.equal(m(x), y)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_decomposition_sums_to_the_final_stream(family, scheme):
    """Every scheme's contributions (as actually added) add up to the final stream, or the scheme says why not:
    it renormalises or activates the stream after each combination, or adds nothing (concatenation)."""
    torch.manual_seed(0)
    m = build(family, scheme).eval()
    perturb(m)
    s = m.trunk.scheme
    linear = s.post_norms is None and s.post_op == "none" and not (
        s.shortcut_option not in (None, "A") and any(sp.changes_shape for sp in s.specs))
    x = tiny_input(family)
    if type(s).decompose is ResidualScheme.decompose:
        with pytest.raises(ValueError, match="does not decompose its stream"):
            decompose(m, x)
        return
    if not linear:
        with pytest.raises(ValueError, match="not a sum of components|not linear"):
            decompose(m, x)
        return
    dec = decompose(m, x)
    assert dec.components.shape == (1 + len(m.trunk), *dec.final.shape)
    torch.testing.assert_close(dec.components.sum(0), dec.final, rtol=1e-4, atol=1e-5)
    assert dec.projections().sum() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_recorded_gradients_are_the_gradients_of_the_stream(family, scheme):
    """``rec.grads()[i]`` is dL/d(state_i) of the very tensor the trunk tapped as ``state`` (the stream, or all of
    hyper-connections' streams: a view, one of several outputs of a node, or the input itself), raw and as
    per-sample norms."""
    torch.manual_seed(0)
    m = build(family, scheme).train()
    perturb(m)
    x = tiny_input(family)
    live = {}
    hooks = [blk.hook_state.register_forward_hook(lambda mod, args, out, i=i: live.__setitem__(i, args[0]))
             for i, blk in enumerate(m.trunk.blocks)]
    torch.manual_seed(1)  # the same draws in every pass (stochastic schemes)
    expected = torch.autograd.grad(m(x).square().mean(), [live[i] for i in range(len(m.trunk))])
    for h in hooks:
        h.remove()
    for grad_reduce, want in ((None, expected), ("norm", [e.flatten(1).norm(dim=1) for e in expected])):
        torch.manual_seed(1)
        with record(m, names=(), grads=True, grad_reduce=grad_reduce) as rec:
            m(x).square().mean().backward()
        got = rec.grads()
        assert len(got) == len(m.trunk)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_hook_points_see_what_the_recorder_records(family, scheme):
    """A forward hook on every hook point (``blocks.{i}.hook_*``, ``hook_final``, ``hook_final_mix``) sees the
    very tensors an attached recorder keeps, whatever the scheme taps."""
    torch.manual_seed(0)
    m = build(family, scheme).eval()
    perturb(m)
    seen = {}
    points = [(n, p) for n, p in m.trunk.named_modules() if n.rsplit(".", 1)[-1].startswith("hook_")]
    handles = [p.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0]))
               for n, p in points]
    with record(m) as rec:
        m(tiny_input(family))
    for h in handles:
        h.remove()
    kept = {(f"hook_{k[0]}" if k[1] == len(m.trunk) and k[0] == "final" else
             f"hook_final_{k[0]}" if k[1] == len(m.trunk) else f"blocks.{k[1]}.hook_{k[0]}"): v
            for k, v in rec._data.items()}
    assert set(kept) == set(seen)
    for n, v in kept.items():
        assert len(v) == len(seen[n]) == 1
        assert torch.equal(v[0], seen[n][0])


def test_every_additive_scheme_states_its_equation():
    missing = [s for s in SCHEMES if issubclass(residual_class(s), AdditiveScheme)
               and residual_class(s).equation is AdditiveScheme.equation]
    assert not missing, f"additive schemes that state no equation(x, fx, i): {missing}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", STATED)
def test_the_trunk_follows_the_stated_equation(family, scheme):
    """At every branch the stream after ``write`` is the scheme's stated ``equation`` of the stream before it (with
    the generic read, sandwich norm and post op / post norm around it), and an additive scheme's ``write`` is its own
    ``skip`` + ``contribution``; the trunk's output is the last of these states. So a wrong equation in a scheme
    cannot pass here (e.g. ``x + 3 F(x)`` where ``(x + F(x)) / sqrt(2)`` is stated)."""
    torch.manual_seed(0)
    m = build(family, scheme).eval()
    perturb(m)
    s = m.trunk.scheme
    x0 = m.stem(tiny_input(family))
    state = s.begin(x0)
    with torch.no_grad():
        for i, branch in enumerate(m.trunk.branches):
            h = s.read(state, i)
            out = call_branch(branch, h)
            x, fx = s.stream(state), s.norm_out(i, out)
            new = s.write(state, i, out, h)
            torch.testing.assert_close(s.stream(new), s.finish(i, s.equation(x, fx, i)), msg=f"branch {i}")
            if isinstance(s, AdditiveScheme):
                torch.testing.assert_close(s.stream(new), s.finish(i, s.stream(s.skip(state, i)) + s.contribution(
                    fx, branch_input(h), i)), msg=f"write at branch {i}")
            state = new
        torch.testing.assert_close(m.trunk(x0), s.end(state))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_mix_tap_has_its_declared_shape(family, scheme):
    """A scheme emits ``mix`` exactly when it declares ``mix_shape``; per-sample mixes lead with the batch and a
    recorder joins two forward passes along it, parameter-shaped ones do not depend on the batch and a recorder
    keeps one per forward pass (two forwards of an (8,) weight vector give (2, 8), not (16,))."""
    torch.manual_seed(0)
    m = build(family, scheme).eval()
    caps = m.trunk.scheme.capabilities
    assert caps.exposes_mixing == (caps.mix_shape is not None)
    seen: dict[int, list] = {}
    m.trunk.set_tap(lambda name, i, t: seen.setdefault(i, []).append(t) if name == "mix" else None)
    m(tiny_input(family, batch=6))
    m(tiny_input(family, batch=3))
    m.trunk.set_tap(None)
    assert bool(seen) == (caps.mix_shape is not None)
    with record(m, names=("mix",)) as rec:
        m(tiny_input(family, batch=6))
        m(tiny_input(family, batch=3))
    for i, (a, b) in seen.items():
        kept = rec.by_depth("mix", len(m.trunk) + 1)[i]
        if caps.mix_per_forward:
            assert a.shape == b.shape and a.dim() == len(caps.mix_shape)
            assert kept.shape == (2, *a.shape)
        else:
            assert (a.shape[0], b.shape[0]) == (6, 3) and a.shape[1:] == b.shape[1:]
            assert kept.shape == (9, *a.shape[1:])
