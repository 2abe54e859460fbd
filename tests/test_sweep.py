"""Sweeps: a TOML grid expanded into runs, run on the local pool and on Ray with identical numbers, an index that
records every state (a failed or diverged run does not stop the others), resumable reruns, the report and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from reslab import runs, sweep
from reslab.cli import main
from reslab.engine import Job, run_jobs
from reslab.train import TrainConfig

TINY = """
[base]
model = "mlp"
data = "mnist1d:200"
epochs = 2
batch_size = 64
[base.model_kwargs]
width = 8
"""


def parse(text: str) -> sweep.Sweep:
    import tomllib

    return sweep.parse(tomllib.loads(text))


def test_axes_expand_into_the_product_with_readable_ids_and_full_configs():
    s = parse(TINY + """
[sweep]
plain_twins = true
[axes]
depth = [4, 6]
lr = [0.1, 0.05]
seed = [0, 1]
width = [8, 12]
""")
    assert s.axes["residual"] == ["identity", "plain"]  # the twin axis comes first
    assert len(s.runs) == 2 * 2 * 2 * 2 * 2
    rid = "residual-plain_depth-6_lr-0.05_seed-1_width-12"
    values, cfg = s.runs[rid]
    assert values == {"residual": "plain", "depth": 6, "lr": 0.05, "seed": 1, "width": 12}
    assert (cfg.model, cfg.residual, cfg.lr, cfg.seed, cfg.model_kwargs) == ("mlp6", "plain", 0.05, 1, {"width": 12})
    # the family's recipe under the base: what `reslab train --model mlp6` would use, with the base on top
    recipe = TrainConfig.for_model("mlp6", data="mnist1d:200", epochs=2, batch_size=64, lr=0.05, seed=1,
                                   residual="plain", model_kwargs={"width": 12})
    assert cfg == recipe


def test_scheme_and_family_options_as_axes_dotted_or_as_tables():
    dotted = parse(TINY.replace('model = "mlp"', 'model = "mlp4"') + """
[axes]
residual = ["scaled"]
"residual_kwargs.b" = [0.5, 0.25]
""")
    table = parse(TINY.replace('model = "mlp"', 'model = "mlp4"') + """
