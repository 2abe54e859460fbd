"""The ensemble claim's conv nets: run ids, downsampling blocks, the analysis (on given lesions) and a smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reslab
from reslab import runs
from reslab.diagnostics.lesion import LesionResult
from reslab.experiments import degradation, ensemble, get_claim
from reslab.experiments.base import PROFILES, Context, run_claim
from reslab.train import TrainConfig


@pytest.mark.parametrize("profile", PROFILES)
def test_conv_run_ids_parse_and_do_not_collide_with_the_mlp_ids(profile):
    mlps, convs, plan = degradation.plan(profile), ensemble.conv_runs(profile), ensemble.plan(profile)
    assert not set(mlps) & set(convs) and plan == {**mlps, **convs}
    assert get_claim("ensemble").runs(profile) == plan
    recipe = TrainConfig.for_model("resnet20").to_dict()
    for rid, cfg in convs.items():
        variant, depth, seed = degradation.parse_id(rid)
        assert ensemble.is_conv(rid) and ensemble.conv_id(variant, depth, seed) == rid
        assert (cfg.model, cfg.residual, cfg.seed) == (f"resnet{depth}", ensemble.CONV_VARIANTS[variant], seed)
        # the family's own recipe (He et al.'s), only the epochs are the profile's
        assert {k: v for k, v in cfg.to_dict().items() if k not in ("model", "residual", "seed", "epochs")} == \
               {k: v for k, v in recipe.items() if k not in ("model", "residual", "seed", "epochs")}
    assert not any(ensemble.is_conv(r) for r in mlps)
    assert sorted(ensemble.CONV_VARIANTS) == sorted({degradation.parse_id(r)[0] for r in convs})
    assert len(convs) == 2 * ensemble.CONV[profile]["seeds"]
    with pytest.raises(ValueError, match="unknown conv variant"):
        ensemble.conv_id("residual", 20, 0)


def test_quick_profile_trains_resnet20_and_its_plain_twin_on_digits_with_three_seeds():
    convs = ensemble.conv_runs("quick")
    assert sorted(convs) == sorted(f"conv-{v}-d20-s{s}" for v in ("residual", "plain") for s in range(3))
    assert {c.data for c in convs.values()} == {"digits"}


@pytest.mark.parametrize("residual", ["identity", "plain"])
def test_the_downsampling_blocks_of_a_resnet20_are_blocks_3_and_6(residual):
    model = reslab.create_model("resnet20", residual, input_shape=(1, 8, 8), width=4)
    assert ensemble.downsampling_blocks(model) == [3, 6]
    assert ensemble.downsampling_blocks(reslab.create_model("mlp8", residual, input_shape=(12,), width=8)) == []


def test_deleting_a_downsampling_block_leaves_the_option_a_skip():
    """With option A, deleting block 3 is the block with a zero branch: ``x[::2, ::2]`` zero-padded to its width."""
    torch.manual_seed(0)
    model = reslab.create_model("resnet20", input_shape=(1, 8, 8), width=4).eval()
    x = torch.randn(5, 1, 8, 8)
    model.trunk.set_lesion([3])
    deleted = model(x)
    model.trunk.set_lesion([])
    bn = model.trunk.branches[3].last_module()
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    assert torch.allclose(deleted, model(x), atol=1e-6)


def test_relative_size_is_the_branch_against_its_skip_path():
    """``r_i = E ||F_i(x_i)|| / ||s_i(x_i)||``: a zeroed branch gives 0; scaling the branch's last BN scales it."""
    torch.manual_seed(0)
    model = reslab.create_model("resnet20", input_shape=(1, 8, 8), width=4).eval()
    x = torch.randn(16, 1, 8, 8)
    r = ensemble.relative_sizes(model, x)
    assert r.shape == (9,) and (r > 0).all()
    bn = model.trunk.branches[8].last_module()  # the last block: nothing after it changes its input
    with torch.no_grad():
        bn.weight.mul_(3)
        bn.bias.mul_(3)
    assert ensemble.relative_sizes(model, x)[8] == pytest.approx(3 * r[8], rel=1e-5)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    assert ensemble.relative_sizes(model, x)[8] == 0


