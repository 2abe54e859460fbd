"""CIFAR-10/100 read from a local copy of the standard python pickle archive (they cannot be downloaded here).

Images stay uint8 ``(N, 3, 32, 32)`` in memory; :meth:`CifarDataset.prepare` scales, normalises with the
per-channel train mean/std and, for training, applies the usual pad-4 random crop and horizontal flip.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reslab.data.base import Dataset

PAD = 4
_ARCHIVES = {  # name -> (folder, train files, test file, label key, classes, display name)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10,
                "CIFAR-10"),
    "cifar100": ("cifar-100-python", ("train",), "test", b"fine_labels", 100, "CIFAR-100"),
}


@dataclass(eq=False)
class CifarDataset(Dataset):
    """A CIFAR dataset with uint8 storage, normalisation and standard augmentation.

    Attributes:
        mean: Per-channel mean of the training images in [0, 1], shape ``(3,)``.
        std: Per-channel standard deviation of the training images in [0, 1], shape ``(3,)``.
    """

    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(3))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(3))

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scale uint8 images to [0, 1], augment if ``train`` and normalise per channel.

        Augmentation pads the raw image with 4 zero (black) pixels on each side, takes a random 32x32 crop and
        flips it horizontally with probability 1/2, as torchvision's ``RandomCrop(32, padding=4)`` and
        ``RandomHorizontalFlip`` do before ``Normalize``. Draws, in order: crop offsets ``(B, 2)`` (row, col)
        in ``[0, 8]``, then flip flags ``(B,)``, all from ``generator`` on the CPU.

        Args:
            x: uint8 batch ``(B, 3, 32, 32)``.
            train: Apply augmentation when true.
            generator: CPU generator for the random draws; ``None`` uses torch's global RNG.

        Returns:
            Float32 batch ``(B, 3, 32, 32)``.
        """
        if train:
            x = augment(x, generator)
        x = x.float() / 255.0
        mean, std = self.mean.to(x.device).view(1, -1, 1, 1), self.std.to(x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = PAD) -> torch.Tensor:
    """Zero-pad by ``pad``, random-crop back to the input size and random-flip horizontally, vectorised.

    Args:
        x: Batch ``(B, C, H, W)``.
        generator: CPU generator for the offsets and flips.
        pad: Padding on each side.

    Returns:
        The augmented batch, same shape and dtype as ``x``.
    """
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).to(x.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class _Refused(pickle.UnpicklingError):
    """A global outside the CIFAR format's allow-list."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it from Python 3 to store bytes: latin-1 of a str only."""
    if not (isinstance(text, str) and isinstance(encoding, str) and errors == "strict"
            and encoding.lower().replace("-", "").replace("_", "") == "latin1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _archive_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR archive pickle may name: what numpy arrays and (from Python 3) bytes pickle as.

    The real archives were pickled by Python 2 with protocol 2: a dict of str (read as bytes), lists of ints and
    one uint8 array, so they need only ``_reconstruct``, ``ndarray`` and ``dtype`` (under numpy 1's module name;
    numpy 2 writes ``numpy._core``). Copies rewritten from Python 3 at protocol 2 store bytes as
    ``_codecs.encode(str, "latin1")``, and protocol 5 stores arrays as ``numeric._frombuffer``.
    """
    import numpy

    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    # Python functions go out as fresh wrappers, so a BUILD opcode aimed at one cannot alter the real function
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): numpy.ndarray, ("numpy", "dtype"): numpy.dtype,
                                           ("_codecs", "encode"): lambda *a: _latin1_encode(*a)}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # built-in: no attributes to set
        allowed[(f"{core}.numeric", "_frombuffer")] = lambda *a: numeric._frombuffer(*a)
    return allowed


class _ArchiveUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, numbers, strings, bytes and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _archive_globals().get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def _unpickle(path: Path, keys: tuple[bytes, ...] = ()) -> dict[bytes, Any]:
    """Read one archive pickle (bytes keys) with an unpickler that builds only what the format holds.

    Raises:
        ValueError: one line naming the file, if it is missing, truncated or corrupt, refers to any global other
            than numpy's array constructors (a class or a callable such as ``os.system``, which is never called),
            or is not a dict with ``keys``.
    """
    if not path.is_file():
        raise ValueError(f"CIFAR archive file {path} is missing")
    try:
        with path.open("rb") as f:
            obj = _ArchiveUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise ValueError(f"CIFAR archive file {path} refused: it holds a pickled {e} (only dicts, lists, strings, "
                         "bytes and numpy arrays are read)") from None
    except PermissionError as e:
        raise ValueError(f"CIFAR archive file {path} cannot be read: {e.strerror or e}") from None
    except Exception:  # noqa: BLE001 (UnpicklingError, EOFError, ValueError, ... from damaged bytes)
        raise ValueError(f"CIFAR archive file {path} is not a readable python archive pickle (truncated or "
                         "corrupt)") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        want = ", ".join(repr(k) for k in keys)
        raise ValueError(f"CIFAR archive file {path} is not a CIFAR batch: expected a dict with keys {want}")
    return obj


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and std of uint8 images in [0, 1] scale, from per-channel value histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]).double()
    n = hist.sum(dim=1)
    mean = (hist * values).sum(dim=1) / n
    var = (hist * (values - mean[:, None]) ** 2).sum(dim=1) / n
    return mean.float(), var.sqrt().float()


def resolve_dir(name: str, arg: str | None) -> Path:
    """Find the archive folder: ``arg`` is the folder itself or its parent; default parent ``$RESLAB_DATA`` or ./data.

    Raises:
        ValueError: If no archive folder is found; the message names the exact expected path.
    """
    folder, train_files, _, _, _, display = _ARCHIVES[name]
    base = Path(arg or os.environ.get("RESLAB_DATA") or "data").expanduser().resolve()
    for cand in (base / folder, base):
        if (cand / train_files[0]).is_file():
            return cand
    expected = base if base.name == folder else base / folder
    raise ValueError(f"{display} not found: expected the python archive folder at {expected} (it cannot be "
                     f"downloaded here; copy '{folder}' there, pass '{name}:DIR' or set RESLAB_DATA)")


def load_cifar(name: str, arg: str | None) -> CifarDataset:
    """Read CIFAR-10 or CIFAR-100 from its local archive.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        arg: Archive folder or its parent, or ``None`` for ``$RESLAB_DATA`` / ``./data``.

    Returns:
        The dataset with uint8 ``(N, 3, 32, 32)`` images and int64 labels.

    Raises:
        ValueError: If the folder or a file in it is missing.
    """
    _, train_files, test_file, label_key, classes, _ = _ARCHIVES[name]
    root = resolve_dir(name, arg)

    def read(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_unpickle(root / f, (b"data", label_key)) for f in files]
        for f, p in zip(files, parts):
            d = p[b"data"]
            if not (isinstance(d, np.ndarray) and d.ndim == 2 and d.shape[1] == 3072 and d.dtype == np.uint8
                    and isinstance(p[label_key], list) and len(p[label_key]) == len(d)
                    and all(type(v) is int for v in p[label_key])):
                raise ValueError(f"CIFAR archive file {root / f} is not a CIFAR batch: expected uint8 data of shape "
                                 "(N, 3072) and a list of N labels")
        data = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)

    x_tr, y_tr = read(train_files)
    x_te, y_te = read((test_file,))
    mean, std = _channel_stats(x_tr)
    return CifarDataset(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=classes,
                        input_shape=(3, 32, 32), mean=mean, std=std)


def load_cifar10(arg: str | None = None) -> CifarDataset:
    """Load CIFAR-10 (see :func:`load_cifar`)."""
    return load_cifar("cifar10", arg)


def load_cifar100(arg: str | None = None) -> CifarDataset:
    """Load CIFAR-100 with fine labels (see :func:`load_cifar`)."""
    return load_cifar("cifar100", arg)
