"""``reslab diagnose``: run measurements on a trained run's checkpoint; arrays and plots go into the run.

Each measurement writes ``RUN/diagnostics/NAME.npz`` (its arrays) and ``RUN/diagnostics/NAME.png``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from reslab import runs
from reslab.report.plots import new_figure, save_figure

Measure = Callable[[nn.Module, Tensor, Tensor, int], dict[str, Any]]


def _responses(model, x, y, classes):
    from reslab.diagnostics.responses import response_magnitudes

    p = response_magnitudes(model, x)
    return {"std": p.std, "sorted": p.sorted}


def _stream(model, x, y, classes):
    from reslab.diagnostics.stream import stream_profile

    p = stream_profile(model, x[:512])
    return {"norm": p.norm, "norm_sq_per_dim": p.norm_sq_per_dim, "share": p.share, "projection": p.projection}


def _grads(model, x, y, classes):
    from reslab.diagnostics.gradients import gradient_profile

    p = gradient_profile(model, x[:256], y[:256])
    return {"stream": p.stream, "params": p.params}


def _gates(model, x, y, classes):
    from reslab.diagnostics.gates import gate_profile

    p = gate_profile(model, x, y, classes)
    return {"mean": p.mean, "hist": p.hist, "bins": p.bins, "per_class": p.per_class}


def _lesion(model, x, y, classes):
    from reslab.diagnostics.lesion import lesion_study

    n = len(model.trunk)
    ks = sorted({k for k in (1, 2, n // 4, n // 2) if 1 <= k <= n})
    r = lesion_study(model, x, y, ks, [1, 2, 4, n], draws=5)
    return {"baseline": np.asarray(r.baseline), "single": r.single, "ks": r.ks, "k_errors": r.k_errors,
            "taus": r.taus, "reorder_errors": r.reorder_errors}


def _paths(model, x, y, classes):
    from reslab.diagnostics.paths import analyse_paths

    p = analyse_paths(model, x[:128], y[:128], samples=50, generator=torch.Generator().manual_seed(0))
    return {"lengths": p.lengths, "exact_norm": p.exact_norm, "veit_mean": p.veit_mean, "veit_total": p.veit_total,
            "path_counts": p.path_counts, "effective_depth_exact": np.asarray(p.effective_depth("exact")),
            "effective_depth_veit": np.asarray(p.effective_depth("veit"))}


def _update(model, x, y, classes):
    from reslab.diagnostics.update_size import effective_update_size

    return {"adam": effective_update_size(model, x[:256], y[:256], optimizer="adam"),
            "sgd": effective_update_size(model, x[:256], y[:256], lr=0.1, optimizer="sgd")}


def _decomposition(model, x, y, classes):
    from reslab.diagnostics.decomposition import decompose, direct_logit_attribution

    dec = decompose(model, x[:64])
    out = {"shares": dec.shares(), "projections": dec.projections()}
    if hasattr(model.head, "unembed"):  # a language model: the target token's logit, by component
        out["direct_logit_attribution"] = direct_logit_attribution(model, x[:64], y[:64])[0]
    return out


def _lens(model, x, y, classes):
    from reslab.diagnostics.decomposition import logit_lens

    p = logit_lens(model, x[:64], y[:64])
    return {"kl": p.kl, "loss": p.loss}


MEASUREMENTS: dict[str, Measure] = {"responses": _responses, "stream": _stream, "grads": _grads, "gates": _gates,
                                    "lesion": _lesion, "paths": _paths, "update": _update,
                                    "decomposition": _decomposition, "lens": _lens}


def _plot(name: str, arrays: dict[str, Any], path: Path) -> None:
    fig, ax = new_figure(1, width=6)
    if name == "lesion":
        ax.plot(100 * arrays["single"], "o-", label="one block deleted")
        ax.axhline(100 * float(arrays["baseline"]), linestyle=":", label="intact")
        ax.set(xlabel="deleted block", ylabel="error (%)")
    elif name == "paths":
        k = arrays["lengths"]
        ax.semilogy(k, arrays["exact_norm"], "o-", ms=3, label="exact ||c_k||")
        ax.semilogy(k, arrays["veit_total"], "s-", ms=3, label="Veit mean x C(n,k)")
        ax.set(xlabel="path length", ylabel="gradient norm")
    elif name == "gates":
        ax.plot(arrays["mean"], "o-", label="mean gate T")
        ax.set(xlabel="layer", ylabel="T", ylim=(0, 1))
    else:
        for key, v in arrays.items():
            if key != "sorted" and np.ndim(v) == 1:
                ax.plot(v, marker=".", label=key)
        ax.set(xlabel="depth (block)", yscale="log" if name in ("grads", "update") else "linear")
    ax.set_title(name)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def diagnose(run_dir: Path | str, what: list[str], samples: int = 1000) -> dict[str, Path]:
    """Measure ``what`` on ``run_dir``'s checkpoint; returns the written ``.npz`` paths by name.

    Raises:
        ValueError: not a finished run directory, an unknown measurement, or one the scheme cannot have.
    """
    from reslab.data import load_dataset
    from reslab.train import load_model

    unknown = [w for w in what if w not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement {unknown[0]!r}; choose from {', '.join(MEASUREMENTS)}")
    run = Path(run_dir)
    if not (run / "checkpoint.pt").exists():
        raise ValueError(f"{run} has no checkpoint.pt: not a trained reslab run directory")
    model, cfg = load_model(run)
    model.eval()
    data = load_dataset(cfg.data)
    x, y = data.prepare(data.x_train[:samples], train=False), data.y_train[:samples]
    out = run / "diagnostics"
    written = {}
    for name in what:
        arrays = MEASUREMENTS[name](model, x, y, data.num_classes)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})
        runs.write_bytes(out / f"{name}.npz", buf.getvalue())
        _plot(name, arrays, out / f"{name}.png")
        written[name] = out / f"{name}.npz"
    return written
