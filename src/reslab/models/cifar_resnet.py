"""CIFAR ResNets (He et al. 2015, arXiv 1512.03385, section 4.2) in He et al. 2016's activation placements.

Depth ``6n + 2``: a 3x3 stem conv with ``width`` (16) channels, three stages of ``n`` two-layer 3x3 branches
at ``width``, ``2 width``, ``4 width`` channels (the first branch of stages 2 and 3 has stride 2), global
average pooling and a linear classifier. With shortcut A the parameter counts of Table 6 follow
(ResNet-20/32/44/56/110: 0.27M/0.46M/0.66M/0.85M/1.7M) and equal those of the plain twins.

``resnet`` takes ``placement``, one of He et al. 2016's five units (arXiv 1603.05027, Fig. 4, Table 2;
:mod:`reslab.models.blocks`), with ``x`` the stream and ``conv`` the 3x3 layers:

- (a) ``original`` (default): ``x_{l+1} = relu(x_l + BN(conv(relu(BN(conv(x_l))))))``
- (b) ``bn_after_add``: ``x_{l+1} = relu(BN(x_l + conv(relu(BN(conv(x_l))))))``
- (c) ``relu_before_add``: ``x_{l+1} = x_l + relu(BN(conv(relu(BN(conv(x_l))))))``
- (d) ``relu_only_preact``: ``x_{l+1} = x_l + BN(conv(relu(BN(conv(relu(x_l))))))``
- (e) ``full_preact``: ``x_{l+1} = x_l + conv(relu(BN(conv(relu(BN(x_l))))))``

What follows the addition is the scheme's ``post`` op (the ReLU of (a), the BN-ReLU of (b)), so the plain twin is
``post(F(x))``. Stem and head: (a), (b), (c) use the post-activation stem ``x_0 = relu(BN(conv(image)))`` and head
``fc(pool(x_L))``; (d) and (e), whose stream is never activated after an addition, the pre-activation stem
``x_0 = conv(image)`` and head ``fc(pool(relu(BN(x_L))))``. ``preact_resnet`` is the family with (e) fixed.
Parameters: (a), (b), (c), (e) have the same count, He et al.'s ((b) keeps each branch's last BN in the scheme,
after the addition; (e)'s norms read the stage's input width, and its head BN makes up for that and the stem's BN);
(d) has ``6 width`` more (96 at width 16: its head BN, less the stem's). Departure: the shortcut of a shape-changing
pre-activation block reads the stream ``x_l`` rather than the pre-activated ``relu(BN(x_l))``, so that the skip path
is exactly the stream for every scheme.
"""

from __future__ import annotations

from torch import nn

from reslab.branch import BranchSpec
from reslab.models.base import FamilyParts, init_weights, register_family
from reslab.models.blocks import PREACT, TwoLayerBranch, check_placement, make_norm, post_op

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


#: ``reslab train``'s defaults: He et al.'s CIFAR recipe (SGD 0.1, momentum 0.9, weight decay 1e-4, rate / 10
#: at 50% and 75% of training) on the images that ship offline (scikit-learn digits); CIFAR with --data cifar10
RESNET_RECIPE = dict(data="digits", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                     milestones=[0.5, 0.75], epochs=30, batch_size=128)


def _check_depth(d: int) -> bool:
    return d >= 8 and (d - 2) % 6 == 0


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _build(depth: int, num_classes: int, input_shape: tuple[int, ...], placement: str, width: int = 16,
           norm: str = "bn") -> FamilyParts:
    if len(input_shape) != 3:
        raise ValueError(f"CIFAR ResNets need image input (C, H, W); got input shape {input_shape}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    check_placement(placement, norm)
    preact, full = placement in PREACT, placement == "full_preact"
    n = (depth - 2) // 6
    cin = input_shape[0]
    widths = (width, 2 * width, 4 * width)
    stem: nn.Module = _conv3(cin, width) if preact else nn.Sequential(
        _conv3(cin, width), make_norm(norm, width, "conv"), nn.ReLU())
    branches: list[nn.Module] = []
    specs: list[BranchSpec] = []
    c = width
    for stage, w in enumerate(widths):
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            spec = BranchSpec(c, w, stride, "conv")
            norm2 = None if placement == "bn_after_add" else make_norm(norm, w, "conv")
            branches.append(TwoLayerBranch(_conv3(c, w, stride), _conv3(w, w),
                                           make_norm(norm, c if full else w, "conv"), norm2, placement))
            specs.append(spec)
            c = w
    fc = nn.Linear(c, num_classes)
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc]
    head = nn.Sequential(make_norm(norm, c, "conv"), nn.ReLU(), *pool) if preact else nn.Sequential(*pool)
    parts = FamilyParts(stem, branches, specs, head, post=post_op(placement))
    for m in (stem, *branches, head):
        init_weights(m, skip=(fc,))
    return parts


@register_family("resnet", depths=CIFAR_DEPTHS, depth_rule="6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110)",
                 check_depth=_check_depth, default_input_shape=(3, 32, 32),
                 paper="He et al. 2015, arXiv 1512.03385",
                 description="CIFAR ResNet, post-activation basic blocks (options: width, norm, placement)",
                 recipe=RESNET_RECIPE)
def resnet(depth: int, num_classes: int, input_shape: tuple[int, ...], width: int = 16,
           norm: str = "bn", placement: str = "original") -> FamilyParts:
    return _build(depth, num_classes, input_shape, placement, width=width, norm=norm)


@register_family("preact_resnet", depths=CIFAR_DEPTHS[:5],
                 depth_rule="6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110)",
                 check_depth=_check_depth, default_input_shape=(3, 32, 32),
                 paper="He et al. 2016, arXiv 1603.05027",
                 description="CIFAR ResNet, full pre-activation basic blocks (options: width, norm)",
                 recipe=RESNET_RECIPE)
def preact_resnet(depth: int, num_classes: int, input_shape: tuple[int, ...], width: int = 16,
                  norm: str = "bn") -> FamilyParts:
    return _build(depth, num_classes, input_shape, "full_preact", width=width, norm=norm)
