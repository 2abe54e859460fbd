"""Bad input to ``reslab sweep``, data specs, checkpoints, output folders, ``report`` and ``export``: one table.

Every case runs the command line (in this process, or as a real subprocess where marked) and must give exit status
2, exactly one line on stderr that names the problem, no traceback, and leave the whole test folder as it was:
no partly written run or sweep directory, and every earlier run, sweep or data file byte-identical.
(tests/test_cli.py's BAD table covers ``reslab train`` / ``reproduce`` options; these are other kinds of input.)
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from reslab import runs
from reslab.cli import main

# ------------------------------------------------------------------------------------------------ sweep files


BASE = 'model = "mlp4"\ndata = "mnist1d:200"\nepochs = 1'


def toml(sweep: str = "", base: str = BASE, kwargs: str = "width = 8", axes: str | None = "seed = [0, 1]",
         extra: str = "") -> str:
    """A sweep file: the good one (two 1-epoch runs of a width-8 mlp4) with one part replaced."""
    parts = [f"[sweep]\n{sweep}"] if sweep else []
    parts.append(f"[base]\n{base}")
    if kwargs:
        parts.append(f"[base.model_kwargs]\n{kwargs}")
    if axes is not None:
        parts.append(f"[axes]\n{axes}")
    return "\n".join(parts + [extra]) + "\n"


GOOD = toml()
# --jobs 1: a sweep that wrongly ran would train in this process (fast), not start a pool
SWEEP = ["sweep", "{t}/s.toml", "--out", "{t}/out", "--jobs", "1", "--quiet"]
TRAIN = ["train", "--model", "mlp4", "--model-arg", "width=8", "--data", "mnist1d:200", "--epochs", "1", "--quiet"]
DIAGNOSE = ["diagnose", "{t}/run", "--what", "responses", "--samples", "50", "--no-plots"]
RESUME = ["train", "--out", "{t}/run", "--resume", "--quiet"]


def train_on(data: str, model: str = "resnet8", kw: str = "width=4") -> list[str]:
    return ["train", "--model", model, "--model-arg", kw, "--data", data, "--epochs", "1", "--out", "{t}/r", "--quiet"]


def lm_on(data: str) -> list[str]:
    return train_on(data, "gpt1", "d_model=8")


Setup = Callable[[Path, "Shared"], None]


@dataclass(frozen=True)
class Shared:
    """Finished artefacts made once per module and copied into a case's folder by its setup."""

    run: Path
    sweep: Path


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # "{t}" is the case's folder
    needle: str  # in the one line on stderr
    setup: tuple[Setup, ...] = ()
    xfail: str | None = None  # the fix this case needs (strict xfail until it is applied)
    in_subprocess: bool = False  # run the command as its own process, not main() here
    skip_root: bool = False  # a permission case that root's writes ignore


def sweep_file(text: str | bytes, name: str = "s.toml") -> Setup:
    """The sweep file ``{t}/name`` (``{t}`` in its text is the case's folder)."""
    def setup(t: Path, shared: Shared) -> None:
        (t / name).write_bytes(text if isinstance(text, bytes) else text.replace("{t}", str(t)).encode())
    return setup


def mkdir(name: str, mode: int | None = None) -> Setup:
    def setup(t: Path, shared: Shared) -> None:
        (t / name).mkdir(parents=True)
        if mode is not None:
            (t / name).chmod(mode)
    return setup


def write(name: str, data: bytes) -> Setup:
    def setup(t: Path, shared: Shared) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(data)
    return setup


def copy_run(name: str = "run", killed: bool = False) -> Setup:
    """The module's finished run at ``{t}/name``; ``killed``: its result.json says running (so --resume reads the
    checkpoint)."""
    def setup(t: Path, shared: Shared) -> None:
        shutil.copytree(shared.run, t / name)
        if killed:
            runs.write_json(t / name / "result.json", {"status": "running", "epoch": 0})
    return setup


def copy_sweep(name: str = "sw") -> Setup:
    def setup(t: Path, shared: Shared) -> None:
        shutil.copytree(shared.sweep, t / name)
    return setup


