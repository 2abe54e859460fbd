"""Wall time of one 12-run sweep on each backend: the local process pool and a local Ray, with identical metrics.

The sweep (written out below as ``SWEEP``): residual MLPs and their plain twins at two depths, three seeds each, on
MNIST-1D, 6 epochs. Each backend runs it with ``--jobs`` runs at once (default: the CPU count) through the
``reslab sweep`` command in a fresh process, into a fresh directory; the Ray time includes starting and stopping
the local Ray. Then every run's final metrics (all but the wall time) are compared between the backends: they
must be identical (one torch thread per run in both).

``--write`` replaces the ``<!-- bench_sweep -->`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import OtherLoad, write_benchmark

START, END = "<!-- bench_sweep -->", "<!-- /bench_sweep -->"
SWEEP = """\
[sweep]
plain_twins = true

[base]
model = "mlp"
data = "mnist1d:2000"
epochs = 6
[base.model_kwargs]
width = 64

[axes]
depth = [8, 20]
seed = [0, 1, 2]
"""


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def finals(root: Path) -> dict[str, dict]:
    idx = json.loads((root / "index.json").read_text())["runs"]
    return {k: {m: v for m, v in (r["final"] or {}).items() if m != "time_s"} for k, r in idx.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    reslab = str(Path(sys.executable).with_name("reslab"))
    t_all = time.perf_counter()
    times, others, result = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "sweep.toml"
        spec.write_text(SWEEP)
        for backend in ("local", "ray"):
            out = Path(tmp) / backend
            load, before = OtherLoad(), _children_cpu()
            t0 = time.perf_counter()
            subprocess.run([reslab, "sweep", str(spec), "--out", str(out), "--backend", backend, "--jobs",
                            str(args.jobs), "--quiet"], check=True, stdout=subprocess.DEVNULL)
            times[backend] = time.perf_counter() - t0
            # what the machine did besides the sweep (the sweep's processes are this one's children; Ray's own
            # daemons are not, so part of Ray's overhead shows here)
            others[backend] = load.cores() - (_children_cpu() - before) / times[backend]
            result[backend] = finals(out)
            print(f"{backend}: {times[backend]:.1f} s", flush=True)
    local, ray = result["local"], result["ray"]
    same = local == ray
    diff = max(abs(local[k][m] - ray[k][m]) for k in local for m in local[k])
    states = {r for k in local for r in [bool(local[k])]}
    lines = ["", "| backend | runs | wall time (s) | other processes (cores) |", "|---|---|---|---|"]
    for b in ("local", "ray"):
        lines.append(f"| {b} | {len(result[b])} | {times[b]:.1f} | {others[b]:.2f} |")
    lines += ["", f"- ray / local wall time: **{times['ray'] / times['local']:.2f}**",
              f"- final metrics identical between the backends: **{'yes' if same else 'NO'}** (largest difference "
              f"{diff:.1e}; every run finished: {'yes' if states == {True} else 'no'})", ""]
    body = "\n".join(lines)
    print(body)
    if args.write:
        path = write_benchmark("bench_sweep.py", "A 12-run sweep on the local pool and on Ray", __doc__,
                               1, time.perf_counter() - t_all, body, START, END)
        print(f"wrote {path}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
