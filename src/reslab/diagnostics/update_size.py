"""Per-layer effective update size: how much one optimiser step on block ``i`` alone moves the network.

The seed's "learning rate sensitivity" (O(L) growth problem, point 4): as depth grows each layer's output is a
smaller fraction of the stream, so the same step on its parameters changes the network less. With ``f`` the
network's output (``at="output"``, the logits) or its final residual stream (``at="stream"``, what the trunk
hands the head), ``delta_i`` one step on block ``i``'s branch parameters only and ``delta`` the same step on every
block's branch parameters at once:

    size[i] = ||f(theta + delta_i) - f(theta)|| / ||f(theta)||        (the layer's effective step)
    whole   = ||f(theta + delta)   - f(theta)|| / ||f(theta)||        (the whole step)
    share[i] = size[i] / whole                                          (the layer's share of the whole step)

A step is SGD's (``-lr * g``) or Adam's first (``-lr * g / (|g| + eps)``), gradients from the mean cross-entropy
of the batch; the model is put in eval mode, so only the step changes ``f``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from reslab.diagnostics.recorder import trunk_of
from reslab.evaluation import eval_mode
from reslab.losses import loss_fn

PLACES = ("output", "stream")


@dataclass(frozen=True)
class UpdateSizes:
    """Relative change of ``f`` per block (``per_block``) and for the step on every block at once (``whole``)."""

    per_block: np.ndarray
    whole: float

    @property
    def share(self) -> np.ndarray:
        """Each block's change as a fraction of the whole step's."""
        return self.per_block / self.whole


def update_sizes(model: nn.Module, x: Tensor, y: Tensor, lr: float = 1e-3, optimizer: str = "adam",
                 at: str = "output") -> UpdateSizes:
    """The effective step of every block, and of the whole step (module docstring).

    Raises:
        ValueError: unknown ``optimizer`` or ``at``.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if at not in PLACES:
        raise ValueError(f"at must be one of {', '.join(PLACES)}, got {at!r}")
    with eval_mode(model):
        trunk = trunk_of(model)
        params = dict(model.named_parameters())
        names = list(params)
        grads = torch.autograd.grad(loss_fn(model(x), y), [params[n] for n in names], allow_unused=True)
        steps = {n: (g if optimizer == "sgd" else g / (g.abs() + 1e-8))
                 for n, g in zip(names, grads) if g is not None}
        with torch.no_grad():
            if at == "output":
                def f(new: dict[str, Tensor]) -> Tensor:
                    return functional_call(model, new, (x,), strict=False)
            else:  # the trunk's output from the (unchanged) stem's: what the head reads
                h0 = model.stem(x)

                def f(new: dict[str, Tensor]) -> Tensor:
                    return functional_call(model.trunk, {n.removeprefix("trunk."): p for n, p in new.items()}, (h0,),
                                           strict=False)
            f0 = f({})
            owner = {id(p): i for i, b in enumerate(trunk.branches) for p in b.parameters()}
            blocks: list[dict[str, Tensor]] = [{} for _ in trunk.branches]
            for n, step in steps.items():
                if id(params[n]) in owner:
                    blocks[owner[id(params[n])]][n] = params[n] - lr * step
            sizes = [float((f(new) - f0).norm() / f0.norm()) for new in blocks]
            whole = float((f({k: v for new in blocks for k, v in new.items()}) - f0).norm() / f0.norm())
    return UpdateSizes(np.asarray(sizes), whole)


def effective_update_size(model: nn.Module, x: Tensor, y: Tensor, lr: float = 1e-3,
                          optimizer: str = "adam") -> np.ndarray:
    """Relative output change per block for one step on that block alone (:func:`update_sizes`' ``per_block``)."""
    return update_sizes(model, x, y, lr, optimizer).per_block

