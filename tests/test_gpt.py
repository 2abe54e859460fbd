"""The GPT family and the transformer norm placements, against their equations on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.diagnostics.recorder import record
from reslab.branch import BranchSpec, layer_count, layer_of, weights_by_role
from reslab.models.gpt import GPT2_STD, CausalSelfAttention, Rotary
from reslab.residuals.layerscale import cait_init


def gpt(residual="preln", depth=2, d=16, heads=2, ctx=9, vocab=11, **kw):
    torch.manual_seed(0)
    return reslab.create_model("gpt", residual, depth=depth, num_classes=vocab, input_shape=(ctx,), d_model=d,
                               n_heads=heads, **kw)


def tokens(n=3, ctx=9, vocab=11, seed=0):
    return torch.randint(0, vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def test_two_branches_per_layer_with_roles():
    m = gpt(depth=3)
    specs = m.trunk.scheme.specs
    assert [s.role for s in specs] == ["attn", "mlp"] * 3
    assert layer_of(specs) == (0, 0, 1, 1, 2, 2) and layer_count(specs) == 3
    assert layer_of([BranchSpec(4, 4)] * 3) == (0, 1, 2)
    assert m.trunk.scheme.norm_placement == "pre"


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_the_past_never_sees_the_future(positions):
    m = gpt(positions=positions).eval()
    x = tokens()
    y = m(x)
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % 11
    y2 = m(x2)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_shorter_sequences_and_too_long_ones():
    m = gpt().eval()
    x = tokens()
    torch.testing.assert_close(m(x[:, :4]), m(x)[:, :4])
    with pytest.raises(ValueError, match="longer than the model's context"):
        m(torch.zeros(1, 10, dtype=torch.long))


def test_attention_matches_a_naive_reference():
    torch.manual_seed(0)
    att = CausalSelfAttention(8, 2)
    x = torch.randn(2, 5, 8)
    q, k, v = (att.qkv(x)).split(8, -1)
    heads = lambda z: z.view(2, 5, 2, 4).transpose(1, 2)  # noqa: E731
    s = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4)
    s = s.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), float("-inf"))
    ref = att.proj((s.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(att(x), ref)


def test_rotary_makes_scores_depend_on_relative_position_only():
    rot = Rotary(4, 16)
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    score = lambda i, j: (rot(q.expand(1, 1, 16, 4))[0, 0, i] * rot(k.expand(1, 1, 16, 4))[0, 0, j]).sum()  # noqa
    torch.testing.assert_close(score(7, 3), score(12, 8))
    torch.testing.assert_close(rot(q.expand(1, 1, 16, 4))[0, 0, 0], q[0, 0, 0])  # position 0: no rotation
    with pytest.raises(ValueError, match="even head size"):
        Rotary(3, 4)


def test_gpt2_init_and_tied_embeddings():
    m = gpt(depth=4, d=64, heads=4)
    outs = weights_by_role(m.trunk.branches, "out")
    assert len(outs) == 8  # one output projection per sublayer
    for w in outs:
        assert abs(w.std().item() - GPT2_STD / math.sqrt(8)) < 0.25 * GPT2_STD / math.sqrt(8)
    assert abs(m.stem.tok.weight.std().item() - GPT2_STD) < 0.1 * GPT2_STD
    plain_init = gpt(depth=4, d=64, heads=4, scaled_out_init=False)
    assert abs(weights_by_role(plain_init.trunk.branches, "out")[0].std().item() - GPT2_STD) < 0.2 * GPT2_STD
    tied = gpt(tie_embeddings=True)
    assert tied.head.unembed.weight is tied.stem.tok.weight
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in gpt().parameters()) - 11 * 16


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=10, n_heads=3), "divisible"), (dict(positions="alibi"), "positions"),
    (dict(input_shape=(3, 4)), "context"), (dict(final_norm="bn"), "final_norm"), (dict(dropout=1.5), "dropout")])
def test_bad_options_are_clear_errors(bad, match):
    kw = dict(depth=1, num_classes=5, input_shape=(4,), d_model=8, n_heads=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        reslab.create_model("gpt", **kw)


def _manual_trunk(m, x0, rule):
    """Run the sublayers by hand with ``rule(i, x, branch) -> x_next``."""
    for i, b in enumerate(m.trunk.branches):
        x0 = rule(i, x0, b)
    return x0


def _perturbed(residual, **kw):
    m = gpt(residual, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_norm_placements_follow_their_equations():
    x0 = torch.randn(2, 9, 16)
    pre = _perturbed("preln")
    s = pre.trunk.scheme
    torch.testing.assert_close(pre.trunk(x0), _manual_trunk(pre, x0, lambda i, x, b: x + b(s.in_norms[i](x))))
    post = _perturbed("postln")
    s2 = post.trunk.scheme
    assert s2.in_norms is None
    torch.testing.assert_close(post.trunk(x0), _manual_trunk(post, x0, lambda i, x, b: s2.post_norms[i](x + b(x))))
    sw = _perturbed("sandwich")
    s3 = sw.trunk.scheme
    torch.testing.assert_close(sw.trunk(x0), _manual_trunk(
        sw, x0, lambda i, x, b: x + s3.out_norms[i](b(s3.in_norms[i](x)))))
    rms = reslab.create_model("gpt", "preln", depth=1, num_classes=5, input_shape=(4,), d_model=8, n_heads=2,
                              residual_kwargs={"norm_type": "rmsnorm"})
    v = torch.randn(3, 4, 8)
    torch.testing.assert_close(rms.trunk.scheme.norm_in(0, v), v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_postln_stream_norm_is_constant_and_preln_grows():
    torch.manual_seed(0)
    x0 = torch.randn(4, 9, 64)
    norms = {}
    for r in ("preln", "postln"):
        m = gpt(r, depth=8, d=64, heads=4, scaled_out_init=False).eval()
        with record(m, names=("resid_post",)) as rec:
            m.trunk(x0)
        norms[r] = [t.pow(2).mean().item() for t in rec.get("resid_post")]
    assert max(abs(v - 1.0) for v in norms["postln"]) < 1e-3  # LayerNorm output, affine at init
    assert norms["preln"][-1] > norms["preln"][0]  # sublayer outputs pile up (the growth claim measures how fast)


def test_deepnorm_alpha_multiplies_the_skip_and_beta_scales_the_init():
    m = _perturbed("deepnorm", depth=3)
    s = m.trunk.scheme
    assert s.alpha == pytest.approx((2 * 3) ** 0.25) and s.beta == pytest.approx((8 * 3) ** -0.25)
    x0 = torch.randn(2, 9, 16)
    torch.testing.assert_close(m.trunk(x0), _manual_trunk(m, x0, lambda i, x, b: s.post_norms[i](s.alpha * x + b(x))))
    # init: Xavier-normal with gain beta on ffn / value / out, gain 1 on query / key
    torch.manual_seed(0)
    big = reslab.create_model("gpt", "deepnorm", depth=2, num_classes=5, input_shape=(4,), d_model=128, n_heads=4)
    s = big.trunk.scheme
    for role, gain in (("value", s.beta), ("query", 1.0), ("key", 1.0)):
        for w in weights_by_role(big.trunk.branches, role):
            expect = gain * math.sqrt(2.0 / (w.shape[0] + w.shape[1]))
            assert abs(w.std().item() / expect - 1) < 0.05, role
    fc = big.trunk.branches[1].fc.weight
    assert abs(fc.std().item() / (s.beta * math.sqrt(2.0 / (fc.shape[0] + fc.shape[1]))) - 1) < 0.05
    with pytest.raises(ValueError, match="supports norm placement post"):
        reslab.create_model("gpt", "deepnorm", depth=1, input_shape=(4,), d_model=8, n_heads=2,
                            residual_kwargs={"norm": "pre"})


def test_rezero_is_the_identity_at_init_and_one_alpha_gates_both_sublayers():
    m = gpt("rezero", depth=3)
    s = m.trunk.scheme
    assert s.norm_placement == "none" and s.alpha.shape == (3,)
    x0 = torch.randn(2, 9, 16)
    torch.testing.assert_close(m.trunk(x0), x0, rtol=0, atol=0)
    F.cross_entropy(m(tokens()).flatten(0, 1), tokens(seed=1).flatten()).backward()
    assert (s.alpha.grad.abs() > 0).all()  # every layer's alpha moves at step 0, from both of its sublayers
    # alpha_l multiplies both sublayers of layer l
    with torch.no_grad():
        s.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(m.trunk(x0), _manual_trunk(m, x0, lambda i, x, b: x + s.alpha[i // 2] * b(x)))


def test_layerscale_cait_init_by_depth_and_skipinit_sqrt():
    assert [cait_init(n) for n in (12, 18, 24, 36)] == [0.1, 0.1, 1e-5, 1e-6]
    m = gpt("layerscale", depth=20)
    assert m.trunk.scheme.init == 1e-5 and m.trunk.scheme.norm_placement == "pre"
    assert m.trunk.scheme.scales[0][0].item() == pytest.approx(1e-5)
    s = gpt("skipinit", depth=2, residual_kwargs={"init": "1/sqrt(L)"}).trunk.scheme
    torch.testing.assert_close(s.alpha.detach(), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="init must be"):
        gpt("layerscale", residual_kwargs={"init": "big"})


def test_a_tiny_language_model_learns_the_pydoc_corpus(tmp_path):
    from reslab.train import TrainConfig, train

    cfg = TrainConfig(model="gpt1", residual="preln", data="pydoc:32", epochs=1, batch_size=64, optimizer="adamw",
                      lr=3e-3, model_kwargs=dict(d_model=32, n_heads=2), seed=0)
    res = train(cfg, tmp_path / "run", quiet=True)
    m = res.metrics[-1]
    uniform = math.log(103)  # nats per character of a uniform guess over the vocabulary
    assert res.status == "completed" and m["test_loss"] < 0.75 * uniform, m
    assert m["train_loss"] < uniform
    # the diagnostics run on a language model's checkpoint too
    from reslab.diagnostics.diagnose import diagnose

    written = diagnose(tmp_path / "run", ["decomposition", "lens", "grads", "stream", "lesion"], samples=64)
    dec = np.load(written["decomposition"])
    assert dec["projections"].shape == (3,) and abs(dec["projections"].sum() - 1) < 1e-4
    lens = np.load(written["lens"])
    assert lens["kl"][-1] < 1e-6 and lens["loss"][-1] < lens["loss"][0]
    assert (tmp_path / "run" / "diagnostics" / "lens.png").exists()
