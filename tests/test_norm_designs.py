"""The 2024-25 norm designs (REFERENCE.md section 14): DyT as a ``norm_type``, and the Peri-LN, Mix-LN and LayerNorm
Scaling placements, each against its equation written out here on known branches, against a published
implementation where one exists (x-transformers), and for lesions, errors and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.diagnostics.decomposition import decompose, direct_logit_attribution, logit_lens
from reslab.diagnostics.paths import check_paths
from reslab.diagnostics.recorder import record
from reslab.norms import NORM_TYPES, DyT

from conftest import TanhBranch

D = 6
ROLES = ("attn", "mlp") * 3  # three transformer layers of two sublayers


def specs(roles=ROLES, d: int = D) -> list[BranchSpec]:
    return [BranchSpec(d, d, 1, "features", role=r) for r in roles]


def perturb_(module: nn.Module, seed: int = 3) -> None:
    """Move every parameter off its init (gains off 1, biases off 0, DyT's alpha off 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def trunk_of(name: str, roles=ROLES, **kw) -> tuple[Trunk, list[nn.Module]]:
    """A trunk of known branches ``F_i(x) = tanh(x W_i^T)`` under scheme ``name``, float64, norms perturbed."""
    bs = [TanhBranch(seed=i, dim=D) for i in range(len(roles))]
    trunk = Trunk(bs, create_residual(name, specs(roles), **kw)).double()
    perturb_(trunk.scheme)
    return trunk, bs


def x_in(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 4, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def gpt(residual: str, depth: int = 2, **kw) -> reslab.ResidualNet:
    torch.manual_seed(0)
    return reslab.create_model("gpt", residual, depth=depth, num_classes=5, input_shape=(7,), d_model=8, n_heads=2,
                               **kw)


def toks(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 5, (3, 7), generator=torch.Generator().manual_seed(seed))


def one_line_error(fn, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def lesion_leaves_the_skip(model: reslab.ResidualNet, block: int) -> None:
    """Deleting ``block`` leaves the stream as it was before it (its norms go with it), and changes the output."""
    model.eval()
    x = toks()
    y = model(x)
    model.trunk.set_lesion({block})
    with record(model, names=("resid_pre", "resid_post")) as rec:
        y_lesioned = model(x)
    model.trunk.set_lesion(())
    assert torch.equal(rec.get("resid_post")[block], rec.get("resid_pre")[block])
    assert not torch.allclose(y, y_lesioned)


# --- DyT ----------------------------------------------------------------------------------------------------------
def test_dyt_is_gamma_tanh_alpha_x_plus_beta():
    m = DyT(D).double()
    assert m.alpha.item() == 0.5 and m.alpha.shape == () and torch.equal(m.weight, torch.ones(D))
    assert torch.equal(m.bias, torch.zeros(D))
    perturb_(m)
    x = 3 * x_in()
    want = m.weight * torch.tanh(m.alpha * x) + m.bias
    assert (m(x) - want).abs().max().item() == 0.0
    assert NORM_TYPES["dyt"] is DyT
    assert DyT(D, alpha=0.8).alpha.item() == pytest.approx(0.8)
    # elementwise: no statistics over the channels (unlike LayerNorm / RMSNorm)
    x2 = x.clone()
    x2[..., 0] += 100.0
    assert torch.equal(m(x2)[..., 1:], m(x)[..., 1:])


@pytest.mark.parametrize("bad,match", [(dict(dim=0), "positive width"), (dict(dim=D, alpha=0.0), "alpha"),
                                       (dict(dim=D, alpha=-1.0), "alpha"), (dict(dim=D, alpha=math.nan), "alpha")])
def test_dyt_refuses_bad_arguments_in_one_line(bad, match):
    one_line_error(lambda: DyT(**bad), match)


def test_dyt_equals_x_transformers_dynamic_tanh():
    xt = pytest.importorskip("x_transformers.x_transformers")
    ours, theirs = DyT(D).double(), xt.DynamicTanh(D, init_alpha=0.5).double()
    x = 3 * x_in()
    assert (ours(x) - theirs(x)).abs().max().item() == 0.0  # at init
    perturb_(ours)
    with torch.no_grad():
        theirs.pre_tanh_scale.copy_(ours.alpha)
        theirs.gamma.copy_(ours.weight)
        theirs.beta.copy_(ours.bias)
    assert (ours(x) - theirs(x)).abs().max().item() == 0.0


@pytest.mark.parametrize("residual", ["preln", "postln", "sandwich", "periln", "mixln", "lnscaling"])
def test_dyt_is_a_norm_type_of_every_placement_and_the_final_norm(residual):
    m = gpt(residual, residual_kwargs={"norm_type": "dyt"}, final_norm="dyt")
    dyts = [mod for mod in m.modules() if isinstance(mod, DyT)]
    assert isinstance(m.head.norm, DyT) and len(dyts) > 1
    assert not any(isinstance(mod, (nn.LayerNorm, reslab.norms.RMSNorm)) for mod in m.modules())
    perturb_(m)
    m(toks()).logsumexp(-1).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dyt_pre_norm_follows_its_equation():
    trunk, bs = trunk_of("preln", norm="pre", norm_type="dyt")
    s, x = trunk.scheme, x_in()
    h = x
    for i, b in enumerate(bs):
        n = s.in_norms[i]
        h = h + b(n.weight * torch.tanh(n.alpha * h) + n.bias)
    assert (trunk(x) - h).abs().max().item() == 0.0


def test_a_dyt_final_norm_decodes_the_logit_lens_and_is_refused_by_direct_attribution():
    m = gpt("preln", final_norm="dyt")
    perturb_(m)
    lens = logit_lens(m, toks(), toks(1))
    assert len(lens.kl) == len(m.trunk) + 1 and lens.kl[-1] == pytest.approx(0.0, abs=1e-6)
    # DyT is not affine in the stream: no exact per-component split of the logit through it
    one_line_error(lambda: direct_logit_attribution(m, toks(), toks(1)), "cannot freeze a DyT head norm")
    one_line_error(lambda: gpt("preln", final_norm="dy"), "final_norm must be one of layernorm, rmsnorm, dyt")


# --- Peri-LN ------------------------------------------------------------------------------------------------------
def test_periln_follows_its_equation():
    trunk, bs = trunk_of("periln")
    s, x = trunk.scheme, x_in()
    h = s.embed_norm(x)  # x_0 = N_e(e)
    for i, b in enumerate(bs):
        h = h + s.out_norms[i](b(s.in_norms[i](h)))  # x + N'(F(N(x)))
    diff = (trunk(x) - h).abs().max().item()
    assert diff == 0.0


def test_periln_is_sandwich_plus_an_embedding_norm():
    peri, sand = gpt("periln"), gpt("sandwich")
    ps, ss = peri.state_dict(), sand.state_dict()
    assert set(ps) - set(ss) == {"trunk.scheme.embed_norm.weight", "trunk.scheme.embed_norm.bias"}
    assert set(ss) <= set(ps) and all(torch.equal(ss[k], ps[k]) for k in ss)  # the same draws for everything else
    perturb_(peri)
    sand.load_state_dict({k: v for k, v in peri.state_dict().items() if k in ss})
    peri.eval(), sand.eval()
    e = peri.stem(toks())
    assert torch.equal(peri.trunk(e), sand.trunk(peri.trunk.scheme.embed_norm(e)))
    # without the embedding norm it is sandwich, output for output
    bare = gpt("periln", residual_kwargs={"embed_norm": False})
    assert bare.trunk.scheme.embed_norm is None
    bare.load_state_dict(sand.state_dict())
    assert torch.equal(bare.eval()(toks()), sand(toks()))
    assert sum(p.numel() for p in peri.parameters()) == sum(p.numel() for p in sand.parameters()) + 2 * 8
    rms = gpt("periln", residual_kwargs={"norm_type": "rmsnorm"})
    assert sum(p.numel() for p in rms.trunk.scheme.embed_norm.parameters()) == 8


@pytest.mark.parametrize("embed_norm", [True, False])
def test_periln_equals_x_transformers_sandwich_norm_with_post_embedding_norm(embed_norm):
    """x-transformers' ``Decoder(sandwich_norm=True)`` (its final norm included) after ``post_emb_norm``: the same
    stream at init on identical weights (its LayerNorm has no bias, which is zero here at init)."""
    xt = pytest.importorskip("x_transformers")
    d, heads, layers = 16, 2, 3
    torch.manual_seed(0)
    m = reslab.create_model("gpt", "periln", depth=layers, num_classes=5, input_shape=(7,), d_model=d,
                            n_heads=heads, residual_kwargs={"embed_norm": embed_norm}).eval()
    w = xt.TransformerWrapper(num_tokens=5, max_seq_len=7, post_emb_norm=embed_norm, attn_layers=xt.Decoder(
        dim=d, depth=layers, heads=heads, attn_dim_head=d // heads, sandwich_norm=True, ff_no_bias=True)).eval()
    with torch.no_grad():
        for i, b in enumerate(m.trunk.branches):
            xb = w.attn_layers.layers[i][1]
            if i % 2 == 0:
                for t, wt in zip((xb.to_q, xb.to_k, xb.to_v), b.qkv.weight.split(d)):
                    t.weight.copy_(wt)
                xb.to_out.weight.copy_(b.proj.weight)
            else:
                xb.ff[0][0].weight.copy_(b.fc.weight)
                xb.ff[2].weight.copy_(b.proj.weight)
    e = m.stem(toks())
    ours = m.head.norm(m.trunk(e))
    theirs = w.attn_layers(w.post_emb_norm(e))
    assert (ours - theirs).abs().max().item() < 1e-5


def test_periln_decomposes_from_the_normalised_embedding_and_lesions_leave_the_skip():
    m = gpt("periln")
    perturb_(m)
    m.eval()
    x = toks()
    dec = decompose(m, x)
    torch.testing.assert_close(dec.components[0], m.trunk.scheme.embed_norm(m.stem(x)))
    torch.testing.assert_close(dec.components.sum(0), dec.final)
    for block in (0, 3):
        lesion_leaves_the_skip(m, block)
    # path analysis linearises the trunk from the stream begin() returns: a scheme that transforms x0 there (N_e)
    # is refused, in one line, rather than given the gradient of the normalised embedding
    one_line_error(lambda: check_paths(m), "path analysis")


def test_periln_refuses_what_it_is_not_in_one_line():
    one_line_error(lambda: gpt("periln", residual_kwargs={"embed_norm": "yes"}), "embed_norm must be True or False")
    one_line_error(lambda: gpt("periln", residual_kwargs={"norm": "pre"}), "supports norm placement sandwich")
    one_line_error(lambda: reslab.create_model("resnet8", "periln", width=4, input_shape=(3, 8, 8)),
                   "needs feature streams")


# --- Mix-LN -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,post_layers", [(0.25, 0), (0.5, 1), (0.7, 2), (1.0, 3)])
def test_mixln_follows_its_equation(alpha, post_layers):
    """Post-LN in the first floor(alpha M) layers (both sublayers of each), Pre-LN after (M = 3 layers here)."""
    trunk, bs = trunk_of("mixln", alpha=alpha)
    s, x = trunk.scheme, x_in()
    assert s.post_layers == post_layers
    layer = [0, 0, 1, 1, 2, 2]
    h = x
    for i, b in enumerate(bs):
        if layer[i] < post_layers:
            h = s.post_norms[i](h + b(h))  # N(x + F(x))
            assert isinstance(s.in_norms[i], nn.Identity)
        else:
            h = h + b(s.in_norms[i](h))  # x + F(N(x))
            assert isinstance(s.post_norms[i], nn.Identity)
    assert (trunk(x) - h).abs().max().item() == 0.0


@pytest.mark.parametrize("layers,post", [(1, 0), (2, 0), (4, 1), (8, 2), (12, 3), (16, 4), (24, 6)])
def test_mixln_counts_layers_not_sublayers(layers, post):
    scheme = create_residual("mixln", specs(("attn", "mlp") * layers))
    assert scheme.post_layers == post  # floor(0.25 M): LLaMA-71M/130M (12 layers) 3, 250M/1B (24 layers) 6
    assert sum(isinstance(n, nn.Identity) for n in scheme.in_norms) == 2 * post
    blocks = create_residual("mixln", specs(("",) * 8), alpha=0.5)  # residual blocks: one layer each
    assert blocks.post_layers == 4
    assert [isinstance(n, nn.Identity) for n in blocks.post_norms] == [False] * 4 + [True] * 4


@pytest.mark.parametrize("alpha,twin", [(0.0, "preln"), (1.0, "postln")])
def test_mixln_ends_are_preln_and_postln(alpha, twin):
    mix, ref = gpt("mixln", residual_kwargs={"alpha": alpha}), gpt(twin)
    perturb_(ref)
    norms = ref.trunk.scheme.in_norms if twin == "preln" else ref.trunk.scheme.post_norms
    mine = mix.trunk.scheme.in_norms if twin == "preln" else mix.trunk.scheme.post_norms
    mine.load_state_dict(norms.state_dict())
    mix.trunk.branches.load_state_dict(ref.trunk.branches.state_dict())
    mix.stem.load_state_dict(ref.stem.state_dict())
    mix.head.load_state_dict(ref.head.state_dict())
    assert torch.equal(mix.eval()(toks()), ref.eval()(toks()))


def test_mixln_has_no_decomposition_and_lesions_leave_the_skip():
    m = gpt("mixln", depth=4)
    assert m.trunk.scheme.post_layers == 1
    perturb_(m)
    with pytest.raises(ValueError, match="not a sum of components"):
        decompose(m, toks())
    for block in (1, 5):  # a Post-LN sublayer (its post norm goes too, as for postln) and a Pre-LN one
        lesion_leaves_the_skip(m, block)


@pytest.mark.parametrize("kw,match", [(dict(alpha=-0.1), "alpha must be a number in"), (dict(alpha=1.5), "alpha"),
                                      (dict(alpha="0.25"), "alpha"), (dict(alpha=True), "alpha"),
                                      (dict(norm="pre"), "places its own norms"),
                                      (dict(norm_type="batchnorm"), "unknown norm_type")])
def test_mixln_refuses_bad_arguments_in_one_line(kw, match):
    one_line_error(lambda: gpt("mixln", residual_kwargs=kw), match)


# --- LayerNorm Scaling --------------------------------------------------------------------------------------------
def test_lnscaling_follows_its_equation():
    trunk, bs = trunk_of("lnscaling")
    s, x = trunk.scheme, x_in()
    k = [1, 1, 2, 2, 3, 3]  # the layer of each sublayer, from 1
    h = x
    for i, b in enumerate(bs):
        h = h + b(s.in_norms[i](h) / math.sqrt(k[i]))  # x + F(N(x) / sqrt(k))
    assert (trunk(x) - h).abs().max().item() < 1e-15
    blocks = create_residual("lnscaling", specs(("",) * 4))  # residual blocks: one layer each
    assert blocks.scales == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5, 0.5])


def test_lnscaling_is_preln_with_scaled_norm_outputs_and_no_parameters():
    lns, pre = gpt("lnscaling", depth=3), gpt("preln", depth=3)
    assert lns.state_dict().keys() == pre.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(lns.state_dict().values(), pre.state_dict().values()))
    assert torch.equal(gpt("lnscaling", depth=1)(toks()), gpt("preln", depth=1)(toks()))  # layer 1: scale 1
    with record(lns.eval(), names=("branch_in",)) as rec:
        lns(toks())
    with record(pre.eval(), names=("branch_in",)) as rec_pre:
        pre(toks())
    ins, ins_pre = rec.get("branch_in"), rec_pre.get("branch_in")
    assert torch.equal(ins[0], ins_pre[0]) and torch.equal(ins[1], ins_pre[1])  # layer 1: N(x) / sqrt(1)
    torch.testing.assert_close(ins[2], ins_pre[2] / math.sqrt(2))  # the same stream before layer 2: N(x) / sqrt(2)
    assert isinstance(lns.head.norm, nn.LayerNorm)  # the final norm is the family's, not scaled


def test_lnscaling_lesions_leave_the_skip_and_it_decomposes():
    m = gpt("lnscaling", depth=3)
    perturb_(m)
    for block in (0, 4):
        lesion_leaves_the_skip(m, block)
    dec = decompose(m, toks())
    torch.testing.assert_close(dec.components.sum(0), dec.final)


def test_lnscaling_refuses_other_placements_in_one_line():
    one_line_error(lambda: gpt("lnscaling", residual_kwargs={"norm": "post"}), "supports norm placement pre")
    one_line_error(lambda: gpt("lnscaling", residual_kwargs={"alpha": 2}), "lnscaling")


# --- every new design: the stated equation is the trunk's update -------------------------------------------------
@pytest.mark.parametrize("name,kw", [("periln", {}), ("mixln", {"alpha": 0.5}), ("lnscaling", {}),
                                     ("preln", {"norm_type": "dyt"})])
def test_equation_is_what_the_trunk_adds(name, kw):
    """``finish_i(equation(x, N'(F(h)), i))`` is the stream after branch ``i`` (the post norm, where there is one,
    applied after the equation)."""
    trunk, _ = trunk_of(name, **kw)
    s = trunk.scheme
    with record(trunk, names=("resid_pre", "branch_out", "resid_post")) as rec:
        trunk(x_in())
    for i, (x, out, y) in enumerate(zip(rec.get("resid_pre"), rec.get("branch_out"), rec.get("resid_post"))):
        assert (s.finish(i, s.equation(x, s.norm_out(i, out), i)) - y).abs().max().item() == 0.0
