"""The command line: help everywhere, one-line errors with exit 2 and no run directory, list and train."""

from __future__ import annotations

import pytest

from reslab.cli import main


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits (help, usage errors)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["train", "--help"], ["reproduce", "--help"],
                                  ["diagnose", "--help"]])
def test_help_everywhere(argv, capsys):
    code, out, _ = _run(argv, capsys)
    assert code == 0 and "usage:" in out


def test_list_shows_every_registry(capsys):
    code, out, _ = _run(["list"], capsys)
    assert code == 0
    for word in ("rezero", "highway", "exclusive_gating", "He et al. 2015", "resnet1202", "mlp56", "cifar10",
                 "mnist1d", "degradation", "avg-down", "concat", "densenet_bc100", "Huang et al. 2017"):
        assert word in out


BAD = [
    (["train", "--model", "resnet58", "--out", "{d}"], "6n+2"),
    (["train", "--model", "resnet57", "--out", "{d}"], "6n+2"),
    (["train", "--model", "nosuchnet20", "--out", "{d}"], "unknown model"),
    (["train", "--model", "mlp8", "--residual", "nosuch", "--out", "{d}"], "unknown residual scheme"),
    (["train", "--model", "mlp8", "--shortcut", "D", "--out", "{d}"], "spatial maps"),
    (["train", "--model", "mlp8", "--residual", "plain", "--shortcut", "B", "--out", "{d}"], "no shortcut option"),
    (["train", "--model", "mlp8", "--residual", "plain", "--zero-init-last", "--out", "{d}"], "plain"),
    (["train", "--model", "mlp8", "--epochs", "0", "--out", "{d}"], "epochs must be positive"),
    (["train", "--model", "mlp8", "--batch-size", "-1", "--out", "{d}"], "batch_size must be positive"),
    (["train", "--model", "mlp8", "--model-arg", "width=0", "--out", "{d}"], "width must be positive"),
    (["train", "--model", "mlp8", "--model-arg", "depthh=3", "--out", "{d}"], "unexpected keyword"),
    (["train", "--model", "mlp8", "--data", "nosuch", "--out", "{d}"], "unknown dataset"),
    (["train", "--model", "resnet20", "--data", "cifar10:{d}x", "--out", "{d}"], "cifar-10-batches-py"),
    (["train", "--model", "resnet20", "--data", "mnist1d", "--out", "{d}"], "image input"),
    (["train", "--model", "mlp8", "--shortcut", "E", "--out", "{d}"], "invalid choice"),
    (["train", "--model", "densenet_bc40", "--residual", "identity", "--out", "{d}"], "only with residual='concat'"),
    (["train", "--model", "resnet20", "--residual", "concat", "--out", "{d}"],
     "runs only on the families built for it"),
    (["train", "--model", "densenet40", "--model-arg", "memory_efficient=maybe", "--out", "{d}"],
     "memory_efficient must be True or False"),
    (["train", "--out", "{d}"], "--model is required"),
    (["reproduce", "--only", "nosuch", "--out", "{d}"], "unknown claim"),
    (["diagnose", "{d}"], "not a trained reslab run"),
    (["reproduce", "--jobs", "0", "--out", "{d}"], "--jobs must be positive"),
    (["reproduce", "--profile", "huge", "--out", "{d}"], "invalid choice"),
    (["reproduce", "--only", "", "--out", "{d}"], "--only needs a claim name"),
    (["reproduce", "--only", " , ", "--out", "{d}"], "--only needs a claim name"),
    # prefixes are not options
    (["train", "--model", "mlp8", "--ep", "2", "--out", "{d}"], "unrecognized arguments: --ep"),
    # model and data that do not fit, caught before anything is created
    (["train", "--model", "mlp8", "--data", "pydoc:16", "--out", "{d}"], "reads real-valued inputs"),
    (["train", "--model", "gpt2", "--data", "mnist1d:200", "--out", "{d}"], "reads token ids"),
    # invalid values
    (["train", "--model", "mlp8", "--device", "tpu", "--out", "{d}"], "unknown device 'tpu'"),
    (["train", "--model", "mlp8", "--schedule", "step", "--gamma", "-1", "--out", "{d}"], "gamma must be positive"),
    (["train", "--model", "mlp8", "--warmup-steps", "5", "--warmup-lr", "-0.1", "--out", "{d}"],
     "warmup_lr must be positive"),
    (["train", "--model", "mlp8", "--optimizer", "sgd", "--momentum", "1.5", "--out", "{d}"], "momentum must be"),
    # options that would be silently ignored
    (["train", "--model", "mlp8", "--optimizer", "adam", "--nesterov", "--out", "{d}"], "nesterov applies to SGD"),
    (["train", "--model", "mlp8", "--optimizer", "adam", "--momentum", "0.5", "--out", "{d}"], "--momentum applies"),
    (["train", "--model", "mlp8", "--schedule", "constant", "--milestones", "3", "--out", "{d}"],
     "--milestones applies to --schedule step only"),
    (["train", "--model", "mlp8", "--schedule", "cosine", "--gamma", "0.5", "--out", "{d}"], "--gamma applies"),
    (["train", "--model", "mlp8", "--warmup-lr", "0.01", "--out", "{d}"], "--warmup-lr needs --warmup-steps"),
    (["train", "--model", "mlp8", "--shortcut", "B", "--out", "{d}"], "no effect on mlp8"),
    (["train", "--model", "mlp8", "--amp", "--device", "cpu", "--data", "mnist1d:200", "--out", "{d}"],
     "CUDA only"),
    (["train", "--resume", "--out", "{d}"], "nothing to resume"),
    (["train", "--model", "mlp8", "--resume", "--out", "{d}"], "nothing to resume"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[:4]) + f" [{n}]" for a, n in BAD])
