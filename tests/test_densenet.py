"""DenseNet and DenseNet-BC through the ``concat`` scheme: the equation, Table 2's parameter counts, the two memory
modes, lesions, taps and the refusals."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.branch import Sources
from reslab.diagnostics.recorder import record
from reslab.models.densenet import DenseLayer, Transition

from conftest import NUM_CLASSES, tiny_input, tiny_model

TINY = ("densenet10", "densenet_bc16")


def _cat(xs):
    return torch.cat(xs, 1)


def _layer_by_hand(b, x):
    """The paper's ``H_l`` / transition, written out from the branch's own modules."""
    y = b.conv1(F.relu(b.norm1(x)))
    if isinstance(b, Transition):
        return F.avg_pool2d(y, 2)
    return b.conv2(F.relu(b.norm2(y))) if b.bottleneck else y


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("train", [False, True])
def test_the_trunk_is_dense_connectivity(name, train):
    """``x_l = H_l([x_0, ..., x_{l-1}])`` inside a block, a transition's output is the next ``x_0``, and the head
    reads the last block's concatenation: the model equals that loop run by hand."""
    torch.manual_seed(0)
    m = tiny_model(name).train(train)
    x = tiny_input(name)
    with torch.no_grad():
        y = m(x)
        feats = [m.stem(x)]
        for b in m.trunk.branches:
            out = _layer_by_hand(b, _cat(feats))
            feats = [out] if isinstance(b, Transition) else [*feats, out]
        by_hand = m.head(_cat(feats))
    torch.testing.assert_close(y, by_hand, rtol=0, atol=0)


@pytest.mark.parametrize("name,stem,growth,widths", [
    ("densenet10", 16, 4, (16, 24, 24, 32, 32, 40)),           # no compression: a transition keeps the width
    ("densenet_bc16", 8, 4, (8, 16, 8, 16, 8, 16)),             # 2k stem; compression 0.5
])
def test_widths(name, stem, growth, widths):
    m = tiny_model(name)
    specs = m.trunk.scheme.specs
    assert specs[0].in_dim == stem
    assert all(s.out_dim == growth for s in specs if s.role == "")
    assert [s.in_dim for s in specs if s.role == "transition"] + [m.trunk.scheme.out_dim] == list(widths[1::2])
    assert [(s.in_dim, s.out_dim, s.stride) for s in specs if s.role == "transition"] == \
        [(widths[1], widths[2], 2), (widths[3], widths[4], 2)]
    assert len(specs) == 3 * 2 + 2
    assert m(tiny_input(name)).shape == (6, NUM_CLASSES)


@pytest.mark.parametrize("name,growth,count,rounded", [
    ("densenet40", 12, 1_019_722, 1.0),            # Huang et al. 2017, Table 2
    ("densenet_bc100", 12, 769_162, 0.8),
    ("densenet100", 24, 27_249_082, 27.2),
    ("densenet_bc250", 24, 15_324_406, 15.3),
])
def test_parameter_counts_of_table_2(name, growth, count, rounded):
    m = reslab.create_model(name, growth=growth)
    n = sum(p.numel() for p in m.parameters())
    assert n == count
    assert round(n / 1e6, 1) == rounded


def test_depth_rules():
    for good in ("densenet7", "densenet40", "densenet_bc10", "densenet_bc100"):
        reslab.models.parse_model_name(good)
    for bad, rule in (("densenet41", "3n+4"), ("densenet_bc40x", "unknown"), ("densenet_bc44", "6n+4"),
                      ("densenet4", "3n+4")):
        with pytest.raises(ValueError, match=re.escape(rule)):
            reslab.models.parse_model_name(bad)


# --- memory modes ------------------------------------------------------------------------------------------
def _run(name, efficient, x, **kw):
    torch.manual_seed(0)
    m = tiny_model(name, memory_efficient=efficient, **kw).train()
    y = m(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad for n, p in m.named_parameters()}, {n: b.clone() for n, b in m.named_buffers()}


@pytest.mark.parametrize("name", TINY)
def test_memory_efficient_mode_has_the_same_outputs_gradients_and_statistics(name):
    """Same seed, same input, train mode: the checkpointed mode gives the naive mode's outputs and every
    parameter's gradient, and the recomputation in backward does not move BatchNorm's running statistics again."""
    x = tiny_input(name)
    (y0, g0, b0), (y1, g1, b1) = _run(name, False, x), _run(name, True, x)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert g0[n] is not None and g0[n].abs().sum() > 0, n
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7)
    for n in b0:
        torch.testing.assert_close(b1[n], b0[n], rtol=0, atol=0)


