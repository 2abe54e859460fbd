"""The densenet claim: its runs and the ones it shares, the fits and checks on known numbers, the memory measurement,
Huang et al.'s weight measure and the measured feature use on analytic cases, and a smoke run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab import runs
from reslab.branch import Sources
from reslab.diagnostics.feature_reuse import feature_reuse, feature_use
from reslab.experiments import densenet, ensemble, get_claim, preactivation, shortcuts
from reslab.experiments.base import PROFILES, VERDICTS, planned, run_claim
from reslab.footprint import step_peak_bytes


@pytest.mark.parametrize("profile", PROFILES)
def test_runs_use_each_familys_recipe_and_shared_ids_mean_the_same_config(profile):
    plan, p = densenet.plan(profile), densenet.PROFILE[profile]
    assert get_claim("densenet").runs(profile) == plan
    by = densenet.nets(profile)
    assert sorted(r for v in by.values() for r in v) == sorted(plan)
    for label, rids in by.items():
        assert len(rids) == p["seeds"] >= 2
        for rid in rids:
            cfg = plan[rid]
            if label.startswith("DenseNet"):
                assert (cfg.model, cfg.residual, cfg.batch_size, cfg.nesterov) == \
                    (f"densenet_bc{label.split('-')[-1]}", "concat", 64, True)
            else:
                assert (cfg.model, cfg.residual, cfg.batch_size, cfg.nesterov) == \
                    (f"resnet{label.split('-')[-1]}", "identity", 128, False)
    shared = {**ensemble.conv_runs(profile), **shortcuts.plan(profile), **preactivation.plan(profile)}
    for rid in set(plan) & set(shared):
        assert plan[rid].to_dict() == shared[rid].to_dict()
    # every run a claim trains evaluates the training set once, at the end (what the analyses read)
    assert {c.eval_train for c in planned(get_claim("densenet"), profile).values()} == {"final"}


def test_quick_shares_the_resnet20_and_26_runs_and_matches_sizes():
    plan, by = densenet.plan("quick"), densenet.nets("quick")
    shared = {**ensemble.conv_runs("quick"), **preactivation.plan("quick")}
    assert set(by["ResNet-20"]) | set(by["ResNet-26"]) <= set(shared)
    assert len(set(plan) - set(shared)) == 12  # 2 DenseNet-BCs and ResNet-8 / -14, 3 seeds each
    n = {k: sum(p.numel() for p in reslab.create_model(plan[v[0]].model, input_shape=(1, 8, 8)).parameters())
         for k, v in by.items()}
    assert abs(n["DenseNet-BC-40"] / n["ResNet-14"] - 1) < 0.05 and abs(n["DenseNet-BC-22"] / n["ResNet-8"] - 1) < 0.06


def test_fits_recover_a_line_and_a_parabola():
    d = np.array([16, 28, 46, 64, 82, 100], dtype=float)
    line = densenet.fits(d, 3 + 2 * d)
    assert line["power"]["p"] == pytest.approx(1.0, abs=1e-3) and line["linear"]["max_rel_residual"] < 1e-9
    par = densenet.fits(d, 5 + 0.1 * d ** 2)
    assert par["power"]["p"] == pytest.approx(2.0, abs=1e-3) and par["quadratic"]["max_rel_residual"] < 1e-9
    assert par["linear"]["max_rel_residual"] > 0.05
    assert par["quadratic"]["coef"] == pytest.approx([0.1, 0, 5], abs=1e-8)


def test_memory_checks_on_given_numbers():
    d = [16, 28, 46, 64, 82, 100]
    rows = [{"depth": x, "naive": 5 + 0.05 * x ** 2, "efficient": 4 + 1.5 * x} for x in d]
    f, checks = densenet.memory_checks(rows)
    assert [c["passed"] for c in checks] == [True, True, True]
    assert checks[2]["value"] == pytest.approx(154 / 505)
    flat = [{"depth": x, "naive": 4 + 2 * x, "efficient": 4 + 1.5 * x} for x in d]
    assert [c["passed"] for c in densenet.memory_checks(flat)[1]] == [False, True, False]


def test_accuracy_checks_pick_the_resnet_of_the_same_size_and_one_twice_as_large():
    params = {"DenseNet-BC-22": 71_000, "DenseNet-BC-40": 176_000, "ResNet-8": 75_000, "ResNet-14": 172_000,
              "ResNet-20": 269_000, "ResNet-26": 367_000}
    errs = {"DenseNet-BC-22": [1.0, 1.2, 1.1], "DenseNet-BC-40": [3.0, 3.2, 3.1], "ResNet-8": [2.0, 2.1, 2.2],
            "ResNet-14": [1.0, 1.1, 1.2], "ResNet-20": [1.0, 1.0, 1.1], "ResNet-26": [0.9, 1.0, 1.1]}
    checks = densenet.accuracy_checks(errs, params)
    assert [("ResNet-8" in c["check"], "ResNet-14" in c["check"], "ResNet-26" in c["check"]) for c in checks] == \
        [(True, False, False), (False, True, False), (False, False, True)]
    assert [c["passed"] for c in checks] == [True, False, False]  # BC-40 errs 2 points more than both
    assert checks[1]["difference"] == pytest.approx(2.0)


def test_reuse_checks_on_given_matrices():
    n = 4
    uniform = np.where(np.tril(np.ones((n + 1, n + 1))).T > 0, 1.0, np.nan)  # every target reads sources 0..t
    low0 = uniform.copy()
    low0[0, 1:] = 0.5
    late = low0.copy()
    late[:, -1] = np.linspace(0.2, 1.0, n + 1)
    checks = densenet.reuse_checks([uniform, low0, late])
    assert [c["passed"] for c in checks] == [True, True, True]
    assert checks[2]["value"] == pytest.approx(np.mean(late[2:, -1]) - np.mean(late[:2, -1]))
    assert [c["passed"] for c in densenet.reuse_checks([uniform, uniform, uniform])] == [True, False, False]
    chain = late.copy()
    chain[0, -1] = 0.05
    assert densenet.reuse_checks([uniform, low0, chain])[0]["passed"] is False


def _bc10():
    torch.manual_seed(0)
    return reslab.create_model("densenet_bc10", input_shape=(1, 8, 8), num_classes=3, growth=4)


def test_feature_reuse_is_the_mean_absolute_weight_per_source_slice():
    model = _bc10()  # three blocks of one layer each: c0 = 8, 6, 5 channels; growth 4
    readers = [b.conv1 for b in model.trunk.branches] + [model.head[-1]]
    with torch.no_grad():
        for r in readers:
            w = r.weight
            w.copy_(torch.arange(w.shape[1], dtype=w.dtype).view(1, -1, *[1] * (w.dim() - 2)).expand_as(w))
    got = feature_reuse(model)
    c0 = [s.in_dim for s, t in zip(model.trunk.scheme.specs, [None, *model.trunk.scheme.specs]) if
          t is None or t.role == "transition"]
    assert [g.shape for g in got] == [(2, 2)] * 3
    for g, c in zip(got, c0):
        # the layer reads channels 0..c-1 (block input only); the reader after it reads c more channels of growth 4
        assert g[0, 0] == pytest.approx((c - 1) / 2) and np.isnan(g[1, 0])
        assert g[0, 1] == pytest.approx((c - 1) / 2) and g[1, 1] == pytest.approx(c + 1.5)
    with pytest.raises(ValueError, match="concatenating"):
        feature_reuse(reslab.create_model("resnet8", input_shape=(1, 8, 8)))


def test_feature_use_is_the_first_order_loss_change_of_losing_a_source():
    model = _bc10().double().eval()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    use = feature_use(model, x, y)
    # block 2's transition (branch 3) reading source 1 (layer 2's 4 maps), scaled by (1 + eps) for that reader only
    eps = 1e-6

    def loss(scale: float) -> torch.Tensor:
        def hook(module, args):
            parts = list(args[0])
            parts[1] = parts[1] * scale
            return (Sources(parts),)

        h = model.trunk.branches[3].register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return F.cross_entropy(model(x), y, reduction="none")
        finally:
            h.remove()

    per_sample = (loss(1 + eps) - loss(1 - eps)) / (2 * eps)  # d loss_i / d scale = <g_i, x_s,i>
    assert use[1][1, 1] == pytest.approx(per_sample.abs().mean().item() / 4, rel=1e-5)
    assert np.isnan(use[1][1, 0]) and all(np.isfinite(u[np.tril_indices(2)[::-1]]).all() for u in use)
    again = feature_use(model, x, y)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(use, again))


def test_step_peak_is_deterministic_linear_in_batch_and_smaller_when_memory_efficient():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    peaks = [step_peak_bytes(mlp, torch.randn(b, 64), torch.randint(0, 10, (b,))) for b in (256, 512, 512)]
    assert peaks[1] == peaks[2] and peaks[1] / peaks[0] == pytest.approx(2, rel=0.05)
    assert all(p.grad is None for p in mlp.parameters())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    naive, eff = (step_peak_bytes(reslab.create_model("densenet_bc28", memory_efficient=m, input_shape=(3, 16, 16)),
                                  x, y) for m in (False, True))
    assert eff < 0.8 * naive


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("densenet")
    return root, run_claim(get_claim("densenet"), "smoke", root, jobs=1, quiet=True)


def test_smoke_profile_runs_end_to_end(smoke):
    root, result = smoke
    out = root / "claims" / "densenet"
    stored = runs.read_json(out / "claim.json")
    assert stored["verdict"] == result.verdict in VERDICTS and len(result.checks) == 8
    assert result.figures == ["densenet_memory.png", "densenet_accuracy.png"]
    assert result.ablation["figures"] == ["densenet_reuse.png"] and result.ablation["table"]
    for f in (*result.figures, *result.ablation["figures"]):
        assert (out / f).stat().st_size > 1000
    mem = [r for r in result.table if r["part"] == "memory"]
    assert [r["net"] for r in mem] == [f"DenseNet-BC-{d}" for d in densenet.PROFILE["smoke"]["mem_depths"]]
    assert all(r["peak MiB, memory-efficient (batch 2)"] < r["peak MiB, naive (batch 2)"] for r in mem[1:])
    acc = {r["net"]: r for r in result.table if r["part"] == "accuracy"}
    finals = [runs.read_jsonl(root / "runs" / r / "metrics.jsonl")[-1]["test_error"]
              for r in densenet.nets("smoke")["DenseNet-BC-16"]]
    assert acc["DenseNet-BC-16"]["held-out error, mean (%)"] == pytest.approx(100 * np.mean(finals))


def test_step_peak_does_not_depend_on_the_thread_count():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    threads = torch.get_num_threads()
    peaks = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            peaks.append(step_peak_bytes(reslab.create_model("densenet_bc16", memory_efficient=True), x, y))
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(threads)
    assert peaks[0] == peaks[1]
