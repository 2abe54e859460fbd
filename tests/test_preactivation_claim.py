"""The preactivation claim: run ids and the runs it shares with the ensemble and shortcuts claims, its checks and
verdict on given numbers, and a smoke run end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from reslab import runs
from reslab.experiments import degradation, ensemble, get_claim, preactivation, shortcuts
from reslab.experiments.base import PROFILES, VERDICTS, run_claim, verdict_of
from reslab.models.blocks import PLACEMENTS


@pytest.mark.parametrize("profile", PROFILES)
def test_run_ids_parse_and_the_shared_runs_are_the_other_claims(profile):
    plan, p = preactivation.plan(profile), preactivation.PROFILE[profile]
    assert get_claim("preactivation").runs(profile) == plan
    by = preactivation.ids(profile)
    assert sorted(r for v in by.values() for r in v) == sorted(plan) and len(plan) == len(set(plan))
    for (k, depth), rids in by.items():
        assert len(rids) == p["seeds"] >= 2
        for seed, rid in enumerate(rids):
            assert degradation.parse_id(rid) == (f"conv-{preactivation.NAME[k]}", depth, seed)
            cfg = plan[rid]
            assert (cfg.model, cfg.residual, cfg.seed, cfg.data) == (f"resnet{depth}", "identity", seed, "digits")
            assert cfg.model_kwargs.get("placement") == (None if k == "original" else k)
    # the same id always means the same config: wherever another claim trains a run, it is this one
    shared = {**ensemble.conv_runs(profile), **shortcuts.plan(profile)}
    for rid in set(plan) & set(shared):
        assert plan[rid] == shared[rid] and plan[rid].to_dict() == shared[rid].to_dict()


def test_quick_shares_the_ensemble_claims_resnet20_runs():
    plan, shared = preactivation.plan("quick"), ensemble.conv_runs("quick")
    by = preactivation.ids("quick")
    assert by[("original", 20)] == [f"conv-residual-d20-s{s}" for s in range(3)]
    assert all(plan[r] == shared[r] and plan[r].to_dict() == shared[r].to_dict() for r in by[("original", 20)])
    assert "placement" not in plan["conv-residual-d20-s0"].model_kwargs
    assert len(plan) == 30 and len(set(plan) - set(shared)) == 27  # 4 placements x 3 seeds at 20, 5 x 3 at 26
    assert {c.epochs for c in plan.values()} == {15} and {c.model for c in plan.values()} == {"resnet20", "resnet26"}
    full = preactivation.plan("full")
    assert {r for r in ensemble.conv_runs("full") if r.startswith("conv-residual")} <= set(full)


def test_full_with_a_local_cifar_archive_shares_the_other_claims_resnet110_runs(monkeypatch):
    from reslab.experiments import base

    monkeypatch.setattr(base, "cifar_present", lambda: True)
    plan = preactivation.plan("full")
    assert {(c.data, c.epochs) for c in plan.values()} == {("cifar10", base.CIFAR_EPOCHS)}
    assert {c.model for c in plan.values()} == {"resnet56", "resnet110"}
    shared = {**ensemble.conv_runs("full"), **shortcuts.plan("full")}
    original = preactivation.ids("full")[("original", 110)]
    assert all(plan[r] == shared[r] for r in original)


def test_a_shared_run_with_another_config_is_refused(monkeypatch):
    real = ensemble.conv_runs
    monkeypatch.setattr(ensemble, "conv_runs", lambda profile: {r: replace(c, epochs=c.epochs + 1)
                                                                 for r, c in real(profile).items()})
    with pytest.raises(ValueError, match="with another config"):
        preactivation.plan("quick")


def _errs(means: dict[tuple[str, int], float], spread: float = 0.1) -> dict[tuple[str, int], list[float]]:
    return {k: [m - spread, m, m + spread] for k, m in means.items()}


#: training error over the run (points) at depths 20 and 26 as He et al. would have it, and log10 r at init
GOOD = {**{(k, 20): v for k, v in zip(PLACEMENTS, (5.0, 6.5, 6.2, 5.0, 4.8))},
        **{(k, 26): v for k, v in zip(PLACEMENTS, (7.0, 9.0, 8.5, 5.2, 5.0))}}
GRADS = {(k, d): 0.8 if k != "full_preact" else 1.6 for k in PLACEMENTS for d in (20, 26)}


@pytest.mark.parametrize("change,grads,failing", [
    ({}, {}, []),
    # full pre-activation worse than the original at depth 26: no worse (at 26) and the gap's growth fail
    ({("full_preact", 26): 9.0}, {}, [1, 2]),
    # everything within noise, and full pre-activation's gradient ratio below the original's
    ({k: 5.0 for k in GOOD}, {("full_preact", 26): 0.5}, [2, 3, 4, 5]),
])
def test_checks_on_given_numbers(change, grads, failing):
    checks = preactivation.checks_of(_errs({**GOOD, **change}), _errs({**GRADS, **grads}, 0.01), (20, 26))
    assert len(checks) == 6
    assert [i for i, c in enumerate(checks) if not c["passed"]] == failing
    assert verdict_of([c["passed"] for c in checks]) == ("reproduced" if not failing else "partly reproduced")
    errs = {k: v for k, v in {**GOOD, **change}.items()}
    gaps = {d: errs[("original", d)] - errs[("full_preact", d)] for d in (20, 26)}
    assert checks[2]["value"] == pytest.approx(gaps[26] - gaps[20])
    assert checks[2]["se"] == pytest.approx(np.sqrt(4 * 0.01 / 3)) and checks[2]["margin"] == 0.5  # the FLOOR
    full = {**GRADS, **grads}[("full_preact", 26)]
    assert checks[5]["difference"] == pytest.approx(full - GRADS[("original", 26)])  # full pre-activation minus (a)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("preactivation")
    return root, run_claim(get_claim("preactivation"), "smoke", root, jobs=1, quiet=True)


def test_smoke_profile_runs_end_to_end(smoke):
    root, result = smoke
    out = root / "claims" / "preactivation"
    stored = runs.read_json(out / "claim.json")
    for key in ("claim", "title", "statement", "published", "recipe", "verdict", "summary", "checks", "table",
                "figures", "ablation"):
        assert stored[key], key
    assert stored["verdict"] == result.verdict in VERDICTS and len(result.checks) == 6
    assert len(result.table) == 2 * len(PLACEMENTS) and result.figures == ["preactivation.png"]
    assert result.ablation["figures"] == ["preactivation_gradients.png"] and result.ablation["table"]
    for f in (*result.figures, *result.ablation["figures"]):
        assert (out / f).stat().st_size > 1000
    row = next(r for r in result.table if r["placement"] == preactivation.LABEL["full_preact"] and r["depth"] == 20)
    finals = [runs.read_jsonl(root / "runs" / r / "metrics.jsonl")[-1]
              for r in preactivation.ids("smoke")[("full_preact", 20)]]
    assert row["held-out error, mean (%)"] == pytest.approx(100 * np.mean([f["test_error"] for f in finals]))
    assert row["published error (%), ResNet-110 / 164"] == "6.37 / 5.46"
    assert row["gradient ratio r at init (geometric mean)"] > 0
    # the checks read the training error over the run: the mean over epochs of each run's training error
    run_err = {k: [100 * np.mean([m["train_error"] for m in runs.read_jsonl(root / "runs" / r / "metrics.jsonl")])
                   for r in rids] for k, rids in preactivation.ids("smoke").items()}
    assert result.checks[3]["difference"] == pytest.approx(np.mean(run_err[("bn_after_add", 20)])
                                                           - np.mean(run_err[("original", 20)]))
    params = {(r["placement"], r["depth"]): r["parameters"] for r in result.table}
    lab = preactivation.LABEL
    assert params[(lab["bn_after_add"], 8)] == params[(lab["original"], 8)] == params[(lab["full_preact"], 8)]
