"""One prepared check of reslab's CUDA path, for a machine with a GPU (never part of the test suite).

Checks: every registered scheme and family (the GPT family included) runs forward/backward on CUDA; ``reslab train``
runs on CUDA with and without bfloat16 autocast; an interrupted CUDA run resumes to the same metrics as an
uninterrupted one (reported as the largest difference, since cuDNN kernels need not be bitwise deterministic).
The timings a GPU session should also take: ``bench_recorder.py --device cuda --write`` (recorder overhead, whose
10% target an MLP-56 step on the 2-core CPU misses), ``bench_trunk.py --device cuda``, ``bench_gpt.py --device
cuda``.

Run from the repository root: ``PYTHONPATH=src python benchmarks/device_check.py --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import reslab
from reslab import runs
from reslab.train import TrainConfig, train


def check_registry(device: torch.device) -> dict[str, str]:
    """Every scheme x family forward/backward on ``device``; pairs a scheme refuses are reported as such."""
    families = {"resnet8": (dict(width=8), (3, 16, 16)), "preact_resnet8": (dict(width=8), (3, 16, 16)),
                "mlp8": (dict(width=8), (40,)), "preact_mlp8": (dict(width=8), (40,)),
                "gpt2": (dict(d_model=64, n_heads=2), (32,))}
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
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    device = torch.device("cuda")
    report: dict[str, object] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    reg = check_registry(device)
    report["registry_failures"] = [k for k, v in reg.items() if v == "FAILED"]
    report["registry_refused"] = sorted(k for k, v in reg.items() if v.startswith("refused"))
    report["registry_checked"] = sum(v == "ok" for v in reg.values())
    base = TrainConfig(model="resnet20", data="digits", epochs=3, batch_size=128, lr=0.05, device="cuda")
    for amp in (False, True):
        t0 = time.perf_counter()
        r = train(replace(base, amp=amp), args.out / f"train_amp{int(amp)}", quiet=True)
        report[f"train_amp{int(amp)}"] = {"status": r.status, "test_error": r.final["test_error"],
                                          "seconds": round(time.perf_counter() - t0, 2)}
    report["resume"] = check_resume(args.out / "resume")
    print(json.dumps(report, indent=2))
    (args.out / "device_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
