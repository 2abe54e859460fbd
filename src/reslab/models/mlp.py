"""Residual / plain / highway MLPs of any depth and width (the quick profile's model on MNIST-1D).

Depth counts weight layers as in the CIFAR ResNets: a linear stem, ``n`` two-layer branches and a linear
classifier, so depth = ``2n + 2`` (``mlp20`` has 9 branches, ``mlp56`` has 27). The scheme decides what the stack
is: ``identity`` (residual MLP), ``plain`` (plain MLP), ``highway``... Norms: BatchNorm (``bn``), LayerNorm
(``ln``) or none. ``mlp`` takes ``placement``, one of He et al. 2016's five units (arXiv 1603.05027, Fig. 4;
:mod:`reslab.models.blocks`), with ``W1``, ``W2`` the branch's linear layers and ``N`` its norms:

- (a) ``original`` (default): ``x_{l+1} = relu(x_l + N(W2 relu(N(W1 x_l))))``
- (b) ``bn_after_add``: ``x_{l+1} = relu(BN(x_l + W2 relu(BN(W1 x_l))))`` (needs ``norm="bn"``: refused otherwise)
- (c) ``relu_before_add``: ``x_{l+1} = x_l + relu(N(W2 relu(N(W1 x_l))))``
- (d) ``relu_only_preact``: ``x_{l+1} = x_l + N(W2 relu(N(W1 relu(x_l))))``
- (e) ``full_preact``: ``x_{l+1} = x_l + W2 relu(N(W1 relu(N(x_l))))`` (``preact_mlp``)

The ReLU (a) and BN-ReLU (b) after the addition are the scheme's ``post`` op. (a), (b), (c) have the stem
``x_0 = relu(N(W_0 x))`` and the head ``fc(x_L)``; (d), (e) the stem ``x_0 = W_0 x`` and the head
``fc(relu(N(x_L)))``. Linear layers have a bias only where no norm follows them (all of them with ``norm="none"``,
and ``W2`` of (e)).
"""

from __future__ import annotations

import math

from torch import nn

from reslab.branch import BranchSpec
from reslab.models.base import FamilyParts, init_weights, register_family
from reslab.models.blocks import PREACT, TwoLayerBranch, check_placement, make_norm, post_op


#: ``reslab train``'s defaults: Adam with a cosine decay on 16,000 MNIST-1D training samples (at the
#: package's default 4,000 a deep MLP overfits: mlp20 ends near 55% test error)
MLP_RECIPE = dict(data="mnist1d:20000", optimizer="adam", lr=1e-3, schedule="cosine", epochs=10, batch_size=128)


def _check_depth(d: int) -> bool:
    return d >= 4 and d % 2 == 0


def _build(depth: int, num_classes: int, input_shape: tuple[int, ...], placement: str, width: int = 128,
           norm: str = "bn") -> FamilyParts:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    check_placement(placement, norm)
    preact = placement in PREACT
    n = (depth - 2) // 2
    d_in = math.prod(input_shape)
    bias = norm == "none"
    stem_layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d_in, width, bias=bias)]
    if not preact:
        stem_layers += [make_norm(norm, width, "features"), nn.ReLU()]
    branches: list[nn.Module] = [
        TwoLayerBranch(nn.Linear(width, width, bias=bias),
                       nn.Linear(width, width, bias=bias or placement == "full_preact"),
                       make_norm(norm, width, "features"),
                       None if placement == "bn_after_add" else make_norm(norm, width, "features"), placement)
        for _ in range(n)]
    specs = [BranchSpec(width, width, 1, "features") for _ in range(n)]
    fc = nn.Linear(width, num_classes)
    head = nn.Sequential(make_norm(norm, width, "features"), nn.ReLU(), fc) if preact else fc
    stem = nn.Sequential(*stem_layers)
    for m in (stem, *branches, head):
        init_weights(m, skip=(fc,))
    return FamilyParts(stem, branches, specs, head, post=post_op(placement))


@register_family("mlp", depths=(8, 20, 56), depth_rule="even and >= 4 (2 layers per branch + stem + head)",
                 check_depth=_check_depth, default_input_shape=(40,),
                 paper="He et al. 2015 (degradation); Srivastava et al. 2015 (highway MLPs)",
                 description="MLP, post-activation two-layer branches (options: width, norm=bn|ln|none, placement)",
                 recipe=MLP_RECIPE)
def mlp(depth: int, num_classes: int, input_shape: tuple[int, ...], width: int = 128,
        norm: str = "bn", placement: str = "original") -> FamilyParts:
    return _build(depth, num_classes, input_shape, placement, width=width, norm=norm)


@register_family("preact_mlp", depths=(8, 20, 56), depth_rule="even and >= 4 (2 layers per branch + stem + head)",
                 check_depth=_check_depth, default_input_shape=(40,),
                 paper="He et al. 2016, arXiv 1603.05027 (pre-activation order)",
                 description="MLP, pre-activation two-layer branches (options: width, norm=bn|ln|none)",
                 recipe=MLP_RECIPE)
def preact_mlp(depth: int, num_classes: int, input_shape: tuple[int, ...], width: int = 128,
               norm: str = "bn") -> FamilyParts:
    return _build(depth, num_classes, input_shape, "full_preact", width=width, norm=norm)
