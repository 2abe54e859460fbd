"""MNIST-1D, generated offline with the ``mnist1d`` package's generator (never its downloader), cached on disk.

The cache lives in ``$RESLAB_CACHE`` or ``~/.cache/reslab`` as ``mnist1d-n{N}-seed42.npz`` with a JSON sidecar
holding its sha256. Both are written atomically; a file whose checksum does not match is regenerated, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from reslab.data.base import Dataset, parse_int_arg
from reslab.runs import write_bytes

DEFAULT_SAMPLES = 5000
SEED = 42
_ARRAYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> Path:
    """Return the cache directory: ``$RESLAB_CACHE`` or ``~/.cache/reslab``."""
    return Path(os.environ.get("RESLAB_CACHE") or Path.home() / ".cache" / "reslab").expanduser()


def cache_paths(num_samples: int) -> tuple[Path, Path]:
    """Return ``(npz_path, checksum_sidecar_path)`` for ``num_samples``."""
    stem = f"mnist1d-n{num_samples}-seed{SEED}"
    return cache_dir() / f"{stem}.npz", cache_dir() / f"{stem}.json"


def _generate(num_samples: int) -> dict[str, np.ndarray]:
    """Run the mnist1d generator, restoring numpy's and python's global RNG states afterwards."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, SEED
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32), "y_test": d["y_test"].astype(np.int64)}


def _read_cache(num_samples: int) -> dict[str, np.ndarray] | None:
    """Return the cached arrays if present and their checksum matches, else ``None`` (warning if corrupt)."""
    npz, sidecar = cache_paths(num_samples)
    if not npz.exists() and not sidecar.exists():
        return None
    try:
        expected = json.loads(sidecar.read_text())["sha256"]
        blob = npz.read_bytes()
        if hashlib.sha256(blob).hexdigest() != expected:
            raise ValueError("sha256 mismatch")
        with np.load(io.BytesIO(blob)) as f:
            return {k: f[k] for k in _ARRAYS}
    except (OSError, ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
        warnings.warn(f"MNIST-1D cache {npz} is invalid ({e}); regenerating", RuntimeWarning, stacklevel=3)
        return None


def _write_cache(num_samples: int, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays and their checksum sidecar; a failure only warns (the data are still returned)."""
    npz, sidecar = cache_paths(num_samples)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = buf.getvalue()
    meta = {"sha256": hashlib.sha256(blob).hexdigest(), "num_samples": num_samples, "seed": SEED}
    try:
        write_bytes(npz, blob)
        write_bytes(sidecar, json.dumps(meta).encode())
    except OSError as e:
        warnings.warn(f"could not write MNIST-1D cache to {npz}: {e}", RuntimeWarning, stacklevel=3)


def load_mnist1d(arg: str | None = None) -> Dataset:
    """Load MNIST-1D with ``N`` samples (default 5000), split 80/20, seed 42.

    The generator makes ``N // 10`` samples per class, so ``N`` not divisible by 10 is rounded down.

    Args:
        arg: ``N`` as a string, or ``None`` for the default.

    Returns:
        The dataset: float32 ``(n, 40)`` inputs, int64 labels, 10 classes.

    Raises:
        ValueError: If ``N`` is not an integer >= 10.
    """
    n = parse_int_arg(arg, DEFAULT_SAMPLES, 10, "mnist1d:N needs an integer N >= 10 (at least one sample per class)")
    arrays = _read_cache(n)
    if arrays is None:
        arrays = _generate(n)
        _write_cache(n, arrays)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return Dataset(name="mnist1d", x_train=t["x"].float(), y_train=t["y"].long(), x_test=t["x_test"].float(),
                   y_test=t["y_test"].long(), num_classes=10, input_shape=(int(t["x"].shape[1]),))
