"""How much memory a training run needs: estimated before anything is allocated, and measured for one step.

The model is built on PyTorch's ``meta`` device (shapes only, no storage) and one training batch is run
forward on it with a saved-tensors hook that adds up what autograd would keep for backward. The estimate is

    bytes = P * b * (2 + s) + A

with ``P`` parameters of ``b`` bytes, their gradients, ``s`` optimiser states per parameter (SGD with momentum
1, Adam 2) and ``A`` the activations saved for backward. It is a lower bound (allocator overhead, temporaries
and evaluation batches come on top), so a run it refuses would certainly not fit.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from reslab.losses import loss_fn

OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the CUDA allocator's free bytes, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def training_bytes(build: Callable[[], nn.Module], batch: tuple[int, ...], dtype: torch.dtype,
                   optimizer: str) -> tuple[int, int, int] | None:
    """``(parameters, parameter-side bytes, saved-activation bytes)`` of one training step, from a ``meta`` build.

    Args:
        build: makes the model (called under ``torch.device("meta")``).
        batch: shape of one input batch.
        dtype: the input's dtype (``torch.long`` for token ids).
        optimizer: ``sgd``, ``adam`` or ``adamw``.

    Returns:
        ``None`` when the model cannot be built or run on ``meta`` (then nothing can be said in advance).
    """
    saved: dict[int, torch.Tensor] = {}  # storage owner -> tensor, so a tensor saved twice counts once
    owned: set[int] = set()

    def pack(t: torch.Tensor) -> Any:
        base = t if t._base is None else t._base
        if id(base) not in owned:  # parameters (and views of them) are counted below
            saved[id(base)] = base
        return t

    try:
        with torch.device("meta"):
            model = build()
            x = torch.zeros(batch, dtype=dtype)
        owned.update(id(p) for p in model.parameters())
        model.train()
        # a measurement on meta tensors: what the model warns about here (an unprofiled Admin) is not the run's
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = model(x)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    del y
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    per = sum(p.numel() * p.element_size() for p in params) * (2 + OPTIMIZER_STATES.get(optimizer, 2))
    return n, per, sum(t.numel() * t.element_size() for t in saved.values())


def at_depth(build_at: Callable[[int], nn.Module], depth: int, probes: tuple[int, int], batch: tuple[int, ...],
             dtype: torch.dtype, optimizer: str) -> tuple[int, int, int] | None:
    """:func:`training_bytes` of the model of ``depth``, extrapolated linearly from the two ``probes`` depths when
    ``depth`` is deeper than :data:`EXACT_DEPTH` (a meta build of 100,000 layers alone takes minutes).

    Every family's parameters and saved activations grow linearly in its depth (blocks per stage, layers), so
    the extrapolation is exact for them, and a lower bound for a model whose cost grows faster (a DenseNet with
    naive concatenation: quadratic).
    """
    if depth <= EXACT_DEPTH:
        return training_bytes(lambda: build_at(depth), batch, dtype, optimizer)
    (d1, d2) = probes
    a, b = (training_bytes(lambda d=d: build_at(d), batch, dtype, optimizer) for d in (d1, d2))
    if a is None or b is None:
        return None
    return tuple(int(x + (y - x) * (depth - d1) / (d2 - d1)) for x, y in zip(a, b))  # type: ignore[return-value]


EXACT_DEPTH = 128


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to ``/dev/null`` for the block: the profiler's C++ side logs its start and stop there,
    two lines per measurement that would run through a progress display. Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Measured peak memory of one training step (forward, cross-entropy, backward) above what was allocated
    before it (the parameters): on CUDA the allocator's ``max_memory_allocated``; on the CPU the running sum of
    every allocation and free of the step in order, as the CPU allocator reports them to ``torch.profiler``
    (``profile_memory``), run on one thread (with more, the intra-op threads' scratch buffers add to the peak:
    DenseNet-BC-100's memory-efficient step, batch 8, peaks at 86 MiB on one thread, 91 on two). Deterministic on
    the CPU: the same ops allocate the same bytes."""
    model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        loss_fn(model(x), y).backward()
        peak = torch.cuda.max_memory_allocated(x.device) - base
    else:
        from torch.profiler import ProfilerActivity, profile

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the intra-op threads' scratch buffers would make the peak depend on their number
        try:
            with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss_fn(model(x), y).backward()
        finally:
            torch.set_num_threads(threads)
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        peak = max(np.cumsum([b for _, b in events]).max(initial=0), 0) if events else 0
    model.zero_grad(set_to_none=True)
    return int(peak)


def check_fits(estimate: tuple[int, int, int] | None, device: torch.device, batch: int, optimizer: str,
               what: str) -> None:
    """Refuse, before allocating, a run whose estimated training memory exceeds what ``device`` has free.

    Args:
        estimate: ``(parameters, parameter-side bytes, saved-activation bytes)``, or ``None`` (no check).

    Raises:
        ValueError: one line with the parameter count, the estimate and the free memory.
    """
    free = available_bytes(device)
    if estimate is None or free is None:
        return
    n, per, acts = estimate
    if per + acts > free:
        gib = 2 ** 30
        raise ValueError(f"{what} is too large for memory: {n:,} parameters and a batch of {batch} need at least "
                         f"{(per + acts) / gib:.1f} GiB ({per / gib:.1f} GiB for weights, gradients and {optimizer} "
                         f"state, {acts / gib:.1f} GiB of activations), and {device.type} has {free / gib:.1f} GiB "
                         f"free; use a smaller model or batch")
