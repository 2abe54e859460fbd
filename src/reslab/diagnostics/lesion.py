"""Lesions: delete one block, delete k random blocks, reorder blocks (Veit et al. 2016, section 4;
REFERENCE.md section 3).

Every lesion goes through the trunk (``set_lesion`` / ``set_order``), so "delete block i" is the scheme's own
skip path: ``y_i = shortcut(y_{i-1})`` for additive schemes, the unchanged input for a plain net (that layer
removed), the carry path for gated schemes, zero features for DenseNet's concatenation. Which blocks can be deleted
is the scheme's to say (``scheme.deletable``: DenseNet's transitions cannot). The trunk is restored afterwards.
Errors are measured in eval mode.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from reslab.diagnostics.common import error_rate
from reslab.diagnostics.recorder import trunk_of


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    trunk = trunk_of(model)
    lesioned, order = trunk.lesioned, trunk.order
    try:
        yield
    finally:
        trunk.lesioned, trunk.order = lesioned, order


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall rank correlation between ``order`` and the identity order (1: unchanged, -1: reversed)."""
    a = np.asarray(order)
    n = len(a)
    if n < 2:
        return 1.0
    sign = np.sign(a[None, :] - a[:, None])[np.triu_indices(n, 1)]
    return float(sign.sum() / (n * (n - 1) / 2))


@dataclass
class LesionResult:
    baseline: float
    single: np.ndarray                   # error with block i deleted (NaN where the scheme cannot delete it)
    ks: np.ndarray                       # numbers of deleted blocks
    k_errors: np.ndarray                 # (len(ks), draws)
    taus: np.ndarray                     # Kendall tau of each reordering
    reorder_errors: np.ndarray           # error of each reordering


def lesion_single(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """Error with each single block deleted (NaN for a block the scheme cannot delete: a DenseNet transition)."""
    trunk = trunk_of(model)
    can = set(trunk.scheme.deletable())
    out = []
    with _restored(model):
        for i in range(len(trunk)):
            if i not in can:
                out.append(float("nan"))
                continue
            trunk.set_lesion([i])
            out.append(error_rate(model, x, y))
    return np.asarray(out)


def deletable(model: nn.Module, keep_shape_changes: bool = True) -> list[int]:
    """Blocks a random lesion may pick: all that the scheme can delete, or all but the shape-changing ones (Veit et
    al. keep those)."""
    return trunk_of(model).scheme.deletable(keep_shape_changes)


def lesion_random(model: nn.Module, x: Tensor, y: Tensor, ks: Sequence[int], draws: int,
                  generator: torch.Generator) -> np.ndarray:
    """Error with ``k`` random blocks deleted, ``draws`` times per ``k``: array ``(len(ks), draws)``."""
    trunk, pool = trunk_of(model), deletable(model)
    out = np.zeros((len(ks), draws))
    with _restored(model):
        for a, k in enumerate(ks):
            if not 0 <= k <= len(pool):
                raise ValueError(f"cannot delete {k} of {len(pool)} deletable blocks")
            for d in range(draws):
                pick = torch.randperm(len(pool), generator=generator)[:k].tolist()
                trunk.set_lesion([pool[j] for j in pick])
                out[a, d] = error_rate(model, x, y)
    return out


def random_swaps(model: nn.Module, swaps: int, generator: torch.Generator) -> list[int]:
    """An order made by ``swaps`` random swaps of blocks with identical shapes (so every order is valid)."""
    specs = trunk_of(model).scheme.specs
    order = list(range(len(specs)))
    groups = [[i for i in range(len(specs)) if specs[i] == s] for s in dict.fromkeys(specs)]
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return order
    for _ in range(swaps):
        g = groups[int(torch.randint(len(groups), (1,), generator=generator))]
        a, b = torch.randperm(len(g), generator=generator)[:2].tolist()
        pa, pb = order.index(g[a]), order.index(g[b])
        order[pa], order[pb] = order[pb], order[pa]
    return order


def lesion_reorder(model: nn.Module, x: Tensor, y: Tensor, swaps: Sequence[int], draws: int,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Error after random reorderings with the given numbers of swaps: ``(kendall taus, errors)``; empty where the
    scheme has no reordering (``capabilities.reorder``: concatenation)."""
    trunk = trunk_of(model)
    taus, errs = [], []
    if not trunk.scheme.capabilities.reorder:
        return np.asarray(taus), np.asarray(errs)
    with _restored(model):
        for s in swaps:
            for _ in range(draws):
                order = random_swaps(model, s, generator)
                trunk.set_order(order)
                taus.append(kendall_tau(order))
                errs.append(error_rate(model, x, y))
    return np.asarray(taus), np.asarray(errs)


def lesion_study(model: nn.Module, x: Tensor, y: Tensor, ks: Sequence[int], swaps: Sequence[int], draws: int,
                 seed: int = 0) -> LesionResult:
    """All three lesions on one model."""
    g = torch.Generator().manual_seed(seed)
    taus, rerr = lesion_reorder(model, x, y, swaps, draws, g)
    return LesionResult(error_rate(model, x, y), lesion_single(model, x, y), np.asarray(ks),
                        lesion_random(model, x, y, ks, draws, g), taus, rerr)
