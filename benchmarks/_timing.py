"""Helpers shared by the benchmark scripts: training steps, interleaved timing, statistics, BENCHMARKS.md sections.

The scripts run as ``python benchmarks/<script>.py``, so this module is imported by its bare name (the script's
folder is first on ``sys.path``).
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from reslab.losses import loss_fn


def copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters and buffers from ``src`` to ``dst`` in registration order (shapes must match)."""
    s, d = src.state_dict(), dst.state_dict()
    assert len(s) == len(d), f"state sizes differ: {len(s)} vs {len(d)}"
    for (ks, vs), (kd, vd) in zip(s.items(), d.items()):
        assert vs.shape == vd.shape, f"{ks} {tuple(vs.shape)} vs {kd} {tuple(vd.shape)}"
    dst.load_state_dict(dict(zip(d.keys(), s.values())))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def make_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One training step of ``model`` on the fixed batch ``(x, y)``, with its own optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_steps(step: Callable[[], None], n: int, device: str, clock: str = "wall") -> float:
    """Seconds per step over ``n`` steps, by the wall clock or by this thread's CPU time (``clock="cpu"``: the
    whole cost of a step when torch runs on one CPU thread, without the time the machine gave to others)."""
    now = CLOCKS[clock]
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = now()
    for _ in range(n):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (now() - t0) / n


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order of round ``r``: ``names`` rotated by ``r`` (two names simply alternate which goes first)."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, n: int, device: str,
                on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
                clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per step of each entry of ``steps``, ``rounds`` times.

    Each round runs ``n`` steps of every entry in :func:`round_order`, so each entry takes every position equally
    often; ``on_round(r, times)`` is called after each round.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for name in round_order(list(steps), r):
            times[name].append(time_steps(steps[name], n, device, clock))
        if on_round is not None:
            on_round(r, times)
    return times


def quantile(v: list[float], q: float) -> float:
    return statistics.quantiles(v, n=4, method="inclusive")[int(4 * q) - 1] if len(v) > 1 else v[0]


def median_ci(v: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of ``v``.

    The order statistics ``x_(j)``, ``x_(n+1-j)`` with ``j`` the largest rank such that
    ``P(Binomial(n, 1/2) < j) <= (1 - level) / 2``; the full range when ``n`` is too small for that.
    """
    s, n = sorted(v), len(v)
    j, cdf = 0, 0.0
    while True:
        nxt = cdf + math.comb(n, j) / 2 ** n  # P(B <= j)
        if nxt > (1 - level) / 2 or j >= n // 2:
            break
        cdf, j = nxt, j + 1
    j = max(j, 1)
    return s[j - 1], s[n - j]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    m = re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.M) if info.exists() else None
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def write_marked_section(path: Path, start: str, end: str, body: str, header: str = "# Benchmarks\n") -> Path:
    """Replace the text between the markers ``start`` and ``end`` in ``path`` with ``body`` (markers kept), or
    append the marked section when absent; the file starts as ``header`` when it does not exist. Nothing else
    in the file changes."""
    text = path.read_text() if path.exists() else header
    section = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (user, nice, system, irq, softirq; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Average number of cores that processes other than this one keep busy between construction and
    :meth:`cores` (machine busy time from /proc/stat minus this process's CPU time). Unlike the load average
    it is not smoothed over minutes and does not count this process; ``nan`` where /proc/stat is missing."""

    def __init__(self) -> None:
        self.ok = Path("/proc/stat").exists()
        self.busy0 = cpu_busy_seconds() if self.ok else 0.0
        self.own0, self.t0 = time.process_time(), time.perf_counter()

    def cores(self) -> float:
        if not self.ok:
            return float("nan")
        busy, own = cpu_busy_seconds() - self.busy0, time.process_time() - self.own0
        return max(0.0, busy - own) / max(time.perf_counter() - self.t0, 1e-9)


def wait_until_quiet(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> float:
    """Wait (up to ``max_wait`` seconds) until other processes use under ``threshold`` cores over a ``window``;
    returns the last measured value."""
    deadline, other = time.perf_counter() + max_wait, float("nan")
    while True:
        probe = OtherLoad()
        time.sleep(window)
        other = probe.cores()
        if not other >= threshold or time.perf_counter() >= deadline:
            return other
        print(f"other processes use {other:.1f} cores; waiting for a quiet machine", flush=True)


def write_benchmark(script: str, title: str, doc: str, threads: int, seconds: float, body: str, start: str,
                    end: str) -> Path:
    """Write a benchmark's result as its marked section of BENCHMARKS.md: ``## title (`benchmarks/script`)``, the
    script's docstring after its first paragraph, the machine, the date, the command line it ran with and how long
    it took, then ``body``."""
    import datetime
    import shlex
    import sys

    cmd = f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    head = (f"## {title} (`benchmarks/{script}`)\n\n{doc.split(chr(10) * 2, 1)[1].strip()}\n\n"
            f"- machine: {cpu_name()} ({os.cpu_count()} cores), torch.set_num_threads({threads}); torch "
            f"{torch.__version__}, Python {platform.python_version()}\n- date: {datetime.date.today()}\n"
            f"- command: `{cmd}` ({seconds:.0f} s)\n")
    return write_marked_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", start, end, head + body)

