"""Residual / plain / highway MLPs of any depth and width (the quick profile's model on MNIST-1D).

Depth counts weight layers as in the CIFAR ResNets: a linear stem, ``n`` two-layer branches and a linear
classifier, so depth = ``2n + 2`` (``mlp20`` has 9 branches, ``mlp56`` has 27). Branches are
``norm(W2 relu(norm(W1 x)))`` with the ReLU after the combination (``mlp``, post-activation), or
``W2 relu(norm(W1 relu(norm(x))))`` (``preact_mlp``) with a final norm-ReLU before the classifier. The
scheme decides what the stack is: ``identity`` (residual MLP), ``plain`` (plain MLP), ``highway``...
Norms: BatchNorm (``bn``), LayerNorm (``ln``) or none.
"""

from __future__ import annotations

import math

from torch import nn

from reslab.branch import BranchSpec
from reslab.models.base import FamilyParts, init_weights, register_family
from reslab.models.blocks import TwoLayerBranch, make_norm


#: ``reslab train``'s defaults: Adam with a cosine decay on 16,000 MNIST-1D training samples (at the
#: package's default 4,000 a deep MLP overfits: mlp20 ends near 55% test error)
MLP_RECIPE = dict(data="mnist1d:20000", optimizer="adam", lr=1e-3, schedule="cosine", epochs=10, batch_size=128)


def _check_depth(d: int) -> bool:
    return d >= 4 and d % 2 == 0


def _build(depth: int, num_classes: int, input_shape: tuple[int, ...], preact: bool, width: int = 128,
           norm: str = "bn") -> FamilyParts:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    n = (depth - 2) // 2
    d_in = math.prod(input_shape)
    bias = norm == "none"
    stem_layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d_in, width, bias=bias)]
    if not preact:
        stem_layers += [make_norm(norm, width, "features"), nn.ReLU()]
    branches: list[nn.Module] = [
        TwoLayerBranch(nn.Linear(width, width, bias=bias), nn.Linear(width, width, bias=bias or preact),
                       make_norm(norm, width, "features"), make_norm(norm, width, "features"), preact)
        for _ in range(n)]
    specs = [BranchSpec(width, width, 1, "features") for _ in range(n)]
    fc = nn.Linear(width, num_classes)
    head = nn.Sequential(make_norm(norm, width, "features"), nn.ReLU(), fc) if preact else fc
    stem = nn.Sequential(*stem_layers)
    for m in (stem, *branches, head):
        init_weights(m, skip=(fc,))
    return FamilyParts(stem, branches, specs, head, post=None if preact else "relu")


@register_family("mlp", depths=(8, 20, 56), depth_rule="even and >= 4 (2 layers per branch + stem + head)",
                 check_depth=_check_depth, default_input_shape=(40,),
                 paper="He et al. 2015 (degradation); Srivastava et al. 2015 (highway MLPs)",
                 description="MLP, post-activation two-layer branches (options: width, norm=bn|ln|none)",
                 recipe=MLP_RECIPE)
def mlp(depth: int, num_classes: int, input_shape: tuple[int, ...], width: int = 128,
        norm: str = "bn") -> FamilyParts:
    return _build(depth, num_classes, input_shape, preact=False, width=width, norm=norm)


@register_family("preact_mlp", depths=(8, 20, 56), depth_rule="even and >= 4 (2 layers per branch + stem + head)",
                 check_depth=_check_depth, default_input_shape=(40,),
                 paper="He et al. 2016, arXiv 1603.05027 (pre-activation order)",
                 description="MLP, pre-activation two-layer branches (options: width, norm=bn|ln|none)",
                 recipe=MLP_RECIPE)
def preact_mlp(depth: int, num_classes: int, input_shape: tuple[int, ...], width: int = 128,
               norm: str = "bn") -> FamilyParts:
    return _build(depth, num_classes, input_shape, preact=True, width=width, norm=norm)
