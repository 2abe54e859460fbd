"""The shortcuts claim: run ids and the runs it shares with the ensemble claim, the skip-path gain of its ablation,
a smoke run end to end, and its verdict on given numbers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import reslab
from reslab import runs
from reslab.experiments import degradation, ensemble, get_claim, shortcuts
from reslab.experiments.base import PROFILES, VERDICTS, Context, run_claim, verdict_of


@pytest.mark.parametrize("profile", PROFILES)
def test_run_ids_parse_and_the_shared_runs_are_the_ensemble_claims(profile):
    plan, p = shortcuts.plan(profile), shortcuts.PROFILE[profile]
    assert get_claim("shortcuts").runs(profile) == plan
    by_net = shortcuts.ids(profile)
    assert sorted({r for v in by_net.values() for r in v}) == sorted(plan)
    for key, rids in by_net.items():
        depth = p["options_depth"] if key in shortcuts.PART1 else p["depth"]
        assert len(rids) == p["seeds"] >= (2 if profile == "smoke" else 3)
        for seed, rid in enumerate(rids):
            name, d, s = degradation.parse_id(rid)
            assert (name, d, s) == (f"conv-{shortcuts.NETS[key]['name']}", depth, seed)
            cfg = plan[rid]
            assert (cfg.model, cfg.residual, cfg.seed, cfg.data) == (f"resnet{depth}", shortcuts.NETS[key]["residual"],
                                                                     seed, "digits")
    # the same id always means the same config: wherever the ensemble claim trains a run, it is this one
    shared = ensemble.conv_runs(profile)
    for rid in set(plan) & set(shared):
        assert plan[rid] == shared[rid] and plan[rid].to_dict() == shared[rid].to_dict()


def test_quick_shares_option_a_the_identity_and_the_plain_twin_with_the_ensemble_claim():
    plan, shared = shortcuts.plan("quick"), ensemble.conv_runs("quick")
    assert set(shared) <= set(plan) and all(plan[r] == shared[r] for r in shared)
    by_net = shortcuts.ids("quick")
    assert by_net["A"] == by_net["identity"] == [f"conv-residual-d20-s{s}" for s in range(3)]
    assert by_net["plain"] == [f"conv-plain-d20-s{s}" for s in range(3)]
    assert len(plan) == 36  # 30 of them new: B, C, D and the 7 multiplicative shortcuts, 3 seeds each
    assert {c.epochs for c in plan.values()} == {15}
    # the full profile also shares the ensemble claim's resnet-56 runs
    assert set(ensemble.conv_runs("full")) <= set(shortcuts.plan("full"))


def test_a_run_of_the_ensemble_claim_with_another_config_is_refused(monkeypatch):
    real = ensemble.conv_runs

    def other(profile):
        return {r: TrainConfigWith(c) for r, c in real(profile).items()}

    def TrainConfigWith(cfg):  # noqa: N802
        from dataclasses import replace
        return replace(cfg, epochs=cfg.epochs + 1)

    monkeypatch.setattr(ensemble, "conv_runs", other)
    with pytest.raises(ValueError, match="ensemble claim's with another config"):
        shortcuts.plan("quick")


def test_the_multiplicative_nets_are_built_with_their_papers_arguments():
    plan = shortcuts.plan("quick")
    cfg = {k: plan[v[0]] for k, v in shortcuts.ids("quick").items()}
    assert cfg["scaled"].residual_kwargs == {"a": 0.5, "b": 0.5}
    assert cfg["exclusive-open"].residual_kwargs == {"gate_bias": -6.0}
    assert cfg["shortcut-closed"].residual_kwargs == {"gate_bias": 0.0}
    assert [cfg[o].shortcut for o in shortcuts.OPTIONS] == [None, "B", "C", "D"]
    assert cfg["dropout"].residual_kwargs == {"p": 0.5} and cfg["conv1x1"].residual == "conv_shortcut"


SIG6 = 1 / (1 + np.exp(6))  # sigmoid(-6): the gate of bias -6 with its weights zeroed


@pytest.mark.parametrize("residual,kwargs,skip,branch", [
    ("identity", {}, 1.0, 1.0),
    ("scaled", {"a": 0.5, "b": 0.5}, 0.5, 0.5),
    ("dropout_shortcut", {"p": 0.5}, 1.0, 1.0),  # taken in eval mode: its gain in expectation
    ("shortcut_gating", {"gate_bias": -6.0}, 1 - SIG6, 1.0),
    ("exclusive_gating", {"gate_bias": -6.0}, 1 - SIG6, SIG6),
    ("exclusive_gating", {"gate_bias": 0.0}, 0.5, 0.5),
])
def test_path_gains_are_the_skip_and_branch_paths_against_the_identity_and_the_raw_branch(residual, kwargs, skip,
                                                                                          branch):
    torch.manual_seed(0)
    model = reslab.create_model("resnet8", residual, input_shape=(1, 8, 8), width=4, residual_kwargs=kwargs)
    for gate in getattr(model.trunk.scheme, "gates", []):
        torch.nn.init.zeros_(gate.weight)  # the gate is its bias alone
    g, b = shortcuts.path_gains(model.train(), torch.randn(16, 1, 8, 8))
    assert g.shape == b.shape == (3,)
    assert g == pytest.approx(skip, rel=1e-6) and b == pytest.approx(branch, rel=1e-6)
    assert np.array_equal(shortcuts.skip_gains(model, torch.randn(4, 1, 8, 8)).shape, (3,))
    assert model.training and model.trunk.scheme.training  # the measure leaves the mode as it was


def test_a_1x1_conv_shortcut_has_the_gain_of_its_projection():
    torch.manual_seed(0)
    model = reslab.create_model("resnet8", "conv_shortcut", input_shape=(1, 8, 8), width=4)
    for i, proj in enumerate(model.trunk.scheme.projections):
        with torch.no_grad():
            proj.weight.zero_()
            if proj.weight.shape[0] == proj.weight.shape[1]:
                proj.weight[:, :, 0, 0] = 3 * torch.eye(proj.weight.shape[0])  # 3 x the identity
    g = shortcuts.skip_gains(model.eval(), torch.randn(8, 1, 8, 8))
    # block 0 keeps the shape (4 -> 4 channels): 3; blocks 1 and 2 change it and were zeroed: 0
    assert g == pytest.approx([3.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortcuts")
    return root, run_claim(get_claim("shortcuts"), "smoke", root, jobs=1, quiet=True)


def test_smoke_profile_runs_end_to_end(smoke):
    root, result = smoke
    assert result.verdict in VERDICTS
    assert len(result.checks) == 2 + len(shortcuts.MULTIPLICATIVE) + len(shortcuts.GATES)
    assert len(result.table) == len(shortcuts.PART1) + len(shortcuts.PART2)
    out = root / "claims" / "shortcuts"
    for f in (*result.figures, *result.ablation["figures"]):
        assert (out / f).stat().st_size > 1000
    stored = runs.read_json(out / "claim.json")
    assert stored["verdict"] == result.verdict and stored["recipe"][0]["published"]
    row = next(r for r in result.table if r["net"] == shortcuts.NETS["plain"]["label"])
    ids = shortcuts.ids("smoke")["plain"]
    finals = [runs.read_jsonl(root / "runs" / r / "metrics.jsonl")[-1] for r in ids]
    assert row["held-out error, mean (%)"] == pytest.approx(100 * np.mean([f["test_error"] for f in finals]))
    # option A and the plain twin are parameter-free twins; a projection adds parameters
    params = {r["net"]: r["parameters"] for r in result.table}
    assert params[shortcuts.NETS["A"]["label"]] == params[shortcuts.NETS["plain"]["label"]]
    assert params[shortcuts.NETS["C"]["label"]] > params[shortcuts.NETS["B"]["label"]] > \
        params[shortcuts.NETS["A"]["label"]]


def _fake(root, smoke_root, errors):
    """The smoke runs (their checkpoints) with given errors: ``errors[net] = (over the run, held-out)`` in [0, 1],
    plus 0.002 per seed."""
    shutil.copytree(smoke_root / "runs", root / "runs")
    spec = shortcuts.plan("smoke")
    for key, rids in shortcuts.ids("smoke").items():
        for seed, rid in enumerate(rids):
            e, t = (v + 0.002 * seed for v in errors[key])
            runs.write_jsonl(root / "runs" / rid / "metrics.jsonl",
                             [{"epoch": 1, "train_error": e, "train_eval_error": e / 2, "test_error": t}])
            runs.write_json(root / "runs" / rid / "result.json", {"status": "completed"})
    return spec


GOOD = {"A": (0.040, 0.02), "B": (0.041, 0.02), "C": (0.042, 0.02), "D": (0.040, 0.02), "plain": (0.10, 0.03),
        "identity": (0.040, 0.02), "scaled": (0.09, 0.05), "exclusive-closed": (0.20, 0.10),
        "exclusive-open": (0.06, 0.03), "shortcut-closed": (0.09, 0.05), "shortcut-open": (0.05, 0.02),
        "conv1x1": (0.08, 0.04), "dropout": (0.30, 0.2)}


@pytest.mark.parametrize("change,expected", [
    ({}, "reproduced"),
    # constant scaling no worse than the identity: its check fails, and the ablation says what its skip path does
    ({"scaled": (0.041, 0.02)}, "partly reproduced"),
])
def test_verdict_follows_the_numbers(tmp_path, smoke, change, expected):
    errors = {**GOOD, **change}
    spec = _fake(tmp_path, smoke[0], errors)
    result = get_claim("shortcuts").analyse(Context(spec, tmp_path / "runs", tmp_path, "smoke"))
    assert result.verdict == expected
    failed = [c["check"] for c in result.checks if not c["passed"]]
    assert failed == ([] if not change else [next(c["check"] for c in result.checks
                                                  if c["check"].startswith("constant scaling"))])
    # the numbers the checks use: the training error over the run, in points (0.002 more per seed in both groups)
    check = next(c for c in result.checks if c["check"].startswith("1x1 conv"))
    assert check["difference"] == pytest.approx(100 * (errors["conv1x1"][0] - errors["identity"][0]))
    row = next(r for r in result.table if r["net"] == shortcuts.NETS["plain"]["label"])
    assert row["training error over the run, mean (%)"] == pytest.approx(100 * (GOOD["plain"][0] + 0.001))
    assert row["held-out error, mean (%)"] == pytest.approx(100 * (GOOD["plain"][1] + 0.001))
    text = result.ablation["text"]
    if change:
        assert text.startswith("Of the 7 multiplicative shortcuts of resnet-8 (3 blocks), 1 did not train")
        assert "constant scaling 0.5 / 0.5 (excess +0.10 ± 0.14 points): skip gain per block 0.5 at init" in text
        assert "product over the 3 blocks of 0.125 at init" in text
    else:
        assert text.startswith("Every multiplicative shortcut of resnet-8 (3 blocks) trained worse")
    assert result.ablation["table"] and result.ablation["figures"] == ["shortcuts_ablation.png"]


@pytest.mark.parametrize("change,failing", [
    # options as far apart as plain is from them: both checks of part 1 fail
    ({"C": 9.8}, ["every shortcut option", "differ by less"]),
    # an open gate no better than its closed one
    ({"shortcut-open": 9.0}, ["shortcut-only gating at"]),
    # nothing differs: nothing holds
    ({k: 5.0 for k in GOOD}, None),
])
def test_checks_on_given_errors(change, failing):
    errs = {k: [100 * v[0] + 0.2 * s for s in range(3)] for k, v in GOOD.items()}
    errs.update({k: [v + 0.2 * s for s in range(3)] for k, v in change.items()})
    checks = shortcuts.options_check(errs, 20) + shortcuts.variant_checks(errs, 20)
    failed = [c["check"] for c in checks if not c["passed"]]
    if failing is None:
        assert len(failed) == len(checks) and verdict_of([c["passed"] for c in checks]) == "not reproduced"
    else:
        assert len(failed) == len(failing) and all(any(c.startswith(f) or f in c for c in failed) for f in failing)
        assert verdict_of([c["passed"] for c in checks]) == "partly reproduced"
    assert all(c["passed"] for c in shortcuts.options_check({k: errs[k] for k in shortcuts.PART1}, 20)) == \
        ("C" not in change and len(change) < len(GOOD))


def test_options_check_bounds_both_sides_with_their_uncertainty():
    errs = {"A": [4.0, 4.1, 4.2], "B": [4.5, 4.6, 4.7], "C": [4.0, 4.1, 4.2], "D": [4.0, 4.1, 4.2],
            "plain": [6.0, 6.1, 6.2]}
    c1, c2 = shortcuts.options_check(errs, 20)
    assert c1["passed"] and c2["passed"]
    assert c2["value"] == pytest.approx(0.5) and c2["smallest_gap"] == pytest.approx(1.5)
    assert c2["upper_bound"] == pytest.approx(0.5 + 2 * np.sqrt(2 * 0.01 / 3))
    # noisier seeds: the same means, but the bounds overlap
    noisy = {k: [v[0] - 1, v[1], v[2] + 1] for k, v in errs.items()}
    assert not shortcuts.options_check(noisy, 20)[1]["passed"]
