"""Claims: one experiment per claim of the seed, each a spec of runs plus an analysis with a verdict.

A claim lists the training runs it needs for a profile (``smoke`` for tests, ``quick`` for ``make demo``,
``full`` for the longer study), and an analysis that reads only the saved run artifacts (and measures the saved
checkpoints) and returns measured tables, figures and a verdict computed from those numbers. Runs live in one
shared folder, ``OUT/runs/RUN_ID``, so claims that need the same trained models share them; a run id always
names the same config (``train`` refuses to resume a run whose stored config differs). Runs are resumable:
re-running ``reproduce`` on the same output directory skips finished runs and continues killed ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from reslab import runs
from reslab.train import TrainConfig

PROFILES = ("smoke", "quick", "full")
RECIPE_ROWS = ("data", "model", "optimiser", "weight decay", "schedule", "training")
INCONCLUSIVE_AT_BUDGET = "inconclusive at this budget"
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "inconclusive", INCONCLUSIVE_AT_BUDGET)


@dataclass
class ClaimResult:
    """What an analysis returns: a verdict computed from measurements, and the evidence.

    Attributes:
        verdict: one of :data:`VERDICTS`.
        summary: one paragraph: what was measured and how the verdict follows from it.
        checks: the named sub-tests behind the verdict, each with its measured numbers and outcome.
        table: rows of measured numbers (list of dicts with the same keys).
        figures: file names (relative to the claim directory) of plots.
        ablation: the measurement that explains the verdict, above all why a claim is not fully reproduced
            (see :func:`ablation`): ``{"text": paragraph, "table": rows, "figures": file names}``.
    """

    verdict: str
    summary: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    ablation: dict[str, Any] | None = None


def ablation(text: str, table: Sequence[dict[str, Any]] = (), figures: Sequence[str] = ()) -> dict[str, Any]:
    """A claim's ablation: the paragraph saying what was measured and what it shows, its table and figures.
    The report titles it "Why not fully reproduced" when the verdict is below ``reproduced``."""
    return {"text": text, "table": list(table), "figures": list(figures)}


@dataclass(frozen=True)
class Claim:
    """A claim of the seed that ``reslab reproduce`` measures."""

    name: str
    title: str
    statement: str
    published: str
    runs: Callable[[str], dict[str, TrainConfig]]
    analyse: Callable[["Context"], ClaimResult]
    #: what ``reproduce --budget K`` multiplies by K, said in the report (see :func:`planned`)
    budget: str = "the epochs of every training run"
    #: the published experiment's recipe, one entry per :data:`RECIPE_ROWS`, shown beside ours
    paper: dict[str, str] = field(default_factory=dict)
    #: what the runs' configs do not say about our recipe for a profile (e.g. nets measured at initialisation)
    ours: Callable[[str], dict[str, str]] = lambda profile: {}


@dataclass(frozen=True)
class Context:
    """What an analysis gets: its runs, where they are, where to write, and the profile."""

    specs: dict[str, TrainConfig]
    runs_dir: Path
    out: Path
    profile: str
    budget: int = 1  # ``reproduce --budget``: analyses that measure at initialisation scale their seeds by it

    def run(self, rid: str) -> Path:
        return self.runs_dir / rid

    def save_figure(self, fig: Any, name: str) -> str:
        """Write ``fig`` as ``name`` into the claim's folder; returns ``name`` for :attr:`ClaimResult.figures`."""
        from reslab.report.plots import save_figure

        save_figure(fig, self.out / name)
        return name


_CLAIMS: dict[str, Claim] = {}


def register_claim(claim: Claim) -> Claim:
    _CLAIMS[claim.name] = claim
    return claim


def list_claims() -> list[Claim]:
    return list(_CLAIMS.values())


def get_claim(name: str) -> Claim:
    if name not in _CLAIMS:
        raise ValueError(f"unknown claim {name!r}; known: {', '.join(_CLAIMS)}")
    return _CLAIMS[name]


