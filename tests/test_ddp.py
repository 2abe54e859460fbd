"""Multi-process training: ``torchrun -m reslab train`` (2 processes, gloo on the CPU) against one process.

The model has LayerNorm, not BatchNorm (SyncBatchNorm does not run on the CPU: BatchNorm statistics are per rank
there), and the batch size 53 on 160 training samples gives shards of 27 and 26 samples and a last batch of one
sample, which leaves rank 1 an empty shard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reslab import distributed, runs
from reslab.cli import main
from reslab.data import load_dataset

EPOCHS = 40
ARGS = ["--model", "mlp6", "--model-arg", "width=32", "--model-arg", "norm='ln'", "--data", "mnist1d:200",
        "--epochs", str(EPOCHS), "--batch-size", "53", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1",
        "--device", "cpu", "--quiet"]
FILES = {"config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "result.json"}
TOL = 1e-5  # metrics and weights: the same computation summed in another order


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", RESLAB_CACHE=str(cache), RESLAB_DATA=str(cache.parent / "no-data"))


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]


def _strip(metrics):
    return [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]


def _max_metric_diff(a, b) -> float:
    assert [sorted(m) for m in a] == [sorted(m) for m in b]
    return max(abs(x[k] - y[k]) for x, y in zip(_strip(a), _strip(b)) for k in x)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return runs.load_checkpoint(run / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same run trained by one process (``reslab train``) and by two (torchrun), with its wall times."""
    base = tmp_path_factory.mktemp("ddp")
    cache = tmp_path_factory.getbasetemp() / "cache"  # conftest's: the data is generated once per session
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESLAB_CACHE", str(cache))
        t0 = time.perf_counter()
        assert main(["train", *ARGS, "--out", str(base / "single")]) == 0
        single_s = time.perf_counter() - t0
    cwd = base / "ddp-cwd"
    cwd.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run(_torchrun("-m", "reslab", "train", *ARGS, "--out", "run"), cwd=cwd, env=_env(cache),
                          capture_output=True, text=True, timeout=180)
    ddp_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"single": base / "single", "ddp": cwd / "run", "cwd": cwd, "stdout": proc.stdout, "cache": cache,
            "single_s": single_s, "ddp_s": ddp_s}


def test_two_processes_match_one(pair, capsys):
    single, ddp = pair["single"], pair["ddp"]
    a, b = runs.read_jsonl(single / "metrics.jsonl"), runs.read_jsonl(ddp / "metrics.jsonl")
    assert len(a) == len(b) == EPOCHS
    for x, y in zip(a, b):
        assert (x["epoch"], x["step"], x["lr"]) == (y["epoch"], y["step"], y["lr"])
        assert {k for k in x if k.startswith("train_eval")} == {"train_eval_loss", "train_eval_error"}
    diff = _max_metric_diff(a, b)
    assert diff < TOL  # train_loss, train_error, train_eval_*, test_loss, test_error of every epoch
    assert a[-1]["train_eval_error"] < a[0]["train_eval_error"]  # it trained
    wa, wb = _weights(single), _weights(ddp)
    assert list(wa) == list(wb)  # the unwrapped model's keys: no DDP "module." prefix
    wdiff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert wdiff < TOL
    with capsys.disabled():
        print(f"\n[ddp] 2 gloo processes vs 1: largest metric difference {diff:.2e}, weight difference {wdiff:.2e}; "
              f"wall {pair['ddp_s']:.1f} s (torchrun) vs {pair['single_s']:.1f} s (in-process)")
    # rank 0 alone wrote the run directory, with the same config; rank 1 wrote nothing anywhere in its cwd
    assert {p.name for p in ddp.iterdir()} == {p.name for p in single.iterdir()} == FILES
    assert sorted(p.name for p in pair["cwd"].iterdir()) == ["run"]
    assert runs.read_json(ddp / "config.json") == runs.read_json(single / "config.json")
    env_a, env_b = runs.read_json(single / "env.json"), runs.read_json(ddp / "env.json")
    assert (env_a["world_size"], env_b["world_size"], env_b["distributed_backend"]) == (1, 2, "gloo")
    assert runs.read_json(ddp / "result.json")["status"] == "completed"
    assert [line.split(":")[0] for line in pair["stdout"].splitlines()] == ["completed"]  # rank 0's line only
    from reslab.train import load_model

    model, cfg = load_model(ddp)
    assert cfg.epochs == EPOCHS and model.trunk is not None