def test_bad_input_one_line_exit_2_nothing_created(argv, needle, tmp_path, capsys):
    d = tmp_path / "run"
    code, out, err = _run([a.replace("{d}", str(d)) for a in argv], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err
    assert not d.exists()


def test_train_cli_end_to_end(tmp_path, capsys):
    d = tmp_path / "run"
    code, out, _ = _run(["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200",
                         "--epochs", "2", "--residual", "highway", "--residual-arg", "gate_bias=-1",
                         "--optimizer", "adam", "--lr", "0.01", "--out", str(d), "--quiet"], capsys)
    assert code == 0 and "completed: 2 epochs" in out
    from reslab import runs

    cfg = runs.read_json(d / "config.json")
    assert cfg["train"]["residual_kwargs"] == {"gate_bias": -1}
    assert cfg["model"]["residual"] == "highway"
    code, _, err = _run(["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200",
                         "--out", str(d), "--quiet"], capsys)
    assert code == 2 and "already holds a run" in err


def test_diagnose_writes_arrays_and_plots(tmp_path, capsys):
    import numpy as np

    d = tmp_path / "run"
    assert _run(["train", "--model", "mlp6", "--model-arg", "width=8", "--data", "mnist1d:200", "--epochs", "1",
                 "--out", str(d), "--quiet"], capsys)[0] == 0
    code, out, _ = _run(["diagnose", str(d), "--what", "responses,stream,grads,lesion,paths,update",
                         "--samples", "100"], capsys)
    assert code == 0
    for name in ("responses", "stream", "grads", "lesion", "paths", "update"):
        arrays = np.load(d / "diagnostics" / f"{name}.npz")
        assert len(arrays.files) > 0 and (d / "diagnostics" / f"{name}.png").stat().st_size > 1000
    assert len(np.load(d / "diagnostics" / "responses.npz")["std"]) == 2
    code, _, err = _run(["diagnose", str(d), "--what", "gates"], capsys)
    assert code == 2 and "no highway gates" in err
    code, _, err = _run(["diagnose", str(d), "--what", "nosuch"], capsys)
    assert code == 2 and "unknown measurement" in err


def _tiny_run(d, capsys, *extra):
    argv = ["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200", "--epochs", "1",
            "--out", str(d), "--quiet", *extra]
    assert _run(argv, capsys)[0] == 0
    return argv


def test_resume_refuses_options_that_change_the_run(tmp_path, capsys):
    d = tmp_path / "run"
    _tiny_run(d, capsys)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    code, _, err = _run(["train", "--out", str(d), "--resume", "--epochs", "20"], capsys)
    assert code == 2 and "differs in epochs" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["train", "--out", str(d), "--resume", "--lr", "0.5"], capsys)
    assert code == 2 and "differs in lr" in err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing touched
    code, out, _ = _run(["train", "--out", str(d), "--resume", "--epochs", "1"], capsys)  # same config: a no-op
    assert code == 0 and "completed: 1 epochs" in out


