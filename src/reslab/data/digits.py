"""scikit-learn's 8x8 digits, which ship inside the package (no download)."""

from __future__ import annotations

import torch

from reslab.data.base import Dataset

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits(arg: str | None = None) -> Dataset:
    """Load the 1797 8x8 digits as ``(N, 1, 8, 8)`` float32 in [0, 1] with a stratified 80/20 split.

    Args:
        arg: Must be ``None``; digits takes no argument.

    Returns:
        The dataset (1437 train / 360 test samples, 10 classes).

    Raises:
        ValueError: If an argument is given.
    """
    if arg is not None:
        raise ValueError(f"dataset 'digits' takes no argument, got 'digits:{arg}'")
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    x = (d.data / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=TEST_FRACTION, stratify=d.target,
                                              random_state=SPLIT_SEED)
    return Dataset(name="digits", x_train=torch.from_numpy(x_tr), y_train=torch.from_numpy(y_tr).long(),
                   x_test=torch.from_numpy(x_te), y_test=torch.from_numpy(y_te).long(), num_classes=10,
                   input_shape=(1, 8, 8))
