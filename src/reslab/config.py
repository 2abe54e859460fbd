"""A run's configuration, and a stored run read back: its :class:`TrainConfig` and its model.

What the run store (``config.json`` + ``checkpoint.pt``, :mod:`reslab.runs`) and everything that reads runs share,
below the training loop (:mod:`reslab.train`): a diagnostic that loads a trained model imports this, not training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab import runs
from reslab.models import ResidualNet, create_model, parse_model_name

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
#: what each annotation of :class:`TrainConfig` accepts (an int is a float; a bool is neither)
_KINDS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "None": (type(None),), "dict": (dict,), "list": (list,)}
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null"}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """``value`` against ``annotation`` (``"int"``, ``"float | None"``, ``"list[float]"``...: the field types of
    :class:`TrainConfig`, as strings); a list's items and a dict's keys are checked too."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    ok = any(isinstance(value, _KINDS[k]) and not (isinstance(value, bool) and k in ("int", "float"))
             for k in kinds)
    if ok and isinstance(value, list) and "list[float]" in annotation:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if ok and isinstance(value, dict):
        ok = all(isinstance(k, str) for k in value)
    if not ok:
        names = ["a list of numbers" if k == "list" else "a table with string keys" if k == "dict" else _NAMES[k]
                 for k in kinds]
        raise ValueError(f"{name} must be {' or '.join(names)}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Attributes:
        model, residual, shortcut, zero_init_last, residual_kwargs, model_kwargs: passed to
            :func:`reslab.create_model`.
        data: dataset spec for :func:`reslab.data.load_dataset` (``mnist1d``, ``digits``, ``cifar10:DIR``...).
        optimizer: ``sgd`` (momentum, optional Nesterov), ``adam`` or ``adamw``.
        schedule: ``constant``, ``step`` (multiply by ``gamma`` at each epoch in ``milestones``) or ``cosine``.
        warmup_steps: iterations of warm-up before the schedule starts. With ``warmup_lr`` set, the rate is that
            constant during warm-up and then **returns** to ``lr`` (He et al. 2015's ResNet-110 recipe);
            without it the rate ramps linearly from 0 to ``lr``.
        train_samples: train on the first ``train_samples`` training samples only (e.g. text windows, for an
            equal token budget); ``None``: all of them.
        eval_train: also evaluate the (used) training set in eval mode: ``True`` after each epoch, ``"final"``
            after the final epoch only (what the claims read; it saves a fifth to a quarter of a small conv run),
            ``False`` never.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: bfloat16 autocast on CUDA.
        compile: train through ``torch.compile`` of the model (inductor, static shapes: one graph for the full
            batches and one for a smaller last batch). Its kernels round differently from eager ones, so the
            numbers of a run change in the last bits: it is part of the config. Evaluation, the saved checkpoint
            (the uncompiled model's ``state_dict``) and every diagnostic use the uncompiled model.
    """

    model: str = "mlp20"
    residual: str = "identity"
    shortcut: str | None = None
    zero_init_last: bool = False
    residual_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "mnist1d"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    milestones_are_fractions: bool = True
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_lr: float | None = None
    seed: int = 0
    train_samples: int | None = None
    eval_train: bool | str = True
    device: str = "auto"
    amp: bool = False
    compile: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` with one clear line for any invalid field (a value of another type than the field's
        annotation is refused, never coerced: ``"5"`` is not an integer, ``true`` is not a number)."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.train_samples is not None and int(self.train_samples) <= 0:
            raise ValueError(f"train_samples must be positive, got {self.train_samples}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be non-negative")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        if self.warmup_lr is not None and not self.warmup_lr > 0:
            raise ValueError(f"warmup_lr must be positive, got {self.warmup_lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov applies to SGD with momentum only")
        if self.eval_train not in (True, False, "final") or not isinstance(self.eval_train, (bool, str)):
            raise ValueError(f"eval_train must be true, false or \"final\", got {self.eval_train!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        parse_device(self.device)

    @classmethod
    def for_model(cls, model: str, **options: Any) -> "TrainConfig":
        """A config with the model family's default recipe (what ``reslab train`` uses), ``options`` on top.

        Raises:
            ValueError: unknown model, unknown options or invalid values.
        """
        return cls.from_dict({**parse_model_name(model)[0].recipe, "model": model, **options})

    def to_dict(self) -> dict[str, Any]:
        """The config as it reads back from JSON (tuples become lists)."""
        return json.loads(json.dumps(asdict(self), default=list))

    @classmethod
    def from_dict(cls, d: Any) -> "TrainConfig":
        """The config of a JSON object, validated.

        Raises:
            ValueError: not an object, unknown keys, or invalid values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option {unknown[0]!r}")
        cfg = cls(**d)
        try:
            cfg.validate()
        except TypeError:
            raise ValueError(f"training config has a value of the wrong type: {d}") from None
        return cfg


@dataclass
class RunResult:
    """Outcome of :func:`train`; ``reason`` says why a diverged run stopped."""

    out_dir: Path
    status: str
    metrics: list[dict[str, Any]]
    diverged_step: int | None = None
    reason: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


def parse_device(name: str) -> torch.device | None:
    """The device ``name`` names (``None`` for ``auto``).

    Raises:
        ValueError: anything but ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    if name == "auto":
        return None
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    return dev


def resolve_device(name: str) -> torch.device:
    """The device to train on; ``auto`` is CUDA when present.

    Raises:
        ValueError: an unknown device, or CUDA asked for where there is none.
    """
    dev = parse_device(name)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def read_run_config(run_dir: Path | str) -> tuple[TrainConfig, dict[str, Any]]:
    """The training config and the model config stored in ``run_dir/config.json``.

    Raises:
        ValueError: no ``config.json``, or one that is not a reslab run config.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a reslab run directory (no config.json)")
    stored = runs.read_json(path)
    if not (isinstance(stored, dict) and isinstance(stored.get("train"), dict)
            and isinstance(stored.get("model"), dict)):
        raise ValueError(f"{path} is not a reslab run config (it needs 'train' and 'model' objects)")
    try:
        return TrainConfig.from_dict({**TrainConfig().to_dict(), **stored["train"]}), stored["model"]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_mismatch(run_dir: Path | str, cfg: TrainConfig) -> list[str]:
    """The fields in which the run stored in ``run_dir`` differs from ``cfg`` (``[]``: same, or no run there).

    Options added to :class:`TrainConfig` after a run was made read as their defaults.
    """
    if not (Path(run_dir) / "config.json").exists():
        return []
    old, new = read_run_config(run_dir)[0].to_dict(), cfg.to_dict()
    return sorted(k for k in old if old[k] != new.get(k))


def _load_state(target: nn.Module | torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """``target.load_state_dict(state)``; a state of another architecture is one line naming the checkpoint."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not fit the {type(target).__name__.lower()} its config.json "
                         f"describes ({str(e).strip().splitlines()[0]})") from None


def load_model(run_dir: Path | str, map_location: str | torch.device = "cpu") -> tuple[ResidualNet, TrainConfig]:
    """Rebuild a run's model from its config and load the last checkpoint's weights."""
    run = Path(run_dir)
    cfg, model_cfg = read_run_config(run)
    try:
        model = create_model(**model_cfg)
    except TypeError as e:
        raise ValueError(f"{run / 'config.json'}: its model config does not build a model ({e})") from None
    ckpt = runs.load_checkpoint(run / "checkpoint.pt", map_location=map_location)
    _load_state(model, ckpt["model"], run / "checkpoint.pt")
    return model, cfg
