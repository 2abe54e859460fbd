"""Cost of the exact gradient-per-path-length decomposition vs Veit et al.'s sampling (REFERENCE.md section 3).

On a 54-block residual MLP (``mlp110``, width 64, eval mode, a batch of 64 random inputs and random targets)
this times

- the exact decomposition (:func:`reslab.diagnostics.paths.path_coefficients`, recurrence and FFT): ``n + 1``
  cotangent vectors pushed back in one batched vector-Jacobian product per block;
- Veit et al.'s sampling (:func:`reslab.diagnostics.paths.veit_sampling`): ``--samples`` single-path vectors per
  length, for all ``n + 1`` lengths. A length costs the same whatever ``k`` is (every block does one batched
  VJP on all samples), so when the full sweep would exceed ``--budget`` seconds, the lengths are timed in an
  evenly spread order until the budget is spent and the total is extrapolated linearly (and the output says so).

It prints the backward passes (cotangent vectors) of each method and their ratio (target: the exact method
needs >= 50x fewer), and with ``--write`` replaces the ``<!-- bench_paths -->`` section of ``BENCHMARKS.md``.
Run ``python benchmarks/bench_paths.py --help``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import reslab
from reslab.diagnostics.paths import binomial_path_counts, model_cotangent, path_coefficients, veit_sampling

from _timing import write_marked_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
TARGET = 50.0
START, END = "<!-- bench_paths -->", "<!-- /bench_paths -->"


def spread_order(n: int) -> list[int]:
    """``0..n`` in an order whose every prefix is spread evenly over the range (0, n, n/2, n/4, 3n/4, ...)."""
    order, seen = [], set()
    parts = 1
    while len(order) < n + 1:
        for j in range(parts + 1):
            k = round(j * n / parts)
            if k not in seen:
                seen.add(k)
                order.append(k)
        parts *= 2
    return order


def calibrate_bn(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``inputs`` (train-mode forward, no gradient)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, exactly the batch statistics
    model.train()
    with torch.no_grad():
        model(inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp110", help="model name (default mlp110: 54 blocks)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1000, help="Veit samples per length")
    ap.add_argument("--budget", type=float, default=180.0,
                    help="seconds for the Veit sweep; beyond it, time a spread subset of lengths and extrapolate")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the exact decomposition")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-calibrate", action="store_true",
                    help="keep BatchNorm's initial running stats (mean 0, var 1: BN is then the identity in eval "
                         "mode and the untrained net's gradient explodes); by default they are set from the batch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads stall under load)")
    ap.add_argument("--write", action="store_true", help="update the bench_paths section of BENCHMARKS.md")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    model = reslab.create_model(args.model, width=args.width, input_shape=(40,))
    gen = torch.Generator().manual_seed(args.seed + 1)
    inputs = torch.randn(args.batch, 40, generator=gen)
    targets = torch.randint(0, 10, (args.batch,), generator=gen)
    if not args.no_calibrate:
        calibrate_bn(model, inputs)
    model.eval()
    x0, g = model_cotangent(model, inputs, targets)
    n = len(model.trunk)
    print(f"{args.model}: {n} blocks, width {args.width}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    times = {"recurrence": [], "fft": []}
    coeffs = {}
    path_coefficients(model.trunk, x0, g)  # warm-up
    for _ in range(args.repeats):
        for method in times:
            t0 = time.perf_counter()
            coeffs[method] = path_coefficients(model.trunk, x0, g, method=method)
            times[method].append(time.perf_counter() - t0)
    exact_s = statistics.median(times["recurrence"])
    fft_s = statistics.median(times["fft"])
    c = coeffs["recurrence"]
    fft_err = float((coeffs["fft"] - c).abs().max() / c.abs().max())
    exact_norm = c.flatten(1).norm(dim=1).numpy()
    print(f"exact (recurrence): {exact_s:.2f} s median of {args.repeats}; fft: {fft_s:.2f} s "
          f"(max rel. difference {fft_err:.1e})")

    veit = np.full(n + 1, np.nan)
    done: list[int] = []
    t_veit = 0.0
    for k in spread_order(n):
        if len(done) >= 3 and t_veit * (len(done) + 1) / len(done) > args.budget:  # always 0, n and n/2
            break
        t0 = time.perf_counter()
        veit[k] = veit_sampling(model.trunk, x0, g, samples=args.samples, lengths=[k],
                                generator=torch.Generator().manual_seed(args.seed + 100 + k))[k]
        t_veit += time.perf_counter() - t0
        done.append(k)
        print(f"  veit length {k:2d}: mean single-path norm {veit[k]:.3e} ({t_veit:.0f} s so far)", flush=True)
    per_length = t_veit / len(done)
    full = len(done) == n + 1
    veit_s = t_veit if full else per_length * (n + 1)
    how = ("measured, all lengths" if full else
           f"extrapolated linearly from {len(done)} of {n + 1} lengths ({t_veit:.0f} s, {per_length:.2f} s per length)")

    exact_passes, veit_passes = n + 1, args.samples * (n + 1)
    ratio = veit_passes / exact_passes
    counts = binomial_path_counts(n)
    total = veit * counts
    ks = np.array(sorted(done))
    valid = exact_norm[ks] > 0  # a length can carry nothing at all (e.g. k = 0 behind 54 ReLU masks)
    diff = np.where(valid, total[ks] / np.where(valid, exact_norm[ks], 1.0), np.nan)
    worst = int(ks[np.nanargmax(diff)])
    agree_n = total[n] / exact_norm[n] if n in done and exact_norm[n] > 0 else float("nan")
    zero = [int(k) for k in range(n + 1) if exact_norm[k] == 0]
    w_exact = exact_norm / exact_norm.sum()
    eff_exact = float((w_exact * np.arange(n + 1)).sum())
    wv = np.nan_to_num(total[ks])
    eff_veit = float((wv * ks).sum() / wv.sum())
    top_exact = int(np.argmax(exact_norm))
    top_veit = int(ks[np.argmax(wv)])
    print(f"veit: {veit_s:.1f} s ({how}); full input gradient norm {float(c.sum(0).norm()):.3g}")
    print(f"backward passes (cotangent vectors): exact {exact_passes} (one batched pass of {n + 1} vectors per "
          f"block), veit {veit_passes} ({args.samples} x {n + 1} lengths) -> {ratio:.0f}x fewer "
          f"({'meets' if ratio >= TARGET else 'misses'} the >= {TARGET:.0f}x target)")
    print(f"time: exact {exact_s:.2f} s vs veit {veit_s:.1f} s -> {veit_s / exact_s:.0f}x")
    print(f"gradient by length: exact peaks at k={top_exact}, effective depth {eff_exact:.1f}; "
          f"veit (sampled lengths) peaks at k={top_veit}, effective depth {eff_veit:.1f}; "
          f"veit*C(n,k) / ||c_k|| is largest at k={worst} ({np.nanmax(diff):.3g}x), {agree_n:.6g} at k=n; "
          f"lengths carrying exactly 0: {zero or 'none'}")
    wall = time.perf_counter() - wall0

    if args.write:
        cpu = platform.processor() or platform.machine()
        body = f"""## Gradient per path length: exact decomposition vs Veit sampling (`benchmarks/bench_paths.py`)