@pytest.mark.parametrize("content,needle", [
    ("{}", "not a reslab run config"),
    ('{"train": {"epochs": "many"}, "model": {}}', "config.json: epochs must be an integer, got 'many'"),
    ('{"train": {"lr": [1]}, "model": {}}', "config.json: lr must be a number, got [1]"),
    ('{"train": {"nosuch": 1}, "model": {}}', "unknown training option 'nosuch'"),
    ("{not json", "config.json is not valid JSON"),
    ("[1, 2]", "not a reslab run config"),
])
def test_broken_stored_config_is_one_line(content, needle, tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(content)
    (d / "checkpoint.pt").write_bytes(b"")  # diagnose reads the config first
    for argv in (["train", "--out", str(d), "--resume"], ["diagnose", str(d)]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    for out, needle in [(f, "is a file, not a run directory"), (f / "sub", "Not a directory")]:
        code, _, err = _run(["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200",
                             "--out", str(out), "--quiet"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert f.read_text() == "keep me"


def test_model_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    from reslab import footprint

    monkeypatch.setattr(footprint, "available_bytes", lambda device: 64 * 2 ** 20)  # a 64 MiB machine
    d = tmp_path / "run"
    code, _, err = _run(["train", "--model", "mlp400", "--data", "mnist1d:200", "--out", str(d)], capsys)
    assert code == 2 and "too large for memory" in err and "parameters" in err, err
    assert not d.exists()


def test_estimate_counts_parameters_states_and_saved_activations():
    import torch

    from reslab.footprint import training_bytes

    n, per, acts = training_bytes(lambda: torch.nn.Linear(10, 20), (7, 10), torch.float32, "adam")
    assert n == 220 and per == 220 * 4 * 4  # weights, gradients, two Adam moments
    assert acts == 7 * 10 * 4  # the input kept for the weight gradient
    assert training_bytes(lambda: torch.nn.Linear(10, 20), (7, 10), torch.float32, "sgd")[1] == 220 * 4 * 3


def test_version(capsys):
    import reslab

    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"reslab {reslab.__version__}"


def test_train_help_states_each_familys_defaults(capsys):
    from reslab.models import list_families

    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    for f in list_families():
        assert f.recipe and f"{f.name}:" in out
        assert all(f"{k}={v}" in " ".join(out.split()) for k, v in f.recipe.items())


@pytest.mark.parametrize("model,probes,kw,batch,dtype", [
    ("mlp", (4, 6), dict(width=8), (5, 40), "float32"),
    ("resnet", (8, 14), dict(width=4), (5, 1, 8, 8), "float32"),
    ("gpt", (1, 2), dict(d_model=16, n_heads=2), (5, 16), "long"),
])
def test_depth_extrapolated_estimate_equals_the_exact_one(model, probes, kw, batch, dtype):
    import torch

    from reslab import create_model
    from reslab.footprint import at_depth, training_bytes

    def build_at(d):
        return create_model(f"{model}{d}", num_classes=7, input_shape=batch[1:], **kw)

    dt = getattr(torch, dtype)
    deep = 2 * probes[1] - probes[0] + (probes[1] - probes[0]) * 3  # a valid depth past both probes
    exact = training_bytes(lambda: build_at(deep), batch, dt, "adam")
    assert at_depth(build_at, deep, probes, batch, dt, "adam") == exact  # exact build at this depth
    import reslab.footprint as fp

    old, fp.EXACT_DEPTH = fp.EXACT_DEPTH, 0
    try:
        assert at_depth(build_at, deep, probes, batch, dt, "adam") == exact  # extrapolated from the probes
    finally:
        fp.EXACT_DEPTH = old