def differs(name: str, a: Sequence[float], b: Sequence[float], expect: str, floor: float = 0.01) -> dict[str, Any]:
    """A check on two groups of seeds: ``mean(b) - mean(a)`` against ``max(2 standard errors, floor)``.

    ``expect="higher"`` passes when ``b`` exceeds ``a`` by more than the margin; ``"not higher"`` when it does
    not; ``"lower"`` when ``b`` is below ``a`` by more than the margin.
    """
    se = pooled_se(a, b)
    diff = float(np.mean(b) - np.mean(a))
    margin = max(2 * se, floor)
    passed = {"higher": diff > margin, "not higher": diff <= margin, "lower": diff < -margin}[expect]
    return {"check": name, "difference": diff, "se": se, "margin": margin, "passed": bool(passed)}


def split_id(rid: str, prefix: str, *fields: tuple[str, type]) -> tuple[Any, ...]:
    """A claim's run id read back: ``prefix``, a name (dashes allowed), then ``-TAGvalue`` per field, e.g.
    ``split_id("lrs-scaled-b8-lr0.1-s2", "lrs-", ("b", int), ("lr", float), ("s", int)) == ("scaled", 8, 0.1, 2)``.

    Raises:
        ValueError: one line, for an id not of that form.
    """
    parts = rid.removeprefix(prefix).rsplit("-", len(fields)) if rid.startswith(prefix) else []
    if len(parts) == len(fields) + 1 and parts[0] and all(p.startswith(t) for p, (t, _) in zip(parts[1:], fields)):
        try:
            return (parts[0], *(cast(p[len(t):]) for p, (t, cast) in zip(parts[1:], fields)))
        except ValueError:
            pass
    form = prefix + "NAME" + "".join(f"-{t}{cast.__name__.upper()}" for t, cast in fields)
    raise ValueError(f"run id {rid!r} is not of the form {form}")


def pooled_se(a: Sequence[float], b: Sequence[float]) -> float:
    """The standard error of ``mean(b) - mean(a)`` for two independent groups of seeds (0 with a single seed)."""
    if min(len(a), len(b)) < 2:
        return 0.0
    return math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))


def mean_sd(v: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (0 with a single seed)."""
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def run_measures(run: Path, chance: float) -> dict[str, Any]:
    """A classification run's errors in %: over the run (mean over epochs of the training error during each epoch,
    as the optimiser saw it), final training error (eval mode), final held-out error, and the training curve; a
    diverged run counts as ``chance``."""
    result = runs.read_json(run / "result.json")
    metrics = runs.read_jsonl(run / "metrics.jsonl")
    curve = [100 * m["train_error"] for m in metrics]
    if result["status"] == "diverged" or not metrics:
        return {"run": chance, "train": chance, "test": chance, "curve": curve, "diverged": True, "steps": 0}
    last = metrics[-1]
    return {"run": float(np.mean(curve)), "train": 100 * last.get("train_eval_error", last["train_error"]),
            "test": 100 * last["test_error"], "curve": curve, "diverged": False, "steps": int(last.get("step", 0))}


def initial_model(cfg: TrainConfig, data: Any) -> Any:
    """Run ``cfg``'s model as its training started (its seed's initialisation), leaving the global RNG as it was."""
    import torch

    from reslab.train import build_model

    with torch.random.fork_rng():
        return build_model(cfg, data)


def check(name: str, value: float, passed: bool, **numbers: float) -> dict[str, Any]:
    """A check on a measured value with a stated rule."""
    return {"check": name, "value": float(value), **{k: float(v) for k, v in numbers.items()}, "passed": bool(passed)}


def verdict_of(passed: Sequence[bool]) -> str:
    """``reproduced`` when every check passed, ``partly reproduced`` when some did, else ``not reproduced``."""
    return "reproduced" if all(passed) else "partly reproduced" if any(passed) else "not reproduced"


def cifar_present() -> bool:
    """Whether a local CIFAR-10 archive is where ``cifar10`` looks by default (``$RESLAB_DATA`` or ``./data``)."""
    from reslab.data.cifar import resolve_dir

    try:
        resolve_dir("cifar10", None)
    except ValueError:
        return False
    return True


def conv_setting(profile: str, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A conv-net claim's setting for ``profile`` from its ``table`` (data ``digits`` unless it says otherwise):
    ``full`` becomes the table's ``full_cifar`` entry (CIFAR-10 at He et al.'s depth and schedule) when a local
    CIFAR-10 archive is present (:func:`cifar_present`)."""
    key = "full_cifar" if profile == "full" and "full_cifar" in table and cifar_present() else profile
    return {"data": "digits", **table[key]}