REFERENCE.md section 3. `{args.model}` ({n} blocks, width {args.width}, untrained, eval mode, post-activation ReLU,
BatchNorm running statistics {'left at their initial values' if args.no_calibrate else 'set from the batch'}), a batch
of {args.batch} random inputs with random targets; cotangent = gradient of the mean cross-entropy at the trunk
output. Exact: `path_coefficients` (float64), all {n + 1} coefficient vectors pushed back together, one batched
vector-Jacobian product per block. Veit et al.: `veit_sampling`, {args.samples} random subsets per length,
one batch of {args.samples} masked cotangents per length (one batched VJP per block per length).

Target: **the exact method needs >= {TARGET:.0f}x fewer backward passes** (cotangent vectors).

- machine: {cpu}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}; torch {torch.__version__}, Python {platform.python_version()}; 1-min load average {load0:.1f} -> {os.getloadavg()[0]:.1f}
- date: {datetime.date.today().isoformat()}
- command: `python benchmarks/bench_paths.py --samples {args.samples} --budget {args.budget:g} --threads {args.threads} --write` ({wall:.0f} s)
- exact: **{exact_s:.2f} s** (recurrence, median of {args.repeats}); FFT variant {fft_s:.2f} s, agrees to {fft_err:.1e} (max rel.)
- Veit, {args.samples} samples x {n + 1} lengths: **{veit_s:.0f} s** ({how})
- backward passes: exact {exact_passes} vectors, Veit {veit_passes} vectors: **{ratio:.0f}x fewer** ({'meets' if ratio >= TARGET else 'misses'} the target); wall time {veit_s / exact_s:.0f}x less
- result (full input-gradient norm {float(c.sum(0).norm()):.3g}): exact ||c_k|| peaks at k = {top_exact} (norm-weighted effective depth {eff_exact:.1f}); Veit's mean x C(n,k) peaks at k = {top_veit} (effective depth {eff_veit:.1f}, over the sampled lengths); at k = n (one path) the two agree (ratio {agree_n:.6g}); they differ most at k = {worst}, where Veit's estimate is {np.nanmax(diff):.3g}x the exact norm (paths cancel); lengths carrying exactly zero gradient (both methods): {', '.join(map(str, zero)) or 'none'}
"""
        print(f"wrote {write_marked_section(ROOT / 'BENCHMARKS.md', START, END, body)}")


if __name__ == "__main__":
    main()
