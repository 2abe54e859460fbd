"""``reslab train --compile``: compiled training matches eager training within rounding, its checkpoint loads into
the uncompiled model, and the flag is on the command line.

The compiled run compiles a tiny MLP's forward and backward with inductor: the module takes about 25 s on the 2-core
CPU of this project with an empty inductor cache (the compiler's start-up and gcc included), 7-11 s once the on-disk
cache (``/tmp/torchinductor_$USER``) holds its kernels.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from reslab import runs
from reslab.cli import _parser, _train_config
from reslab.data import load_dataset
from reslab.train import TrainConfig, evaluate, load_model, train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")  # inductor's imports

# 128 samples in batches of 32: every batch has the same shape, so the run compiles one graph (and its backward)
TINY = TrainConfig(model="mlp6", model_kwargs={"width": 16}, data="mnist1d:300", train_samples=128, epochs=3,
                   batch_size=32, optimizer="sgd", lr=0.05, seed=3, device="cpu", eval_train=False)
#: compiled kernels may sum in another order than eager ones: after 12 SGD steps the epoch losses came out equal
#: and the weights within 5e-7 on this machine; the tolerances leave a margin of 20x and more
LOSS_RTOL, WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from torch._dynamo.utils import counters

    root = tmp_path_factory.mktemp("compile")
    eager = train(TINY, root / "eager", quiet=True)
    counters.clear()
    compiled = train(replace(TINY, compile=True), root / "compiled", quiet=True)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    return eager, compiled, graphs, breaks


def test_compiled_training_matches_eager_within_rounding(pair):
    eager, compiled, graphs, breaks = pair
    assert graphs >= 1 and breaks == 0  # the model was compiled, in one piece
    assert compiled.status == eager.status == "completed" and len(compiled.metrics) == TINY.epochs
    for a, b in zip(eager.metrics, compiled.metrics):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), key
    wa, wb = load_model(eager.out_dir)[0].state_dict(), load_model(compiled.out_dir)[0].state_dict()
    assert list(wa) == list(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=k)


def test_checkpoint_of_a_compiled_run_loads_into_the_uncompiled_model(pair):
    _, compiled, _, _ = pair
    state = runs.load_checkpoint(compiled.out_dir / "checkpoint.pt")["model"]
    assert state and not any(k.startswith("_orig_mod.") for k in state)
    model, cfg = load_model(compiled.out_dir)  # strict load into a freshly built, uncompiled model
    assert cfg.compile is True and type(model).__name__ == "ResidualNet"
    data = load_dataset(TINY.data)
    ev = evaluate(model, data, data.x_test, data.y_test)
    assert ev["loss"] == pytest.approx(compiled.metrics[-1]["test_loss"], rel=1e-6)  # the trained weights


def test_compile_is_a_flag_of_train(tmp_path, capsys):
    parser = _parser()
    assert _train_config(parser.parse_args(["train", "--model", "mlp6", "--compile", "--out", str(tmp_path)])).compile
    assert not _train_config(parser.parse_args(["train", "--model", "mlp6", "--out", str(tmp_path)])).compile
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "--compile" in capsys.readouterr().out
    with pytest.raises(ValueError, match="compile must be true or false"):
        replace(TINY, compile="yes").validate()


@pytest.mark.parametrize("scheme", ["block_attnres", "attnres"])
def test_depth_attention_runs_eagerly_inside_a_compiled_model(scheme):
    """The depth-attention functions share state outside autograd: under ``torch.compile`` they run eagerly (a
    graph break around them), and the compiled model's output and gradients are the eager ones."""
    import reslab

    torch.manual_seed(0)
    m = reslab.create_model("gpt", scheme, depth=2, num_classes=11, input_shape=(9,), d_model=16, n_heads=2)
    with torch.no_grad():
        m.trunk.scheme.queries.normal_()  # non-uniform depth weights
    x = torch.randint(0, 11, (3, 9))
    out = m(x)
    out.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", dynamic=False)(x)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, out)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], msg=k)


def test_importing_reslab_does_not_load_the_compiler():
    """``import reslab`` (and the CLI) must not import ``torch._dynamo``: 2 s on every command that never compiles
    (it did, through ``torch.compiler.disable`` at class definition in the AttnRes module)."""
    import subprocess
    import sys

    code = "import sys, reslab, reslab.cli, reslab.train; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