#: He et al.'s CIFAR-10 training, for the ``full_cifar`` settings: 64k iterations of batch 128 = 164 epochs of
#: 50,000 images (the rate / 10 at 50% and 75%: 32k and 48k iterations, the family's recipe)
CIFAR_EPOCHS = 164


def load_trained(ctx: "Context", rid: str) -> tuple[Any, TrainConfig]:
    """The trained model of run ``rid`` (eval mode, CPU) and its config."""
    from reslab.config import load_model

    model, cfg = load_model(ctx.run(rid))
    return model.eval(), cfg


def eval_batch(data_spec: str, n: int, split: str = "train") -> tuple[Any, Any, int]:
    """The first ``n`` prepared samples of a dataset split: ``(x, y, num_classes)``."""
    from reslab.data import load_dataset

    data = load_dataset(data_spec)
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    return data.prepare(x[:n], train=False), y[:n], data.num_classes


def compare_budgets(base: Path, larger: Path, claim: Claim, budget: int) -> dict[str, Any]:
    """Put the agreement of ``claim``'s checks at the profile's budget (``base``) and at ``budget`` times it
    (``larger``) into ``base``'s ``claim.json``; a claim whose checks disagree becomes
    :data:`INCONCLUSIVE_AT_BUDGET`, with both verdicts and every check's numbers at both budgets kept.

    Returns:
        The updated claim record.
    """
    path = base / "claims" / claim.name / "claim.json"
    a, b = runs.read_json(path), runs.read_json(larger / "claims" / claim.name / "claim.json")
    by_name = {c["check"]: c for c in b["checks"]}
    rows = []
    for i, ca in enumerate(a["checks"]):
        cb = by_name.get(ca["check"], b["checks"][i] if i < len(b["checks"]) else {})
        row = {"check": ca["check"]}
        for label, c in (("1x", ca), (f"{budget}x", cb)):
            value = c.get("value", c.get("difference"))
            if value is not None:
                row[f"value at {label}"] = value
            row[f"passed at {label}"] = c.get("passed")
        row["agree"] = ca.get("passed") == cb.get("passed")
        rows.append(row)
    agree = all(r["agree"] for r in rows)
    a["budget"] = {"factor": budget, "what": claim.budget, "verdict_1x": a["verdict"],
                   f"verdict_{budget}x": b["verdict"], "checks": rows, "agree": agree}
    a["verdict"] = a["budget"]["verdict_1x"] if agree else INCONCLUSIVE_AT_BUDGET
    runs.write_json(path, a, sort_keys=False)
    return a


def _unique(values: Any) -> list[Any]:
    return list(dict.fromkeys(values))


_OPTIMISERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def _rate(v: float) -> str:
    """``1e-4`` rather than ``0.0001``, ``0.1`` as it is."""
    return f"{v:.0e}".replace("e-0", "e-") if 0 < v < 1e-3 else f"{v:g}"


def _schedule(cfg: TrainConfig) -> str:
    s = {"constant": "constant", "cosine": "cosine to zero",
         "step": f"x{cfg.gamma:g} at " + ", ".join(
             f"{100 * m:g}%" if cfg.milestones_are_fractions else f"epoch {m:g}" for m in cfg.milestones)
         + (" of training" if cfg.milestones_are_fractions else "")}[cfg.schedule]
    if cfg.warmup_steps:
        s += (f", after {cfg.warmup_steps} steps at {cfg.warmup_lr:g}" if cfg.warmup_lr is not None
              else f", after {cfg.warmup_steps} steps of linear warm-up")
    return s