[axes]
residual = ["scaled"]
[axes.residual_kwargs]
b = [0.5, 0.25]
""")
    assert list(dotted.runs) == list(table.runs) == ["residual-scaled_residual.b-0.5",
                                                      "residual-scaled_residual.b-0.25"]
    assert [c.residual_kwargs for _, c in dotted.runs.values()] == [{"b": 0.5}, {"b": 0.25}]
    assert [c.residual_kwargs for _, c in table.runs.values()] == [{"b": 0.5}, {"b": 0.25}]


@pytest.mark.parametrize("extra,needle", [
    ('[axes]\nseed = []', "non-empty list"),
    ('[axes]\nnosuch = [1]', "unknown axis 'nosuch'"),
    ('[axes]\nseed = [0, 0]', "repeats a value"),
    ('[axes]\nresidual = ["identity", "nosuch"]', "residual='nosuch'"),
    ('[axes]\ndepth = [4, 5]\n', "depth=5"),
    ('[axes]\nlr = [0.1, -1.0]', "lr must be positive"),
    ('[sweep]\nmetric = "accuracy"\n[axes]\nseed = [0]', "unknown metric"),
    ('[axes]\nwidth = [8]\n"model_kwargs.width" = [8]', "same option"),
])
def test_every_problem_is_one_line_naming_it(extra, needle):
    text = TINY + extra
    if "depth" not in extra:
        text = text.replace('model = "mlp"', 'model = "mlp4"')
    with pytest.raises(ValueError, match=None) as e:
        parse(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _write(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "sweep.toml"
    f.write_text(TINY.replace('model = "mlp"', 'model = "mlp4"') + body)
    return f


def _finals(root: Path) -> dict[str, dict]:
    idx = runs.read_json(root / "index.json")["runs"]
    return {k: {m: v for m, v in r["final"].items() if m != "time_s"} for k, r in idx.items() if r["final"]}


def test_failed_and_diverged_runs_do_not_stop_the_others_and_reruns_skip_finished(tmp_path, capsys):
    # lr 1e6 diverges; device cuda fails at run time on this CPU machine (it is valid config, checked by train())
    f = _write(tmp_path, '[axes]\nlr = [0.05, 1e6]\ndevice = ["cpu", "cuda"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
    idx = runs.read_json(out / "index.json")
    states = {k: r["state"] for k, r in idx["runs"].items()}
    assert states["lr-0.05_device-cpu"] == "done"
    assert states["lr-1000000.0_device-cpu"] == "diverged"
    import torch

    if not torch.cuda.is_available():
        assert states["lr-0.05_device-cuda"] == "failed"
        assert "CUDA" in idx["runs"]["lr-0.05_device-cuda"]["error"]
    assert idx["counts"]["done"] == 1 and sum(idx["counts"].values()) == 4
    stamp = (out / "runs" / "lr-0.05_device-cpu" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["sweep", str(f), "--out", str(out), "--jobs", "2", "--quiet"]) == 0  # rerun: retries failed only
    assert (out / "runs" / "lr-0.05_device-cpu" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert {k: r["state"] for k, r in runs.read_json(out / "index.json")["runs"].items()} == states
    # another sweep in the same directory is refused, nothing changed
    g = _write(tmp_path, '[axes]\nlr = [0.07]\n')
    assert main(["sweep", str(g), "--out", str(out), "--quiet"]) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_local_and_ray_give_identical_metrics_and_one_process_agrees(tmp_path):
    pytest.importorskip("ray")
    f = _write(tmp_path, '[sweep]\nplain_twins = true\n[axes]\nlr = [0.1, 0.05]\nseed = [0, 1]\n')
    backends = (("pool", ["--jobs", "2"]), ("one", ["--jobs", "1"]), ("ray", ["--backend", "ray", "--jobs", "2"]))
    for name, extra in backends:
        assert main(["sweep", str(f), "--out", str(tmp_path / name), "--quiet", *extra]) == 0
    pool, one, ray = (_finals(tmp_path / n) for n in ("pool", "one", "ray"))
    assert len(pool) == 8 and pool == ray  # one thread per run in both: the same numbers
    # in this process with every core: another summation order, the same numbers to float precision
    assert one.keys() == pool.keys()
    for k in pool:
        assert one[k] == pytest.approx(pool[k], rel=1e-5, abs=1e-7), k


def test_report_table_plots_and_csv_export(tmp_path, capsys):
    f = _write(tmp_path, '[sweep]\nmetric = "test_loss"\n[axes]\nresidual = ["identity", "rezero"]\n'
                         'lr = [0.1, 0.02]\nseed = [0, 1]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| residual | lr | runs | test_loss (mean ± sd over seeds) |" in md
    finals = _finals(out)
    a, b = (finals[f"residual-rezero_lr-0.02_seed-{s}"]["test_loss"] for s in (0, 1))
    import statistics

    assert f"| rezero | 0.02 | 2 done | {statistics.fmean([a, b]):.4g} ± {statistics.stdev([a, b]):.2g} |" in md
    for axis in ("residual", "lr"):
        assert (out / "figures" / f"test_loss_vs_{axis}.png").stat().st_size > 1000
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert main(["export", str(out), "--csv", str(tmp_path / "m.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert len(rows) == 8 * 2  # runs x epochs
    assert {"run", "residual", "lr", "seed", "status", "epoch", "test_loss"} <= set(rows[0])
    last = [r for r in rows if r["run"] == "residual-rezero_lr-0.02_seed-1" and r["epoch"] == "2"][0]
    assert float(last["test_loss"]) == finals["residual-rezero_lr-0.02_seed-1"]["test_loss"]
    assert main(["report", str(out), "--metric", "nosuch"]) == 2


def test_export_of_one_run_and_of_a_folder_without_runs(tmp_path, capsys):
    assert main(["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200", "--epochs", "2",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--csv", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("run,model,residual,shortcut,seed,lr,epochs,data,status,epoch") and len(lines) == 3
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--csv", str(tmp_path / "x.csv")]) == 2
    assert "holds no run" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


def test_engine_reports_each_outcome_and_restores_the_thread_count(tmp_path):
    import torch

    threads = torch.get_num_threads()
    cfg = TrainConfig.for_model("mlp4", data="mnist1d:200", epochs=1, model_kwargs={"width": 8})
    started, done = [], []
    outs = run_jobs([Job("a", cfg, str(tmp_path / "a")), Job("b", cfg, str(tmp_path / "b"))], workers=1,
                    on_start=lambda j: started.append(j.key), on_done=lambda o: done.append(o.key))
    assert [o.status for o in outs] == ["completed", "completed"] and started == done == ["a", "b"]
    (tmp_path / "f").write_text("{}")
    bad = run_jobs([Job("c", cfg, str(tmp_path / "f"))], workers=1)[0]
    assert bad.status == "failed" and "is a file" in bad.error
    assert torch.get_num_threads() == threads
    assert json.loads((tmp_path / "a" / "result.json").read_text())["status"] == "completed"


def test_reproduce_on_ray_equals_the_local_pool(tmp_path, capsys):
    pytest.importorskip("ray")
    for name, extra in (("local", ["--jobs", "2"]), ("ray", ["--backend", "ray", "--jobs", "2"])):
        assert main(["reproduce", "--profile", "smoke", "--only", "degradation", "--out", str(tmp_path / name),
                     "--quiet", *extra]) == 0
    local, ray = (json.loads((tmp_path / n / "claims" / "degradation" / "claim.json").read_text()) for n in
                  ("local", "ray"))
    assert local["table"] == ray["table"] and local["checks"] == ray["checks"]
    ids = sorted(p.name for p in (tmp_path / "local" / "runs").iterdir())
    assert ids == sorted(p.name for p in (tmp_path / "ray" / "runs").iterdir())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    for rid in ids:
        assert strip(runs.read_jsonl(tmp_path / "local" / "runs" / rid / "metrics.jsonl")) == \
            strip(runs.read_jsonl(tmp_path / "ray" / "runs" / rid / "metrics.jsonl"))


def test_a_sweep_file_is_data_never_code(tmp_path):
    """Strings that look like code stay strings: a config is parsed, never evaluated or imported."""
    marker = tmp_path / "pwned"
    f = _write(tmp_path, f'[axes]\nresidual = ["__import__(\'os\').system(\'touch {marker}\')"]\n')
    with pytest.raises(ValueError, match="unknown residual scheme"):
        sweep.parse(sweep.read_spec(f))
    assert not marker.exists()


class _Shell:
    """Pickles as ``os.system("touch MARKER")``: what a planted checkpoint would run if it were unpickled freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_sweep_workers_load_checkpoints_with_the_safe_loader(tmp_path, backend, capsys):
    """A run to resume whose checkpoint was replaced by a pickled command: the worker refuses it (the run fails
    with the loader's one line), runs nothing, and the other runs finish."""
    if backend == "ray":
        pytest.importorskip("ray")
    import torch

    f = _write(tmp_path, '[axes]\nseed = [0, 1]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--out", str(out), "--quiet"]) == 0
    victim = out / "runs" / "seed-0"
    marker = tmp_path / "pwned"
    torch.save({"model": _Shell(marker)}, victim / "checkpoint.pt")
    runs.write_json(victim / "result.json", {"status": "running", "epoch": 1})  # as if killed: to be resumed
    assert main(["sweep", str(f), "--out", str(out), "--quiet", "--backend", backend, "--jobs", "2"]) == 0
    idx = runs.read_json(out / "index.json")["runs"]
    assert idx["seed-0"]["state"] == "failed" and "refused" in idx["seed-0"]["error"]
    assert idx["seed-1"]["state"] == "done"
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["sweep", "{f}", "--out", "{d}"],
                                  ["reproduce", "--profile", "smoke", "--out", "{d}"]])
