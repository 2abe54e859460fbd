"""The dilution claim's ablation: pairwise cosines of the contributions and the share they predict, on analytic
cases (orthogonal, identical, equal cosines, zero final streams), and the ablation the smoke run writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reslab.diagnostics.decomposition import Decomposition, share_under_cosine
from reslab.experiments import dilution, get_claim
from reslab.experiments.base import run_claim


def decomposition(components: torch.Tensor) -> Decomposition:
    """A decomposition straight from its contributions ``(K, *shape)``, in float64 so that the final stream is
    their sum to rounding of the checks (the sources play no part here)."""
    components = components.double()
    return Decomposition(components, components.sum(0), list(components))


def test_orthogonal_contributions_have_cosine_zero_and_share_k_to_minus_half():
    k, n, t, d = 5, 3, 4, 8
    scale = torch.rand(n, t, 1) + 0.5  # every token its own norm, equal over the components
    comps = torch.stack([scale * torch.eye(d)[j] for j in range(k)])  # component j along basis vector e_j
    dec = decomposition(comps)
    assert dec.pairwise_cosine() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(dec.cosines(), np.eye(k), atol=1e-12)
    np.testing.assert_allclose(dec.shares(), k ** -0.5, rtol=1e-12)
    assert dec.share_from_cosine() == pytest.approx(k ** -0.5, rel=1e-12)
    assert float(share_under_cosine(k, 0.0)) == pytest.approx(k ** -0.5, rel=1e-15)


def test_identical_contributions_have_cosine_one_and_share_one_over_k():
    k = 7
    comps = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)).expand(k, 3, 5, 16).clone()
    dec = decomposition(comps)
    assert dec.pairwise_cosine() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(dec.shares(), 1 / k, rtol=1e-12)
    assert dec.share_from_cosine() == pytest.approx(1 / k, rel=1e-12)
    assert float(share_under_cosine(k, 1.0)) == pytest.approx(1 / k, rel=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_equal_norm_formula_against_the_direct_computation(seed):
    """One row of ``K`` equal-norm vectors in random directions: ``n / ||sum c_j||`` is exactly
    ``1 / sqrt(K (1 + (K - 1) rho))`` with ``rho`` their mean pairwise cosine."""
    g = torch.Generator().manual_seed(seed)
    k, n = 6, 2.5
    v = torch.randn(k, 1, 4, generator=g, dtype=torch.float64) + 0.7  # a common direction: rho well above 0
    comps = n * v / v.norm(dim=-1, keepdim=True)
    u = comps[:, 0] / n
    rho = float(((u @ u.T).sum() - k) / (k * (k - 1)))
    direct = n / float(comps.sum(0).norm())
    dec = decomposition(comps)
    assert dec.pairwise_cosine() == pytest.approx(rho, rel=1e-12)
    assert float(share_under_cosine(k, rho)) == pytest.approx(direct, rel=1e-12)
    np.testing.assert_allclose(dec.shares(), direct, rtol=1e-12)
    assert dec.share_from_cosine() == pytest.approx(direct, rel=1e-12)
    np.testing.assert_allclose(share_under_cosine([1, 4, 16], [0.0, 0.0, 1.0]), [1, 0.5, 1 / 16])


def test_share_from_cosine_keeps_the_measured_norms_and_is_exact_for_equal_cosines():
    """``u_j = a e_0 + b e_j`` have every pairwise cosine ``a^2 / (a^2 + b^2)``; with unequal norms ``n_j`` the
    prediction from the measured norms is the measured mean share, the equal-norm formula is not."""
    k, d, a, b = 4, 6, 0.6, 0.8
    u = torch.stack([a * torch.eye(d)[0] + b * torch.eye(d)[j + 1] for j in range(k)])
    norms = torch.tensor([1.0, 2.0, 0.5, 3.0])
    dec = decomposition((norms[:, None] * u)[:, None])  # one sample, (K, 1, d)
    rho = a * a / (a * a + b * b)
    assert dec.pairwise_cosine() == pytest.approx(rho, rel=1e-6)
    assert dec.share_from_cosine() == pytest.approx(float(dec.shares().mean()), rel=1e-6)
    assert dec.share_from_cosine() < float(share_under_cosine(k, rho))  # the norms' spread lowers the share


def test_rows_are_tokens_for_token_streams():
    """Per token: token 0 holds two identical contributions (cosine 1), token 1 two orthogonal ones (cosine 0):
    mean 1/2. Taken per sample the cosine would be ``1 / 101``."""
    e = torch.eye(3)
    comps = torch.stack([torch.stack([e[0], 10 * e[1]]), torch.stack([e[0], 10 * e[2]])])[:, None]  # (2, 1, 2, 3)
    assert decomposition(comps).pairwise_cosine() == pytest.approx(0.5, rel=1e-12)


def test_rows_with_a_zero_final_stream_are_left_out():
    """Row 1's contributions cancel (``v`` and ``-v``, cosine -1, final stream zero): it has no share and no cosine;
    the two live rows are orthogonal pairs."""
    e = torch.eye(4)
    comps = torch.stack([torch.stack([e[0], e[2], 3 * e[1]]), torch.stack([e[1], -e[2], 3 * e[3]])])  # (2, 3, 4)
    dec = decomposition(comps)
    assert float(dec.final[1].norm()) == 0
    assert dec.pairwise_cosine() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(dec.shares(), 2 ** -0.5, rtol=1e-12)
    assert dec.share_from_cosine() == pytest.approx(2 ** -0.5, rel=1e-12)


def test_a_zero_contribution_counts_as_orthogonal():
    comps = torch.stack([torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3)])  # a zero-initialised branch
    dec = decomposition(comps)
    assert np.isfinite(dec.cosines()).all()
    assert dec.pairwise_cosine() == pytest.approx(2 / 6)  # of the six ordered pairs only (0, 1) and (1, 0) align


def _rows(rho: float) -> list[dict]:
    """Ablation rows at init whose measured shares are the equal-norm law at cosine ``rho``."""
    rows = []
    for layers in (2, 4, 8, 16):
        share = float(share_under_cosine(2 * layers + 1, rho))
        rows.append(dilution._law_row("init", layers, share, [(rho, share)]))
    return rows


def test_the_ablation_text_states_the_law_the_numbers_show():
    orthogonal, coherent = _rows(0.0), _rows(0.9)
    assert [r["law"] for r in orthogonal] == ["K^-1/2"] * 4 and [r["law"] for r in coherent] == ["1/K"] * 4
    k = np.array([r["components"] for r in orthogonal], float)
    p_orth = dilution._fit(k, np.array([r["mean_share"] for r in orthogonal]))
    p_coh = dilution._fit(k, np.array([r["mean_share"] for r in coherent]))
    assert p_orth == pytest.approx(-0.5) and p_coh < -0.85
    text = dilution._ablation_text(orthogonal, p_orth)
    assert "follow the K^-1/2 law, not 1/K" in text and '"1/L" is wrong' in text and "0.0% apart" in text
    text = dilution._ablation_text(coherent, p_coh)
    assert "follow the 1/K law" in text and "wrong" not in text


def test_smoke_run_writes_the_ablation(tmp_path):
    result = run_claim(get_claim("dilution"), "smoke", tmp_path, jobs=1, quiet=True)
    ab = result.ablation
    assert ab is not None and ab["text"] and ab["figures"] == ["dilution_ablation.png"]
    assert (tmp_path / "claims" / "dilution" / "dilution_ablation.png").stat().st_size > 1000
    depths = dilution.INIT_DEPTHS["smoke"]
    init = [r for r in ab["table"] if r["when"] == "init"]
    trained = [r for r in ab["table"] if r["when"] == "trained"]
    assert [r["layers"] for r in init] == list(depths) and [r["layers"] for r in trained] == list(depths)
    for r in ab["table"]:
        k = r["components"]
        assert k == 2 * r["layers"] + 1 and r["K^-1/2"] == pytest.approx(k ** -0.5) and r["1/K"] == pytest.approx(1 / k)
        assert -1 / (k - 1) <= r["mean_pairwise_cosine"] <= 1
        assert r["share_equal_norms"] == pytest.approx(float(share_under_cosine(k, r["mean_pairwise_cosine"])))
        assert r["share_from_cosine"] == pytest.approx(r["mean_share"], rel=0.1)  # the cosine explains the share
    # the measured shares are the claim's own (its table), and the text quotes them
    table = {(r["when"], r["layers"]): r["mean_share"] for r in result.table if r["scheme"] == "Pre-LN"}
    assert all(r["mean_share"] == pytest.approx(table[(r["when"], r["layers"])]) for r in ab["table"])
    assert all(f"{r['mean_share']:.3f}" in ab["text"] for r in ab["table"])


def test_where_weights_sit_on_analytic_sites():
    from reslab.experiments.dilution import where_weights_sit

    diagonal = [np.eye(s)[-1] for s in (2, 3, 5)]  # every site puts all its weight on the latest source
    w = where_weights_sit(diagonal)
    assert (w["latest"], w["embedding"], w["other"]) == (1.0, 0.0, 0.0)
    assert w["entropy"] == pytest.approx(0.0, abs=1e-12) and w["peak"] == pytest.approx(np.mean([2, 3, 5]))
    uniform = [np.full(s, 1 / s) for s in (2, 4)]
    assert where_weights_sit(uniform)["entropy"] == pytest.approx(1.0) and where_weights_sit(uniform)["peak"] == 1
    middle = where_weights_sit([np.array([0.1, 0.8, 0.1])])
    assert middle["other"] == 1.0 and middle["peak"] == pytest.approx(2.4)
