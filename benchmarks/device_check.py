"""One prepared check of reslab's CUDA path, for a machine with a GPU (never part of the test suite).

Checks: every registered scheme and family (the GPT family and both DenseNets included) runs forward/backward on
CUDA; DenseNet's two memory modes give the same outputs and gradients on CUDA; ``reslab train`` runs on CUDA with and
without bfloat16 autocast; an interrupted CUDA run resumes to the same metrics as an uninterrupted one (reported as
the largest difference, since cuDNN kernels need not be bitwise deterministic).

``--timings`` also times issue 12's ratios on the GPU, each benchmark in a subprocess with ``--device cuda``:
DenseNet-BC-100's memory-efficient / naive peak (``torch.cuda.max_memory_allocated``) and step time
(``bench_densenet.py``), and Block / Full AttnRes against Pre-LN, step time and saved activations with the CUDA peak
(``bench_gpt.py --schemes block_attnres attnres``); their output goes into ``device_check.json`` and, with
``--write``, into the ``<!-- device_check -->`` section of BENCHMARKS.md with the card's name. The whole run fits in
10 minutes on an H100. Other timings a GPU session may take: ``bench_recorder.py --device cuda --write``,
``bench_trunk.py --device cuda``.

Run from the repository root: ``PYTHONPATH=src python benchmarks/device_check.py --out DIR --timings --write``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import reslab
from reslab import runs
from reslab.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def check_registry(device: torch.device) -> dict[str, str]:
    """Every scheme x family forward/backward on ``device``; pairs a scheme refuses are reported as such."""
    families = {"resnet8": (dict(width=8), (3, 16, 16)), "preact_resnet8": (dict(width=8), (3, 16, 16)),
                "mlp8": (dict(width=8), (40,)), "preact_mlp8": (dict(width=8), (40,)),
                "gpt2": (dict(d_model=64, n_heads=2), (32,)), "densenet10": (dict(growth=4), (3, 16, 16)),
                "densenet_bc16": (dict(growth=4, memory_efficient=True), (3, 16, 16))}
    out = {}
    for model, (kw, shape) in families.items():
        for scheme in reslab.list_residuals():
            try:
                m = reslab.create_model(model, scheme, input_shape=shape, num_classes=10, **kw).to(device)
            except ValueError as e:
                out[f"{model}/{scheme}"] = f"refused ({e})"
                continue
            x = (torch.randint(0, 10, (4, *shape), device=device) if model.startswith("gpt")
                 else torch.randn(4, *shape, device=device))
            y = m(x)
            y.float().logsumexp(-1).sum().backward()
            ok = torch.isfinite(y).all().item() and all(p.grad is not None for p in m.parameters())
            out[f"{model}/{scheme}"] = "ok" if ok else "FAILED"
    return out


def check_memory_modes(device: torch.device) -> dict[str, float]:
    """DenseNet-BC-40's naive and memory-efficient modes on ``device``: the largest output and gradient differences."""
    x = torch.randn(8, 3, 32, 32, device=device)
    grads, outs = [], []
    for efficient in (False, True):
        torch.manual_seed(0)
        m = reslab.create_model("densenet_bc40", memory_efficient=efficient).to(device)
        y = m(x)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in m.parameters()])
    return {"max_abs_output_diff": (outs[0] - outs[1]).abs().max().item(),
            "max_abs_grad_diff": max((a - b).abs().max().item() for a, b in zip(*grads))}


def timings() -> dict[str, str]:
    """The GPU ratios of issue 12 (see the module docstring): each benchmark's printed result."""
    env = {"PYTHONPATH": str(ROOT / "src")}
    cmds = {"bench_densenet": ["bench_densenet.py", "--device", "cuda", "--rounds", "10", "--steps", "5"],
            "bench_gpt": ["bench_gpt.py", "--device", "cuda", "--schemes", "block_attnres", "attnres",
                          "stacked attnres",
                          "--skip-reference", "--rounds", "10", "--steps", "10"]}
    out = {}
    for name, cmd in cmds.items():
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / cmd[0]), *cmd[1:]], capture_output=True,
                           text=True, env={**os.environ, **env})
        out[name] = (f"`python benchmarks/{' '.join(cmd)}` ({time.perf_counter() - t0:.0f} s, exit {r.returncode})\n\n"
                     + (r.stdout if r.returncode == 0 else r.stderr[-3000:]))
    return out


def check_resume(out: Path) -> dict[str, float]:
    cfg = TrainConfig(model="resnet20", data="digits", epochs=4, batch_size=64, lr=0.05, device="cuda", seed=0,
                      model_kwargs={"width": 8})
    full = train(cfg, out / "full", quiet=True)
    real = runs.save_torch
    calls = {"n": 0}

    def dying(path, obj):
        real(path, obj)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    runs.save_torch = dying
    try:
        train(cfg, out / "killed", quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        runs.save_torch = real
    resumed = train(cfg, out / "killed", resume=True, quiet=True)
    keys = ("train_loss", "train_error", "test_loss", "test_error")
    diff = max(abs(a[k] - b[k]) for a, b in zip(full.metrics, resumed.metrics) for k in keys)
    return {"epochs": len(resumed.metrics), "max_abs_metric_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/reslab_device_check"))
    ap.add_argument("--timings", action="store_true", help="also time the GPU ratios (DenseNet memory, AttnRes)")
    ap.add_argument("--write", action="store_true", help="put the result into BENCHMARKS.md (device_check section)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    device = torch.device("cuda")
    report: dict[str, object] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    reg = check_registry(device)
    report["registry_failures"] = [k for k, v in reg.items() if v == "FAILED"]
    report["registry_refused"] = sorted(k for k, v in reg.items() if v.startswith("refused"))
    report["registry_checked"] = sum(v == "ok" for v in reg.values())
    report["densenet_memory_modes"] = check_memory_modes(device)
    base = TrainConfig(model="resnet20", data="digits", epochs=3, batch_size=128, lr=0.05, device="cuda")
    for amp in (False, True):
        t0 = time.perf_counter()
        r = train(replace(base, amp=amp), args.out / f"train_amp{int(amp)}", quiet=True)
        report[f"train_amp{int(amp)}"] = {"status": r.status, "test_error": r.final["test_error"],
                                          "seconds": round(time.perf_counter() - t0, 2)}
    report["resume"] = check_resume(args.out / "resume")
    if args.timings:
        report["timings"] = timings()
    print(json.dumps({k: v for k, v in report.items() if k != "timings"}, indent=2))
    for text in report.get("timings", {}).values():
        print(text)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2))
    if args.write:
        from _timing import write_marked_section

        checks = {k: v for k, v in report.items() if k not in ("timings", "gpu", "torch")}
        body = "\n".join([f"## CUDA path (`benchmarks/device_check.py`), {report['gpu']}", "",
                          f"- date: {datetime.date.today().isoformat()}; torch {report['torch']}",
                          f"- checks: `{json.dumps(checks)}`", ""]
                         + [f"### {name}\n\n{text}" for name, text in report.get("timings", {}).items()])
        write_marked_section(ROOT / "BENCHMARKS.md", "<!-- device_check -->", "<!-- /device_check -->", body)


if __name__ == "__main__":
    main()
