"""What ``reslab train --compile`` buys on the CPU: step time eager vs ``torch.compile``, compile time, break-even.

**Step.** The training step of ``reslab train`` for each family's recipe (``TrainConfig.for_model``: its
optimizer, learning rate, weight decay), under the same ``torch.use_deterministic_algorithms(True,
warn_only=True)``: forward + cross-entropy + backward + optimizer step on a fixed batch of random inputs, in
train mode. ``--compile`` compiles the model only (``torch.compile(model, dynamic=False)``, inductor, default
mode); the loss and the optimizer step stay eager, as in ``reslab train``. Families, small nets like those of
``reslab reproduce --profile quick``: resnet20 and preact_resnet20 (width 16) on 1x8x8 digits-shaped inputs,
batch 128; mlp20 (width 64) on 40 features (MNIST-1D), batch 128; densenet_bc40 (growth 12) on 1x8x8, batch 64;
gpt4 (d=128, 4 heads, context 64, vocabulary 128), batch 64; and gpt4 at the transformer claim's quick size
(d=32, 2 heads, context 32, batch 32). ``--families`` picks some.

**Timing.** Eager and compiled copies of the same net (same initialisation) are timed in the same process in
interleaved rounds (the order alternates each round) of ``--steps`` steps, after ``--warmup`` steps of each;
the speed-up is eager / compiled step time, paired per round, median with a distribution-free 95% confidence
interval.

**Compile time.** The first compiled step less an eager step: the one-off cost of tracing and code generation,
measured with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a fresh folder for this process; a
trivial function is compiled first, so the process's one-time start-up of the compiler, listed separately, is
not charged to the first family), and again for a second, fresh copy of the net once the on-disk cache holds
its kernels (``torch._dynamo.reset()`` in between): what every further run of the same architecture pays, e.g.
the seeds of a claim. A run also compiles a second graph for its last, smaller batch when the batch size does
not divide the training set. **Break-even**: the number of steps after which compiling has paid for itself,
compile time / (eager - compiled step time); "never" when compiled steps are not faster.

``--write`` replaces the ``<!-- bench_compile -->`` section of BENCHMARKS.md. Run with ``--threads 1`` (the
default, as ``reslab reproduce`` runs its workers) on a shared machine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="reslab-bench-compile-")  # before torch imports
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import reslab  # noqa: E402
from _timing import OtherLoad, interleaved, median_ci, n_params, write_benchmark  # noqa: E402
from reslab.losses import loss_fn  # noqa: E402
from reslab.train import TrainConfig, make_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_compile -->", "<!-- /bench_compile -->"

#: label -> (model name, family options, input shape, batch, classes or vocabulary)
FAMILIES: dict[str, tuple[str, dict, tuple[int, ...], int, int]] = {
    "resnet20": ("resnet20", {}, (1, 8, 8), 128, 10),
    "preact_resnet20": ("preact_resnet20", {}, (1, 8, 8), 128, 10),
    "mlp20": ("mlp20", {"width": 64}, (40,), 128, 10),
    "densenet_bc40": ("densenet_bc40", {}, (1, 8, 8), 64, 10),
    "gpt4": ("gpt4", {"d_model": 128, "n_heads": 4}, (64,), 64, 128),
    "gpt4 quick": ("gpt4", {"d_model": 32, "n_heads": 2}, (32,), 32, 128),
}


def build(label: str) -> tuple[nn.Module, Tensor, Tensor]:
    name, kw, shape, batch, classes = FAMILIES[label]
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=classes, input_shape=shape, **kw)
    g = torch.Generator().manual_seed(0)
    if name.startswith("gpt"):
        x = torch.randint(0, classes, (batch, *shape), generator=g)
        y = torch.randint(0, classes, (batch, *shape), generator=g)
    else:
        x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)
    return model.train(), x, y


def make_train_step(label: str, model: nn.Module, x: Tensor, y: Tensor, compiled: bool):
    """``reslab train``'s step for the family's recipe; ``compiled``: through ``torch.compile`` of the model."""
    opt = make_optimizer(TrainConfig.for_model(FAMILIES[label][0]), model)
    fwd = torch.compile(model, dynamic=False) if compiled else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(fwd(x), y).backward()
        opt.step()

    return step


def quick_runs() -> dict[str, list[tuple[int, int, str]]]:
    """Per model family: ``(steps, graphs, architecture)`` of every distinct run of ``reslab reproduce --profile
    quick`` (graphs: 2 where the last batch is smaller)."""
    import json
    import math

    from reslab.data import load_dataset
    from reslab.experiments import list_claims
    from reslab.models import parse_model_name

    specs = {rid: cfg for c in list_claims() for rid, cfg in c.runs("quick").items()}
    sizes: dict[str, int] = {}
    out: dict[str, list[tuple[int, int, str]]] = {}
    for cfg in specs.values():
        n = sizes.setdefault(cfg.data, len(load_dataset(cfg.data).y_train))
        n = min(n, cfg.train_samples or n)
        arch = json.dumps([cfg.model, cfg.residual, cfg.shortcut, cfg.zero_init_last, cfg.model_kwargs,
                           cfg.residual_kwargs, cfg.batch_size, cfg.data], sort_keys=True)
        out.setdefault(parse_model_name(cfg.model)[0].name, []).append(
            (cfg.epochs * math.ceil(n / cfg.batch_size), 1 + (n % cfg.batch_size != 0), arch))
    return out


def net_saving(r: dict[str, object], family_runs: list[tuple[int, int, str]]) -> float:
    """Seconds ``--compile`` saves over a family's quick-profile runs at this row's measured gain and compile
    times: every run saves steps x gain and compiles its graphs from the cache; the first run of each
    architecture compiles them with an empty cache."""
    gain = (r["eager_ms"] - r["compiled_ms"]) / 1e3
    archs = {a for _, _, a in family_runs}
    first = {a: g for _, g, a in family_runs}
    return (sum(s * gain - g * r["warm_s"] for s, g, _ in family_runs)
            - sum(g * (r["cold_s"] - r["warm_s"]) for a, g in first.items() if a in archs))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt_ci(v: list[float]) -> str:
    lo, hi = median_ci(v)
    return f"{statistics.median(v):.2f} [{lo:.2f}-{hi:.2f}]"


def run_family(label: str, args: argparse.Namespace) -> dict[str, object]:
    eager_model, x, y = build(label)
    comp_model = copy.deepcopy(eager_model)
    eager = make_train_step(label, eager_model, x, y, False)
    for _ in range(args.warmup):
        eager()
    eager_once = min(timed(eager) for _ in range(3))
    compiled = make_train_step(label, comp_model, x, y, True)
    cold = timed(compiled) - eager_once
    for _ in range(args.warmup - 1):
        compiled()
    # a second, fresh copy compiled once the cache holds this net's kernels
    torch._dynamo.reset()
    warm_step = make_train_step(label, copy.deepcopy(eager_model), x, y, True)
    warm = timed(warm_step) - eager_once
    del warm_step
    torch._dynamo.reset()
    compiled = make_train_step(label, comp_model, x, y, True)  # the timed one: compiled again, from the cache
    for _ in range(args.warmup):
        compiled()
    others = OtherLoad()  # only while timing: the compiler's gcc processes would count as other load
    times = interleaved({"eager": eager, "compiled": compiled}, args.rounds, args.steps, "cpu")
    speedup = [e / c for e, c in zip(times["eager"], times["compiled"])]
    te, tc = statistics.median(times["eager"]), statistics.median(times["compiled"])
    gain = te - tc
    return {"label": label, "params": n_params(eager_model), "batch": len(x), "eager_ms": 1e3 * te,
            "others": others.cores(),
            "compiled_ms": 1e3 * tc, "speedup": speedup, "cold_s": cold, "warm_s": warm,
            "break_even_cold": cold / gain if gain > 0 else None, "break_even_warm": warm / gain if gain > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="steps per round of each variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as reslab train

    start_up = timed(lambda: torch.compile(lambda t: (t * 2).sin())(torch.ones(3)))
    quick = quick_runs()
    rows = []
    for label in args.families:
        rows.append(run_family(label, args))
        r = rows[-1]
        print(f"  {label}: eager {r['eager_ms']:.2f} ms, compiled {r['compiled_ms']:.2f} ms, speed-up "
              f"{fmt_ci(r['speedup'])}, compile {r['cold_s']:.1f} s (cached {r['warm_s']:.1f} s)", flush=True)

    def steps(v: float | None) -> str:
        return "never" if v is None else f"{v:,.0f}"

    lines = [f"- compiler start-up in this process (a trivial function, once): {start_up:.1f} s",
             f"- {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps; other processes "
             f"{max(r['others'] for r in rows):.2f} cores at most while timing\n",
             "| net | parameters | batch | eager step | compiled step | speed-up eager/compiled [95% CI] | "
             "compile time (empty cache / cached) | break-even steps (empty cache / cached) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name, kw, shape, _, _ = FAMILIES[r["label"]]
        what = f"{r['label']} ({', '.join(f'{k}={v}' for k, v in kw.items())}{', ' if kw else ''}input {shape})"
        lines.append(f"| {what} | {r['params']:,} | {r['batch']} | {r['eager_ms']:.2f} ms | {r['compiled_ms']:.2f} ms"
                     f" | {fmt_ci(r['speedup'])} | {r['cold_s']:.1f} s / {r['warm_s']:.1f} s | "
                     f"{steps(r['break_even_cold'])} / {steps(r['break_even_warm'])} |")
    lines += ["\n**Against `reslab reproduce --profile quick`**: its runs of each family (distinct run ids of all "
              "claims), and the time `--compile` would save over all of them at the row's measured gain and "
              "compile times (each run compiles its graphs from the cache; the first run of each architecture with "
              "an empty cache). The claims' nets are not all of the row's size (e.g. the degradation claim's MLPs "
              "are 128 wide), so this is an estimate.\n",
              "| net | family | quick runs (architectures) | steps per run (median) | graphs per run | "
              "saved over the runs |", "|---|---|---|---|---|---|"]
    wins = []
    for r in rows:
        fam = reslab.models.parse_model_name(FAMILIES[r["label"]][0])[0].name
        runs_ = quick.get(fam, [])
        if not runs_:
            lines.append(f"| {r['label']} | {fam} | none | | | |")
            continue
        saved = net_saving(r, runs_)
        if saved > 0 and median_ci(r["speedup"])[0] > 1.0:
            wins.append(fam)
        lines.append(f"| {r['label']} | {fam} | {len(runs_)} ({len({a for _, _, a in runs_})}) | "
                     f"{statistics.median(s for s, _, _ in runs_):.0f} | "
                     f"{'/'.join(str(g) for g in sorted({g for _, g, _ in runs_}))} | {saved:+,.0f} s |")
    lines.append(f"\n- compiled steps faster (95% CI above 1): "
                 f"{', '.join(r['label'] for r in rows if median_ci(r['speedup'])[0] > 1.0) or 'none'}")
    lines.append(f"- families where `--compile` saves time over the quick profile's runs: "
                 f"{', '.join(dict.fromkeys(wins)) or 'none'}")
    body = "\n".join(lines)
    print(body)
    if args.write:
        path = write_benchmark("bench_compile.py", "torch.compile for training", __doc__, args.threads,
                               time.perf_counter() - t_start, body, START, END)
        print(f"wrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