def our_recipe(specs: dict[str, TrainConfig], runs_dir: Path) -> dict[str, str]:
    """Our recipe, by :data:`RECIPE_ROWS`, from the runs' configs; the steps per run are read from their
    ``result.json`` (what was trained, not what was planned)."""
    from reslab.data import load_dataset

    cfgs = list(specs.values())
    if not cfgs:
        return {}
    data = []
    for spec in _unique(c.data for c in cfgs):
        n = len(load_dataset(spec).x_train)
        used = _unique(min(n, c.train_samples or n) for c in cfgs if c.data == spec)
        data.append(f"{spec} ({' / '.join(f'{u:,}' for u in used)} training samples)")
    kwargs = _unique(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.model_kwargs.items()) for c in cfgs)
    zero = _unique(c.zero_init_last for c in cfgs)
    model = (", ".join(_unique(c.model for c in cfgs)) + (f" ({' / '.join(k for k in kwargs if k)})"
                                                          if any(kwargs) else "")
             + "; residual: " + ", ".join(_unique(c.residual for c in cfgs))
             + ("; last BN of each branch zero-initialised in some runs" if len(zero) > 1
                else "; last BN of each branch zero-initialised" if zero[0] else ""))
    rates: dict[tuple, list[str]] = {}  # the learning rates of each otherwise equal optimiser (a sweep's in one item)
    for c in cfgs:
        rates.setdefault((c.optimizer, c.momentum, c.nesterov, c.batch_size), []).append(_rate(c.lr))
    optimiser = " / ".join(
        f"{_OPTIMISERS[opt]}, lr {' / '.join(_unique(lrs))}"
        + (f", momentum {mom:g}" + (" (Nesterov)" if nest else "") if opt == "sgd" else "") + f", batch {batch}"
        for (opt, mom, nest, batch), lrs in rates.items())
    steps = sorted(_unique(int(runs.read_json(p)["final"]["step"]) for rid in specs
                           if (p := runs_dir / rid / "result.json").exists()
                           and runs.read_json(p).get("final")))
    trained = (f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}-{steps[-1]:,}") if steps else "?"
    epochs = " / ".join(str(e) for e in _unique(c.epochs for c in cfgs))
    return {"data": "; ".join(data), "model": model, "optimiser": optimiser,
            "weight decay": " / ".join(_unique(_rate(c.weight_decay) if c.weight_decay else "none" for c in cfgs)),
            "schedule": " / ".join(_unique(_schedule(c) for c in cfgs)),
            "training": f"{epochs} epoch{'s' if epochs != '1' else ''}, {trained} steps per run (measured); "
                        f"{len(cfgs)} runs over {len(_unique(c.seed for c in cfgs))} seeds"}


def recipe_table(claim: Claim, profile: str, specs: dict[str, TrainConfig], runs_dir: Path) -> list[dict[str, str]]:
    """The published recipe beside ours, row by row (:data:`RECIPE_ROWS`)."""
    ours, extra = our_recipe(specs, runs_dir), claim.ours(profile)
    return [{"": row, "published": claim.paper.get(row, ""),
             "ours": "; ".join(t for t in (ours.get(row), extra.get(row)) if t)} for row in RECIPE_ROWS]


def check_data(claims: Sequence[Claim], profile: str) -> None:
    """Load every dataset the claims' runs need, before any training: a missing corpus (or package) fails in
    one line at the start, not after an hour of other claims.

    Raises:
        ValueError: a dataset that cannot be loaded.
    """
    from reslab.data import load_dataset

    for spec in sorted({cfg.data for c in claims for cfg in c.runs(profile).values()}):
        load_dataset(spec)


def scale(cfg: TrainConfig, budget: int) -> TrainConfig:
    """``cfg`` at ``budget`` times its size: ``train_samples`` times K where the run is sized in samples (an equal
    token budget), otherwise its epochs times K."""
    if budget == 1:
        return cfg
    if cfg.train_samples is not None:
        return replace(cfg, train_samples=cfg.train_samples * budget)
    return replace(cfg, epochs=cfg.epochs * budget)


def planned(claim: Claim, profile: str, budget: int = 1) -> dict[str, TrainConfig]:
    """The runs ``claim`` needs for ``profile`` at ``budget`` (1: the profile's own). Analyses read the training
    set's eval-mode error at the end of a run only, so a run that evaluates it does so after the final epoch only
    (``eval_train="final"``)."""
    return {rid: scale(replace(cfg, eval_train="final") if cfg.eval_train is True else cfg, budget)
            for rid, cfg in claim.runs(profile).items()}


