"""CPU efficiency of a GPT training step: achieved FLOP/s over the peak FLOP/s of a large fp32 matmul.

**Step.** reslab's ``gpt`` family with Pre-LN (``residual="preln"``), 12 layers, context T = 128, heads of 64,
vocabulary V = 128 (a character-level corpus), widths d = 256 and 512, MLP width 4d, no biases; one step is
forward + cross-entropy over every next-token target + backward + the optimizer step of ``reslab train``'s GPT
recipe (``reslab.train.make_optimizer``: AdamW, weight decay 0.1), on a fixed batch of B random sequences (B*T
tokens). fp32, ``torch.set_num_threads(--threads)`` (default 1).

**FLOPs, counted analytically** (one multiply-add = 2 FLOPs; matrix products only), per token and per layer in
the forward pass::

    qkv projection             2 * d * 3d   =  6 d^2
    attention scores  q k^T    2 * T * d             (all heads together; the full T x T product)
    weighted sum      a v      2 * T * d
    output projection          2 * d * d    =  2 d^2
    MLP (d -> 4d -> d)         2 * 2 * d * 4d = 16 d^2
                               --------------------------
                               24 d^2 + 4 T d

plus the unembedding 2 d V per token, so forward = B T (L (24 d^2 + 4 T d) + 2 d V) and a training step =
**3 x forward** (the backward pass computes the gradient of both operands of every product: twice the forward).
Not counted: norms, softmax, GELU, residual adds, embedding lookups, the loss and the optimizer (O(B T d) or
O(parameters) each, and not what a FLOP/s rate measures). The causal mask makes half of the T x T products
unnecessary; like ``torch.utils.flop_counter`` and the usual MFU convention, the count takes them in full. The
count is cross-checked against ``FlopCounterMode`` on one forward + backward: it counts the matmuls exactly, but
has no formula for the CPU flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``), so it is
also run with SDPA's math backend, whose attention is plain ``bmm``.

**Peak.** The best of ``--peak-reps`` fp32 ``torch.mm`` of two ``--peak-size`` square matrices (default 2048),
in the same process and with the same thread count as the steps, measured before the first step and after every
step; a step's peak is the mean of the measurements just before and just after it. On a shared machine the rate
of both changes by up to 1.6x within minutes (another process on the other core, the host's other guests), so a
step is only compared with the peak of its own moment. Other sizes are listed once for reference.

**Timing.** Every (width, batch) step is timed in interleaved rounds (the order rotates each round), after
``--warmup`` steps; a step's efficiency is (analytic FLOPs / its time) / its peak, and the table gives the median
over rounds with a distribution-free 95% confidence interval (the full range below 9 rounds). Small batches
cannot reach the peak (thin matrices, fixed per-op costs), so the efficiency is shown against the batch; the
headline batch is ``reslab train``'s GPT recipe (``batch_size`` of ``GPT_RECIPE``: 64 sequences = 8192 tokens per
step). Goal: >= 0.75.

**Where the rest goes.** One profiled step (``torch.profiler``, CPU) per width at the headline and the smallest
batch: the self CPU time of every op, by category (matmuls, attention (SDPA), norms, GELU, other elementwise
ops and copies, embedding and loss, views and dispatch wrappers including autograd nodes), the optimizer step
(everything inside ``Optimizer.step`` / ``zero_grad``, its Python included), and Python = the profiled wall time
minus every op's time; with the rate the matmuls themselves reach inside the step (analytic matmul FLOPs / their
time) and the system time and page faults of the step (``getrusage``). Profiling slows a step down a little,
so shares are of the profiled step. And the optimizer step alone, AdamW as ``reslab train`` builds it (the
for-loop implementation, PyTorch's default on the CPU) against ``foreach=True`` and ``fused=True``.

``--write`` replaces the ``<!-- bench_efficiency -->`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import reslab
from _timing import OtherLoad, median_ci, n_params, round_order, wait_until_quiet, write_benchmark
from reslab.losses import loss_fn
from reslab.models.gpt import GPT_RECIPE
from reslab.train import TrainConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_efficiency -->", "<!-- /bench_efficiency -->"
VOCAB, CTX, LAYERS, HEAD = 128, 128, 12, 64
GOAL = 0.75
HEADLINE_BATCH = int(GPT_RECIPE["batch_size"])


def gpt(d: int) -> nn.Module:
    torch.manual_seed(0)
    return reslab.create_model("gpt", "preln", depth=LAYERS, num_classes=VOCAB, input_shape=(CTX,), d_model=d,
                               n_heads=d // HEAD)


def step_flops(d: int, batch: int, layers: int = LAYERS, ctx: int = CTX, vocab: int = VOCAB) -> dict[str, int]:
    """FLOPs of one training step (3 x forward), by term (see the module docstring)."""
    tokens = batch * ctx
    per = {"qkv": 6 * d * d, "attention scores": 2 * ctx * d, "attention weighted sum": 2 * ctx * d,
           "output projection": 2 * d * d, "MLP": 16 * d * d}
    terms = {k: 3 * tokens * layers * v for k, v in per.items()}
    terms["unembedding"] = 3 * tokens * 2 * d * vocab
    terms["total"] = sum(terms.values())
    terms["matmuls outside attention"] = terms["total"] - terms["attention scores"] - terms["attention weighted sum"]
    return terms


def counted_flops(model: nn.Module, batch: int, math_sdpa: bool) -> int:
    """``FlopCounterMode``'s count of one forward + cross-entropy + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, VOCAB, (batch, CTX), generator=g) for _ in range(2))
    counter = FlopCounterMode(display=False)
    kernel = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with kernel, counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(n: int, reps: int) -> float:
    """Best rate (GFLOP/s) of ``reps`` fp32 products of two n x n matrices (one warm-up product first)."""
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def train_step(model: nn.Module, x: Tensor, y: Tensor):
    """``reslab train``'s step for the GPT recipe on the fixed batch ``(x, y)``."""
    opt = make_optimizer(TrainConfig.for_model(f"gpt{LAYERS}"), model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def optimizer_variants(model: nn.Module, reps: int = 5) -> dict[str, tuple[float, float]]:
    """Milliseconds per AdamW step (best of ``reps``, after a first step that makes the state) on ``model``'s
    parameter shapes with fixed random gradients, for the for-loop implementation (``reslab train``'s default on
    the CPU), ``foreach=True`` and ``fused=True``; with each one's largest parameter difference from the for-loop
    one after that first step."""
    g = torch.Generator().manual_seed(0)
    base = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in base]
    out: dict[str, tuple[float, float]] = {}
    first: list[Tensor] = []
    for name, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [nn.Parameter(p.clone()) for p in base]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, **kw)
        opt.step()
        after = [p.detach().clone() for p in params]
        first = first or after
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        out[name] = (1e3 * best, max((a - b).abs().max().item() for a, b in zip(after, first)))
    return out


