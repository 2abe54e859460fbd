"""Offline datasets: MNIST-1D (generated), scikit-learn digits, and CIFAR-10/100 from a local archive."""

from reslab.data.base import DATASETS, Dataset, list_datasets, load_dataset

__all__ = ["DATASETS", "Dataset", "list_datasets", "load_dataset"]
