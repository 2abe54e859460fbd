"""The training loop's generic hook: every module of the model that defines ``after_optimizer_step()`` has it
called once after each optimiser step, also in a resumed run and on every rank under torchrun. Tested with a toy
module that belongs to no scheme (nGPT's use of it is in test_ngpt.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reslab import runs
from reslab.train import TrainConfig, train

TINY = TrainConfig(model="mlp6", model_kwargs={"width": 16}, data="mnist1d:300", epochs=3, batch_size=32,
                   optimizer="sgd", lr=0.05, seed=3, device="cpu", eval_train=False)


class UnitVector(nn.Module):
    """Scales its input by ``1 + <w, c> / 4`` (``c`` fixed) and puts ``w`` back on the unit sphere after each
    optimiser step, counting the calls in a buffer (saved with the model, so a resumed run continues the count).
    With ``log`` set, each call also writes the count to ``{log}.{RANK}``."""

    def __init__(self, log: str | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 0.5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("c", torch.tensor([1.0, -1.0, 2.0, 0.0]), persistent=False)
        self.log = log

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * (1 + self.w @ self.c / 4)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.w.div_(self.w.norm())
        self.calls += 1
        if self.log:
            Path(f"{self.log}.{os.environ.get('RANK', '0')}").write_text(str(int(self.calls)))


def with_toy(build, log: str | None = None):
    """``build_model`` with a :class:`UnitVector` after the head."""

    def build_model(cfg, data):
        model = build(cfg, data)
        model.head = nn.Sequential(model.head, UnitVector(log))
        return model

    return build_model


@pytest.fixture
def toy(monkeypatch):
    import reslab.train as T

    monkeypatch.setattr(T, "build_model", with_toy(T.build_model))


def _toy_state(run: Path) -> tuple[torch.Tensor, int]:
    state = runs.load_checkpoint(run / "checkpoint.pt")["model"]
    return state["head.1.w"], int(state["head.1.calls"])


def _strip(metrics):
    return [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]


def test_hook_runs_once_after_every_step(tmp_path, toy):
    result = train(TINY, tmp_path / "run", quiet=True)
    w, calls = _toy_state(tmp_path / "run")
    assert calls == result.metrics[-1]["step"] == 3 * result.metrics[0]["step"] > 3
    assert abs(float(w.norm()) - 1) < 1e-6  # called after the last step, not before it
    assert not torch.allclose(w, torch.full((4,), 0.5))  # the steps moved it


def test_hook_runs_in_a_resumed_run(tmp_path, monkeypatch, toy):
    full = train(TINY, tmp_path / "full", quiet=True)
    real, saves = runs.save_torch, []

    def dying_save(path, obj):
        real(path, obj)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(runs, "save_torch", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, tmp_path / "killed", quiet=True)
    assert _toy_state(tmp_path / "killed")[1] == full.metrics[0]["step"]
    resumed = train(TINY, tmp_path / "killed", resume=True, quiet=True)
    assert _strip(resumed.metrics) == _strip(full.metrics)
    (w_full, n_full), (w_res, n_res) = _toy_state(tmp_path / "full"), _toy_state(tmp_path / "killed")
    assert n_res == n_full == full.metrics[-1]["step"] and torch.equal(w_res, w_full)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import reslab.train as T
from reslab.cli import main
from test_train_hook import with_toy

T.build_model = with_toy(T.build_model, log="calls")
sys.exit(main(sys.argv[1:]))
"""


def test_hook_runs_on_every_rank_under_torchrun(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    args = ["train", "--model", "mlp6", "--model-arg", "width=16", "--data", "mnist1d:300", "--epochs", "1",
            "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--device", "cpu", "--quiet",
            "--out", "run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["step"]
    assert [(tmp_path / f"calls.{r}").read_text() for r in (0, 1)] == [str(steps)] * 2
    w, calls = _toy_state(tmp_path / "run")
    assert calls == steps > 2 and abs(float(w.norm()) - 1) < 1e-6
