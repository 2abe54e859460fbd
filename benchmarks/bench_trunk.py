"""Cost of reslab's trunk abstraction: one training step of reslab's CIFAR ResNet vs a hand-written twin.

Both nets have identical layers (post-activation basic blocks, option-A zero-pad shortcuts); the
hand-written one is a plain ``nn.Module`` with the blocks inlined, as in the usual CIFAR reference code.
A step is forward + cross-entropy + backward + SGD(momentum) on random 3x32x32 inputs in train mode.
Timing is interleaved: each round runs ``--steps`` steps of one net then of the other, alternating
which goes first, after warm-up steps. Run ``python benchmarks/bench_trunk.py --help``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reslab
from _timing import (copy_state, cpu_name, interleaved, make_step, n_params, quantile, time_steps,
                     write_marked_section)

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.03


class Block(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut_A(x))``; submodules in reslab's order."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + x)


class HandResNet(nn.Module):
    """Plain-PyTorch CIFAR ResNet-(6n+2), He et al. 2015, option A."""

    def __init__(self, depth: int, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                blocks.append(Block(c, w, 2 if stage > 0 and j == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


HEADER = f"""# Benchmarks

## Trunk abstraction overhead (`benchmarks/bench_trunk.py`)

Time of one training step (forward + cross-entropy + backward + SGD momentum step, random
3x32x32 inputs, 10 classes, train mode) of `reslab.create_model("resnet56")` against a hand-written
plain-PyTorch ResNet-56 with identical layers (equal parameter count and equal outputs checked before
timing). Rounds are interleaved, alternating which net goes first; the ratio is the median of the
per-round (paired) ratios, with their min/max. The load average is recorded: on a shared machine other
jobs inflate the spread.

Target: **the trunk abstraction costs <= {100 * (TARGET - 1):.0f}%** (reslab/hand-written ratio <= {TARGET:.2f}).

Run: `python benchmarks/bench_trunk.py --model resnet56 --write` (`--device cuda` for a GPU).
"""


def write_section(key: str, body: str) -> Path:
    start, end = f"<!-- bench_trunk:{key} -->", f"<!-- /bench_trunk:{key} -->"
    return write_marked_section(ROOT / "BENCHMARKS.md", start, end, body, HEADER)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56", choices=[f"resnet{d}" for d in (20, 32, 44, 56, 110)])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=2, help="steps per net per round")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per net")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--write", action="store_true", help="update the section in BENCHMARKS.md")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    ours = reslab.create_model(args.model).to(dev)
    hand = HandResNet(int(args.model.removeprefix("resnet"))).to(dev)
    p_ours, p_hand = n_params(ours), n_params(hand)
    assert p_ours == p_hand, f"parameter counts differ: reslab {p_ours} vs hand-written {p_hand}"
    copy_state(ours, hand)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    with torch.no_grad():
        diff = (ours.eval()(x) - hand.eval()(x)).abs().max().item()
    assert diff < 1e-4, f"outputs differ by {diff}: not the same network"
    ours.train(), hand.train()
    print(f"{args.model}: {p_ours} params, eval outputs match (max |diff| {diff:.1e})")

    steps = {"reslab": make_step(ours, x, y), "hand": make_step(hand, x, y)}
    for name in steps:
        time_steps(steps[name], args.warmup, args.device)
    load0 = os.getloadavg()[0]
    ratios: list[float] = []

    def on_round(r: int, times: dict[str, list[float]]) -> None:
        ratios.append(times["reslab"][-1] / times["hand"][-1])
        print(f"round {r + 1:2d}/{args.rounds}: reslab {1e3 * times['reslab'][-1]:8.1f} ms  "
              f"hand {1e3 * times['hand'][-1]:8.1f} ms  ratio {ratios[-1]:.3f}", flush=True)

    t_start = time.perf_counter()
    # each round runs both nets, alternating which goes first (reslab first in even rounds)
    times = interleaved(steps, args.rounds, args.steps, args.device, on_round)
    wall, load1 = time.perf_counter() - t_start, os.getloadavg()[0]

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratio = statistics.median(ratios)  # paired per round, so slow phases of a shared machine cancel
    result = (f"reslab/hand-written step time ratio: {ratio:.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    details = (f"median step: reslab {1e3 * med['reslab']:.1f} ms, hand-written {1e3 * med['hand']:.1f} ms; "
               f"best: {1e3 * best['reslab']:.1f} / {1e3 * best['hand']:.1f} ms "
               f"(ratio {best['reslab'] / best['hand']:.3f}); per-round ratio quartiles "
               f"{quantile(ratios, 0.25):.3f}-{quantile(ratios, 0.75):.3f}")
    verdict = "meets" if ratio <= TARGET else "MISSES"
    busy = max(load0, load1) > args.threads + 0.5
    print(f"{details}\n{args.rounds} rounds x {args.steps} steps, {wall:.0f} s, load average "
          f"{load0:.1f} -> {load1:.1f}{' (machine busy: numbers are noisy)' if busy else ''}; "
          f"{verdict} target <= {TARGET:.2f}")
    if args.write:
        machine = (torch.cuda.get_device_name(dev) if args.device == "cuda"
                   else f"{cpu_name()} ({os.cpu_count()} cores), torch.set_num_threads({torch.get_num_threads()})")
        body = (f"### {args.model}, {args.device}, batch {args.batch}\n\n"
                f"- machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}; "
                f"1-min load average {load0:.1f} -> {load1:.1f}\n"
                f"- date: {datetime.date.today().isoformat()}\n"
                f"- command: `python benchmarks/bench_trunk.py --model {args.model} --batch {args.batch} "
                f"--rounds {args.rounds} --steps {args.steps} --device {args.device} --write` ({wall:.0f} s)\n"
                f"- parameters: {p_ours} (both nets)\n- {details}\n"
                f"- **{result}**: {verdict} the target (<= {TARGET:.2f})\n")
        print(f"wrote {write_section(f'{args.device}:{args.model}', body)}")
    print(result)


if __name__ == "__main__":
    main()
