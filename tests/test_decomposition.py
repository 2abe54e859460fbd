"""Residual decomposition, direct logit attribution and the logit lens on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.diagnostics.decomposition import decompose, direct_logit_attribution, logit_lens


def perturbed_gpt(residual="preln", final_norm="layernorm", **kw):
    torch.manual_seed(0)
    m = reslab.create_model("gpt", residual, depth=2, num_classes=7, input_shape=(6,), d_model=8, n_heads=2,
                            final_norm=final_norm, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def toks(seed=0):
    return torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(seed))


def test_identity_decomposition_is_embedding_plus_raw_branch_outputs():
    m = perturbed_gpt()
    x = toks()
    dec = decompose(m, x)
    torch.testing.assert_close(dec.components[0], m.stem(x))
    h = m.stem(x)
    for i, b in enumerate(m.trunk.branches):  # Pre-LN: x_{i+1} = x_i + F_i(LN_i(x_i))
        out = b(m.trunk.scheme.in_norms[i](h))
        torch.testing.assert_close(dec.components[i + 1], out)
        h = h + out
    assert dec.labels(m) == ["embed", "attn0", "mlp0", "attn1", "mlp1"]


def test_scaled_skip_carries_earlier_terms_through_every_later_scale():
    m = reslab.create_model("mlp8", "scaled", width=4, input_shape=(3,), norm="none",
                            residual_kwargs=dict(a=0.5, b=2.0, post=None)).eval()
    x = torch.randn(5, 3)
    dec = decompose(m, x)
    torch.testing.assert_close(dec.components[0], 0.5 ** 3 * m.stem(x))  # a^L x0
    torch.testing.assert_close(dec.components.sum(0), dec.final)
    # each term's weight: b for the branch, times a for every later skip
    np.testing.assert_allclose(dec.weights(), [0.125, 2 * 0.25, 2 * 0.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(decompose(perturbed_gpt(), toks()).weights(), 1.0, rtol=1e-6)  # Pre-LN: uniform


@pytest.mark.parametrize("final_norm", ["layernorm", "rmsnorm", "none"])
def test_direct_logit_attribution_adds_up_to_the_target_logit(final_norm):
    m = perturbed_gpt(final_norm=final_norm)
    x, t = toks(), toks(1)
    terms, bias = direct_logit_attribution(m, x, t)
    logit = m(x).gather(-1, t.unsqueeze(-1)).mean().item()
    assert terms.sum() + bias == pytest.approx(logit, abs=1e-5)
    assert len(terms) == 5


def test_post_norm_schemes_refuse_a_decomposition():
    for r in ("postln", "deepnorm"):
        with pytest.raises(ValueError, match="not a sum of components"):
            decompose(perturbed_gpt(r), toks())


def test_logit_lens_ends_at_the_model_output():
    m = perturbed_gpt()
    x, t = toks(), toks(1)
    lens = logit_lens(m, x, t)
    assert len(lens.kl) == len(m.trunk) + 1 and lens.kl[-1] == pytest.approx(0.0, abs=1e-6)
    logits = m(x)
    assert lens.loss[-1] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), t.flatten()).item(), abs=1e-5)
    # depth 0 decodes the embedding alone: the head applied to the stem output
    e = F.log_softmax(m.head(m.stem(x)), -1)
    assert lens.loss[0] == pytest.approx(F.nll_loss(e.flatten(0, 1), t.flatten()).item(), abs=1e-5)
    assert (lens.kl >= -1e-6).all()
