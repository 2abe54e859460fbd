"""The lr_sensitivity claim: its sweep plan, the best-rate estimators on analytic curves, the checks on synthetic
numbers, and the smoke profile end to end."""

import math

import numpy as np
import pytest

from reslab import runs
from reslab.experiments import lr_sensitivity as lrs
from reslab.experiments.base import get_claim, run_claim

RATES = np.array([0.01, 0.03, 0.1, 0.3, 1.0])


def test_quick_plan_is_a_full_sweep():
    plan = lrs.plan("quick")
    p = lrs.PROFILE["quick"]
    assert len(p["rates"]) >= 5 and p["seeds"] >= 3 and len(p["blocks"]) >= 3
    assert len(plan) == len(lrs.SCHEMES) * len(p["blocks"]) * len(p["rates"]) * p["seeds"]
    for rid, cfg in plan.items():
        scheme, blocks, lr, seed = lrs.parse_id(rid)
        assert lrs.run_id(scheme, blocks, lr, seed) == rid
        assert (cfg.model, cfg.lr, cfg.seed) == (f"preact_mlp{2 * blocks + 2}", lr, seed)
        assert (cfg.optimizer, cfg.schedule, cfg.weight_decay) == ("sgd", "constant", 0.0)
        assert cfg.model_kwargs["norm"] == "ln"
    # the trained nets whose effective steps are measured are in every profile's grid
    assert all(lrs.STEP_LR in p["rates"] for p in lrs.PROFILE.values())


def test_fitted_optimum_finds_the_vertex_of_a_parabola():
    target = math.log10(0.07)
    losses = (np.log10(RATES) - target) ** 2 + 1.0
    assert lrs.fitted_optimum(RATES, losses) == pytest.approx(target)
    # at the grid's edge it is the edge
    assert lrs.fitted_optimum(RATES, np.log10(RATES)) == pytest.approx(math.log10(0.01))


def test_best_rates_and_their_bootstrap():
    rng = np.random.default_rng(0)
    same = np.tile((np.log10(RATES) + 1.0) ** 2, (3, 1))  # minimum at 0.1 for every seed
    b = lrs.best_rates(RATES, same, rng)
    assert b["rate"] == 0.1 and b["bootstrap"][2] == 1.0 and b["fitted_se"] == pytest.approx(0.0)
    split = np.array([(np.log10(RATES) - math.log10(r)) ** 2 for r in (0.03, 0.1, 0.3)])
    b = lrs.best_rates(RATES, split, rng)
    assert b["bootstrap"].sum() == pytest.approx(1.0) and np.count_nonzero(b["bootstrap"]) >= 2
    assert b["fitted_mean"] == pytest.approx(np.log10([0.03, 0.1, 0.3]).mean()) and b["fitted_se"] > 0


def test_slope_of_a_power_law():
    blocks = [2, 8, 32]
    values = np.array([[3.0 * b ** -0.5, 5.0 * b ** -0.5] for b in blocks])
    assert lrs.slope(blocks, values) == pytest.approx([-0.5, -0.5])


def _best(identity: list[float], scaled: list[int]) -> dict:
    """Synthetic best rates: the identity's per-seed fitted optima per depth, the scaled rule's grid indices."""
    out = {}
    for b, opt, k in zip([2, 8, 32], identity, scaled):
        out[("identity", b)] = {"fitted": np.array([opt - 0.02, opt, opt + 0.02])}
        out[("scaled", b)] = {"index": k}
    return out


def test_checks_pass_when_the_identity_drifts_and_the_scaled_branch_transfers():
    falling = np.array([[4e-3, 4.1e-3, 3.9e-3], [3e-3, 3.1e-3, 2.9e-3], [2e-3, 2.1e-3, 1.9e-3]])
    checks = lrs.judge([2, 8, 32], RATES, _best([-0.5, -1.0, -1.5], [3, 2, 2]), falling)
    assert [c["passed"] for c in checks] == [True, True, True]


def test_checks_fail_when_nothing_moves_and_the_scaled_branch_drifts():
    flat = np.array([[4e-3, 4.1e-3, 3.9e-3]] * 3)
    checks = lrs.judge([2, 8, 32], RATES, _best([-1.0, -1.0, -1.1], [4, 2, 1]), flat)
    assert [c["passed"] for c in checks] == [False, False, False]
    assert checks[2]["value"] == 3


def test_smoke_profile_end_to_end(tmp_path):
    result = run_claim(get_claim("lr_sensitivity"), "smoke", tmp_path, jobs=1, quiet=True)
    record = runs.read_json(tmp_path / "claims" / "lr_sensitivity" / "claim.json")
    assert record["verdict"] == result.verdict and len(record["checks"]) == 3
    assert {r["scheme"] for r in record["table"]} == {label for _, _, label in lrs.SCHEMES.values()}
    for name in record["figures"]:
        assert (tmp_path / "claims" / "lr_sensitivity" / name).stat().st_size > 10_000
    assert "Block AttnRes" in record["ablation"]["text"]
    ours = {r[""]: r["ours"] for r in record["recipe"]}
    assert ours["optimiser"] == "SGD, lr 0.01 / 0.1 / 1, momentum 0.9, batch 128"  # the sweep's rates in one item
