"""The conv claims' ``full`` profile on CIFAR-10: with a local archive present (files this test writes), the runs
switch to CIFAR-10 at He et al.'s depth (ResNet-110) and schedule (164 epochs), the claims still share their runs,
and a planned config trains on the archive; without one, ``full`` stays on digits."""

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from reslab.experiments import ensemble, preactivation, shortcuts
from reslab.experiments.base import CIFAR_EPOCHS, cifar_present
from reslab.train import train

PER_BATCH = 26  # 5 x 26 = 130 training images: one full batch of 128


def _write_cifar10(parent: Path) -> None:
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{b}", PER_BATCH) for b in range(1, 6)), ("test_batch", 20)]:
        with (root / name).open("wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, f, protocol=2)


@pytest.fixture
def archive(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "data")
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def _conv_plans(profile):
    return {**ensemble.conv_runs(profile), **shortcuts.plan(profile), **preactivation.plan(profile)}


def test_without_an_archive_full_stays_on_digits():
    assert not cifar_present()
    assert {c.data for c in _conv_plans("full").values()} == {"digits"}


def test_with_an_archive_full_trains_resnet110_on_cifar10(archive):
    assert cifar_present()
    plans = _conv_plans("full")
    assert {c.data for c in plans.values()} == {"cifar10"}
    assert {c.model for c in plans.values()} == {"resnet56", "resnet110"}  # preactivation's two depths
    assert {c.epochs for c in plans.values()} == {CIFAR_EPOCHS}
    # He et al.'s optimiser and steps: SGD 0.1, momentum 0.9, wd 1e-4, / 10 at 50% and 75% (32k and 48k of 64k)
    cfg = plans["conv-residual-d110-s0"]
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.milestones) == ("sgd", 0.1, 0.9, 1e-4,
                                                                                       [0.5, 0.75])
    ens, sc, pre = ensemble.conv_runs("full"), shortcuts.plan("full"), preactivation.plan("full")
    residual = {r for r in ens if r.startswith("conv-residual-")}
    assert residual <= set(sc) & set(pre)  # the original ResNet-110 is trained once, for all three claims
    assert all(ens[r] == sc[r] == pre[r] for r in residual)
    # the quick profile never changes with an archive present
    assert {c.data for c in _conv_plans("quick").values()} == {"digits"}


def test_a_planned_cifar_config_trains_on_the_archive(archive, tmp_path):
    cfg = replace(ensemble.conv_runs("full")["conv-residual-d110-s0"], model="resnet8", model_kwargs={"width": 4},
                  epochs=1)
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result.status == "completed" and result.final["step"] == 2  # 130 images, batch 128
    assert 0.0 <= result.final["test_error"] <= 1.0