def test_torchrun_killed_then_resumed_ends_with_the_same_metrics(pair, tmp_path):
    cwd = tmp_path
    cmd = _torchrun("-m", "reslab", "train", *ARGS, "--out", "run")
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(pair["cache"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = cwd / "run" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.005)
    assert proc.poll() is None, "run finished before it could be killed"
    ranks = _children(proc.pid)  # torchrun starts each rank in a session of its own: kill them by their ids
    assert len(ranks) == 2
    for pid in (proc.pid, *ranks):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in ranks):
        time.sleep(0.01)
    assert not any(_alive(pid) for pid in ranks)
    done = len(runs.read_jsonl(cwd / "run" / "metrics.jsonl"))
    assert 1 <= done < EPOCHS
    assert runs.read_json(cwd / "run" / "result.json")["status"] == "running"
    resumed = subprocess.run(_torchrun("-m", "reslab", "train", "--out", "run", "--resume", "--quiet"), cwd=cwd,
                             env=_env(pair["cache"]), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same numbers as the uninterrupted two-process run, bit for bit
    resumed_metrics, uninterrupted = (runs.read_jsonl(d / "metrics.jsonl") for d in (cwd / "run", pair["ddp"]))
    assert _strip(resumed_metrics) == _strip(uninterrupted)
    wa, wb = _weights(pair["ddp"]), _weights(cwd / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    left = {p.name for p in (cwd / "run").iterdir() if not p.name.endswith(".tmp")}  # a killed write may leave one
    assert left == FILES


LESIONED = """
import sys
import reslab.train as T
from reslab.cli import main

real = T.build_model

def lesioned(cfg, data):
    model = real(cfg, data)
    model.trunk.set_lesion([1])  # branch 1's parameters see no gradient
    return model

T.build_model = lesioned
sys.exit(main(sys.argv[1:]))
"""


def test_lesioned_branch_trains_under_ddp_like_one_process(tmp_path, monkeypatch):
    """A model with parameters that never get a gradient: DDP needs find_unused_parameters (found by a probe)."""
    import reslab.train as T

    args = [a if a != str(EPOCHS) else "3" for a in ARGS]
    real = T.build_model

    def lesioned(cfg, data):
        model = real(cfg, data)
        model.trunk.set_lesion([1])
        return model

    with monkeypatch.context() as mp:
        mp.setattr(T, "build_model", lesioned)
        assert main(["train", *args, "--out", str(tmp_path / "single")]) == 0
    script = tmp_path / "lesioned.py"
    script.write_text(LESIONED)
    proc = subprocess.run(_torchrun(str(script), "train", *args, "--out", "ddp"), cwd=tmp_path,
                          env=_env(Path(os.environ["RESLAB_CACHE"])), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (runs.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("single", "ddp"))
    assert len(a) == 3 and _max_metric_diff(a, b) < TOL
    wa, wb = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < TOL
    fresh = real(T.TrainConfig.from_dict(runs.read_json(tmp_path / "ddp" / "config.json")["train"]),
                 load_dataset("mnist1d:200"))
    lesioned_keys = [k for k in wa if k.startswith("trunk.branches.1.")]
    assert lesioned_keys and all(torch.equal(wb[k], fresh.state_dict()[k]) for k in lesioned_keys)  # never moved


def test_unused_parameter_probe_finds_lesions_only():
    from reslab import create_model

    torch.manual_seed(0)
    model = create_model("mlp6", "highway", num_classes=3, input_shape=(5,), width=8)  # BatchNorm, gates
    x, y = torch.randn(2, 5), torch.tensor([0, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert distributed.unused_parameters(model, x, y) == []
    model.trunk.set_lesion([0])
    unused = distributed.unused_parameters(model.eval(), x, y)
    assert unused and all(n.startswith(("trunk.branches.0.", "trunk.scheme.gates.0.")) for n in unused)
    assert {n.split(".")[2] for n in unused if n.startswith("trunk.branches")} == {"0"}
    # the probe changed nothing: weights, BatchNorm statistics, RNG, gradients, mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_shards_cover_the_batch_in_order():
    for n in (0, 1, 2, 5, 53, 54):
        for world in (1, 2, 3, 4):
            parts = [distributed.shard(n, r, world) for r in range(world)]
            sizes = [s.stop - s.start for s in parts]
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert distributed.shard(53, 0, 2) == slice(0, 27) and distributed.shard(1, 1, 2) == slice(1, 1)


def test_shards_a_model_cannot_train_on_are_refused():
    from reslab import create_model

    x = torch.randn(2, 5)
    bn = create_model("mlp6", num_classes=3, input_shape=(5,), width=8)
    ln = create_model("mlp6", num_classes=3, input_shape=(5,), width=8, norm="ln")
    with pytest.raises(ValueError, match="a batch of 3 samples split over 2 processes leaves one rank a single"):
        distributed.check_shards(bn, x, 163, 32, 2, sync_bn=False)  # last batch 3 -> 2 + 1
    distributed.check_shards(bn, x, 163, 32, 2, sync_bn=True)  # SyncBatchNorm sees the global batch
    distributed.check_shards(ln, x, 163, 32, 2, sync_bn=False)
    distributed.check_shards(bn, x, 164, 32, 2, sync_bn=False)  # 32 -> 16 + 16, 4 -> 2 + 2
    attnres = create_model("mlp6", "attnres", num_classes=3, input_shape=(5,), width=8, norm="ln")
    before = {k: v.clone() for k, v in attnres.state_dict().items()}
    distributed.check_shards(attnres, x, 161, 32, 2, sync_bn=False)  # last batch 1 -> 1 + 0: runs an empty batch
    assert all(torch.equal(before[k], v) for k, v in attnres.state_dict().items())

    class NoEmpty(torch.nn.Linear):  # a model that cannot run an empty batch
        def forward(self, x):
            if not len(x):
                raise RuntimeError("cannot reshape tensor of 0 elements")
            return super().forward(x)

    with pytest.raises(ValueError, match="cannot run an empty batch"):
        distributed.check_shards(NoEmpty(5, 3), x, 161, 32, 2, sync_bn=False)
    distributed.check_shards(NoEmpty(5, 3), x, 162, 32, 2, sync_bn=False)  # no empty shard: no question


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_exit_2_everywhere(tmp_path, monkeypatch, capsys,
                                                                               rank, lines):
    from reslab.__main__ import _run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sys, "argv", ["reslab", "train", "--model", "mlp6", "--epochs", "0", "--out",
                                      str(tmp_path / "run")])
    assert _run() == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == lines
    assert all(line.startswith("reslab: error: epochs must be positive") for line in out.err.splitlines())
    assert not (tmp_path / "run").exists()


def test_single_process_env_records_world_size_1(tmp_path):
    from reslab.train import TrainConfig, train

    cfg = TrainConfig(model="mlp4", model_kwargs={"width": 8}, data="mnist1d:200", epochs=1, device="cpu")
    train(cfg, tmp_path / "r", quiet=True)
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["world_size"] == 1 and "distributed_backend" not in env