def batch_of(batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, CTX), generator=g), torch.randint(0, VOCAB, (batch, CTX), generator=g))


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
WRAPPERS = {"aten::view", "aten::t", "aten::transpose", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
            "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::split",
            "aten::split_with_sizes", "aten::unbind", "aten::narrow", "aten::slice", "aten::select", "aten::detach",
            "aten::alias", "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::empty",
            "aten::empty_like", "aten::empty_strided", "aten::linear", "aten::matmul", "aten::flatten",
            "aten::scaled_dot_product_attention", "aten::dropout", "aten::to", "aten::lift_fresh", "aten::numel",
            "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::ones_like",
            "aten::zeros_like", "aten::new_empty_strided", "aten::new_empty", "aten::cross_entropy_loss"}
CATEGORIES = ("matmuls (mm)", "attention (SDPA kernels)", "norms (LayerNorm)", "GELU", "other elementwise and copies",
              "embedding and loss", "optimizer step (incl. its Python)", "views and dispatch wrappers, autograd nodes",
              "Python (wall minus every op's time)")


def category(name: str) -> str:
    """The breakdown category of an op that is not inside the optimizer step."""
    if name in MATMUL_OPS:
        return CATEGORIES[0]
    if "scaled_dot_product" in name or "flash_attention" in name:
        return CATEGORIES[1] if name != "aten::scaled_dot_product_attention" else CATEGORIES[7]
    if "layer_norm" in name or "rms_norm" in name:
        return CATEGORIES[2]
    if name.startswith("aten::gelu"):
        return CATEGORIES[3]
    if any(s in name for s in ("embedding", "index_select", "log_softmax", "nll_loss")):
        return CATEGORIES[5]
    if name in WRAPPERS or not name.startswith("aten::"):  # autograd::engine..., *Backward0, AccumulateGrad
        return CATEGORIES[7]
    return CATEGORIES[4]


