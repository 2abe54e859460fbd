"""Claims: one experiment per claim of the seed, each a spec of runs plus an analysis with a verdict.

A claim lists the training runs it needs for a profile (``smoke`` for tests, ``quick`` for ``make demo``,
``full`` for the longer study), and an analysis that reads only the saved run artifacts and returns measured
tables, figures and a verdict computed from those numbers. Runs are resumable: re-running ``reproduce`` on
the same output directory skips finished runs and continues killed ones.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from reslab import runs
from reslab.train import TrainConfig

PROFILES = ("smoke", "quick", "full")
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "inconclusive")


@dataclass
class ClaimResult:
    """What an analysis returns: a verdict computed from measurements, and the evidence.

    Attributes:
        verdict: one of :data:`VERDICTS`.
        summary: one paragraph: what was measured and how the verdict follows from it.
        checks: the named sub-tests behind the verdict, each with its measured numbers and outcome.
        table: rows of measured numbers (list of dicts with the same keys).
        figures: file names (relative to the claim directory) of plots.
    """

    verdict: str
    summary: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """A claim of the seed that ``reslab reproduce`` measures."""

    name: str
    title: str
    statement: str
    published: str
    runs: Callable[[str], dict[str, TrainConfig]]
    analyse: Callable[[dict[str, TrainConfig], Path], ClaimResult]


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


def _run_one(cfg: TrainConfig, out: str, threads: int) -> str:
    import torch

    from reslab.train import train

    torch.set_num_threads(threads)
    return train(cfg, out, resume=True, quiet=True).status


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_claim(claim: Claim, profile: str, out: Path, jobs: int | None = None, quiet: bool = False) -> ClaimResult:
    """Run (or resume) every run of ``claim`` under ``out/runs`` and analyse them into ``out``.

    Runs go to ``jobs`` worker processes with one thread each: the models of the quick profile are small,
    and one thread per process avoids oversubscribing the cores.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    specs = claim.runs(profile)
    jobs = default_jobs() if jobs is None else jobs
    if jobs <= 0:
        raise ValueError(f"jobs must be positive, got {jobs}")
    todo = {rid: cfg for rid, cfg in specs.items() if not _finished(out / "runs" / rid)}
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), disable=quiet, desc=claim.name, unit="run")
    if jobs == 1:
        for rid, cfg in todo.items():
            _run_one(cfg, str(out / "runs" / rid), threads=max(1, os.cpu_count() or 1))
            bar.update(1)
    elif todo:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, cfg, str(out / "runs" / rid), 1) for rid, cfg in todo.items()]
            for f in as_completed(futures):
                f.result()
                bar.update(1)
    bar.close()
    result = claim.analyse(specs, out)
    runs.write_json(out / "claim.json", {"claim": claim.name, "profile": profile, "verdict": result.verdict,
                                         "summary": result.summary, "checks": result.checks,
                                         "table": result.table, "figures": result.figures}, sort_keys=False)
    return result


def _finished(run_dir: Path) -> bool:
    p = run_dir / "result.json"
    return p.exists() and runs.read_json(p).get("status") in ("completed", "diverged")