# --- the analysis on given lesions (the measurement replaced; no training) ---------------------------------------

def _lesioned(rid: str, plain_intact: float) -> ensemble.Lesioned:
    """Made-up lesions of run ``rid``: the residual MLP hurt by deletions (less at later blocks, which are smaller
    against their skip), the zero-init one barely, conv residual barely except its downsampling blocks (2: 50%,
    4: 30% error), plain nets at chance."""
    variant, depth, _ = degradation.parse_id(rid)
    n = (depth - 2) // 2
    i = np.arange(n, dtype=float)
    ds = [n // 3, 2 * n // 3] if ensemble.is_conv(rid) else []
    base = plain_intact if variant == "conv-plain" else 0.05
    single = {"plain": np.full(n, 0.9), "conv-plain": np.full(n, 0.9),
              "residual": base + 0.3 / (i + 1), "residual-zero-init": base + 0.01 / (i + 1),
              "conv-residual": np.full(n, base + 0.01)}[variant]
    if variant == "conv-residual":
        single[ds] = [0.5, 0.3]
    response = {"residual": 1 + 0.01 * i, "residual-zero-init": 0.1 + 0.001 * i}.get(variant, np.ones(n))
    relative = {"residual": 1 / (i + 1), "residual-zero-init": 0.1 / (i + 1)}.get(variant, np.full(n, 0.5))
    ks = np.array([1, 2])
    k_errors = base + 0.1 * np.array([[1.0, 1.0], [2.0, 2.0]]) if "plain" not in variant else np.full((2, 2), 0.9)
    lesion = LesionResult(base, single, ks, k_errors, np.array([1.0, 0.5, 0.0]), base + np.array([0.0, 0.1, 0.2]))
    return ensemble.Lesioned(lesion, response, relative, ds)


def _analyse(tmp_path, monkeypatch, plain_intact: float):
    monkeypatch.setattr(ensemble, "eval_batch", lambda spec, n, split="train": (torch.zeros(360, 1), torch.zeros(360),
                                                                                 10))
    monkeypatch.setattr(ensemble, "load_trained", lambda ctx, rid: (rid, None))
    monkeypatch.setattr(ensemble, "measure", lambda rid, x, y, draws, seed: _lesioned(rid, plain_intact))
    return ensemble.analyse(Context(ensemble.plan("smoke"), tmp_path / "runs", tmp_path, "smoke"))


def test_downsampling_blocks_are_reported_apart_and_the_verdict_follows_the_numbers(tmp_path, monkeypatch):
    result = _analyse(tmp_path, monkeypatch, plain_intact=0.05)
    rows = {(r["variant"], r["blocks deleted"]): r for r in result.table if r["variant"] == "conv residual"}
    assert set(rows) == {("conv residual", "ordinary (4 of 6)"), ("conv residual", "downsampling block 2"),
                         ("conv residual", "downsampling block 4")}
    ordinary = rows[("conv residual", "ordinary (4 of 6)")]
    # the downsampling blocks' 50% and 30% are on their own rows, not in the ordinary blocks' mean and worst
    assert ordinary["error, one block deleted, mean (%)"] == pytest.approx(6)
    assert ordinary["error, one block deleted, worst (%)"] == pytest.approx(6)
    assert rows[("conv residual", "downsampling block 2")]["error, one block deleted, mean (%)"] == pytest.approx(50)
    assert rows[("conv residual", "downsampling block 4")]["error, one block deleted, mean (%)"] == pytest.approx(30)
    checks = {c["check"]: c for c in result.checks}
    conv_barely = checks["deleting one ordinary block of conv residual-14 barely hurts (mean error rise <= 5 points; "
                         "downsampling blocks apart)"]
    assert conv_barely["value"] == pytest.approx(1) and conv_barely["passed"]
    plain = checks["deleting one ordinary layer of conv plain-14 (which trains) leaves it near chance (error in %, "
                   "within 10 points of chance)"]
    assert plain["value"] == pytest.approx(90) and plain["intact"] == pytest.approx(5) and plain["passed"]
    assert checks["conv residual-14: error grows with k ordinary blocks deleted (Spearman rho > 0.5)"]["passed"]
    # the residual MLP fails "barely hurts" (rise 18.3 points at depth 8), everything else passes
    failed = [c["check"] for c in result.checks if not c["passed"]]
    assert failed == ["deleting one block of residual-8 barely hurts (mean error rise <= 5 points)"]
    assert result.verdict == "partly reproduced"
    assert "deleting a downsampling block adds 45.0 (block 2), 25.0 (block 4)" in result.summary
    # the ablation: which variant's deletions hurt, and that the relative size (not the response std) ranks them
    text = result.ablation["text"]
    assert text.startswith("Deleting one block hurts residual-8 (mean error rise 18.3 points, above the 5-point "
                           "bound) but not residual, zero-init last BN-8 (0.6 points).")
    assert "explains which deletions hurt when it is measured against what the block's skip path carries" in text
    assert "block 2 hurts most (45.0 points" in text
    assert [(r["variant"], r["depth"]) for r in result.ablation["table"]] == [
        ("residual", 4), ("residual", 8), ("residual, zero-init last BN", 4), ("residual, zero-init last BN", 8),
        ("conv residual", 14), ("conv plain", 14)]
    row = result.ablation["table"][1]
    assert row["Spearman rho(relative size, rise)"] == pytest.approx(1)
    assert row["Spearman rho(response std, rise)"] == pytest.approx(-1)
    assert result.figures == ["ensemble.png"] and result.ablation["figures"] == ["ensemble_ablation.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("ensemble.png", "ensemble_ablation.png"))


def test_a_plain_twin_that_did_not_train_has_no_lesion_check(tmp_path, monkeypatch):
    result = _analyse(tmp_path, monkeypatch, plain_intact=0.85)
    assert not any("conv plain" in c["check"] for c in result.checks)
    assert "it did not train" in result.summary
    assert sum("conv" in c["check"] for c in result.checks) == 2


# --- the claim's smoke profile, trained and measured ------------------------------------------------------------

def test_smoke_run_yields_the_conv_checks_the_ablation_and_both_figures(tmp_path):
    claim = get_claim("ensemble")
    result = run_claim(claim, "smoke", tmp_path, jobs=1, quiet=True)
    stored = runs.read_json(tmp_path / "claims" / "ensemble" / "claim.json")
    names = [c["check"] for c in result.checks]
    assert "deleting one ordinary block of conv residual-14 barely hurts (mean error rise <= 5 points; downsampling " \
           "blocks apart)" in names
    assert "conv residual-14: error grows with k ordinary blocks deleted (Spearman rho > 0.5)" in names
    conv_rows = {r["blocks deleted"]: r for r in result.table if r["variant"] == "conv residual"}
    assert set(conv_rows) == {"ordinary (4 of 6)", "downsampling block 2", "downsampling block 4"}
    plain = next(r for r in result.table if r["variant"] == "conv plain" and r["blocks deleted"].startswith("ord"))
    trained = plain["error intact (%)"] < 90 - ensemble.NEAR_CHANCE
    assert trained == any(n.startswith("deleting one ordinary layer of conv plain-14") for n in names)
    # the check's rise is the table's: ordinary blocks only
    rise = next(c for c in result.checks if c["check"].startswith("deleting one ordinary block of conv"))["value"]
    assert rise == pytest.approx(conv_rows["ordinary (4 of 6)"]["error, one block deleted, mean (%)"]
                                 - conv_rows["ordinary (4 of 6)"]["error intact (%)"])
    assert len(result.ablation["table"]) == 2 * 2 + 2  # two MLP variants at two depths, two conv nets
    assert stored["ablation"] == result.ablation and stored["checks"] == result.checks
    out = tmp_path / "claims" / "ensemble"
    assert all((out / f).stat().st_size > 1000 for f in ("ensemble.png", "ensemble_ablation.png"))
    for rid in ensemble.conv_runs("smoke"):
        assert runs.read_json(tmp_path / "runs" / rid / "result.json")["status"] == "completed"
