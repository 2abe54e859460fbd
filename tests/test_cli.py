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
                 "mnist1d", "degradation", "avg-down"):
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
    (["train", "--out", "{d}"], "--model is required"),
    (["reproduce", "--only", "nosuch", "--out", "{d}"], "unknown claim"),
    (["diagnose", "{d}"], "not a trained reslab run"),
    (["reproduce", "--jobs", "0", "--out", "{d}"], "--jobs must be positive"),
    (["reproduce", "--profile", "huge", "--out", "{d}"], "invalid choice"),
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