def check_reuse(claims: Sequence[Claim], profile: str, root: Path, budget: int = 1) -> None:
    """Refuse, before training anything, an output folder made with another profile, or whose run folder of the
    same id holds a different config: a finished run is reused only when its config is the one asked for.

    Raises:
        ValueError: one line naming the folder and what differs.
    """
    from reslab.config import config_mismatch

    if (root / "sweep.json").exists():
        raise ValueError(f"{root} holds a sweep (sweep.json): write this reproduction to another --out")
    if (root / "config.json").exists():
        raise ValueError(f"{root} holds a training run (config.json): write this reproduction to another --out")
    meta = runs.read_json(root / "reproduce.json") if (root / "reproduce.json").exists() else None
    if meta is not None:
        made = (meta.get("profile"), meta.get("budget", 1)) if isinstance(meta, dict) else (None, None)
        if made != (profile, budget):
            raise ValueError(f"{root} holds a reproduction made with profile {made[0]!r} at budget {made[1]}, not "
                             f"{profile!r} at budget {budget}: write this one to another --out")
    for claim in claims:
        for rid, cfg in planned(claim, profile, budget).items():
            diff = config_mismatch(root / "runs" / rid, cfg)
            if diff:
                raise ValueError(f"{root / 'runs' / rid} holds a run with another config (it differs in "
                                 f"{', '.join(diff)}): write this reproduction to another --out")


def run_claim(claim: Claim, profile: str, root: Path, jobs: int | None = None, quiet: bool = False,
              budget: int = 1, backend: str = "local", address: str | None = None,
              gpus_per_run: float = 0.0) -> ClaimResult:
    """Run (or resume) every run of ``claim`` under ``root/runs`` and analyse them into ``root/claims/NAME``;
    ``budget`` K > 1 runs the profile at K times its size (:func:`planned`).

    The runs go through :func:`reslab.engine.run_jobs` on ``backend`` (``jobs`` worker processes with one
    thread each by default: the models of the quick profile are small; ``ray`` spreads them over a cluster).
    A failed run does not stop the others; the claim then stops with the first failure's error.
    """
    from reslab.engine import Job, run_jobs

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    if jobs is not None and jobs <= 0:
        raise ValueError(f"jobs must be positive, got {jobs}")
    specs = planned(claim, profile, budget)
    check_reuse([claim], profile, root, budget)
    _record(root, profile, budget, claim.name)
    runs_dir, out = root / "runs", root / "claims" / claim.name
    todo = [Job(rid, cfg, str(runs_dir / rid)) for rid, cfg in specs.items() if not _finished(runs_dir / rid)]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), disable=quiet, desc=claim.name, unit="run")
    outcomes = run_jobs(todo, backend, workers=jobs, address=address, gpus_per_run=gpus_per_run,
                        on_done=lambda o: bar.update(1))
    bar.close()
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise ValueError(f"{claim.name}: {len(failed)} of {len(todo)} runs failed; run {failed[0].key}: "
                         f"{failed[0].error}")
    out.mkdir(parents=True, exist_ok=True)
    result = claim.analyse(Context(specs, runs_dir, out, profile, budget))
    runs.write_json(out / "claim.json", {"claim": claim.name, "title": claim.title, "statement": claim.statement,
                                         "published": claim.published, "profile": profile,
                                         "recipe": recipe_table(claim, profile, specs, runs_dir),
                                         "verdict": result.verdict, "summary": result.summary,
                                         "checks": result.checks, "table": result.table, "figures": result.figures,
                                         "ablation": result.ablation},
                    sort_keys=False)
    return result


def _record(root: Path, profile: str, budget: int, name: str) -> None:
    """``root/reproduce.json``: the profile, the reslab version, the date of the last run and the claims in the
    order they were first run (what a report is rebuilt from)."""
    import datetime as _dt

    import reslab

    path = root / "reproduce.json"
    meta = runs.read_json(path) if path.exists() else {}
    claims = list(meta.get("claims", [])) if isinstance(meta, dict) else []
    runs.write_json(path, {"profile": profile, "budget": budget, "reslab": reslab.__version__,
                           "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                           "claims": claims + ([name] if name not in claims else [])}, sort_keys=False)


def _finished(run_dir: Path) -> bool:
    p = run_dir / "result.json"
    return p.exists() and runs.read_json(p).get("status") in ("completed", "diverged")
