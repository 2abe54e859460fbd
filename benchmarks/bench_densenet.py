"""DenseNet memory modes: peak training memory and step time of ``memory_efficient=True`` against naive concatenation.

Model: DenseNet-BC (L=100, k=12; ``reslab.create_model("densenet_bc100")``) at batch 64 on random 3x32x32 inputs,
Pleiss et al.'s setting (2.863 GB -> 1.605 GB on a GPU, 15-20% more time). A step is forward + cross-entropy +
backward + SGD(momentum) in train mode; both modes have the same weights (same seed) and give the same outputs.

Peak memory. CPU: every measurement runs in a fresh subprocess (``--peak MODE``): build the model and the batch, read
the resident set size (``/proc/self/statm``), run one step, read the process's peak resident set size
(``getrusage``'s ``ru_maxrss``); the step's memory is the peak less the size before it. A fresh process keeps the
memory one step freed (and the allocator kept) from hiding the next step's peak. ``--mem-repeats`` processes per
mode, medians; and the allocator's count in this process (:func:`reslab.footprint.step_peak_bytes`: every allocation
and free of one forward + backward, in order, from ``torch.profiler``; deterministic, and free of the pages the heap
keeps after a free, which the resident set size counts). CUDA: ``torch.cuda.max_memory_allocated`` over one step,
less the allocation before it.
Step time: interleaved rounds in one process (``_timing.interleaved``), the efficient step's time over the naive
one's in the same round, median with a 95% confidence interval. Targets: peak ratio <= 0.6 at a step-time ratio
<= 1.25. ``--write`` replaces the ``<!-- bench_densenet:DEVICE -->`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import reslab
from reslab.footprint import step_peak_bytes
from _timing import OtherLoad, cpu_name, interleaved, make_step, median_ci, n_params, write_marked_section

ROOT = Path(__file__).resolve().parents[1]
TARGET = {"memory": 0.6, "time": 1.25}
MODES = ("naive", "efficient")


def build(mode: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = reslab.create_model(f"densenet_bc{args.depth}", growth=args.growth,
                                memory_efficient=mode == "efficient").to(args.device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    return model, x, y


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_of_one_step(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Bytes a first training step adds at its peak (see the module docstring)."""
    model, x, y = build(mode, args)
    step = make_step(model, x, y)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"before": before, "peak": torch.cuda.max_memory_allocated()}
    make_step(model, x[:1], y[:1])()  # the libraries' one-time allocations, at a peak far below the measured one
    before = rss_bytes()
    step()
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_peaks(args: argparse.Namespace) -> dict[str, list[float]]:
    """Step memory (bytes) per mode, each from a fresh process on CPU, alternating modes."""
    out: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.mem_repeats):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            if args.device == "cuda":
                p = peak_of_one_step(mode, args)
            else:
                cmd = [sys.executable, __file__, "--peak", mode, *sys.argv[1:]]
                p = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            out[mode].append(p["peak"] - p["before"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--growth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=1, help="steps per mode per round")
    ap.add_argument("--mem-repeats", type=int, default=3, help="fresh processes per mode for the peak")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--write", action="store_true", help="write the result into BENCHMARKS.md")
    ap.add_argument("--peak", choices=MODES, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.peak:
        print(json.dumps(peak_of_one_step(args.peak, args)))
        return
    t0 = time.perf_counter()
    peaks = measure_peaks(args)  # its child processes would count as other load
    load = OtherLoad()
    mem = {m: statistics.median(v) for m, v in peaks.items()}
    models = {m: build(m, args) for m in MODES}
    with torch.no_grad():
        same = torch.equal(models["naive"][0](models["naive"][1]), models["efficient"][0](models["efficient"][1]))
    alloc = {m: step_peak_bytes(*models[m]) for m in MODES} if args.device == "cpu" else None
    steps = {m: make_step(*models[m]) for m in MODES}
    for s in steps.values():
        s()  # warm-up
    times = interleaved(steps, args.rounds, args.steps, args.device)
    ratios = [e / n for e, n in zip(times["efficient"], times["naive"])]
    r, (lo, hi) = statistics.median(ratios), median_ci(ratios)
    mem_ratio = mem["efficient"] / mem["naive"]
    ok = mem_ratio <= TARGET["memory"] and r <= TARGET["time"]
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{cpu_name()} ({os.cpu_count()} cores), torch.set_num_threads({torch.get_num_threads()})")
    cmd = "python benchmarks/bench_densenet.py " + shlex.join(sys.argv[1:])
    body = "\n".join([
        "## DenseNet memory modes (`benchmarks/bench_densenet.py`)",
        "",
        f"DenseNet-BC (L={args.depth}, k={args.growth}), batch {args.batch}, 3x32x32, one training step; peak memory "
        "of a first step, each in a fresh process (CPU: peak resident set size less the size before the step), and "
        "on the CPU also the allocator's count in one process (torch.profiler's allocation events); step time in "
        "interleaved rounds. Targets: memory-efficient / naive peak <= 0.6 at step time <= 1.25x.",
        "",
        f"### densenet_bc{args.depth}, {args.device}, batch {args.batch}",
        "",
        f"- machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}; other load "
        f"{load.cores():.2f} cores (during the timing)",
        f"- date: {datetime.date.today().isoformat()}",
        f"- command: `{cmd}` ({time.perf_counter() - t0:.0f} s)",
        f"- parameters: {n_params(models['naive'][0])}; outputs of the two modes equal: {same}",
        f"- step memory (median of {args.mem_repeats}): naive {mem['naive'] / 2**20:.0f} MiB, memory-efficient "
        f"{mem['efficient'] / 2**20:.0f} MiB (each: " + "; ".join(
            f"{m} " + ", ".join(f"{v / 2**20:.0f}" for v in peaks[m]) for m in MODES) + " MiB)",
        *([f"- allocator peak of one forward + backward (in this process): naive {alloc['naive'] / 2**20:.0f} MiB, "
           f"memory-efficient {alloc['efficient'] / 2**20:.0f} MiB, **ratio "
           f"{alloc['efficient'] / alloc['naive']:.2f}**"] if alloc else []),
        f"- median step: naive {1e3 * statistics.median(times['naive']):.0f} ms, memory-efficient "
        f"{1e3 * statistics.median(times['efficient']):.0f} ms",
        f"- **peak memory ratio {mem_ratio:.2f}{' (resident set size)' if alloc else ''}, step time ratio {r:.3f} "
        f"(95% CI {lo:.3f}-{hi:.3f})**: "
        + ("meets the targets" if ok else "misses a target") + f" (<= {TARGET['memory']}, <= {TARGET['time']})",
    ])
    print(body)
    if args.write:
        write_marked_section(ROOT / "BENCHMARKS.md", f"<!-- bench_densenet:{args.device} -->",
                             f"<!-- /bench_densenet:{args.device} -->", body)


if __name__ == "__main__":
    main()
