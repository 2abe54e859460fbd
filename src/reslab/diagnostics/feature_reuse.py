"""Feature reuse in a DenseNet: how much weight each layer gives each earlier layer's features (Huang et al. 2017,
arXiv 1608.06993, section 5 and Fig. 5).

In a dense block with input ``x_0`` (``c_0`` channels) and layers ``x_l = H_l([x_0, ..., x_{l-1}])`` of ``k``
channels each, layer ``l``'s first weight layer (the 1x1 bottleneck conv in DenseNet-BC, the 3x3 conv otherwise)
reads the concatenation; its weight ``W_l`` has one input slice per source. The reuse of source ``s`` by target
``t`` is the average absolute weight over that slice::

    R[s, t] = mean |W_t[:, channels of x_s]|          (s = 0 .. t; the "average L1 norm normalised by the number
                                                       of input feature-maps" of Huang et al.)

The block's last column is the layer that reads the whole block: the transition after it (its 1x1 conv), or, after
the last block, the classifier (its linear weight on the pooled features).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.branch import Sources


def _reader_weight(module: nn.Module) -> np.ndarray:
    """The weight of the first layer that reads the concatenation, as ``(out, in, ...)``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().double().cpu().numpy()
    conv = getattr(module, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"feature reuse needs DenseNet layers (a conv1 reading the concatenation), got "
                         f"{type(module).__name__}")
    return conv.weight.detach().double().cpu().numpy()


def feature_reuse(model: nn.Module) -> list[np.ndarray]:
    """``R`` of every dense block of ``model`` (a ``densenet`` / ``densenet_bc`` net), as ``(n+1, n+1)`` arrays:
    row ``s`` the source (``0``: the block's input), column ``t < n`` dense layer ``t+1`` (reading sources
    ``0..t``), column ``n`` the transition or the classifier; ``nan`` where a layer does not read the source.

    Raises:
        ValueError: a model whose residual scheme is not the concatenating one.
    """
    trunk = getattr(model, "trunk", None)
    if trunk is None or getattr(trunk.scheme, "name", None) != "concat":
        raise ValueError("feature reuse reads the weights of a concatenating (DenseNet) model; this model's scheme is "
                         f"{getattr(getattr(trunk, 'scheme', None), 'name', None)!r}")
    fc = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    blocks: list[list[nn.Module]] = [[]]
    starts: list[int] = [trunk.scheme.specs[0].in_dim]
    for branch, spec in zip(trunk.branches, trunk.scheme.specs):
        blocks[-1].append(branch)
        if spec.role == "transition":
            blocks.append([])
            starts.append(spec.out_dim)
    blocks[-1].append(fc[-1])
    out = []
    for readers, c0 in zip(blocks, starts):
        n = len(readers) - 1
        growth = (_reader_weight(readers[-1]).shape[1] - c0) // max(n, 1)
        bounds = [0, c0] + [c0 + growth * (i + 1) for i in range(n)]
        r = np.full((n + 1, n + 1), np.nan)
        for t, reader in enumerate(readers):
            w = np.abs(_reader_weight(reader))
            if w.shape[1] != bounds[t + 1]:
                raise ValueError(f"a reader of {w.shape[1]} channels where the block's concatenation has "
                                 f"{bounds[t + 1]}")
            for s in range(t + 1):
                r[s, t] = w[:, bounds[s]:bounds[s + 1]].mean()
        out.append(r)
    return out


def feature_use(model: nn.Module, x: Tensor, y: Tensor) -> list[np.ndarray]:
    """What each reader uses of each source, measured on data: ``U[s, t] = mean_i |<g_i, x_s,i>| / c_s``, with
    ``g_i`` the gradient of sample ``i``'s loss with respect to source ``s`` as reader ``t`` reads it (every reader
    gets its own copy of every source) and ``c_s`` the source's channels. ``<g, x_s>`` is the first-order change of
    the loss when ``t`` loses ``x_s`` (``x_s -> 0``), so ``U`` is what ``t`` draws from ``s`` per feature map on
    these samples, where ``R`` (:func:`feature_reuse`) is what its weights could draw. Same layout as
    :func:`feature_reuse`; ``model`` is run in eval mode."""
    leaves: list[list[Tensor]] = []

    def own(parts: Any) -> Any:
        copies = [p.view_as(p) for p in parts]  # a node of its own per reader, the graph kept
        leaves.append(copies)
        return copies

    def branch_hook(module: nn.Module, args: tuple) -> tuple:
        return (Sources(own(args[0] if isinstance(args[0], Sources) else (args[0],))),)

    def head_hook(module: nn.Module, args: tuple) -> tuple:
        widths = [b - a for a, b in zip(bounds, bounds[1:])]
        return (torch.cat(own(args[0].split(widths, 1)), 1),)

    trunk = model.trunk
    readers = feature_reuse(model)  # checks the model, and gives the last block's layout
    n = readers[-1].shape[0] - 1
    c0 = trunk.scheme.specs[-n].in_dim if n else trunk.scheme.specs[-1].out_dim
    growth = trunk.scheme.specs[-1].out_dim
    bounds = [0, c0] + [c0 + growth * (i + 1) for i in range(n)]
    handles = [b.register_forward_pre_hook(branch_hook) for b in trunk.branches]
    handles.append(model.head.register_forward_pre_hook(head_hook))
    was = model.training
    try:
        model.eval()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y, reduction="sum")
            flat = [t for copies in leaves for t in copies]
            grads = iter(torch.autograd.grad(loss, flat))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    use = [np.array([(next(grads) * t).detach().flatten(1).sum(1).abs().mean().item() / t.shape[1] for t in copies])
           for copies in leaves]
    out, i = [], 0
    for r in readers:
        u = np.full_like(r, np.nan)
        for t in range(r.shape[1]):
            u[:t + 1, t] = use[i]
            i += 1
        out.append(u)
    return out
