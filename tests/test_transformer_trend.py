"""The transformers claim's ablation: the gap of each scheme to Pre-LN at smaller budgets, and its trend with tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reslab.experiments import transformers
from reslab.experiments.base import get_claim, run_claim


@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_trend_runs_parse_and_are_apart_from_the_plan(profile):
    plan, trend = transformers.plan(profile), transformers.trend_plan(profile)
    p = transformers.PROFILE[profile]
    assert not plan.keys() & trend.keys()
    assert len(trend) == (len(transformers.TREND_SCHEMES) * len(p["depths"]) * len(p["seeds"])
                          * len(transformers.TREND_SHARES))
    for rid, cfg in trend.items():
        scheme, layers, seed, share = transformers.parse_trend_id(rid)
        assert transformers.parse_id(rid) == (scheme, layers, seed)
        assert transformers.run_id(scheme, layers, seed, share) == rid
        assert (cfg.residual, cfg.model, cfg.seed, cfg.train_samples) == (scheme, f"gpt{layers}", seed,
                                                                         p["samples"] // share)
        assert 0 < cfg.warmup_steps < math.ceil(cfg.train_samples / cfg.batch_size)
        # the same recipe as the profile's own run, but for the windows and the warm-up
        full = plan[transformers.run_id(scheme, layers, seed)].to_dict()
        assert {k: v for k, v in cfg.to_dict().items() if full[k] != v}.keys() <= {"train_samples", "warmup_steps"}
    for rid in plan:  # the plan's ids parse as before, share 1
        assert transformers.parse_trend_id(rid) == (*transformers.parse_id(rid), 1)
    assert transformers.CLAIM.runs(profile) == {**plan, **trend}


def test_full_profile_has_no_trend_runs():
    """The whole corpus (samples None) is sized in epochs by --budget: no fraction of a pass to scale with it."""
    assert transformers.PROFILE["full"]["samples"] is None and transformers.trend_plan("full") == {}


def test_gap_slope_on_a_line_and_on_a_flat_gap():
    t = np.log2([1200 * 32, 2400 * 32, 4800 * 32])
    offsets = np.array([[-0.1], [0.02], [0.05]])  # per seed; the slope is the same for every seed
    slope, se = transformers.gap_slope(t, offsets + 0.03 * t)
    assert slope == pytest.approx(0.03, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)
    slope, se = transformers.gap_slope(t, offsets + np.zeros_like(t))
    assert slope == pytest.approx(0.0, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)
    # per-seed slopes 0.01, 0.02, 0.03: their mean and its standard error sd / sqrt(3)
    slope, se = transformers.gap_slope(t, np.array([[0.01], [0.02], [0.03]]) * t)
    assert slope == pytest.approx(0.02) and se == pytest.approx(0.01 / math.sqrt(3))
    assert math.isnan(transformers.gap_slope(t, np.full((2, 3), np.nan))[0])


def test_trend_reading():
    read = transformers._trend_reading
    assert read(0.001, 0.01, -0.1, 0.0) == "flat"
    assert read(0.001, 0.0, -0.1, 0.002) == "flat"  # below the floor
    assert read(0.05, 0.01, -0.1, 0.0) == "narrowing, against the paper's ordering"
    assert read(-0.05, 0.01, -0.1, 0.0) == "widening, toward the paper's ordering"
    assert read(-0.05, 0.01, 0.1, 0.0) == "narrowing, toward the paper's ordering"


def test_smoke_claim_has_the_trend_as_its_ablation(tmp_path):
    result = run_claim(get_claim("transformers"), "smoke", tmp_path, jobs=1, quiet=True)
    p = transformers.PROFILE["smoke"]
    a = result.ablation
    assert a is not None and a["figures"] == ["gap_trend.png"]
    assert (tmp_path / "claims" / "transformers" / "gap_trend.png").stat().st_size > 0
    budgets = {(r["scheme"], r["layers"], r["training windows"]) for r in a["table"] if "training windows" in r}
    assert budgets == {(transformers.LABELS[s], L, w) for s in transformers.TREND_SCHEMES[1:] for L in p["depths"]
                       for w in (16, 32, 64)}
    assert all(r["tokens seen"] == r["training windows"] * p["ctx"] for r in a["table"] if "training windows" in r)
    slopes = [r for r in a["table"] if "training windows" not in r]
    assert len(slopes) == (len(transformers.TREND_SCHEMES) - 1) * len(p["depths"])
    assert all(np.isfinite(r["gap to Pre-LN (bits/char)"]) for r in a["table"])
    assert "large-scale result" in a["text"] and "Block AttnRes, 2 layers" in a["text"]
    # the gradient check is followed over the same budgets; at the full budget it is the check's own number
    grad = next(c for c in result.checks if c["check"].startswith("gradients more uniform"))
    sentence = a["text"][a["text"].index("The gradient check at the same budgets"):]
    assert sentence.split("Block AttnRes ")[1].split(":")[0].split(", ")[-1] == f"{grad['value']:.3f}"
    # the claim's own table and figures stay on the profile's budget: one row per scheme and depth
    assert len(result.table) == len(transformers.SCHEMES) * len(p["depths"])
    assert result.figures == ["bpc.png", "depth_dynamics.png"]
