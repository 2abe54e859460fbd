"""Branch building blocks shared by the families: a two-layer branch in any of He et al. 2016's five activation
placements (arXiv 1603.05027, Fig. 4 and Table 2).

With ``x`` the stream, ``W1``, ``W2`` the two weight layers and ``BN`` the norms, the five units are

- (a) ``original``:          ``x_{l+1} = relu(x + BN(W2 relu(BN(W1 x))))``
- (b) ``bn_after_add``:      ``x_{l+1} = relu(BN(x + W2 relu(BN(W1 x))))``
- (c) ``relu_before_add``:   ``x_{l+1} = x + relu(BN(W2 relu(BN(W1 x))))``
- (d) ``relu_only_preact``:  ``x_{l+1} = x + BN(W2 relu(BN(W1 relu(x))))``
- (e) ``full_preact``:       ``x_{l+1} = x + W2 relu(BN(W1 relu(BN(x))))``

:class:`TwoLayerBranch` computes the branch term of each; what follows the addition (the ReLU of (a), the
BN-ReLU of (b)) is the residual scheme's ``post`` op (:func:`post_op`), so that a scheme owns the whole combination
rule and the plain twin is ``post(F(x))``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

#: He et al. 2016's activation placements, in the order of their Fig. 4
PLACEMENTS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
#: the placements whose stream is not activated after the addition: their families use a pre-activation stem (a
#: bare weight layer) and head (norm-ReLU before the classifier)
PREACT = ("relu_only_preact", "full_preact")
_POST = {"original": "relu", "bn_after_add": "bn_relu"}


def check_placement(placement: str, norm: str) -> None:
    """Refuse an unknown placement, and ``bn_after_add`` without BatchNorm (it moves a BatchNorm after the add).

    Raises:
        ValueError: one line naming the five placements, or the norm that ``bn_after_add`` needs.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    if placement == "bn_after_add" and norm != "bn":
        raise ValueError(f"placement 'bn_after_add' moves the branch's last BatchNorm after the addition: it needs "
                         f"norm='bn', not {norm!r}")


def post_op(placement: str) -> str | None:
    """The scheme's post-combination op of a placement: ``"relu"`` (a), ``"bn_relu"`` (b), else ``None``."""
    return _POST.get(placement)


def make_norm(kind: str, dim: int, layout: str) -> nn.Module:
    """A normalisation layer by name: ``bn`` (BatchNorm), ``ln`` (LayerNorm over channels) or ``none``."""
    if kind == "bn":
        return nn.BatchNorm2d(dim) if layout == "conv" else nn.BatchNorm1d(dim)
    if kind == "ln":
        if layout == "conv":
            return nn.GroupNorm(1, dim)
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected 'bn', 'ln' or 'none'")


class TwoLayerBranch(nn.Module):
    """Two weight layers with their norms, in one of :data:`PLACEMENTS`; the branch term ``F(x)`` of each unit:

    - ``original``:          ``F(x) = norm2(layer2(relu(norm1(layer1(x)))))``
    - ``bn_after_add``:      ``F(x) = layer2(relu(norm1(layer1(x))))`` (``norm2`` is ``Identity``: the BN sits after
      the addition, in the scheme)
    - ``relu_before_add``:   ``F(x) = relu(norm2(layer2(relu(norm1(layer1(x))))))``
    - ``relu_only_preact``:  ``F(x) = norm2(layer2(relu(norm1(layer1(relu(x))))))``
    - ``full_preact``:       ``F(x) = layer2(relu(norm2(layer1(relu(norm1(x))))))`` (``norm1`` reads the input)
    """

    def __init__(self, layer1: nn.Module, layer2: nn.Module, norm1: nn.Module, norm2: nn.Module | None,
                 placement: str) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
        if (norm2 is None) != (placement == "bn_after_add"):
            raise ValueError(f"placement {placement!r} {'has no' if norm2 is None else 'needs a'} second norm "
                             "in the branch")
        self.layer1, self.layer2, self.norm1 = layer1, layer2, norm1
        self.norm2 = nn.Identity() if norm2 is None else norm2
        self.placement = placement

    def forward(self, x: Tensor) -> Tensor:
        p = self.placement
        if p == "full_preact":
            return self.layer2(F.relu(self.norm2(self.layer1(F.relu(self.norm1(x))))))
        if p == "relu_only_preact":
            x = F.relu(x)
        y = self.norm2(self.layer2(F.relu(self.norm1(self.layer1(x)))))
        return F.relu(y) if p == "relu_before_add" else y

    def last_module(self) -> nn.Module:
        """The module whose scale sets the branch output: the last norm where one ends the branch ((a), (c), (d)),
        else the last layer ((b), (e), or no norm)."""
        if self.placement in ("bn_after_add", "full_preact") or isinstance(self.norm2, nn.Identity):
            return self.layer2
        return self.norm2

    def zero_init_last_(self) -> None:
        """Zero the scale of the branch's last module, so the branch starts at zero (Goyal et al. 2017)."""
        nn.init.zeros_(self.last_module().weight)