def breakdown(step, flops: dict[str, int]) -> dict[str, object]:
    """Profile one call of ``step`` and split its wall time by :data:`CATEGORIES` (milliseconds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    ms = dict.fromkeys(CATEGORIES, 0.0)
    other: dict[str, float] = {}
    covered = 0.0
    for ev in prof.events():
        self_ms = ev.self_cpu_time_total / 1e3
        covered += self_ms
        node, in_opt = ev, False
        while node is not None and not in_opt:
            in_opt = node.name.startswith("Optimizer.")
            node = node.cpu_parent
        cat = CATEGORIES[6] if in_opt else category(ev.name)
        ms[cat] += self_ms
        if cat == CATEGORIES[4]:
            other[ev.name] = other.get(ev.name, 0.0) + self_ms
    ms[CATEGORIES[8]] = max(0.0, 1e3 * wall - covered)
    mm_rate = flops["matmuls outside attention"] / (ms[CATEGORIES[0]] / 1e3) / 1e9 if ms[CATEGORIES[0]] else 0.0
    top = sorted(other.items(), key=lambda kv: -kv[1])[:5]
    return {"wall_ms": 1e3 * wall, "ms": ms, "mm_gflops": mm_rate, "other_top": top,
            "sys_ms": 1e3 * (r1.ru_stime - r0.ru_stime), "minflt": r1.ru_minflt - r0.ru_minflt}


def fmt_ci(v: list[float], digits: int = 3) -> str:
    lo, hi = median_ci(v)
    return f"{statistics.median(v):.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, HEADLINE_BATCH],
                    help=f"sequences per step (the headline is {HEADLINE_BATCH}, reslab train's GPT recipe, "
                         "when listed; else the largest)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of every (width, batch) first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--peak-reps", type=int, default=5)
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the breakdown")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.wait_quiet:
        wait_until_quiet(args.wait_quiet)
    t_start = time.perf_counter()
    headline = HEADLINE_BATCH if HEADLINE_BATCH in args.batches else max(args.batches)
    lines: list[str] = []

    sizes = sorted({1024, 2048, 4096, args.peak_size})
    ref = {n: matmul_gflops(n, 3) for n in sizes}
    lines.append("- fp32 `torch.mm` n x n x n, best of 3, once before the rounds: "
                 + ", ".join(f"n={n}: {r:.1f}" for n, r in ref.items()) + " GFLOP/s")

    models = {d: gpt(d) for d in args.widths}
    lines.append("\n**FLOPs per training step** (3 x forward; B sequences of T = 128 tokens, L = 12, V = 128): "
                 "`3 B T (L (24 d^2 + 4 T d) + 2 d V)`\n")
    lines.append("| d | parameters | analytic GFLOP per sequence | of which attention T x T | FlopCounterMode "
                 "(CPU flash SDPA) | FlopCounterMode (math SDPA) |")
    lines.append("|---|---|---|---|---|---|")
    for d, m in models.items():
        f, b = step_flops(d, 2), 2
        flash, math_ = counted_flops(m, b, False), counted_flops(m, b, True)
        att = f["attention scores"] + f["attention weighted sum"]
        lines.append(f"| {d} | {n_params(m):,} | {f['total'] / b / 1e9:.3f} | {att / b / 1e9:.3f} | "
                     f"{flash / b / 1e9:.3f} (= analytic without attention: "
                     f"{'yes' if flash == f['total'] - att else 'NO'}) | {math_ / b / 1e9:.3f} "
                     f"(= analytic: {'yes' if math_ == f['total'] else 'NO'}) |")
        print(f"d={d}: analytic {f['total']} FLOPs at B={b}; FlopCounterMode {flash} (flash SDPA), {math_} (math)",
              flush=True)

    steps, flops = {}, {}
    for d, m in models.items():
        for b in args.batches:
            x, y = batch_of(b)
            steps[(d, b)] = train_step(m, x, y)
            flops[(d, b)] = step_flops(d, b)
    for key, st in steps.items():
        for _ in range(args.warmup):
            st()
    others = OtherLoad()
    t0 = time.perf_counter()
    times: dict[tuple[int, int], list[float]] = {k: [] for k in steps}
    peaks: dict[tuple[int, int], list[float]] = {k: [] for k in steps}  # each step's, from the peaks around it
    before = matmul_gflops(args.peak_size, args.peak_reps)
    every = [before]
    for r in range(args.rounds):
        for key in round_order(list(steps), r):
            t = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t)
            after = matmul_gflops(args.peak_size, args.peak_reps)
            peaks[key].append((before + after) / 2)
            before = after
            every.append(after)
        print(f"  round {r + 1}/{args.rounds}: "
              + ", ".join(f"d={d} B={b} {flops[(d, b)]['total'] / times[(d, b)][-1] / 1e9:.1f} / "
                          f"{peaks[(d, b)][-1]:.1f}" for d, b in steps) + " GFLOP/s (step / peak)", flush=True)
    timed_s, other_cores = time.perf_counter() - t0, others.cores()
    ratios = {k: [flops[k]["total"] / t / 1e9 / p for t, p in zip(v, peaks[k])] for k, v in times.items()}
    lines.append(f"\n**Efficiency**: step FLOP/s over the {args.peak_size}^3 matmul peak (best of {args.peak_reps}) "
                 f"measured just before and just after that step (their mean): peak median "
                 f"{statistics.median(every):.1f} GFLOP/s, range {min(every):.1f}-{max(every):.1f} over the "
                 f"{len(every)} measurements; {args.rounds} rounds x 1 step after {args.warmup} warm-up, "
                 f"{timed_s:.0f} s, other processes {other_cores:.2f} cores\n")
    lines.append("| d | batch (tokens) | median step | achieved GFLOP/s | peak around it | / peak [95% CI] |")
    lines.append("|---|---|---|---|---|---|")
    for (d, b), v in times.items():
        med = statistics.median(v)
        bold = "**" if b == headline else ""
        lines.append(f"| {d} | {bold}{b} ({b * CTX}){bold} | {1e3 * med:.0f} ms | "
                     f"{flops[(d, b)]['total'] / med / 1e9:.1f} | {statistics.median(peaks[(d, b)]):.1f} | "
                     f"{bold}{fmt_ci(ratios[(d, b)])}{bold} |")
    lines.append("")
    for d in args.widths:
        r = statistics.median(ratios[(d, headline)])
        word = (f"meets the goal (>= {GOAL})" if r >= GOAL else
                f"MISSES the goal of {GOAL} by {GOAL - r:.3f} (the step would need {100 * (1 - r / GOAL):.0f}% "
                "less time)")
        lines.append(f"- **d={d}, batch {headline}: efficiency {r:.3f}**: {word}")

    for d, m in models.items():
        v = optimizer_variants(m)
        lines.append(f"- optimizer step alone, d={d} ({n_params(m):,} parameters): AdamW as `reslab train` makes it "
                     f"(for-loop) {v['for-loop'][0]:.0f} ms; `foreach=True` {v['foreach'][0]:.0f} ms, `fused=True` "
                     f"{v['fused'][0]:.0f} ms (parameters after one step differ from the for-loop's by at most "
                     f"{v['foreach'][1]:.1e} and {v['fused'][1]:.1e})")

    if args.profile:
        for d in args.widths:
            for b in dict.fromkeys((headline, min(args.batches))):
                p0 = matmul_gflops(args.peak_size, args.peak_reps)
                rep = breakdown(steps[(d, b)], flops[(d, b)])
                peak = (p0 + matmul_gflops(args.peak_size, args.peak_reps)) / 2
                wall = rep["wall_ms"]
                at_peak = flops[(d, b)]["total"] / peak / 1e6
                lines.append(f"\n**Where the time goes, d={d}, batch {b}**: one profiled step {wall:.0f} ms "
                             f"(unprofiled median {1e3 * statistics.median(times[(d, b)]):.0f} ms; all FLOPs at "
                             f"the peak around it, {peak:.1f} GFLOP/s: {at_peak:.0f} ms); system time "
                             f"{rep['sys_ms']:.0f} ms, "
                             f"{rep['minflt']:,} page faults (inside the ops' times)\n")
                lines.append("| category | ms | share |")
                lines.append("|---|---|---|")
                for cat, v in rep["ms"].items():
                    lines.append(f"| {cat} | {v:.1f} | {100 * v / wall:.1f}% |")
                mm_ms = flops[(d, b)]["matmuls outside attention"] / peak / 1e6
                lines.append(f"\n- the matmuls run at {rep['mm_gflops']:.1f} GFLOP/s inside the step "
                             f"({rep['mm_gflops'] / peak:.2f} of the peak; at the peak they would take {mm_ms:.0f} "
                             "ms); largest other elementwise ops: "
                             + ", ".join(f"{n.removeprefix('aten::')} {v:.0f} ms" for n, v in rep["other_top"]))
                print(f"  profiled d={d} B={b}", flush=True)

    body = "\n".join(lines)
    print(body)
    if args.write:
        path = write_benchmark("bench_efficiency.py", "CPU efficiency of a GPT step", __doc__, args.threads,
                               time.perf_counter() - t_start, body, START, END)
        print(f"wrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
