"""The one training loop of reslab: seeded, checkpointed every epoch, resumable with identical numbers.

A run directory holds::

    config.json      the resolved TrainConfig and the model's config
    env.json         versions, git revision, device
    metrics.jsonl    one line per epoch (train loss/error, test loss/error, learning rate, wall time)
    checkpoint.pt    model, optimiser, RNG state and metrics after the last finished epoch
    result.json      status ("running", "completed" or "diverged") and the final metrics

Data order and augmentation are drawn from generators seeded by ``(seed, epoch)``, and the global RNG state
(used by dropout) is saved in every checkpoint, so ``resume=True`` after a kill ends with the same metrics as
an uninterrupted run. A non-finite loss stops the run and records it as diverged at that step.

Several processes: under ``torchrun --nproc_per_node=N -m reslab train ...`` (``WORLD_SIZE > 1`` in the environment)
the same loop trains with DistributedDataParallel (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU):
every rank draws and augments the single-process global batch and trains on its shard, with the loss weighted so
that the averaged gradient is the global batch's; losses and errors are all-reduced, so the metrics are those of one
process (to floating-point rounding; BatchNorm statistics are per rank on the CPU, synchronised on CUDA; dropout
masks differ). Only rank 0 writes the run directory (the config is the same TrainConfig; ``env.json`` records
``world_size``); a killed run resumes under torchrun with every rank loading the checkpoint. Details, and which
models need DDP's ``find_unused_parameters``: :mod:`reslab.distributed`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reslab import distributed, footprint, runs
from reslab.data import Dataset, load_dataset
from reslab.config import RunResult, TrainConfig, _load_state, config_mismatch, load_model, resolve_device
from reslab.evaluation import errors, eval_mode
from reslab.losses import loss_fn
from reslab.models import ResidualNet, create_model, init_from_batch, parse_model_name

#: an epoch whose mean training loss exceeds this many times chance (ln C nats, at least 1) ends the run as
#: diverged: the loss exploded without turning non-finite
EXPLODED_LOSS_FACTOR = 10
TENSORBOARD_MISSING = "--tensorboard needs TensorBoard: pip install 'reslab[tensorboard]'"


def check_compatible(cfg: TrainConfig, data: Dataset, model: ResidualNet, device: torch.device) -> None:
    """Refuse, before a run directory exists, a model that cannot read ``data`` or a device option without effect.

    Raises:
        ValueError: one line naming the mismatch.
    """
    if cfg.amp and device.type != "cuda":
        raise ValueError(f"amp (bfloat16 autocast) works on CUDA only; this run is on {device.type}")
    fam = parse_model_name(cfg.model)[0]
    if fam.inputs != data.inputs:
        what = {"tokens": "token ids (a text dataset: pydoc, shakespeare, text:PATH)",
                "features": "real-valued inputs (mnist1d, digits, cifar10, cifar100)"}
        raise ValueError(f"model {cfg.model!r} reads {what[fam.inputs]}, but dataset {cfg.data!r} gives "
                         f"{what[data.inputs]}")
    try:
        with torch.no_grad(), eval_mode(model):
            model(data.prepare(data.x_train[:2], train=False).to(device))
    except RuntimeError as e:
        raise ValueError(f"model {cfg.model!r} cannot read dataset {cfg.data!r}: "
                         f"{str(e).strip().splitlines()[0]}") from None


def build_model(cfg: TrainConfig, data: Dataset) -> ResidualNet:
    """The model a config describes, sized for ``data``; initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, cfg.residual, cfg.shortcut, num_classes=data.num_classes,
                        input_shape=data.input_shape, zero_init_last=cfg.zero_init_last,
                        residual_kwargs=cfg.residual_kwargs, **cfg.model_kwargs)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at iteration ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        if cfg.warmup_lr is not None:
            return cfg.warmup_lr
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        marks = [m * cfg.epochs if cfg.milestones_are_fractions else m for m in cfg.milestones]
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in marks)
    return cfg.lr


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, x: Tensor, y: Tensor, batch_size: int = 1000,
             amp: bool = False) -> dict[str, float]:
    """Mean cross-entropy (nats) and error rate of ``model`` on ``(x, y)`` in eval mode, per target: one per
    sample for classifiers, one per token for language models (targets ``(N, T)``, logits ``(N, T, V)``)."""
    loss_sum, wrong = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb, yb = data.prepare(x[i:i + batch_size], train=False), y[i:i + batch_size]
            with _autocast(xb.device, amp):
                logits = model(xb)
            loss_sum += loss_fn(logits, yb, reduction="sum").item()
            wrong += errors(logits, yb).item()
    n = max(1, y.numel())
    return {"loss": loss_sum / n, "error": wrong / n}


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[Tensor, torch.Generator]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size], g


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(cfg: TrainConfig, out_dir: Path | str, resume: bool = False, quiet: bool = False,
          data: Dataset | None = None, tensorboard: bool = False) -> RunResult:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its last checkpoint. With ``tensorboard`` every
    epoch's metrics also go to TensorBoard event files in ``out_dir/tensorboard`` (step = epoch; written before the
    epoch's checkpoint, so a resumed run logs every epoch, a repeated one with the same values).

    Under torchrun (``WORLD_SIZE > 1``) every rank calls this with the same arguments and trains its shard of each
    batch with DistributedDataParallel (see the module docstring); only rank 0 writes ``out_dir``, and every rank
    returns the same result.

    Raises:
        ValueError: invalid config, unknown names, an existing run without ``resume``, or a ``resume`` whose
            stored config differs. Nothing is created on disk before the config has been checked.
    """
    out = Path(out_dir)
    cfg.validate()
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(TENSORBOARD_MISSING)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a run directory")
    stored = out / "config.json"
    if out.is_dir() and not stored.exists() and any(not runs.is_temp(p) for p in out.iterdir()):
        raise ValueError(f"{out} is not a run directory: it holds other files and no config.json; train into a new "
                         "or empty directory")
    if stored.exists():
        if not resume:
            raise ValueError(f"run directory {out} already holds a run; pass resume to continue it")
        diff = config_mismatch(out, cfg)
        if diff:
            raise ValueError(f"cannot resume {out}: its stored config differs in {', '.join(diff)}")
        result = runs.read_json(out / "result.json") if (out / "result.json").exists() else {}
        if result.get("status") in ("completed", "diverged"):
            return RunResult(out, result["status"], runs.read_jsonl(out / "metrics.jsonl"),
                             result.get("diverged_step"), result.get("reason"))
    device = distributed.device_for(resolve_device(cfg.device))
    with distributed.process_group(device) as ctx:
        return _train(cfg, out, resume, quiet, data, device, ctx, tensorboard)


def _batch_loss(logits: Tensor, yb: Tensor, targets: int,
                ctx: distributed.Context | None) -> tuple[Tensor, Tensor, Tensor]:
    """The loss to backpropagate, the batch's mean loss and its number of errors.

    One process: the mean over the batch. Several: this rank's shard of a global batch of ``targets`` targets; the
    loss to backpropagate is the shard's sum times ``world / targets`` (DDP's average over ranks makes it the global
    batch's mean), and the mean and errors are all-reduced over the ranks (the same numbers on every rank).
    """
    if ctx is None:
        loss = loss_fn(logits, yb)
        return loss, loss.detach(), errors(logits, yb)
    local = loss_fn(logits, yb, reduction="sum")
    wrong = errors(logits, yb)
    total = distributed.all_sum(torch.stack([local.detach().double(), wrong.double()]))
    return local * (ctx.world / targets), (total[0] / targets).float(), total[1].round().long()


def _train(cfg: TrainConfig, out: Path, resume: bool, quiet: bool, data: Dataset | None, device: torch.device,
           ctx: distributed.Context | None, tensorboard: bool) -> RunResult:
    main = ctx is None or ctx.main
    stored = out / "config.json"
    data = data if data is not None else distributed.rank0_first(ctx, lambda: load_dataset(cfg.data))
    fam, depth = parse_model_name(cfg.model)
    batch = (min(cfg.batch_size, len(data.y_train)), *data.input_shape)
    probes = tuple(d for d in range(1, 1000) if fam.check_depth(d))[:2]
    estimate = footprint.at_depth(lambda d: build_model(replace(cfg, model=f"{fam.name}{d}"), data), depth, probes,
                                  batch, torch.long if data.inputs == "tokens" else torch.float32, cfg.optimizer)
    footprint.check_fits(estimate, device, batch[0], cfg.optimizer, f"model {cfg.model!r}")
    try:
        model = build_model(cfg, data).to(device)
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise ValueError(f"model {cfg.model!r} is too large for memory ({str(e).splitlines()[0]})") from None
    check_compatible(cfg, data, model, device)
    x_tr, y_tr = data.x_train[:cfg.train_samples].to(device), data.y_train[:cfg.train_samples].to(device)
    find_unused = False
    if ctx is not None:
        probe = data.prepare(x_tr[:2], train=False)
        distributed.check_shards(model, probe, len(y_tr), cfg.batch_size, ctx.world, sync_bn=device.type == "cuda")
        find_unused = bool(distributed.unused_parameters(model, probe, y_tr[:2]))
        model = distributed.prepare_model(model, device)
        ctx.barrier()  # every rank has checked everything: now rank 0 may create the run directory
    opt = make_optimizer(cfg, model)

    metrics: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = runs.load_checkpoint(ckpt_path, map_location="cpu")  # RNG states must stay on the CPU
        _load_state(model, ckpt["model"], ckpt_path)
        _load_state(opt, ckpt["optimizer"], ckpt_path)
        start_epoch, step, metrics = ckpt["epoch"], ckpt["step"], ckpt["metrics"]
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    else:
        if main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create run directory {out}: {e.strerror or e}") from None
            env = runs.environment(device)
            env["world_size"] = 1 if ctx is None else ctx.world
            if ctx is not None:
                env["distributed_backend"] = ctx.backend
            runs.write_json(stored, {"train": cfg.to_dict(), "model": model.config})
            runs.write_json(out / "env.json", env)
        # data-dependent initialisation (Admin's profiling pass): every module's init_from_batch(model, x) sees the
        # run's first batch size of training inputs, unaugmented, on every rank the same, before the first step
        init_from_batch(model, data.prepare(x_tr[:cfg.batch_size], train=False))
        torch.manual_seed(cfg.seed)
    if main:
        runs.write_json(out / "result.json", {"status": "running", "epoch": start_epoch})
    net = model if ctx is None else distributed.wrap(model, device, find_unused)
    forward = torch.compile(net, dynamic=False) if cfg.compile else net  # shares model's parameters
    # every module's after_optimizer_step() runs after each optimiser step, on every rank (nGPT's unit-norm weights)
    after_step = [m.after_optimizer_step for m in model.modules() if callable(getattr(m, "after_optimizer_step", None))]

    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    board = None
    if tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"))
    n = len(y_tr)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=step, disable=quiet or not main, leave=False,
               desc=f"{cfg.model}/{cfg.residual} s{cfg.seed}", unit="step", dynamic_ncols=True)
    diverged_step: int | None = None
    reason: str | None = None
    exploded = EXPLODED_LOSS_FACTOR * max(1.0, math.log(data.num_classes))
    with _deterministic():
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            if ctx is not None:  # per-rank dropout masks, the same after a resume
                torch.manual_seed(distributed.rank_seed(cfg.seed, epoch, ctx.rank))
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            wrong = torch.zeros((), device=device, dtype=torch.long)
            for idx, gen in _epoch_batches(n, cfg.batch_size, cfg.seed, epoch):
                idx = idx.to(device)
                xb, yb = data.prepare(x_tr[idx], train=True, generator=gen), y_tr[idx]
                targets = yb.numel()
                if ctx is not None:  # every rank prepared the whole global batch: it trains on its own shard
                    part = distributed.shard(len(yb), ctx.rank, ctx.world)
                    xb, yb = xb[part], yb[part]
                lr = lr_at(cfg, step, steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"] = lr
                with _autocast(device, cfg.amp):
                    logits = forward(xb)
                loss, mean, batch_wrong = _batch_loss(logits, yb, targets, ctx)
                step += 1
                if not torch.isfinite(mean):
                    diverged_step, reason = step, f"non-finite loss at step {step}"
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for hook in after_step:
                    hook()
                loss_sum += mean * targets
                wrong += batch_wrong
                bar.update(1)
            if diverged_step is not None:
                break
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": lr,
                                   "train_loss": loss_sum.item() / y_tr.numel(),
                                   "train_error": wrong.item() / y_tr.numel()}
            if ctx is not None:  # BatchNorm statistics are per rank on the CPU: evaluate rank 0's on every rank
                distributed.sync_buffers(model)
            if cfg.eval_train is True or (cfg.eval_train == "final" and epoch + 1 == cfg.epochs):
                ev = evaluate(model, data, x_tr, y_tr, amp=cfg.amp)
                row.update(train_eval_loss=ev["loss"], train_eval_error=ev["error"])
            ev = evaluate(model, data, x_te, y_te, amp=cfg.amp)
            row.update(test_loss=ev["loss"], test_error=ev["error"], time_s=time.perf_counter() - t0)
            metrics.append(row)
            if board is not None:
                for k, v in row.items():
                    if k != "epoch":
                        board.add_scalar(k, v, epoch + 1)
                board.flush()
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_err=f"{row['test_error']:.3f}")
            if main:
                runs.write_jsonl(out / "metrics.jsonl", metrics)
                runs.save_torch(ckpt_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step,
                    "metrics": metrics, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
            if row["train_loss"] > exploded:  # finite but useless: stop as a divergence, saying why
                diverged_step = step
                reason = (f"loss exploded in epoch {epoch + 1} (mean training loss {row['train_loss']:.3g} nats, "
                          f"over {EXPLODED_LOSS_FACTOR}x chance = {exploded:.3g})")
                break
            if main:
                runs.write_json(out / "result.json", {"status": "running", "epoch": epoch + 1})
    bar.close()
    if board is not None:
        board.close()
    status = "diverged" if diverged_step is not None else "completed"
    if main:
        runs.write_json(out / "result.json", {"status": status, "diverged_step": diverged_step, "reason": reason,
                                              "epochs_done": len(metrics), "final": metrics[-1] if metrics else None})
    return RunResult(out, status, metrics, diverged_step, reason)


__all__ = ["RunResult", "TrainConfig", "build_model", "evaluate", "load_model", "lr_at", "train"]
