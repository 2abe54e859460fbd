"""The transformer claims: their measurements on cases with known answers, and their run plans."""

from __future__ import annotations

import numpy as np
import pytest

from reslab.experiments import dilution, growth, transformers


def test_xiong_setting_matches_the_expectation():
    """E||x_{l+1}||^2 = E||x_l||^2 + d/2 in expectation for Pre-LN FFN sublayers (relu of unit-variance
    pre-activations keeps half the energy, N(0, 1/d) weights keep the norm); Post-LN sees 3d/2 before each LN."""
    pre = np.mean([growth.xiong_profile("preln", 256, 8, 512, s) for s in range(3)], 0)
    assert pre[0] == pytest.approx(1.0, abs=0.1)
    slope, _, r2 = growth._linear_fit(np.arange(len(pre), dtype=float), pre)
    assert slope == pytest.approx(0.5, abs=0.08) and r2 > 0.99
    post = np.mean([growth.xiong_profile("postln", 256, 8, 512, s) for s in range(3)], 0)
    assert len(post) == 8 and np.abs(post - 1.5).max() < 0.12


def test_linear_fit_on_a_line():
    b, a, r2 = growth._linear_fit(np.arange(5.0), 2.0 + 3.0 * np.arange(5.0))
    assert (b, a, r2) == pytest.approx((3.0, 2.0, 1.0))


def test_budget_plan_is_equal_for_every_scheme():
    plan = transformers.plan("quick")
    p = transformers.PROFILE["quick"]
    assert len(plan) == len(transformers.SCHEMES) * len(p["depths"]) * len(p["seeds"])
    budgets = {(c.epochs, c.batch_size, c.train_samples, c.lr, c.weight_decay, c.warmup_steps, c.data,
                c.model_kwargs["d_model"], c.model_kwargs["n_heads"]) for c in plan.values()}
    assert len(budgets) == 1  # same tokens, optimiser, schedule and widths for every scheme
    for rid, cfg in plan.items():
        name, layers, seed = transformers.parse_id(rid)
        design = transformers.SCHEMES[transformers.LABELS[name]]
        assert (cfg.residual, cfg.residual_kwargs, cfg.model, cfg.seed) == (design.scheme, design.kwargs,
                                                                             f"gpt{layers}", seed)
        assert {k: v for k, v in cfg.model_kwargs.items() if k not in ("d_model", "n_heads")} == design.model
    assert dilution.CLAIM.runs("quick").keys() == plan.keys()  # the two claims share their runs


def test_ngram_entropies_on_a_known_text(tmp_path):
    """'abab...': two equally frequent characters (1 bit), each fully predicted by the one before (0 bits)."""
    f = tmp_path / "t.txt"
    f.write_text("ab" * 400)
    h1, h2 = transformers.ngram_entropies(f"text:{f}@4")
    assert h1 == pytest.approx(1.0, abs=1e-3) and h2 == pytest.approx(0.0, abs=1e-9)
