"""Multi-process training under ``torchrun``: DistributedDataParallel, NCCL on CUDA and gloo on the CPU.

``torchrun --nproc_per_node=N -m reslab train ...`` starts N copies of ``reslab train``; :func:`reslab.train.train`
sees ``WORLD_SIZE > 1`` in the environment, joins the process group (:func:`process_group`) and runs its one
training loop on every rank:

- Data. Every rank draws the same global batch of ``batch_size`` indices (the seeded order of a single-process run)
  and prepares the whole batch with the same generator, so augmentation is that of one process; then it keeps its
  own contiguous shard (:func:`shard`; the first ``n mod N`` ranks get one sample more, and a rank may get none
  when a last batch has fewer samples than ranks).
- Gradient. Each rank backpropagates ``sum of its shard's losses * N / (targets in the global batch)``; DDP averages
  over the N ranks, so the gradient is the single-process gradient of the global batch's mean loss, also for a last
  batch that does not divide by N (up to floating-point summation order).
- Metrics. The training loss and error sums of each step are all-reduced (one small all-reduce per step, which also
  makes every rank take the same "non-finite loss" decision); rank 0's buffers are broadcast before evaluation
  (:func:`sync_buffers`) and every rank evaluates the whole test (and training) set, so every rank holds the
  single-process metrics and takes the same decisions. Only rank 0 writes the run directory or shows progress.
- RNG. Dropout masks cannot match a single process (each rank draws masks for its own shard only); under DDP the
  global RNG is seeded at each epoch from ``(seed, epoch, rank)`` (:func:`rank_seed`), so ranks draw independent
  masks and a resumed run draws the same masks as an uninterrupted one without per-rank RNG states in the
  checkpoint. Models without dropout match a single process to floating-point rounding.

BatchNorm. ``nn.SyncBatchNorm`` works on CUDA only: in torch 2.13's CPU build, DDP refuses a module with
SyncBatchNorm layers ("SyncBatchNorm layers only work with GPU modules"). So on CUDA every BatchNorm is converted
to SyncBatchNorm (:func:`prepare_model`: batch statistics over the global batch, as in one process), while on the
CPU (gloo) each rank normalises with its own shard's statistics and the running statistics are rank 0's (broadcast
by DDP at every forward and by :func:`sync_buffers` before evaluation): a BatchNorm model trained on N CPU processes
is a different (ghost-batch) computation from one process. LayerNorm / RMSNorm and norm-free models match.
A rank whose shard holds one sample cannot run a training-mode ``BatchNorm1d`` on the CPU; :func:`check_shards`
refuses that configuration before anything is written.

Unused parameters. DDP's default reducer waits for a gradient of every parameter in every step and fails (at the
next step) when one gets none. Checked for every registered scheme on a tiny model of every family (each scheme
on each family that accepts it, with the shortcut options A-D, ``zero_init_last``, the norms and placements of the
MLPs, and the schemes' options: static/dynamic hyper-connections, AttnRes block sizes, DenseFormer dilation and
period, fixed value-residual lambdas, GPT rotary positions, tied embeddings, no final norm, dropout): no model that
:func:`reslab.create_model` builds leaves a parameter without a gradient in a training step. Zero-initialised
scalars (ReZero, SkipInit, LayerScale near 0) and nearly closed gates (highway, gating) still put their parameters
in the graph: their gradients are small or zero, not missing, which DDP handles. What does leave parameters unused
is a lesion (``model.trunk.lesioned``: a deleted branch's parameters, and with highway / gating its gate, with
hyper-connections its site's beta weights, see no gradient), which training never sets but a caller may. So
:func:`wrap` turns on ``find_unused_parameters`` only when needed: when :func:`unused_parameters` finds a parameter
without a gradient in one probe step (on two training samples, RNG and buffers restored); otherwise DDP runs
without the extra graph traversal per step (``static_graph`` would also cope with a fixed unused set, but it is not
needed for any model here). A future scheme that drops branches at random (stochastic depth) would need
``find_unused_parameters=True`` always: one probe step cannot see it.

Empty shards. A rank whose shard is empty (a last batch with fewer samples than ranks) still runs the model, on an
empty batch, since DDP and SyncBatchNorm need every rank in every step; its loss is 0 and so is its gradient. Every
model reslab builds runs an empty batch (AttnRes did not until its ``view(-1, ...)`` of 0 elements was fixed:
``tests/test_attnres.py``); :func:`check_shards` still tries one and refuses, before anything is written, a run
whose model cannot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reslab.losses import loss_fn

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Context:
    """This process's place in a multi-process run.

    Attributes:
        rank, world, local_rank: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (the GPU index on CUDA).
        backend: ``nccl`` (CUDA) or ``gloo`` (CPU).
        device: where collectives put their tensors (this rank's training device).
    """

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def agree(self, ok: bool) -> bool:
        """Rank 0's ``ok``, on every rank."""
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE > 1``).

    Raises:
        ValueError: a ``WORLD_SIZE`` that is not an integer.
    """
    return _env_int("WORLD_SIZE", 1) > 1


def env_rank() -> int:
    """This process's rank under torchrun, 0 otherwise (also for malformed variables: train() reports those)."""
    try:
        return _env_int("RANK", 0) if launched() else 0
    except ValueError:
        return 0