def test_sweep_and_reproduce_refuse_to_run_under_torchrun(tmp_path, monkeypatch, capsys, argv):
    f = _write(tmp_path, '[axes]\nseed = [0]\n')
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([a.replace("{f}", str(f)).replace("{d}", str(tmp_path / "out")) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not run under torchrun" in err[0] and not (tmp_path / "out").exists()


def test_tensorboard_event_files_hold_every_epochs_metrics(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200", "--epochs", "3",
                 "--out", str(run), "--quiet", "--tensorboard"]) == 0
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    metrics = runs.read_jsonl(run / "metrics.jsonl")
    for key in ("train_loss", "test_loss", "test_error", "lr"):
        events = board.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    # a sweep's runs too
    f = _write(tmp_path, '[axes]\nseed = [0, 1]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "sw"), "--quiet", "--tensorboard"]) == 0
    assert all(any((tmp_path / "sw" / "runs" / f"seed-{s}" / "tensorboard").iterdir()) for s in (0, 1))


def test_no_ray_cluster_at_the_address_is_one_line_before_anything_is_written(tmp_path, capsys):
    pytest.importorskip("ray")
    if Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster is running on this machine")
    f = _write(tmp_path, '[axes]\nseed = [0]\n')
    assert main(["sweep", str(f), "--out", str(tmp_path / "out"), "--backend", "ray", "--address", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach Ray at 'auto'" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_documented_sweep_file_is_valid():
    """The example in ``reslab.sweep``'s docstring (what `reslab sweep --help` prints) parses as it is."""
    import textwrap
    import tomllib

    text = textwrap.dedent(sweep.__doc__.split("three tables::", 1)[1].split("An axis is", 1)[0])
    s = sweep.parse(tomllib.loads(text))
    assert s.axes["residual"] == ["identity", "rezero", "plain"] and len(s.runs) == 3 * 2 * 2 * 3 * 2


def test_a_pool_trains_its_last_run_with_one_thread_like_the_others(tmp_path):
    """The thread count changes a run's numbers (summation order): with workers > 1 a lone run (what a rerun of a
    killed sweep may have left) still trains in a pool worker with one thread, as in the first attempt; only an
    explicit ``workers=1`` trains in this process with every core. (A kill test caught a rerun that differed in
    the last bits of train_loss when one run was left.)"""
    import os

    cfg = TrainConfig.for_model("mlp4", data="mnist1d:200", epochs=1, model_kwargs={"width": 8})
    assert run_jobs([Job("a", cfg, str(tmp_path / "a"))], workers=2)[0].status == "completed"
    assert run_jobs([Job("b", cfg, str(tmp_path / "b"))], workers=1)[0].status == "completed"
    assert runs.read_json(tmp_path / "a" / "env.json")["threads"] == 1
    assert runs.read_json(tmp_path / "b" / "env.json")["threads"] == max(1, os.cpu_count() or 1)


@pytest.mark.parametrize("argv,needle", [
    (["sweep", "{f}", "--out", "{d}", "--backend", "ray"], "pip install 'reslab[ray]'"),
    (["reproduce", "--profile", "smoke", "--out", "{d}", "--backend", "ray"], "pip install 'reslab[ray]'"),
    (["sweep", "{f}", "--out", "{d}", "--tensorboard"], "pip install 'reslab[tensorboard]'"),
    (["train", "--model", "mlp4", "--out", "{d}", "--tensorboard"], "pip install 'reslab[tensorboard]'"),
])
def test_a_missing_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys, argv, needle):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("ray", "tensorboard") else real(name, *a))
    f = _write(tmp_path, '[axes]\nseed = [0]\n')
    assert main([a.replace("{f}", str(f)).replace("{d}", str(tmp_path / "out")) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and not (tmp_path / "out").exists()
