"""The gradient highway: gradient norm at each depth (REFERENCE.md section 2; the seed's eq. dL/dx_l).

``stream[i] = ||dL/d(state_i)||`` (Frobenius over the batch; the stream at the start of block ``i``, all ``n``
streams for hyper-connections) for the mean cross-entropy of one batch, and ``params[i]`` the norm of the gradient
of block ``i``'s branch parameters. Measured in training mode (batch statistics, as an optimiser step sees them);
every buffer is given back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from reslab.diagnostics.recorder import record, trunk_of
from reslab.evaluation import preserved
from reslab.losses import loss_fn


@dataclass
class GradientProfile:
    stream: np.ndarray
    params: np.ndarray

    @property
    def input_to_output_ratio(self) -> float:
        """``||dL/dx_0|| / ||dL/dx_{L-1}||``: above 1 the gradient grows towards the input, below it vanishes."""
        return float(self.stream[0] / self.stream[-1])

    def plot(self, ax, label: str = "", **kw) -> None:
        ax.semilogy(np.arange(len(self.stream)), self.stream, label=label, **kw)
        ax.set(xlabel="depth (block)", ylabel="||dL/dx_i||")


def param_grad_norms(model: nn.Module) -> np.ndarray:
    """Norm of the current parameter gradients of each block's branch (0 where none)."""
    out = []
    for branch in trunk_of(model).branches:
        sq = sum(float(p.grad.double().pow(2).sum()) for p in branch.parameters() if p.grad is not None)
        out.append(sq ** 0.5)
    return np.asarray(out)


def gradient_profile(model: nn.Module, x: Tensor, y: Tensor, train_mode: bool = True) -> GradientProfile:
    """Gradient norms per depth for one batch ``(x, y)``; the model's gradients and buffers are left unchanged."""
    saved = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with preserved(model):
        model.train(train_mode)
        model.zero_grad(set_to_none=True)
        with record(model, names=(), grads=True, grad_reduce=lambda n, i, g: g.double().pow(2).sum()[None]) as rec:
            # A float input requires grad so that the first block's stream does even with a parameter-free stem.
            x = x.detach().requires_grad_(True) if x.is_floating_point() else x
            loss_fn(model(x), y).backward()
        stream = np.asarray([float(g.sum()) ** 0.5 for g in rec.grads()])
        params = param_grad_norms(model)
    for n, p in model.named_parameters():
        p.grad = saved[n]
    return GradientProfile(stream, params)