def device_for(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` on CUDA (any CUDA device name selects the rank's own GPU),
    else ``device``.

    Raises:
        ValueError: a ``LOCAL_RANK`` beyond the GPUs present.
    """
    if device.type != "cuda" or not launched():
        return device
    local = _env_int("LOCAL_RANK", 0)
    if not 0 <= local < torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()} (start at most "
                         "that many processes per node)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Context | None]:
    """Join torchrun's process group for the block (``None`` when not launched by torchrun) and leave it after, also
    on errors. Backend ``nccl`` on CUDA, ``gloo`` on the CPU. A process group that already exists (a caller's own)
    is used as it is and left in place."""
    if not launched():
        yield None
        return
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    else:
        rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    try:
        yield Context(rank, world, local, backend, device)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def rank0_first(ctx: Context | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks: what rank 0 caches on disk (MNIST-1D) the others only read.
    When rank 0 fails, the others raise too (their message is not shown: rank 0's is the one)."""
    if ctx is None:
        return fn()
    if ctx.main:
        try:
            value = fn()
        except BaseException:
            ctx.agree(False)
            raise
        ctx.agree(True)
        return value
    if not ctx.agree(True):  # the value broadcast is rank 0's
        raise ValueError("rank 0 failed (its error is the one reported)")
    return fn()


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of a batch of ``n``: sizes differ by at most one, larger ones first."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG seed of ``rank`` in ``epoch`` (dropout masks), independent across ranks and epochs."""
    return int.from_bytes(hashlib.sha256(f"reslab-ddp/{seed}/{epoch}/{rank}".encode()).digest()[:8], "little")


def all_sum(t: Tensor) -> Tensor:
    """``t`` summed over all ranks (in place, returned)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics: per-rank on the CPU after a training step)."""
    for b in model.buffers():
        dist.broadcast(b, 0)


def check_shards(model: nn.Module, x: Tensor, n: int, batch_size: int, world: int, sync_bn: bool) -> None:
    """Refuse, before anything is written, a run in which some rank would get a shard the model cannot train on:
    one sample under a training-mode ``BatchNorm1d`` with per-rank statistics (it has no variance; a single process,
    which sees the whole batch, can run it), or no sample for a model that cannot run an empty batch (tried on
    ``x[:0]``, ``x`` a prepared input batch, with the model's state restored).

    Raises:
        ValueError: one line naming the batch.
    """
    per_rank_bn = not sync_bn and any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    for size in sorted({min(batch_size, n), n % batch_size} - {0}, reverse=True):
        parts = [s.stop - s.start for s in (shard(size, r, world) for r in range(world))]
        if per_rank_bn and 1 in parts:
            raise ValueError(f"a batch of {size} samples split over {world} processes leaves one rank a single "
                             "sample, which BatchNorm1d cannot normalise (batch statistics are per rank on the CPU); "
                             "choose another batch size or number of processes")
        if 0 in parts:
            try:
                with _state_kept(model, x.device), torch.no_grad():
                    model.train()(x[:0])
            except RuntimeError as e:
                raise ValueError(f"a batch of {size} samples leaves some of the {world} processes without samples, "
                                 f"and this model cannot run an empty batch ({str(e).strip().splitlines()[0]}); "
                                 "choose a batch size that leaves every process a sample in the last batch") from None


@contextlib.contextmanager
def _state_kept(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a probe on ``model`` and leave it as it was: RNG states forked; buffers (BatchNorm statistics), gradients
    and train/eval mode restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    was = model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g
        model.train(was)


def unused_parameters(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """The names of trainable parameters that get no gradient from a training-mode step on ``(x, y)``.

    The probe leaves the model as it was: RNG states forked, buffers (BatchNorm statistics) restored, gradients and
    train/eval mode as before.
    """
    with _state_kept(model, x.device):
        for p in model.parameters():
            p.grad = None
        model.train()
        loss_fn(model(x), y).backward()
        return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def prepare_model(model: M, device: torch.device) -> M:
    """The model to wrap: on CUDA with every BatchNorm turned into SyncBatchNorm (same parameters, buffers and
    state-dict keys); unchanged on the CPU, where SyncBatchNorm does not run."""
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the submodules in place (the root is no norm)
    return model


def wrap(model: nn.Module, device: torch.device, find_unused: bool) -> nn.parallel.DistributedDataParallel:
    """``model`` in DistributedDataParallel (parameters broadcast from rank 0)."""
    kw: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused, **kw)


__all__ = ["Context", "all_sum", "check_shards", "device_for", "env_rank", "launched", "prepare_model",
           "process_group", "rank0_first", "rank_seed", "shard", "sync_buffers", "unused_parameters", "wrap"]