def checkpoint(make: Callable[[dict], object]) -> Setup:
    """Replace ``{t}/run/checkpoint.pt`` with ``torch.save(make(real checkpoint))`` (bytes: written as they are)."""
    def setup(t: Path, shared: Shared) -> None:
        path = t / "run" / "checkpoint.pt"
        obj = make(runs.load_checkpoint(path))
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        elif isinstance(obj, Path):
            path.unlink()
            path.mkdir()
        else:
            torch.save(obj, path)
    return setup


def corrupt_tail(ckpt: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(ckpt, buf)
    blob = buf.getvalue()
    return blob[:-200] + bytes(200)  # the zip's central directory zeroed


def cifar(missing: str | None = None, garbage: str | None = None) -> Setup:
    """A tiny ``{t}/data/cifar-10-batches-py`` (two images per batch, pickled as Python 3 writes protocol 2), with one
    file missing or replaced by garbage."""
    def setup(t: Path, shared: Shared) -> None:
        root = t / "data" / "cifar-10-batches-py"
        root.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
            (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        if missing:
            (root / missing).unlink()
        if garbage:
            (root / garbage).write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return setup


CASES = [
    # --- the sweep file itself
    Case("toml-not-toml", SWEEP, "is not valid TOML", (sweep_file('[base\nmodel = "mlp4"\n'),)),
    Case("toml-not-utf8", SWEEP, "is not UTF-8 text", (sweep_file(b'[base]\nmodel = "mlp4\xff\xfe"\n'),)),
    Case("toml-missing", SWEEP, "s.toml is missing"),
    Case("toml-is-a-directory", SWEEP, "s.toml is not a file", (mkdir("s.toml"),)),
    Case("unknown-table", SWEEP, "unknown table [grid]", (sweep_file(toml(extra="[grid]\nx = 1")),)),
    Case("unknown-key-in-sweep", SWEEP, "unknown key 'colour' in [sweep]", (sweep_file(toml(sweep='colour = 1')),)),
    Case("sweep-key-wrong-type", SWEEP, "plain_twins must be a bool", (sweep_file(toml(sweep='plain_twins = "yes"')),)),
    Case("sweep-unknown-metric", SWEEP, "unknown metric 'accuracy'", (sweep_file(toml(sweep='metric = "accuracy"')),)),
    Case("base-unknown-option", SWEEP, "unknown training option 'learning_rate' in [base]",
         (sweep_file(toml(base=BASE + "\nlearning_rate = 0.1")),)),
    Case("base-without-model", SWEEP, "[base] must be a table with at least `model`",
         (sweep_file(toml(base='data = "mnist1d:200"')),)),
    Case("axes-missing", SWEEP, "[axes] must be a table with at least one axis", (sweep_file(toml(axes=None)),)),
    Case("axis-unknown", SWEEP, "unknown axis 'colour'", (sweep_file(toml(axes="colour = [1, 2]")),)),
    Case("axis-empty-list", SWEEP, "axis 'seed' must be a non-empty list", (sweep_file(toml(axes="seed = []")),)),
    Case("axis-not-a-list", SWEEP, "axis 'seed' must be a non-empty list", (sweep_file(toml(axes="seed = 3")),)),
    Case("axis-table-value", SWEEP, "axis 'seed' takes plain values", (sweep_file(toml(axes="seed = [{a = 1}]")),)),
    Case("axis-list-value", SWEEP, "axis 'lr' takes plain values", (sweep_file(toml(axes="lr = [[0.1, 0.2]]")),)),
    Case("axis-repeated-value", SWEEP, "axis 'seed' repeats a value", (sweep_file(toml(axes="seed = [0, 1, 0]")),)),
    Case("axis-values-same-run-id", SWEEP, "repeats a value",  # "a/b" and "a:b" would share one run directory
         (sweep_file(toml(axes='"model_kwargs.norm" = ["a/b", "a:b"]')),)),
    Case("two-axes-same-option", SWEEP, "two axes set the same option",
         (sweep_file(toml(axes="width = [8]\nmodel_kwargs.width = [16]")),)),
    # --- values of the wrong type (refused, not coerced)
    Case("epochs-a-word", SWEEP, "epochs must be an integer, got 'five'",
         (sweep_file(toml(base=BASE.replace("epochs = 1", 'epochs = "five"'))),)),
    Case("lr-a-word", SWEEP, "lr must be a number, got 'fast'", (sweep_file(toml(base=BASE + '\nlr = "fast"')),)),
    Case("epochs-a-numeric-string", SWEEP, "epochs must be an integer, got '1'",
         (sweep_file(toml(base=BASE.replace("epochs = 1", 'epochs = "1"'))),)),
    Case("seed-a-float", SWEEP, "seed must be an integer, got 1.5", (sweep_file(toml(axes="seed = [0, 1.5]")),)),
    Case("batch-size-a-boolean", SWEEP, "batch_size must be an integer, got True",
         (sweep_file(toml(base=BASE + "\nbatch_size = true")),)),
    Case("train-samples-a-float", SWEEP, "train_samples must be an integer or null, got 10.5",
         (sweep_file(toml(base=BASE + "\ntrain_samples = 10.5")),)),
    Case("data-a-number", SWEEP, "data must be a string, got 5",
         (sweep_file(toml(base=BASE.replace('"mnist1d:200"', "5"))),)),
    Case("momentum-a-boolean", SWEEP, "momentum must be a number, got True",
         (sweep_file(toml(base=BASE + '\noptimizer = "sgd"\nmomentum = true')),)),
    Case("milestones-with-a-word", SWEEP, "milestones must be a list of numbers",
         (sweep_file(toml(base=BASE + '\nschedule = "step"\nmilestones = [0.5, "late"]')),)),
    Case("compile-a-word-axis", SWEEP, "compile must be true or false, got 'yes'",
         (sweep_file(toml(axes='compile = [false, "yes"]')),)),
    Case("model-a-number", SWEEP, "model must be a string", (sweep_file(toml(base=BASE.replace('"mlp4"', "4"))),)),
    # --- unknown names, in the base or an axis
    Case("unknown-model", SWEEP, "unknown model", (sweep_file(toml(base=BASE.replace("mlp4", "nosuch4"))),)),
    Case("unknown-scheme-axis", SWEEP, "unknown residual scheme 'nosuch'",
         (sweep_file(toml(axes='residual = ["identity", "nosuch"]')),)),
    Case("unknown-shortcut", SWEEP, "unknown shortcut 'E'", (sweep_file(toml(
        base='model = "resnet8"\ndata = "digits"\nepochs = 1\nshortcut = "E"', kwargs="width = 4")),)),
    Case("unknown-dataset-axis", SWEEP, "unknown dataset 'nosuch'",
         (sweep_file(toml(axes='data = ["mnist1d:200", "nosuch"]')),)),
    Case("unknown-optimiser", SWEEP, "unknown optimizer 'lbfgs'",
         (sweep_file(toml(base=BASE + '\noptimizer = "lbfgs"')),)),
    Case("unknown-schedule-axis", SWEEP, "unknown schedule 'linear'",
         (sweep_file(toml(axes='schedule = ["cosine", "linear"]')),)),
    Case("unknown-scheme-option-axis", SWEEP, "unexpected keyword argument 'nosuch'",
         (sweep_file(toml(axes='"residual_kwargs.nosuch" = [1]')),)),
    # --- configs that do not make sense together
    Case("concat-on-resnet", SWEEP, "runs only on the families built for it", (sweep_file(toml(
        base='model = "resnet8"\ndata = "digits"\nepochs = 1\nresidual = "concat"', kwargs="width = 4")),)),
    Case("plain-with-zero-init-last", SWEEP, "zero_init_last has no meaning for a plain net",
         (sweep_file(toml(base=BASE + "\nzero_init_last = true", axes='residual = ["identity", "plain"]')),)),
    Case("nesterov-with-adam", SWEEP, "nesterov applies to SGD", (sweep_file(toml(
        base=BASE + '\noptimizer = "adam"\nnesterov = true')),)),
    Case("resnet-depth-58", SWEEP, "(depth=58): resnet depth 58 is invalid", (sweep_file(toml(
        base='model = "resnet"\ndata = "digits"\nepochs = 1', kwargs="width = 4", axes="depth = [20, 58]")),)),
    Case("family-without-depth-axis", SWEEP, "is a family: add a depth axis",
         (sweep_file(toml(base=BASE.replace("mlp4", "mlp"))),)),
    Case("depth-axis-on-a-model-name", SWEEP, "with a depth axis must be a family",
         (sweep_file(toml(axes="depth = [4, 8]")),)),
    Case("gpt-on-mnist1d", SWEEP, "reads token ids", (sweep_file(toml(base=BASE.replace("mlp4", "gpt2"), kwargs="")),)),
    # --- the sweep's --out and options
    Case("out-is-a-file", SWEEP, "is a file, not a sweep directory", (sweep_file(GOOD), write("out", b"keep"))),
    Case("out-not-empty-no-sweep", SWEEP, "is not empty and holds no sweep",
         (sweep_file(GOOD), write("out/notes.txt", b"mine"))),
    Case("out-holds-a-run", SWEEP, "is not empty and holds no sweep", (sweep_file(GOOD), copy_run("out"))),
    Case("out-holds-another-sweep", ["sweep", "{t}/s.toml", "--out", "{t}/sw", "--jobs", "1", "--quiet"],
         "holds another sweep",
         (sweep_file(toml(axes="seed = [0, 1, 2]")), copy_sweep())),
    Case("out-holds-a-corrupt-plan", SWEEP, "is not a readable sweep plan",
         (sweep_file(GOOD), write("out/sweep.json", b"{not json"))),
    Case("out-under-a-file", ["sweep", "{t}/s.toml", "--out", "{t}/afile/sub", "--quiet"],
         "cannot write the sweep to {t}/afile/sub: Not a directory",
         (sweep_file(GOOD), write("afile", b"keep"))),
    Case("out-unwritable", ["sweep", "{t}/s.toml", "--out", "{t}/ro/sub", "--jobs", "1", "--quiet"],
         "cannot write the sweep",
         (sweep_file(GOOD), mkdir("ro", 0o500)), skip_root=True),
    Case("jobs-0", SWEEP + ["--jobs", "0"], "--jobs must be positive", (sweep_file(GOOD),)),
    Case("jobs-negative", SWEEP + ["--jobs", "-3"], "--jobs must be positive", (sweep_file(GOOD),)),
    Case("backend-nosuch", SWEEP + ["--backend", "nosuch"], "invalid choice: 'nosuch'", (sweep_file(GOOD),),
         in_subprocess=True),
    Case("address-with-local-backend", SWEEP + ["--address", "auto"], "--address applies to --backend ray only",
         (sweep_file(GOOD),), in_subprocess=True),
    Case("gpus-with-local-backend", SWEEP + ["--gpus-per-run", "1"], "--gpus-per-run applies to --backend ray only",
         (sweep_file(GOOD),)),
    Case("gpus-negative", SWEEP + ["--backend", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be non-negative",
         (sweep_file(GOOD),)),
    Case("reproduce-gpus-with-local-backend", ["reproduce", "--profile", "smoke", "--out", "{t}/rep",
                                               "--gpus-per-run", "0.5"], "--gpus-per-run applies", ()),
    # --- data that cannot be read
    Case("cifar-batch-missing", train_on("cifar10:{t}/data"),
         "data_batch_3 is missing", (cifar(missing="data_batch_3"),)),
    Case("cifar-test-batch-missing", train_on("cifar10:{t}/data"),
         "test_batch is missing", (cifar(missing="test_batch"),)),
    Case("cifar-test-batch-corrupt-in-sweep", SWEEP, "test_batch is not a readable python archive pickle",
         (cifar(garbage="test_batch"), sweep_file(toml(base='model = "resnet8"\ndata = "digits"\nepochs = 1',
                                                       kwargs="width = 4", axes='data = ["cifar10:{t}/data"]')))),
    Case("text-empty", lm_on("text:{t}/c.txt@4"),
         "has 0 characters, too short", (write("c.txt", b""),)),
    Case("text-not-utf8", lm_on("text:{t}/c.txt@4"),
         "is not valid UTF-8", (write("c.txt", "caf\u00e9 ".encode("latin-1") * 40),)),
    Case("text-missing", lm_on("text:{t}/none.txt"),
         "text file not found"),
    Case("text-a-directory", lm_on("text:{t}/corpus"),
         "text path is not a file", (mkdir("corpus"),)),
    Case("text-context-0", lm_on("text:{t}/c.txt@0"),
         "context length CTX must be a positive integer", (write("c.txt", b"abc " * 100),)),
    Case("text-not-utf8-in-sweep", SWEEP, "is not valid UTF-8", (write("c.txt", b"\xff\xfe" * 200), sweep_file(
        toml(base='model = "gpt1"\nepochs = 1', kwargs="d_model = 8", axes='data = ["text:{t}/c.txt@4"]')))),
    Case("mnist1d-size-not-a-number", TRAIN + ["--data", "mnist1d:many", "--out", "{t}/r"],
         "mnist1d:N needs an integer N >= 10 (at least one sample per class), got 'many'"),
    # --- checkpoints that are not reslab's (the run is otherwise intact and must stay so)
    Case("resume-ckpt-bare-state-dict", RESUME, "lacks 'model'",
         (copy_run(killed=True), checkpoint(lambda c: c["model"]))),
    Case("diagnose-ckpt-bare-state-dict", DIAGNOSE, "lacks 'model'", (copy_run(), checkpoint(lambda c: c["model"]))),
    Case("resume-ckpt-empty-dict", RESUME, "lacks 'model'", (copy_run(killed=True), checkpoint(lambda c: {}))),
    Case("diagnose-ckpt-a-module", DIAGNOSE, "refused", (copy_run(), checkpoint(lambda c: torch.nn.Linear(2, 2)))),
    Case("resume-ckpt-a-tensor", RESUME, "holds a Tensor, not a dict",
         (copy_run(killed=True), checkpoint(lambda c: torch.zeros(3)))),
    Case("resume-ckpt-corrupt-tail", RESUME, "truncated or corrupt", (copy_run(killed=True), checkpoint(corrupt_tail))),
    Case("diagnose-ckpt-corrupt-tail", DIAGNOSE, "truncated or corrupt", (copy_run(), checkpoint(corrupt_tail))),
    Case("resume-ckpt-a-directory", RESUME, "is not a file", (copy_run(killed=True), checkpoint(lambda c: Path()))),
    Case("diagnose-ckpt-epoch-a-string", DIAGNOSE, "'epoch' or 'step' is not an integer",
         (copy_run(), checkpoint(lambda c: {**c, "epoch": "1"}))),
    Case("resume-ckpt-rng-float", RESUME, "'rng' is not a uint8 RNG state",
         (copy_run(killed=True), checkpoint(lambda c: {**c, "rng": c["rng"].float()}))),
    # --- output folders that hold something else, or cannot be written
    Case("train-out-holds-a-run", TRAIN + ["--seed", "4", "--out", "{t}/run"], "already holds a run", (copy_run(),)),
    Case("train-out-holds-a-sweep", TRAIN + ["--out", "{t}/sw"], "is not a run directory", (copy_sweep(),)),
    Case("resume-other-seed", RESUME + ["--seed", "4"], "differs in seed", (copy_run(killed=True),)),
    Case("resume-other-model", RESUME + ["--model", "mlp6", "--model-arg", "width=8", "--data", "mnist1d:200"],
         "differs in epochs, model", (copy_run(killed=True),)),
    Case("resume-not-a-run", ["train", "--out", "{t}/sw", "--resume", "--quiet"], "nothing to resume",
         (copy_sweep(),)),
    Case("reproduce-out-under-a-file", ["reproduce", "--profile", "smoke", "--only", "degradation", "--out",
                                        "{t}/afile/sub", "--quiet"], "Not a directory", (write("afile", b"keep"),)),
    Case("reproduce-out-holds-a-sweep", ["reproduce", "--profile", "smoke", "--only", "degradation", "--out",
                                         "{t}/sw", "--jobs", "1", "--quiet"], "holds a sweep", (copy_sweep(),)),
    Case("reproduce-out-holds-a-run", ["reproduce", "--profile", "smoke", "--only", "degradation", "--out", "{t}/run",
                                       "--jobs", "1", "--quiet"], "holds a training run", (copy_run(),)),
    Case("export-csv-under-a-file", ["export", "{t}/run", "--csv", "{t}/afile/x.csv"], "Not a directory: {t}/afile",
         (copy_run(), write("afile", b"keep"))),
    # --- report and export
    Case("report-plain-folder", ["report", "{t}/d"], "holds no measured claims", (write("d/notes.txt", b"x"),)),
    Case("report-a-run", ["report", "{t}/run"], "holds no measured claims", (copy_run(),)),
    Case("report-missing", ["report", "{t}/none"], "is not a directory"),
    Case("report-a-file", ["report", "{t}/f"], "is not a directory", (write("f", b"x"),)),
    Case("report-sweep-metric-nosuch", ["report", "{t}/sw", "--metric", "nosuch"], "unknown metric 'nosuch'",
         (copy_sweep(),)),
    Case("report-run-with-metric", ["report", "{t}/run", "--metric", "test_error"], "--metric applies to sweep "
         "folders only", (copy_run(),)),
    Case("report-sweep-corrupt-plan", ["report", "{t}/sw"], "sweep.json is not valid JSON",
         (copy_sweep(), write("sw/sweep.json", b"{oops"))),
    Case("export-no-runs", ["export", "{t}/d", "--csv", "{t}/m.csv"], "holds no run", (write("d/notes.txt", b"x"),)),
    Case("export-missing", ["export", "{t}/none", "--csv", "{t}/m.csv"], "is not a directory"),
    Case("export-torn-metrics", ["export", "{t}/sw", "--csv", "{t}/m.csv"], "line 1 is not valid JSON",
         (copy_sweep(), write("sw/runs/seed-0/metrics.jsonl", b'{"epoch": 1, "test_err\n'))),
]


# ------------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    assert main(TRAIN + ["--out", str(root / "run")]) == 0
    (root / "s.toml").write_text(GOOD)
    assert main(["sweep", str(root / "s.toml"), "--out", str(root / "sweep"), "--jobs", "1", "--quiet"]) == 0
    assert runs.read_json(root / "sweep" / "index.json")["counts"]["done"] == 2
    return Shared(root / "run", root / "sweep")


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root``: a file's bytes, ``<dir>`` for a folder."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else p.read_bytes()
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture, in_subprocess: bool) -> tuple[int | str, str]:
    if in_subprocess:
        p = subprocess.run([sys.executable, "-m", "reslab.cli", *argv], capture_output=True, text=True, timeout=300)
        return p.returncode, p.stderr
    try:
        code: int | str = main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    except BaseException as e:  # noqa: BLE001 (an escaped exception is a failure of the contract)
        code = f"raised {type(e).__name__}: {e}"
    return code, capsys.readouterr().err


def _param(c: Case):
    marks = []
    if c.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=c.xfail))
    if c.skip_root:
        marks.append(pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                        reason="root writes into a mode-0500 folder (out-under-a-file covers it)"))
    return pytest.param(c, id=c.id, marks=marks)


def test_cases_are_distinct():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = tmp_path / "t"
    t.mkdir()
    for setup in case.setup:
        setup(t, shared)
    capsys.readouterr()
    before = snapshot(t)
    try:
        code, err = run_cli([a.replace("{t}", str(t)) for a in case.argv], capsys, case.in_subprocess)
    finally:
        for p in t.rglob("*"):  # a mode-0500 folder must not stop pytest's cleanup
            if p.is_dir():
                p.chmod(0o755)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one line on stderr: {err!r}"
    assert err.startswith("reslab"), err
    assert "Traceback" not in err
    assert case.needle.replace("{t}", str(t)) in err, (case.needle, err)
    after = snapshot(t)
    assert after.keys() == before.keys(), f"created or removed: {sorted(after.keys() ^ before.keys())}"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"changed: {changed}"
