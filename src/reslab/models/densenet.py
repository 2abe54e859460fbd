"""CIFAR DenseNets (Huang et al. 2017, arXiv 1608.06993, sections 3-4 and Table 2; REFERENCE.md section 5).

Dense connectivity, run by the ``concat`` scheme (:mod:`reslab.residuals.concat`): inside a dense block of ``n``
layers with growth rate ``k``::

    x_l = H_l([x_0, x_1, ..., x_{l-1}])            ([...]: concatenation on channels, l = 1..n)

A 3x3 stem conv (16 channels; ``2k`` for BC) makes the first block's ``x_0``; three dense blocks follow, with a
transition between consecutive ones, ``T(x) = avgpool_2x2(conv_1x1(relu(BN(x))))`` on the block's concatenation
(``c`` channels in, ``floor(theta c)`` out: compression ``theta``, 1 without), whose output is the next block's
``x_0``; the head is ``fc(pool(relu(BN([x_0, ..., x_n]))))`` on the last block's concatenation.

- ``densenet`` (basic layers, no compression): ``H(x) = conv_3x3(relu(BN(x)))`` to ``k`` channels; depth
  ``L = 3n + 4``. DenseNet (L=40, k=12): 1.0M parameters (Table 2).
- ``densenet_bc`` (bottleneck layers, compression 0.5): ``H(x) = conv_3x3(relu(BN(conv_1x1(relu(BN(x))))))``, the
  1x1 conv to ``4k`` channels; depth ``L = 6n + 4``. DenseNet-BC (L=100, k=12): 0.8M parameters.

Each layer and transition starts with BN-ReLU-conv on the concatenation. With ``memory_efficient=True`` (Pleiss et
al. 2017, arXiv 1707.06990; torchvision's ``memory_efficient``) that part, concatenation included, runs in a
checkpoint whose inputs are the separate feature maps: nothing of the concatenation's size is kept for backward
(memory linear in depth, not quadratic) and it is recomputed in backward (without moving BatchNorm's running
statistics a second time). Outputs and gradients are those of the naive mode.

The family works only with ``concat`` (its default): its branches read a concatenation that grows with depth, so
an additive scheme, and the plain twin, do not apply. Init: He-normal (fan-out) convs, BatchNorm weight 1 and bias
0, the classifier's bias 0 (its weight keeps PyTorch's default). Departure: no dropout (the paper uses 0.2 after
each conv only without data augmentation).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from reslab.branch import BranchSpec, Sources
from reslab.models.base import FamilyParts, init_weights, register_family

#: ``reslab train``'s defaults: Huang et al.'s CIFAR recipe (SGD 0.1 with Nesterov momentum 0.9, weight decay 1e-4,
#: batch 64, rate / 10 at 50% and 75% of training; 300 epochs on CIFAR) on the images that ship offline
#: (scikit-learn digits) for 30 epochs; CIFAR with --data cifar10
DENSENET_RECIPE = dict(residual="concat", data="digits", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                       weight_decay=1e-4, schedule="step", milestones=[0.5, 0.75], epochs=30, batch_size=64)


class _StatsKept:
    """Runs a recomputation without moving ``norm``'s running statistics (the forward pass already did); reusable,
    since a graph kept for a second backward recomputes once per backward."""

    def __init__(self, norm: nn.Module) -> None:
        self.norm, self.saved = norm, []

    def __enter__(self) -> None:
        self.saved = [b.clone() for b in self.norm.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, s in zip(self.norm.buffers(), self.saved):
                b.copy_(s)
        self.saved = []


class _ReadsConcatenation(nn.Module):
    """``conv(relu(BN([x_0, ..., x_{l-1}])))``: how a dense layer and a transition begin.

    Reads a tensor or :class:`~reslab.branch.Sources`. With ``memory_efficient`` (and a gradient to compute) the
    concatenation, BN, ReLU and conv run in a non-reentrant checkpoint on the separate sources: recomputed in
    backward, nothing of the concatenation's size is kept.
    """

    def __init__(self, cin: int, cout: int, kernel: int, memory_efficient: bool) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.memory_efficient = memory_efficient

    def _first(self, *xs: Tensor) -> Tensor:
        x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
        return self.conv1(F.relu(self.norm1(x)))

    def first(self, h: Tensor | Sources) -> Tensor:
        """``conv(relu(BN(h)))``, ``h`` joined first where it is :class:`~reslab.branch.Sources`."""
        if isinstance(h, Tensor):
            return self._first(h)
        if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in h):
            return checkpoint(self._first, *h, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _StatsKept(self.norm1)))
        return self._first(h.joined())

    def zero_init_last_(self) -> None:
        raise ValueError("zero_init_last has no meaning for a DenseNet: its layers are not added to a stream "
                         "(a zero layer only adds zero features)")


class DenseLayer(_ReadsConcatenation):
    """``H(x) = conv_3x3(relu(BN(x)))`` to ``growth`` channels, or with ``bottleneck``
    ``H(x) = conv_3x3(relu(BN(conv_1x1(relu(BN(x))))))`` with the 1x1 conv to ``4 growth`` channels;
    ``x = [x_0, ..., x_{l-1}]``."""

    def __init__(self, cin: int, growth: int, bottleneck: bool, memory_efficient: bool = False) -> None:
        width = 4 * growth if bottleneck else growth
        super().__init__(cin, width, 1 if bottleneck else 3, memory_efficient)
        self.bottleneck = bottleneck
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def forward(self, h: Tensor | Sources) -> Tensor:
        y = self.first(h)
        return self.conv2(F.relu(self.norm2(y))) if self.bottleneck else y


class Transition(_ReadsConcatenation):
    """``T(x) = avgpool_2x2(conv_1x1(relu(BN(x))))``, ``x = [x_0, ..., x_n]`` the dense block's concatenation."""

    def __init__(self, cin: int, cout: int, memory_efficient: bool = False) -> None:
        super().__init__(cin, cout, 1, memory_efficient)

    def forward(self, h: Tensor | Sources) -> Tensor:
        return F.avg_pool2d(self.first(h), 2)


