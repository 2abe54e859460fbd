"""Sweeps: a grid of training runs from one TOML file, run on a backend of :mod:`reslab.engine`, with an index.

A sweep file is data (parsed with ``tomllib``, never evaluated) with three tables::

    [sweep]                      # optional
    plain_twins = true           # add a residual = "plain" twin of every config (default false)
    metric = "test_error"        # what `reslab report DIR` shows by default (default test_error)

    [base]                       # a training config as `reslab train` takes it, on top of the family's recipe
    model = "mlp"                # a family (with a `depth` axis) or a model name such as "mlp20"
    data = "mnist1d:500"
    epochs = 5
    [base.model_kwargs]
    width = 32

    [axes]                       # each a non-empty list; the sweep is their product
    residual = ["identity", "rezero"]
    depth = [8, 20]
    lr = [0.1, 0.01]
    seed = [0, 1, 2]
    "model_kwargs.norm" = ["bn", "ln"]   # a family option (or [axes.model_kwargs] norm = [...])

An axis is a ``TrainConfig`` field (``residual``, ``lr``, ``seed``, ``epochs``, ``data``...), ``depth`` (the depth
of the base model's family), ``width`` (short for ``model_kwargs.width``), or ``model_kwargs.KEY`` /
``residual_kwargs.KEY`` (a family or scheme option, e.g. ``"residual_kwargs.gate_bias" = [-1.0, -3.0]`` with
``residual = "highway"``). Every config of the product is validated before anything is written: its fields, its
model, scheme and dataset names, and that the model builds and reads the dataset,
each problem as one line naming the axis values of the config it was found in.

The sweep directory::

    sweep.json       the plan: the spec, the axes and every run (id, axis values, full config); written once
    index.json       every run's state: pending, running, done, diverged or failed (with the error), and its
                     final metrics; rewritten atomically at every change by the process that runs the sweep
    runs/ID/         each run, as `reslab train` writes it

A run id spells its axis values (``residual-identity_depth-8_lr-0.1_seed-0``) and always names the same config:
rerunning a sweep into its directory skips finished runs (done or diverged), resumes killed ones and retries
failed ones; a different sweep in the same directory is refused. A failed or diverged run never stops the others.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import itertools
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from reslab import runs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATES = ("pending", "running", "done", "diverged", "failed")
SECTIONS = ("sweep", "base", "axes")
SWEEP_KEYS = {"plain_twins": bool, "metric": str}
KWARG_AXES = ("model_kwargs", "residual_kwargs")
METRICS = ("test_error", "test_loss", "train_loss", "train_error", "train_eval_error", "train_eval_loss")


@dataclass(frozen=True)
class Sweep:
    """A parsed, validated sweep: axis names and values in file order, and every run (id -> axis values, config)."""

    spec: dict[str, Any]
    axes: dict[str, list[Any]]
    runs: dict[str, tuple[dict[str, Any], Any]]  # id -> (axis values, TrainConfig)
    metric: str

    def plan(self) -> dict[str, Any]:
        """What ``sweep.json`` holds."""
        return {"spec": self.spec, "axes": self.axes, "metric": self.metric,
                "runs": [{"id": rid, "axes": ax, "config": cfg.to_dict()} for rid, (ax, cfg) in self.runs.items()]}


def read_spec(path: Path | str) -> dict[str, Any]:
    """The TOML file at ``path`` as data.

    Raises:
        ValueError: missing, unreadable, not UTF-8, or not TOML (with the parser's line and column).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"sweep file {p} is missing" if not p.exists() else f"sweep file {p} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"sweep file {p} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"sweep file {p} is not valid TOML: {e}") from None


def _flatten_axes(axes: Any) -> dict[str, Any]:
    """``[axes]`` with nested ``model_kwargs``/``residual_kwargs`` tables spelled as dotted names."""
    if not isinstance(axes, dict) or not axes:
        raise ValueError("[axes] must be a table with at least one axis (e.g. seed = [0, 1, 2])")
    flat: dict[str, Any] = {}
    for k, v in axes.items():
        if k in KWARG_AXES and isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[k] = v
    return flat


def _axis_field(name: str, fields: set[str]) -> str:
    """Check an axis name; return what it sets: a TrainConfig field, ``depth`` or ``KWARGS.KEY``."""
    if name == "width":
        return "model_kwargs.width"
    if name == "depth" or name in fields - set(KWARG_AXES) - {"model"} or name == "model":
        return name
    head, _, key = name.partition(".")
    if head in KWARG_AXES and key:
        return name
    raise ValueError(f"unknown axis {name!r}: an axis is a training option ({', '.join(sorted(fields))}), depth, "
                     f"width, model_kwargs.KEY or residual_kwargs.KEY")


def _slug(v: Any) -> str:
    s = re.sub(r"[^A-Za-z0-9.+-]", "~", str(v).lower() if isinstance(v, bool) else str(v))
    return s or "~"


def run_id(axes: dict[str, Any]) -> str:
    """``axis-value`` pairs joined by ``_`` (characters other than letters, digits, ``.+-`` become ``~``)."""
    return "_".join(f"{_slug(k.replace('_kwargs.', '.'))}-{_slug(v)}" for k, v in axes.items())


def parse(spec: dict[str, Any]) -> Sweep:
    """Validate ``spec`` (a parsed sweep file) and expand it into its runs.

    Raises:
        ValueError: one line naming the first problem (unknown table, key or axis, a value of the wrong type, an
            empty or repeated axis value, an invalid config, unknown model/scheme/dataset names, a model that does
            not build or cannot read its data).
    """
    from dataclasses import fields as dc_fields

    from reslab.models.base import list_families
    from reslab.train import TrainConfig

    if not isinstance(spec, dict):
        raise ValueError("a sweep must be a TOML table")
    unknown = sorted(set(spec) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown table [{unknown[0]}] in the sweep file; expected {', '.join(SECTIONS)}")
    head = spec.get("sweep", {})
    if not isinstance(head, dict):
        raise ValueError("[sweep] must be a table")
    for k, v in head.items():
        if k not in SWEEP_KEYS:
            raise ValueError(f"unknown key {k!r} in [sweep]; expected {', '.join(SWEEP_KEYS)}")
        if not isinstance(v, SWEEP_KEYS[k]):
            raise ValueError(f"[sweep] {k} must be a {SWEEP_KEYS[k].__name__}, got {v!r}")
    metric = head.get("metric", "test_error")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    base = spec.get("base")
    if not isinstance(base, dict) or "model" not in base:
        raise ValueError("[base] must be a table with at least `model` (a family such as \"mlp\" or a model such "
                         "as \"resnet20\")")
    names = {f.name for f in dc_fields(TrainConfig)}
    for k in base:
        if k not in names:
            raise ValueError(f"unknown training option {k!r} in [base]")
    axes = _flatten_axes(spec.get("axes"))
    sets = {name: _axis_field(name, names) for name in axes}
    if len(set(sets.values())) < len(sets) or {"depth", "model"} <= set(sets):
        raise ValueError("two axes set the same option (width is model_kwargs.width; depth names the model)")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"axis {name!r} must be a non-empty list of values, got {values!r}")
        if any(isinstance(v, (dict, list)) for v in values):
            raise ValueError(f"axis {name!r} takes plain values (numbers, strings, booleans), got {values!r}")
        slugs = [_slug(v) for v in values]
        if len(set(slugs)) < len(slugs):
            raise ValueError(f"axis {name!r} repeats a value: {values!r}")
    if head.get("plain_twins"):
        if "residual" in axes:
            axes["residual"] = axes["residual"] + ([] if "plain" in axes["residual"] else ["plain"])
        else:
            axes = {"residual": list(dict.fromkeys([base.get("residual", "identity"), "plain"])), **axes}
            sets = {"residual": "residual", **sets}
    families = {f.name for f in list_families()}
    model = base["model"]
    if not isinstance(model, str):
        raise ValueError(f"[base] model must be a string, got {model!r}")
    if "depth" in axes:
        if model not in families:
            raise ValueError(f"[base] model {model!r} with a depth axis must be a family: one of "
                             f"{', '.join(sorted(families))}")
    elif "model" not in axes and model in families:
        raise ValueError(f"[base] model {model!r} is a family: add a depth axis, or name a model such as "
                         f"{model}{next(f for f in list_families() if f.name == model).depths[0]}")

    out: dict[str, tuple[dict[str, Any], Any]] = {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        fields: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        for name, v in values.items():
            target = sets[name]
            if target == "depth":
                fields["model"] = f"{model}{v}"
            elif "." in target:
                kw, key = target.split(".", 1)
                fields[kw] = {**fields.get(kw, {}), key: v}
            else:
                fields[target] = v
        where = where_of(values)
        try:
            if not isinstance(fields.get("model"), str):
                raise ValueError(f"model must be a string, got {fields.get('model')!r}")
            cfg = TrainConfig.for_model(**fields)
        except TypeError as e:
            raise ValueError(f"sweep config ({where}): a value of the wrong type ({e})") from None
        except ValueError as e:
            raise ValueError(f"sweep config ({where}): {e}") from None
        out[run_id(values)] = (values, cfg)
    _check_builds([(where_of(v), cfg) for v, cfg in out.values()])
    return Sweep(spec, axes, out, metric)


def where_of(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _check_builds(configs: list[tuple[str, Any]]) -> None:
    """Each distinct model/scheme/data combination builds and reads its data (one model per combination)."""
    import torch

    from reslab.data import load_dataset
    from reslab.train import build_model, check_compatible

    data: dict[str, Any] = {}
    seen: set[str] = set()
    for where, cfg in configs:
        key = repr((cfg.model, cfg.residual, cfg.shortcut, cfg.zero_init_last, sorted(cfg.residual_kwargs.items()),
                    sorted(cfg.model_kwargs.items()), cfg.data, cfg.amp, cfg.device))
        if key in seen:
            continue
        seen.add(key)
        try:
            if cfg.data not in data:
                data[cfg.data] = load_dataset(cfg.data)
            model = build_model(cfg, data[cfg.data])
            # on the CPU, without amp: the runs' device may be a worker's GPU (train() checks it there)
            check_compatible(replace(cfg, amp=False), data[cfg.data], model, torch.device("cpu"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep config ({where}): {e}") from None


# --- the sweep directory ---------------------------------------------------------------------------------------

def _final(run_dir: Path) -> tuple[str, dict[str, Any] | None]:
    """A run directory's state from its own files: done, diverged, or pending (absent or unfinished)."""
    p = run_dir / "result.json"
    if not p.exists():
        return "pending", None
    try:
        res = runs.read_json(p)
    except ValueError:
        return "pending", None
    status = res.get("status") if isinstance(res, dict) else None
    if status == "completed":
        return "done", res.get("final")
    if status == "diverged":
        return "diverged", res.get("final")
    return "pending", None


class Index:
    """``index.json``: every run's state, error and final metrics; written atomically at every change."""

    def __init__(self, root: Path, ids: list[str]) -> None:
        self.path = root / "index.json"
        self.root = root
        old = {}
        if self.path.exists():
            try:
                old = runs.read_json(self.path).get("runs", {})
            except (ValueError, AttributeError):
                old = {}
        self.runs: dict[str, dict[str, Any]] = {}
        for rid in ids:  # the run directories are the truth; a failed run keeps its error until it is retried
            state, final = _final(root / "runs" / rid)
            error = old.get(rid, {}).get("error") if state == "pending" and old.get(rid, {}).get("state") == \
                "failed" else None
            self.runs[rid] = {"state": "failed" if error else state, "error": error, "final": final}
        self.write()

    def set(self, rid: str, state: str, error: str | None = None) -> None:
        final = None
        if state in ("done", "diverged"):
            final = _final(self.root / "runs" / rid)[1]
        self.runs[rid] = {"state": state, "error": error, "final": final}
        self.write()

    def counts(self) -> dict[str, int]:
        return {s: sum(r["state"] == s for r in self.runs.values()) for s in STATES}

    def write(self) -> None:
        runs.write_json(self.path, {"updated": _dt.datetime.now().isoformat(timespec="seconds"),
                                    "counts": self.counts(), "runs": self.runs}, sort_keys=False)


def prepare(sweep: Sweep, root: Path) -> Index:
    """Write (or check) ``root/sweep.json`` and reconcile ``root/index.json`` with the run directories.

    Raises:
        ValueError: ``root`` is a file, is not writable, or holds another sweep or something else.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a sweep directory")
    plan_path = root / "sweep.json"
    plan = runs.as_json(sweep.plan())
    if plan_path.exists():
        try:
            old = runs.read_json(plan_path)
        except ValueError:
            raise ValueError(f"{plan_path} is not a readable sweep plan: write this sweep to another --out") from None
        old_runs = {r["id"]: r["config"] for r in old.get("runs", [])} if isinstance(old, dict) else {}
        new_runs = {r["id"]: r["config"] for r in plan["runs"]}
        if old_runs != new_runs:
            changed = sorted(set(old_runs) ^ set(new_runs)) or sorted(k for k in new_runs if old_runs[k] != new_runs[k])
            raise ValueError(f"{root} holds another sweep (run {changed[0]} differs): write this sweep to another "
                             f"--out")
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no sweep: write the sweep to a new or empty --out")
    else:
        try:
            runs.write_json(plan_path, plan, sort_keys=False)
        except OSError as e:
            raise ValueError(f"cannot write the sweep to {root}: {e.strerror or e}") from None
    return Index(root, list(sweep.runs))


def run_sweep(sweep: Sweep, root: Path, backend: str = "local", workers: int | None = None,
              address: str | None = None, gpus_per_run: float = 0.0,
              echo: Callable[[str], None] | None = None, tensorboard: bool = False) -> Index:
    """Run every unfinished run of ``sweep`` into ``root`` on ``backend``; the index records each state change."""
    from tqdm.auto import tqdm

    from reslab.engine import Job, run_jobs, session
    from reslab.train import TENSORBOARD_MISSING

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(TENSORBOARD_MISSING)
    with session(backend, address, workers):  # connected (or refused) before anything is written
        index = prepare(sweep, root)
        todo = [Job(rid, cfg, str(root / "runs" / rid), tensorboard) for rid, (_, cfg) in sweep.runs.items()
                if index.runs[rid]["state"] not in ("done", "diverged")]
        bar = tqdm(total=len(sweep.runs), initial=len(sweep.runs) - len(todo), desc="sweep", unit="run",
                   disable=echo is None)

        def done(o: Any) -> None:
            index.set(o.key, {"completed": "done"}.get(o.status, o.status), o.error)
            bar.update(1)
            if o.status == "failed" and echo is not None:
                bar.write(f"run {o.key} failed: {o.error}")

        try:
            run_jobs(todo, backend, workers=workers, address=address, gpus_per_run=gpus_per_run,
                     on_start=lambda job: index.set(job.key, "running"), on_done=done)
        finally:
            bar.close()
            for rid, r in index.runs.items():  # runs stopped by Ctrl-C or a lost worker: resumable, so pending
                if r["state"] == "running":
                    index.runs[rid] = {"state": "pending", "error": None, "final": None}
            index.write()
    return index
