"""``reslab diagnose``: run measurements on a trained run's checkpoint; arrays and plots go into the run.

Each measurement writes ``RUN/diagnostics/NAME.npz`` (its arrays) and ``RUN/diagnostics/NAME.png`` (its figure,
drawn by :mod:`reslab.diagnostics.figures`), and reports its key numbers in one line. :data:`MEASUREMENTS` is the
registry: name, one-line description (``reslab diagnose --help`` is built from it), the measurement, its summary
line, its figure and the check that refuses it where it has no meaning (e.g. ``gates`` without highway gates,
``paths`` on a non-additive scheme).

Every measurement uses the training loss (:func:`reslab.train.loss_fn`) and the training error definition, so it
works the same on classifiers (logits ``(N, C)``, labels ``(N,)``) and language models (logits ``(N, T, V)``,
next-token targets ``(N, T)``: everything is per target, i.e. per token).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from reslab import runs
from reslab.diagnostics import figures
from reslab.diagnostics.figures import Context

Arrays = dict[str, Any]
Measure = Callable[[nn.Module, Tensor, Tensor, int], Arrays]


@dataclass(frozen=True)
class Measurement:
    """One entry of :data:`MEASUREMENTS`.

    Attributes:
        description: one line for ``reslab diagnose --help``.
        measure: ``measure(model, x, y, num_classes) -> arrays`` (written to ``NAME.npz``).
        summary: ``summary(arrays, ctx) -> str``, the key numbers in one line.
        plot: ``plot(arrays, ctx) -> figure``.
        check: ``check(model, x)`` raises ``ValueError`` (one line) where the measurement has no meaning.
    """

    description: str
    measure: Measure
    summary: Callable[[Arrays, Context], str]
    plot: Callable[[Arrays, Context], Any]
    check: Callable[[nn.Module, Tensor], None] | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Arrays:
        return self.measure(model, x, y, num_classes)


def _g(v: float) -> str:
    return f"{float(v):.3g}"


def _first_last(a: np.ndarray) -> tuple[float, float]:
    a = np.asarray(a, dtype=np.float64)
    ok = a[np.isfinite(a)]
    return (float(ok[0]), float(ok[-1])) if len(ok) else (float("nan"), float("nan"))


# --- responses ---------------------------------------------------------------------------------------------
def _responses(model, x, y, classes):
    from reslab.diagnostics.responses import response_magnitudes

    p = response_magnitudes(model, x)
    return {"std": p.std, "sorted": p.sorted}


def _responses_summary(a, ctx):
    std = a["std"]
    k = int(np.argmax(std))
    return (f"branch-output std {_g(std[0])} ({ctx.blocks[0]}) -> {_g(std[-1])} ({ctx.blocks[-1]}), "
            f"mean {_g(std.mean())}, largest {_g(std[k])} ({ctx.blocks[k]})")


# --- stream ------------------------------------------------------------------------------------------------
def _stream(model, x, y, classes):
    from reslab.diagnostics.stream import stream_profile

    p = stream_profile(model, x[:512])
    return {"norm": p.norm, "norm_sq_per_dim": p.norm_sq_per_dim, "share": p.share, "projection": p.projection}


def _stream_summary(a, ctx):
    n = a["norm"]
    line = (f"stream norm {_g(n[0])} entering {ctx.blocks[0]} -> {_g(n[-1])} final (x{_g(n[-1] / n[0])} growth); "
            f"E||x||^2/d {_g(a['norm_sq_per_dim'][0])} -> {_g(a['norm_sq_per_dim'][-1])}")
    share = np.asarray(a["share"], dtype=np.float64)
    if np.isfinite(share).any():
        k = int(np.nanargmax(share))
        line += f"; largest contribution share {_g(share[k])} ({ctx.blocks[k]})"
    return line


# --- grads -------------------------------------------------------------------------------------------------
def _grads(model, x, y, classes):
    from reslab.diagnostics.gradients import gradient_profile

    p = gradient_profile(model, x[:256], y[:256])
    return {"stream": p.stream, "params": p.params}


def _grads_summary(a, ctx):
    first, last = a["stream"][0], a["stream"][-1]
    ratio = first / last if last > 0 else float("inf")
    pf, pl = _first_last(a["params"])
    return (f"||dL/dx|| {_g(first)} at {ctx.blocks[0]}, {_g(last)} at {ctx.blocks[-1]}, ratio first/last {_g(ratio)} "
            f"(log10 {np.log10(ratio):+.2f}); branch-parameter gradient {_g(pf)} -> {_g(pl)}")


# --- gates -------------------------------------------------------------------------------------------------
def _gates(model, x, y, classes):
    from reslab.diagnostics.gates import gate_profile

    p = gate_profile(model, x, y, classes)
    return {"mean": p.mean, "hist": p.hist, "bins": p.bins, "per_class": p.per_class}


def _gates_check(model, x):
    from reslab.diagnostics.gates import check_gates

    check_gates(model)


def _gates_summary(a, ctx):
    m = a["mean"]
    return (f"mean transform gate T {_g(m[0])} ({ctx.blocks[0]}) -> {_g(m[-1])} ({ctx.blocks[-1]}), "
            f"mean {_g(m.mean())}, range {_g(m.min())}-{_g(m.max())} (T -> 0: carry, the branch is closed)")


# --- lesion ------------------------------------------------------------------------------------------------
def _lesion(model, x, y, classes):
    from reslab.diagnostics.lesion import deletable, lesion_study

    n, pool = len(model.trunk), len(deletable(model))  # random lesions keep shape-changing blocks (Veit et al.)
    ks = sorted({k for k in (1, 2, pool // 4, pool // 2) if 1 <= k <= pool})
    r = lesion_study(model, x, y, ks, [1, 2, 4, n], draws=5)
    return {"baseline": np.asarray(r.baseline), "single": r.single, "ks": r.ks, "k_errors": r.k_errors,
            "taus": r.taus, "reorder_errors": r.reorder_errors}


def _lesion_summary(a, ctx):
    base, single = float(a["baseline"]), a["single"]  # NaN where the scheme cannot delete the block
    k = int(np.nanargmax(single))
    line = (f"error intact {100 * base:.1f}%, one {ctx.unit} deleted mean {100 * np.nanmean(single):.1f}% "
            f"(worst {ctx.blocks[k]}: {100 * single[k]:.1f}%)")
    if np.isnan(single).any():
        line += f" ({int(np.isnan(single).sum())} {ctx.unit}s cannot be deleted)"
    if len(a["ks"]):
        line += "; k random deleted: " + ", ".join(f"k={int(k)} {100 * e.mean():.1f}%"
                                                   for k, e in zip(a["ks"], a["k_errors"]))
    if len(a["reorder_errors"]):
        line += f"; reordered mean {100 * a['reorder_errors'].mean():.1f}%"
    return line


# --- paths -------------------------------------------------------------------------------------------------
def _paths(model, x, y, classes):
    from reslab.diagnostics.paths import analyse_paths

    # 128 targets: 128 samples of a classifier, or (at least 2) whole sequences of a language model, ~128 tokens
    # (each target costs one row in every one of the ~50 (n + 1) vector-Jacobian products of Veit's sampling)
    k = max(2, 128 // y[:1].numel())
    p = analyse_paths(model, x[:k], y[:k], samples=50, generator=torch.Generator().manual_seed(0))
    lo, hi = p.mass_range("exact")
    return {"lengths": p.lengths, "exact_norm": p.exact_norm, "veit_mean": p.veit_mean, "veit_total": p.veit_total,
            "path_counts": p.path_counts, "effective_depth_exact": np.asarray(p.effective_depth("exact")),
            "effective_depth_veit": np.asarray(p.effective_depth("veit")), "mass90_exact": np.asarray([lo, hi]),
            "full_grad_norm": np.asarray(p.full_grad_norm)}


def _paths_check(model, x):
    from reslab.diagnostics.paths import check_paths

    check_paths(model)


def _paths_summary(a, ctx):
    n = len(a["lengths"]) - 1
    lo, hi = a["mass90_exact"]
    return (f"effective depth {float(a['effective_depth_exact']):.2f} exact, "
            f"{float(a['effective_depth_veit']):.2f} Veit sampling, of n = {n} {ctx.unit}s "
            f"(binomial mean n/2 = {n / 2:g}); 90% of the exact gradient in path lengths {int(lo)}-{int(hi)}")


# --- update ------------------------------------------------------------------------------------------------
def _update(model, x, y, classes):
    from reslab.diagnostics.update_size import effective_update_size

    return {"adam": effective_update_size(model, x[:256], y[:256], optimizer="adam"),
            "sgd": effective_update_size(model, x[:256], y[:256], lr=0.1, optimizer="sgd")}


def _update_summary(a, ctx):
    return "; ".join(f"{opt} step: ||df||/||f|| {_g(a[key][0])} ({ctx.blocks[0]}) -> {_g(a[key][-1])} "
                     f"({ctx.blocks[-1]}), mean {_g(a[key].mean())}"
                     for key, opt in (("adam", "Adam lr 1e-3"), ("sgd", "SGD lr 0.1")))


# --- decomposition -----------------------------------------------------------------------------------------
def _decomposition(model, x, y, classes):
    from reslab.diagnostics.decomposition import decompose, direct_logit_attribution

    dec = decompose(model, x[:64])
    out = {"labels": np.asarray(dec.labels(model)), "shares": dec.shares(), "projections": dec.projections()}
    if hasattr(model.head, "unembed"):  # a language model: the target token's logit, by component
        out["direct_logit_attribution"] = direct_logit_attribution(model, x[:64], y[:64])[0]
    return out


def _decomposition_check(model, x):
    from reslab.diagnostics.decomposition import decompose

    decompose(model, x[:1])


def _decomposition_summary(a, ctx):
    labels, proj, share = list(a["labels"]), a["projections"], a["shares"]
    k = int(np.argmax(share[1:])) + 1
    line = (f"{labels[0]} projection {_g(proj[0])}, share {_g(share[0])}; largest branch share {_g(share[k])} "
            f"({labels[k]}); projections sum to {proj.sum():.3f}")
    if "direct_logit_attribution" in a:
        dla = a["direct_logit_attribution"]
        j = int(np.argmax(np.abs(dla)))
        line += f"; largest direct logit attribution {dla[j]:+.3g} ({labels[j]})"
    return line


# --- lens --------------------------------------------------------------------------------------------------
def _lens(model, x, y, classes):
    from reslab.diagnostics.decomposition import logit_lens

    p = logit_lens(model, x[:64], y[:64])
    return {"kl": p.kl, "loss": p.loss}


def _lens_summary(a, ctx):
    ok = np.flatnonzero(np.isfinite(a["kl"]))
    i, j = int(ok[0]), len(a["kl"]) - 2  # the first decodable stream, the stream entering the last block
    where = [f"entering {b}" for b in ctx.blocks] + ["at the output"]
    line = f"KL(final || decoded) {_g(a['kl'][i])} nats {where[i]}"
    if j > i:
        line += f", {_g(a['kl'][j])} {where[j]}"
    line += f"; loss {_g(a['loss'][i])} -> {_g(a['loss'][-1])} nats per {ctx.target} (final)"
    if len(ok) < len(a["kl"]):
        line += f"; {len(a['kl']) - len(ok)} earlier streams have another shape (not decoded)"
    return line


MEASUREMENTS: dict[str, Measurement] = {
    "responses": Measurement("std of each branch's output F_i(x) (He et al. 2015, Fig. 7)",
                             _responses, _responses_summary, figures.responses),
    "stream": Measurement("stream norm per depth, each block's share of / projection on the final stream",
                          _stream, _stream_summary, figures.stream),
    "grads": Measurement("gradient norm ||dL/dx_i|| of the stream and of each branch's parameters per depth",
                         _grads, _grads_summary, figures.grads),
    "gates": Measurement("highway transform-gate values per layer and per class (gated schemes only)",
                         _gates, _gates_summary, figures.gates, _gates_check),
    "lesion": Measurement("error with one / k random blocks deleted and with blocks reordered (Veit et al. 2016)",
                          _lesion, _lesion_summary, figures.lesion),
    "paths": Measurement("gradient per path length, exact and Veit sampling; effective depth (additive schemes)",
                         _paths, _paths_summary, figures.paths, _paths_check),
    "update": Measurement("relative output change from one Adam / SGD step on each block alone",
                          _update, _update_summary, figures.update),
    "decomposition": Measurement("each component's share of the final stream (and direct logit attribution)",
                                 _decomposition, _decomposition_summary, figures.decomposition,
                                 _decomposition_check),
    "lens": Measurement("logit lens: decode every depth's stream with the head; KL to the output and loss",
                        _lens, _lens_summary, figures.lens),
}


def help_text() -> str:
    """The measurements, one line each (for ``reslab diagnose --help``)."""
    return "\n".join(f"  {name:14s} {m.description}" for name, m in MEASUREMENTS.items())


def refusal(name: str, model: nn.Module, x: Tensor) -> str | None:
    """Why measurement ``name`` has no meaning on ``model`` (one line), or ``None`` where it applies."""
    check = MEASUREMENTS[name].check
    if check is None:
        return None
    try:
        check(model, x)
    except ValueError as e:
        return str(e)
    return None


def diagnose(run_dir: Path | str, what: Sequence[str] | None = None, samples: int = 1000,
             echo: Callable[[str], None] | None = None, plots: bool = True) -> dict[str, Path]:
    """Measure ``what`` on ``run_dir``'s checkpoint; returns the written ``.npz`` paths by name.

    Args:
        what: measurement names (see :data:`MEASUREMENTS`); ``None``: every measurement that applies to the run
            (the others are skipped with a note).
        samples: the first ``samples`` training samples to measure on (some measurements use fewer).
        echo: called with each measurement's summary line and the files it wrote (``print`` in the CLI).
        plots: also draw each measurement's figure (``NAME.png``); without, only the arrays and the numbers.

    Raises:
        ValueError: not a finished run directory, an unknown measurement, or a requested one that has no meaning
            for the run's scheme or family (checked before anything is measured or written).
    """
    from reslab.data import load_dataset
    from reslab.config import load_model

    say = echo or (lambda line: None)
    explicit = what is not None
    names = list(MEASUREMENTS) if what is None else list(dict.fromkeys(what))
    unknown = [w for w in names if w not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement {unknown[0]!r}; choose from {', '.join(MEASUREMENTS)}")
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    run = Path(run_dir)
    if not (run / "checkpoint.pt").exists():
        raise ValueError(f"{run} has no checkpoint.pt: not a trained reslab run directory")
    model, cfg = load_model(run)
    model.eval()
    data = load_dataset(cfg.data)
    x, y = data.prepare(data.x_train[:samples], train=False), data.y_train[:samples]
    refused = {name: why for name in names if (why := refusal(name, model, x)) is not None}
    if explicit and refused:
        name, why = next(iter(refused.items()))
        raise ValueError(f"{name} does not apply to this run: {why}")
    ctx = Context.of(model, cfg, y)
    out = run / "diagnostics"
    written = {}
    for name in names:
        if name in refused:
            say(f"{name}: skipped ({refused[name]})")
            continue
        m = MEASUREMENTS[name]
        arrays = {k: np.asarray(v) for k, v in m.measure(model, x, y, data.num_classes).items() if v is not None}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        runs.write_bytes(out / f"{name}.npz", buf.getvalue())
        written[name] = out / f"{name}.npz"
        files = str(written[name])
        if plots:
            figures.save(m.plot(arrays, ctx), out / f"{name}.png")
            files += f", {written[name].with_suffix('.png')}"
        say(f"{name}: {m.summary(arrays, ctx)}")
        say(f"  -> {files}")
    return written
