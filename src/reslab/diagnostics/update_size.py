"""Per-layer effective update size: how much one optimiser step on block ``i`` alone moves the output.

The seed's "learning rate sensitivity" (O(L) growth problem, point 4): as depth grows each layer's output is a
smaller fraction of the stream, so the same step on its parameters changes the network less.
``size[i] = ||f(x; theta + delta_i) - f(x; theta)|| / ||f(x; theta)||`` with ``delta_i`` one step of SGD
(``-lr * g_i``) or of Adam (its first step, ``-lr * g_i / (|g_i| + eps)``) on block ``i``'s branch parameters
only, gradients from the mean cross-entropy of the batch (eval mode, so only the step changes the output).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from reslab.diagnostics.recorder import trunk_of
from reslab.losses import loss_fn


def effective_update_size(model: nn.Module, x: Tensor, y: Tensor, lr: float = 1e-3,
                          optimizer: str = "adam") -> np.ndarray:
    """Relative output change per block for one step on that block alone."""
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    training = model.training
    model.eval()
    params = dict(model.named_parameters())
    names = list(params)
    grads = torch.autograd.grad(loss_fn(model(x), y), [params[n] for n in names], allow_unused=True)
    grad = dict(zip(names, grads))
    with torch.no_grad():
        f0 = model(x)
        sizes = []
        for i, branch in enumerate(trunk_of(model).branches):
            mine = {id(p) for p in branch.parameters()}
            new = {}
            for n in names:
                p, g = params[n], grad[n]
                if id(p) in mine and g is not None:
                    step = g if optimizer == "sgd" else g / (g.abs() + 1e-8)
                    new[n] = p - lr * step
            f1 = functional_call(model, new, (x,), strict=False)
            sizes.append(float((f1 - f0).norm() / f0.norm()))
    model.train(training)
    return np.asarray(sizes)