def _build(depth: int, num_classes: int, input_shape: tuple[int, ...], growth: int, bottleneck: bool,
           compression: float, memory_efficient: bool) -> FamilyParts:
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ValueError(f"DenseNets need image input (C, H, W) of at least 4x4 (two transitions halve it); "
                         f"got input shape {input_shape}")
    if isinstance(growth, bool) or not isinstance(growth, int) or growth <= 0:
        raise ValueError(f"growth must be a positive integer, got {growth!r}")
    if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    if not isinstance(memory_efficient, bool):
        raise ValueError(f"memory_efficient must be True or False, got {memory_efficient!r}")
    n = (depth - 4) // (6 if bottleneck else 3)
    c = 2 * growth if bottleneck else 16
    stem = nn.Conv2d(input_shape[0], c, 3, padding=1, bias=False)
    branches: list[nn.Module] = []
    specs: list[BranchSpec] = []
    for block in range(3):
        if block > 0:
            out = math.floor(compression * c)
            branches.append(Transition(c, out, memory_efficient))
            specs.append(BranchSpec(c, out, 2, "conv", role="transition"))
            c = out
        for _ in range(n):
            branches.append(DenseLayer(c, growth, bottleneck, memory_efficient))
            specs.append(BranchSpec(c, growth, 1, "conv"))
            c += growth
    fc = nn.Linear(c, num_classes)
    head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    for m in (stem, *branches, head):
        init_weights(m, skip=(fc,))
    nn.init.zeros_(fc.bias)
    return FamilyParts(stem, branches, specs, head)


@register_family("densenet", depths=(40, 100), depth_rule="3n+4 with n >= 1 (e.g. 40, 100)",
                 check_depth=lambda d: d >= 7 and (d - 4) % 3 == 0, default_input_shape=(3, 32, 32),
                 paper="Huang et al. 2017, arXiv 1608.06993",
                 description="CIFAR DenseNet, basic BN-ReLU-conv3x3 layers (options: growth, memory_efficient)",
                 recipe=DENSENET_RECIPE, residuals=("concat",))
def densenet(depth: int, num_classes: int, input_shape: tuple[int, ...], growth: int = 12,
             memory_efficient: bool = False) -> FamilyParts:
    return _build(depth, num_classes, input_shape, growth, False, 1.0, memory_efficient)


@register_family("densenet_bc", depths=(100, 190, 250), depth_rule="6n+4 with n >= 1 (e.g. 40, 100, 190, 250)",
                 check_depth=lambda d: d >= 10 and (d - 4) % 6 == 0, default_input_shape=(3, 32, 32),
                 paper="Huang et al. 2017, arXiv 1608.06993",
                 description="CIFAR DenseNet-BC, bottleneck layers and compressing transitions "
                             "(options: growth, compression, memory_efficient)",
                 recipe=DENSENET_RECIPE, residuals=("concat",))
def densenet_bc(depth: int, num_classes: int, input_shape: tuple[int, ...], growth: int = 12,
                compression: float = 0.5, memory_efficient: bool = False) -> FamilyParts:
    return _build(depth, num_classes, input_shape, growth, True, compression, memory_efficient)
