"""The training loop: determinism, kill-and-resume, divergence, schedules, run directory contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from reslab import runs
from reslab.data import load_dataset
from reslab.train import TrainConfig, load_model, lr_at, train

TINY = TrainConfig(model="mlp6", model_kwargs={"width": 16}, data="mnist1d:300", epochs=3, batch_size=32,
                   optimizer="sgd", lr=0.05, seed=3, device="cpu")


def _strip(metrics):
    return [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]


def test_same_seed_same_metrics_and_run_dir(tmp_path):
    a = train(TINY, tmp_path / "a", quiet=True)
    b = train(TINY, tmp_path / "b", quiet=True)
    assert a.status == "completed" and len(a.metrics) == 3
    assert _strip(a.metrics) == _strip(b.metrics)
    for f in ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "result.json"):
        assert (tmp_path / "a" / f).exists(), f
    assert _strip(runs.read_jsonl(tmp_path / "a" / "metrics.jsonl")) == _strip(a.metrics)
    assert runs.read_json(tmp_path / "a" / "result.json")["status"] == "completed"
    c = train(replace(TINY, seed=4), tmp_path / "c", quiet=True)
    assert _strip(c.metrics) != _strip(a.metrics)


def test_interrupted_run_resumes_to_identical_metrics(tmp_path, monkeypatch):
    cfg = replace(TINY, residual="dropout_shortcut", epochs=4)  # dropout exercises the saved global RNG
    full = train(cfg, tmp_path / "full", quiet=True)
    calls = {"n": 0}
    real = runs.save_torch

    def dying_save(path, obj):
        real(path, obj)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(runs, "save_torch", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", quiet=True)
    monkeypatch.setattr(runs, "save_torch", real)
    assert runs.read_json(tmp_path / "killed" / "result.json") == {"status": "running", "epoch": 1}  # not 0
    assert len(runs.read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == 2
    resumed = train(cfg, tmp_path / "killed", resume=True, quiet=True)
    assert _strip(resumed.metrics) == _strip(full.metrics)
    m_full, _ = load_model(tmp_path / "full")
    m_res, _ = load_model(tmp_path / "killed")
    for (k, p), q in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        assert torch.equal(p, q), k


def test_sigkill_then_cli_resume(tmp_path):
    """A real SIGKILL of the CLI mid-run, then ``reslab train --resume``: same metrics as a clean run."""
    args = ["--model", "mlp6", "--model-arg", "width=16", "--data", "mnist1d:300", "--epochs", "25",
            "--batch-size", "16", "--lr", "0.05", "--seed", "1", "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "reslab.cli", "train", *args]
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(runs.read_jsonl(metrics))
    assert 3 <= done < 25
    subprocess.run([sys.executable, "-m", "reslab.cli", "train", "--out", str(tmp_path / "run"), "--resume",
                    "--quiet"], check=True, env=env, capture_output=True)
    assert _strip(runs.read_jsonl(metrics)) == _strip(runs.read_jsonl(tmp_path / "clean" / "metrics.jsonl"))


def test_nan_loss_is_recorded_as_diverged(tmp_path):
    data = load_dataset("mnist1d:300")
    data.x_train[5] = float("nan")  # the first batch that draws sample 5 produces a NaN loss
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(TINY.seed * 1_000_003))
    expected_step = int((order == 5).nonzero()) // TINY.batch_size + 1
    r = train(TINY, tmp_path / "nan", quiet=True, data=data)
    assert r.status == "diverged"
    assert r.diverged_step == expected_step
    stored = runs.read_json(tmp_path / "nan" / "result.json")
    assert stored["status"] == "diverged" and stored["diverged_step"] == expected_step


def test_existing_run_needs_resume_and_same_config(tmp_path):
    train(replace(TINY, epochs=1), tmp_path / "r", quiet=True)
    with pytest.raises(ValueError, match="already holds a run"):
        train(replace(TINY, epochs=1), tmp_path / "r", quiet=True)
    with pytest.raises(ValueError, match="differs in lr"):
        train(replace(TINY, epochs=1, lr=0.3), tmp_path / "r", resume=True, quiet=True)
    again = train(replace(TINY, epochs=1), tmp_path / "r", resume=True, quiet=True)  # finished: no-op
    assert again.status == "completed" and len(again.metrics) == 1


def test_invalid_config_creates_nothing(tmp_path):
    for bad in (replace(TINY, epochs=0), replace(TINY, optimizer="lbfgs"), replace(TINY, model="mlp7"),
                replace(TINY, residual="nope"), replace(TINY, data="cifar10:" + str(tmp_path / "none"))):
        with pytest.raises(ValueError):
            train(bad, tmp_path / "bad", quiet=True)
        assert not (tmp_path / "bad").exists()


def test_warmup_returns_to_base_rate():
    cfg = replace(TINY, lr=0.1, warmup_steps=4, warmup_lr=0.01, epochs=2)
    assert [lr_at(cfg, s, 10) for s in range(6)] == [0.01] * 4 + [0.1] * 2
    lin = replace(cfg, warmup_lr=None)
    assert [lr_at(lin, s, 10) for s in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_step_and_cosine_schedules():
    step = replace(TINY, lr=0.1, schedule="step", milestones=[2, 3], milestones_are_fractions=False, epochs=4)
    assert [lr_at(step, e * 10, 10) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    frac = replace(step, milestones=[0.5, 0.75], milestones_are_fractions=True)
    assert [lr_at(frac, e * 10, 10) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cos = replace(TINY, lr=0.2, schedule="cosine", epochs=2)
    assert lr_at(cos, 0, 10) == pytest.approx(0.2)
    assert lr_at(cos, 10, 10) == pytest.approx(0.1)
    assert lr_at(cos, 20, 10) == pytest.approx(0.0)


def test_config_json_roundtrip(tmp_path):
    train(replace(TINY, epochs=1), tmp_path / "r", quiet=True)
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    assert TrainConfig.from_dict(stored["train"]) == replace(TINY, epochs=1)
    assert stored["model"]["name"] == "mlp6"


def test_finite_exploding_loss_is_a_divergence_with_its_reason(tmp_path, capsys):
    from reslab.cli import main

    d = tmp_path / "run"
    argv = ["train", "--model", "mlp8", "--model-arg", "width=16", "--model-arg", "norm='none'", "--data",
            "mnist1d:400", "--optimizer", "adam", "--lr", "10", "--epochs", "3", "--out", str(d), "--quiet"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert line.startswith("diverged: 1 epochs") and "loss exploded in epoch 1" in line, line
    result = runs.read_json(d / "result.json")
    assert result["status"] == "diverged" and "exploded" in result["reason"]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in runs.read_jsonl(d / "metrics.jsonl"))
    assert train(TrainConfig.from_dict(runs.read_json(d / "config.json")["train"]), d, resume=True).reason \
        == result["reason"]  # a finished run reports the same reason


def test_run_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        import importlib

        importlib.reload(runs)  # the mode is read from the umask once, at import
        train(replace(TINY, epochs=1), tmp_path / "run", quiet=True)
    finally:
        os.umask(old)
        importlib.reload(runs)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes  # not mkstemp's private 0600


def test_final_line_reports_eval_mode_train_error(tmp_path, capsys):
    from reslab.cli import main

    d = tmp_path / "run"
    assert main(["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200", "--epochs", "1",
                 "--out", str(d), "--quiet"]) == 0
    final = runs.read_jsonl(d / "metrics.jsonl")[-1]
    out = capsys.readouterr().out
    assert f"train error {100 * final['train_eval_error']:.2f}% (eval mode" in out


def test_eval_train_final_evaluates_the_training_set_after_the_last_epoch_only(tmp_path):
    every = train(TINY, tmp_path / "every", quiet=True).metrics
    final = train(replace(TINY, eval_train="final"), tmp_path / "final", quiet=True).metrics
    assert ["train_eval_error" in m for m in every] == [True] * 3
    assert ["train_eval_error" in m for m in final] == [False, False, True]
    assert final[-1]["train_eval_error"] == every[-1]["train_eval_error"]  # evaluation changes no training
    assert _strip(final)[0] == {k: v for k, v in _strip(every)[0].items() if not k.startswith("train_eval")}
    for bad in ("last", 1, None):
        with pytest.raises(ValueError, match="eval_train must be"):
            replace(TINY, eval_train=bad).validate()