def test_memory_efficient_mode_is_plain_in_eval_and_without_grad():
    x = tiny_input("densenet_bc16")
    outs = []
    for eff in (False, True):
        torch.manual_seed(0)
        m = tiny_model("densenet_bc16", memory_efficient=eff).eval()
        with torch.no_grad():
            outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def _saved_bytes(model, x):
    """Bytes of the distinct storages autograd saves for backward (parameters left out), and of every branch's
    output (what the checkpoints of the memory-efficient mode keep alive as their inputs)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved, outs = {}, []

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = [b.register_forward_hook(lambda mod, args, out: outs.append(out.numel() * out.element_size()))
             for b in model.trunk.branches]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for h in hooks:
        h.remove()
    return sum(saved.values()), sum(outs)


def test_memory_efficient_mode_saves_memory():
    """DenseNet-BC (L=40, k=12), 32x32 inputs, batch 8: nothing of the concatenation's size is saved in the
    efficient mode (measured: 66.9 MB naive, 31.9 MB efficient, + 3.6 MB of layer outputs the checkpoints keep)."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes = {}
    for eff in (False, True):
        torch.manual_seed(0)
        m = reslab.create_model("densenet_bc40", memory_efficient=eff).train()
        sizes[eff] = _saved_bytes(m, x)
    naive, (efficient, kept) = sizes[False][0], sizes[True]
    assert efficient + kept < 0.7 * naive, (naive, efficient, kept)


# --- lesions, order, taps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("efficient", [False, True])
def test_a_deleted_layer_contributes_zero_features(name, efficient):
    """Deleting dense layer ``i`` is ``x_i = 0``: the same as the full net with that layer's output zeroed."""
    torch.manual_seed(0)
    m = tiny_model(name, memory_efficient=efficient).eval()
    x = tiny_input(name)
    layers = [i for i, s in enumerate(m.trunk.scheme.specs) if s.role == ""]
    for i in (layers[0], layers[-1]):
        m.trunk.set_lesion([i])
        lesioned = m(x)
        m.trunk.set_lesion([])
        h = m.trunk.branches[i].register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
        zeroed = m(x)
        h.remove()
        torch.testing.assert_close(lesioned, zeroed, rtol=0, atol=0)
        assert not torch.equal(lesioned, m(x))


def test_deleting_a_transition_is_refused_in_one_line():
    m = tiny_model("densenet10")
    t = next(i for i, s in enumerate(m.trunk.scheme.specs) if s.role == "transition")
    m.trunk.set_lesion([t])
    with pytest.raises(ValueError, match="transition") as e:
        m(tiny_input("densenet10"))
    assert "\n" not in str(e.value)


def test_reordering_is_refused():
    """Even where two layers read as many channels (densenet_bc40: 72 in all three blocks), a layer moved would read
    unrelated features; the depth order itself is accepted."""
    m = reslab.create_model("densenet_bc40", input_shape=(3, 8, 8))
    specs = m.trunk.scheme.specs
    i, j = [k for k, s in enumerate(specs) if s == specs[15]][:2]  # the same spec in two blocks
    order = list(range(len(specs)))
    order[i], order[j] = j, i
    _one_line(lambda: m.trunk.set_order(order), "cannot run its blocks in another order")
    m.trunk.set_order(range(len(specs)))
    assert m.trunk.order is None


@pytest.mark.parametrize("efficient", [False, True])
def test_taps_see_the_concatenation(efficient):
    torch.manual_seed(0)
    m = tiny_model("densenet_bc16", memory_efficient=efficient)
    x = tiny_input("densenet_bc16")
    specs, n = m.trunk.scheme.specs, len(m.trunk)
    with record(m) as rec:
        y = m(x)
    pre, post, bin_, bout = (rec.get(k) for k in ("resid_pre", "resid_post", "branch_in", "branch_out"))
    assert len(pre) == len(post) == len(bin_) == len(bout) == n
    side = 8
    for i, s in enumerate(specs):
        assert pre[i].shape == bin_[i].shape == (6, s.in_dim, side, side)
        torch.testing.assert_close(bin_[i], pre[i], rtol=0, atol=0)  # a branch reads the whole concatenation
        side //= s.stride
        assert bout[i].shape == (6, s.out_dim, side, side)
        if s.role == "transition":
            torch.testing.assert_close(post[i], bout[i], rtol=0, atol=0)
        else:  # the concatenation grows by the layer's output
            torch.testing.assert_close(post[i], torch.cat([pre[i], bout[i]], 1), rtol=0, atol=0)
        if i + 1 < n:
            torch.testing.assert_close(pre[i + 1], post[i], rtol=0, atol=0)
    assert rec.get("final")[0].shape == (6, m.trunk.scheme.out_dim, side, side)
    assert rec.get("contribution") == [] and rec.get("mix") == []  # nothing is added, nothing mixed
    torch.testing.assert_close(m.head(rec.get("final")[0]), y.detach())


