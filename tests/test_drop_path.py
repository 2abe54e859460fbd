"""Stochastic depth on every additive scheme: the rate spreads written out, the train-mode masks (per sample and per
batch), expectation-correct eval, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import reslab
from reslab import BranchSpec, Trunk, create_residual
from reslab.residuals.base import drop_rates

from conftest import TanhBranch, tiny_input, tiny_model

D = 6


def test_rate_spreads_are_timm_and_huang_written_out():
    L, rate = 5, 0.5
    assert drop_rates(rate, L, "timm") == pytest.approx([rate * l / (L - 1) for l in range(L)])  # linspace(0, r, L)
    survival = [1 - (l / L) * (1 - (1 - rate)) for l in range(1, L + 1)]  # Huang et al.: p_l = 1 - (l/L)(1 - p_L)
    assert drop_rates(rate, L, "linear") == pytest.approx([1 - p for p in survival])
    assert drop_rates(0.3, 1, "timm") == [0.0]


def test_a_transformer_layer_shares_its_rate():
    m = tiny_model("gpt2", "preln", residual_kwargs={"drop_path": 0.4})
    rates = m.trunk.scheme.drop_rates
    assert rates[0::2] == rates[1::2] and rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)


def one_branch(mode: str, rate: float = 0.5, scheme: str = "identity", **kw):
    torch.manual_seed(0)
    spec = [BranchSpec(D, D, 1, "features")]
    return Trunk([TanhBranch(1, D)], create_residual(scheme, spec, drop_path=rate, drop_path_mode=mode,
                                                     drop_path_spread="linear", **kw))


def test_row_mode_drops_whole_samples_and_rescales_the_kept_ones():
    t = one_branch("row").train()
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(1))
    f = t.branches[0](x)
    y = t(x)
    kept = torch.isclose(y, x + f / 0.5).all(1)
    dropped = torch.isclose(y, x).all(1)
    assert (kept ^ dropped).all()  # every sample is one or the other, as a whole
    assert 150 < int(kept.sum()) < 250  # keep probability 0.5


def test_batch_mode_drops_the_whole_batch_or_nothing():
    t = one_branch("batch").train()
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(1))
    f = t.branches[0](x)
    outcomes = set()
    for _ in range(40):
        y = t(x)
        if torch.allclose(y, x):
            outcomes.add("dropped")
        else:
            torch.testing.assert_close(y, x + f / 0.5)
            outcomes.add("kept")
    assert outcomes == {"dropped", "kept"}


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_the_training_output_is_the_eval_output_in_expectation(mode):
    t = one_branch(mode, rate=0.3)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(2)).expand(20000 if mode == "row" else 1, D)
    y_eval = t.eval()(x[:1])
    torch.testing.assert_close(y_eval, x[:1] + t.branches[0](x[:1]))  # eval: the deterministic net
    t.train()
    ys = t(x) if mode == "row" else torch.cat([t(x) for _ in range(20000)])
    se = (ys.std(0) / math.sqrt(len(ys))).max()
    assert (ys.mean(0) - y_eval[0]).abs().max() < 5 * se


def test_eval_mode_and_rate_zero_are_the_net_without_stochastic_depth():
    torch.manual_seed(0)
    ref = tiny_model("resnet8", "identity").eval()
    m = tiny_model("resnet8", "identity", residual_kwargs={"drop_path": 0.5}).eval()
    m.load_state_dict(ref.state_dict())
    x = tiny_input("resnet8")
    assert torch.equal(m(x), ref(x))
    m.train()
    torch.manual_seed(3)
    assert not torch.allclose(m(x), ref.train()(x))


def test_same_seed_same_masks_and_every_parameter_in_the_graph():
    m = tiny_model("gpt2", "layerscale", residual_kwargs={"drop_path": 0.9, "drop_path_mode": "batch"}).train()
    x = tiny_input("gpt2")
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    b = m(x)
    assert torch.equal(a, b)
    a.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in m.parameters())  # dropped branches: zero gradients, still in the graph


@pytest.mark.parametrize("kw, match", [
    ({"drop_path": 1.0}, r"drop_path must be a probability in \[0, 1\)"),
    ({"drop_path": -0.1}, r"drop_path must be a probability"),
    ({"drop_path": True}, r"drop_path must be a probability"),
    ({"drop_path": 0.1, "drop_path_mode": "sample"}, "drop_path_mode must be one of row, batch"),
    ({"drop_path": 0.1, "drop_path_spread": "cosine"}, "drop_path_spread must be one of timm, linear"),
])
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny_model("mlp8", "identity", residual_kwargs=kw)
    assert "\n" not in str(e.value)


def test_a_scheme_that_is_not_additive_refuses_it():
    with pytest.raises(ValueError, match="drop_path") as e:
        tiny_model("mlp8", "highway", residual_kwargs={"drop_path": 0.1})
    assert "\n" not in str(e.value)


def test_training_with_stochastic_depth(tmp_path):
    from reslab.train import TrainConfig, train

    cfg = TrainConfig(model="mlp6", residual="identity", residual_kwargs={"drop_path": 0.2}, model_kwargs={"width": 16},
                      data="mnist1d:300", train_samples=128, epochs=2, batch_size=32, optimizer="sgd", lr=0.05,
                      seed=0, device="cpu", eval_train=False)
    a, b = train(cfg, tmp_path / "a", quiet=True), train(cfg, tmp_path / "b", quiet=True)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time_s"} for m in ms]  # noqa: E731
    assert a.status == "completed" and strip(a.metrics) == strip(b.metrics)  # the masks follow the run's seed
    assert reslab.create_model("mlp6", "identity", residual_kwargs={"drop_path": 0.2}).trunk.scheme.drop_path == 0.2
