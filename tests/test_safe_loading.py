"""Loading never executes what a file holds: checkpoints (weights-only) and CIFAR archives (restricted unpickler).

Every malicious file carries a pickled call of :func:`_plant`, which writes a marker file; the tests check the
marker never appears and that damaged files give the CLI's one line (``reslab: error: ...``, exit 2).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab import runs
from reslab.cli import main
from reslab.data import load_dataset

TRAIN = ["train", "--model", "mlp6", "--model-arg", "width=16", "--data", "mnist1d:300", "--epochs", "2",
         "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--device", "cpu", "--quiet"]
DIAGNOSE = ["diagnose", "--what", "responses", "--samples", "50"]


def _plant(path: str) -> None:
    """The 'payload': harmless, but proof that unpickling called something."""
    Path(path).write_text("pwned")


class _Payload:
    """Pickles as a call of ``_plant(marker)``, the way an attacker's object would call ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_plant, (self.marker,))


class _SystemPayload(_Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str, str, str]:
    """``main(argv)``'s exit code, stdout and stderr; an exception escaping ``main`` becomes the code."""
    try:
        code: int | str = main([str(a) for a in argv])
    except Exception as e:  # noqa: BLE001 (a traceback instead of the one-line error)
        code = f"raised {type(e).__name__}: {e}"
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int | str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("reslab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 2-epoch run, copied by the tests that need a run directory."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(TRAIN + ["--out", str(run)]) == 0
    return run


def _killed_copy(trained: Path, dest: Path) -> Path:
    """A copy of the run that looks killed mid-way (so --resume reads its checkpoint)."""
    shutil.copytree(trained, dest)
    runs.write_json(dest / "result.json", {"status": "running", "epoch": 1})
    return dest


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_loads_weights_only_with_expected_contents(trained: Path) -> None:
    ckpt = runs.load_checkpoint(trained / "checkpoint.pt")
    assert set(ckpt) >= {"model", "optimizer", "epoch", "step", "metrics", "rng", "cuda_rng"}
    assert ckpt["epoch"] == 2 and ckpt["rng"].dtype == torch.uint8 and ckpt["cuda_rng"] is None
    assert all(torch.is_tensor(v) for v in ckpt["model"].values())
    assert [m["epoch"] for m in ckpt["metrics"]] == [1, 2]


def _write_payload(path: Path, marker: Path, how: str) -> None:
    evil = {"model": _Payload(marker), "optimizer": {}, "epoch": 1, "step": 1, "metrics": [], "rng": None}
    if how == "torch.save":
        torch.save(evil, path)
    elif how == "os.system":
        torch.save({**evil, "model": _SystemPayload(marker)}, path)
    else:  # a bare pickle, not even a torch file
        with path.open("wb") as f:
            pickle.dump(evil, f, protocol=int(how[-1]))


@pytest.mark.parametrize("how", ["torch.save", "os.system", "pickle2", "pickle4"])
@pytest.mark.parametrize("command", ["resume", "diagnose"])
def test_pickled_callable_refused_never_called(trained, tmp_path, capsys, how, command) -> None:
    run = _killed_copy(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    _write_payload(run / "checkpoint.pt", marker, how)
    argv = ["train", "--out", run, "--resume", "--quiet"] if command == "resume" else DIAGNOSE + [run]
    code, _, err = _cli(argv, capsys)
    assert not marker.exists(), "unpickling ran the payload"
    _one_line_error(code, err, str(run / "checkpoint.pt"))
    if how in ("torch.save", "os.system", "pickle2"):
        assert "refused" in err and "other than tensors and plain data" in err
    assert not (run / "diagnostics").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing_keys", "not_a_dict"])
@pytest.mark.parametrize("command", ["resume", "diagnose"])
def test_damaged_checkpoint_one_line(trained, tmp_path, capsys, damage, command) -> None:
    run = _killed_copy(trained, tmp_path / "run")
    ck = run / "checkpoint.pt"
    blob = ck.read_bytes()
    if damage == "truncated":
        ck.write_bytes(blob[:len(blob) // 2])
    elif damage == "garbage":
        ck.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        ck.write_bytes(b"")
    elif damage == "missing_keys":
        torch.save({"model": torch.load(io.BytesIO(blob), weights_only=True)["model"]}, ck)
    else:
        torch.save([1, 2, 3], ck)
    argv = ["train", "--out", run, "--resume", "--quiet"] if command == "resume" else DIAGNOSE + [run]
    code, _, err = _cli(argv, capsys)
    needle = {"truncated": "truncated or corrupt", "garbage": "truncated or corrupt", "empty": "truncated or corrupt",
              "missing_keys": "lacks 'optimizer'", "not_a_dict": "not a dict"}[damage]
    _one_line_error(code, err, str(ck), needle)


def test_load_checkpoint_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="checkpoint .*nothere.pt is missing"):
        runs.load_checkpoint(tmp_path / "nothere.pt")


def test_train_kill_resume_diagnose_still_work(trained, tmp_path, capsys, monkeypatch) -> None:
    real, calls = runs.save_torch, {"n": 0}

    def dying_save(path, obj):
        real(path, obj)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(runs, "save_torch", dying_save)
    run = tmp_path / "run"
    assert main(TRAIN + ["--out", str(run)]) == 130
    assert runs.read_json(run / "result.json")["status"] == "running"
    code, out, err = _cli(["train", "--out", run, "--resume", "--quiet"], capsys)
    assert code == 0 and "completed: 2 epochs" in out, err
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(runs.read_jsonl(run / "metrics.jsonl")) == strip(runs.read_jsonl(trained / "metrics.jsonl"))
    code, out, err = _cli(DIAGNOSE + [run], capsys)
    assert code == 0 and (run / "diagnostics" / "responses.npz").is_file(), err


# ------------------------------------------------------------------------------------------ CIFAR archives


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the real archives were written by Python 2's cPickle."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def _dump(path: Path, obj: dict, fmt: str) -> None:
    """``py2``: a byte-for-byte imitation of the real files (protocol 2, Python 2 strings, numpy 1's module
    name ``numpy.core.multiarray``); ``pN``: what Python 3 writes at protocol N."""
    if fmt == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        blob = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"_codecs" not in blob and b"numpy._core" not in blob
    else:
        blob = pickle.dumps(obj, protocol=int(fmt[1:]))
    path.write_bytes(blob)


def _fake_cifar10(parent: Path, fmt: str = "py2", per_batch: int = 2) -> tuple[np.ndarray, list[int]]:
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump(root / name, {b"batch_label": f"{name} of 5".encode(), b"labels": labels, b"data": data,
                            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}, fmt)
        if name != "test_batch":
            xs.append(data)
            ys += labels
    _dump(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, fmt)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), ys


@pytest.mark.parametrize("fmt", ["py2", "p2", "p4", "p5"])
def test_cifar_archive_loads(tmp_path, fmt) -> None:
    x, y = _fake_cifar10(tmp_path, fmt)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert np.array_equal(ds.x_train.numpy(), x) and ds.y_train.tolist() == y and ds.x_test.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("fmt", ["py2", "p2", "p4"])
@pytest.mark.parametrize("payload", ["plant", "os.system"])
def test_cifar_malicious_batch_refused(tmp_path, capsys, fmt, payload) -> None:
    _fake_cifar10(tmp_path, fmt)
    marker = tmp_path / "pwned"
    evil = (_Payload if payload == "plant" else _SystemPayload)(marker)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": evil, b"labels": [1]}, protocol=int(fmt[-1])))
    with pytest.raises(ValueError) as err:
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists(), "unpickling ran the payload"
    msg = str(err.value)
    assert str(bad) in msg and "refused" in msg and "\n" not in msg
    out = tmp_path / "run"
    code, _, err_text = _cli(["train", "--model", "resnet8", "--data", f"cifar10:{tmp_path}", "--out", out], capsys)
    _one_line_error(code, err_text, str(bad), "refused")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_batch", "wrong_shape"])
def test_cifar_damaged_batch_one_line(tmp_path, capsys, damage) -> None:
    _fake_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    blob = bad.read_bytes()
    if damage == "truncated":
        bad.write_bytes(blob[:len(blob) // 2])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "not_a_batch":
        bad.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    else:
        bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError) as err:
        load_dataset(f"cifar10:{tmp_path}")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    code, _, err_text = _cli(["train", "--model", "resnet8", "--data", f"cifar10:{tmp_path}", "--out",
                              tmp_path / "run"], capsys)
    _one_line_error(code, err_text, str(bad))
    assert json.dumps(err_text)  # printable


class _CodecPayload:
    """``_codecs.encode`` is allowed only as protocol 2's latin-1 bytes constructor, not with other codecs."""

    def __reduce__(self):
        import codecs

        return (codecs.encode, (b"x" * 10, "zlib_codec"))


def test_cifar_codecs_only_latin1(tmp_path) -> None:
    _fake_cifar10(tmp_path, "p2")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": _CodecPayload(), b"labels": [1]}, protocol=2))
    assert b"_codecs\nencode" in bad.read_bytes()
    with pytest.raises(ValueError, match=r"refused: it holds a pickled _codecs.encode with encoding 'zlib_codec'"):
        load_dataset(f"cifar10:{tmp_path}")


def test_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    from reslab.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    for d, width in ((a, "8"), (b, "16")):
        assert main(["train", "--model", "mlp4", "--model-arg", f"width={width}", "--data", "mnist1d:200",
                     "--epochs", "1", "--out", str(d), "--quiet"]) == 0
    (a / "checkpoint.pt").write_bytes((b / "checkpoint.pt").read_bytes())
    (a / "result.json").write_text('{"status": "running", "epoch": 1}')  # as if killed: resume reads the checkpoint
    capsys.readouterr()
    for argv in (["diagnose", str(a), "--what", "responses", "--samples", "50"],
                 ["train", "--out", str(a), "--resume"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "does not fit the" in err and err.count("\n") == 1, err