@pytest.mark.parametrize("efficient", [False, True])
def test_recording_changes_nothing_and_its_gradients_are_the_streams(efficient):
    """With a recorder attached the branches read the tapped concatenation (so that its gradient carries every
    gradient to earlier depths): outputs and parameter gradients are unchanged, in both memory modes."""
    x = tiny_input("densenet_bc16")

    def model():
        torch.manual_seed(0)
        return tiny_model("densenet_bc16", memory_efficient=efficient).train()

    m = model()
    y0 = m(x)
    y0.square().mean().backward()
    g0 = [p.grad for p in m.parameters()]

    m, live = model(), {}
    hooks = [b.hook_state.register_forward_hook(lambda mod, args, out, i=i: live.__setitem__(i, args[0]))
             for i, b in enumerate(m.trunk.blocks)]
    expected = torch.autograd.grad(m(x).square().mean(), [live[i] for i in range(len(m.trunk))])
    for h in hooks:
        h.remove()

    m = model()
    with record(m, grads=True) as rec:
        y1 = m(x)
        y1.square().mean().backward()
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g0, [p.grad for p in m.parameters()], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for g, e in zip(rec.grads(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert [g.shape[1] for g in rec.grads()] == [s.in_dim for s in m.trunk.scheme.specs]


def test_sources_join_once_and_then_hand_out_views():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    s = Sources((a, b))
    assert s.parts() is s  # nothing joined yet: the tensors themselves
    j = s.joined()
    assert j.shape == (2, 8, 4, 4) and s.joined() is j
    views = s.parts()
    assert views.joined() is j and all(v._base is j for v in views)
    torch.testing.assert_close(torch.cat(views, 1), j)
    one = Sources((a,))
    assert one.joined() is a and one.parts() is one


def test_layers_read_a_tensor_or_sources():
    torch.manual_seed(0)
    layer, trans = DenseLayer(8, 4, bottleneck=True), Transition(8, 4)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    for mod in (layer, trans):
        torch.testing.assert_close(mod(Sources((a, b))), mod(torch.cat([a, b], 1)), rtol=0, atol=0)


# --- defaults and refusals ---------------------------------------------------------------------------------
def test_concat_is_the_default_scheme_of_the_family():
    m = reslab.create_model("densenet_bc16", growth=4, input_shape=(3, 8, 8))
    assert m.config["residual"] == "concat" and m.trunk.scheme.name == "concat"
    assert reslab.create_model("resnet8", width=4, input_shape=(3, 8, 8)).config["residual"] == "identity"
    from reslab.train import TrainConfig

    cfg = TrainConfig.for_model("densenet_bc40")
    assert (cfg.residual, cfg.data, cfg.batch_size, cfg.nesterov, cfg.weight_decay) == ("concat", "digits", 64,
                                                                                        True, 1e-4)


def _one_line(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scheme", ["identity", "plain", "highway", "rezero", "denseformer", "attnres"])
def test_additive_schemes_are_refused_on_densenet(scheme):
    _one_line(lambda: tiny_model("densenet10", scheme), "works only with residual='concat'")


@pytest.mark.parametrize("family", ["resnet8", "preact_resnet8", "mlp8", "gpt2"])
def test_concat_is_refused_on_other_families(family):
    _one_line(lambda: tiny_model(family, "concat"), r"runs only on the families built for it \(densenet, densenet_bc\)")


def test_densenet_has_no_plain_twin_and_refuses_additive_options():
    m = tiny_model("densenet10")
    _one_line(lambda: reslab.plain_twin(m), "no plain twin")
    _one_line(lambda: tiny_model("densenet10", zero_init_last=True), "zero_init_last")
    _one_line(lambda: tiny_model("densenet10", shortcut="B"), "no shortcut")
    _one_line(lambda: tiny_model("densenet10", memory_efficient="yes"), "memory_efficient")
    _one_line(lambda: tiny_model("densenet_bc16", compression=0), "compression")
    _one_line(lambda: tiny_model("densenet10", growth=0), "growth")
    _one_line(lambda: tiny_model("densenet10", input_shape=(3, 2, 2)), "at least 4x4")
    _one_line(lambda: m.trunk.scheme.decompose(None, [], []), "does not decompose")


def test_model_arg_reads_lowercase_booleans():
    from reslab.cli import _kv

    assert _kv("memory_efficient=true") == ("memory_efficient", True)
    assert _kv("memory_efficient=False") == ("memory_efficient", False)
    assert _kv("norm=ln") == ("norm", "ln")
