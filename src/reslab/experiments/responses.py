"""Residual responses are small, and smaller per layer in deeper nets (He et al. 2015, Fig. 7).

Measured on the degradation claim's trained MLPs (the same runs, shared): the std of each block's branch output
(after its last BN, before the addition) on 1000 training samples, for the plain twins and the residual nets.
"""

from __future__ import annotations

import numpy as np

from reslab.diagnostics.responses import response_magnitudes
from reslab.experiments import degradation
from reslab.experiments.base import (Claim, ClaimResult, Context, differs, eval_batch, load_trained,
                                     register_claim, verdict_of)
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure

VARIANTS = ("plain", "residual", "residual-zero-init")


def analyse(ctx: Context) -> ClaimResult:
    depths = sorted({degradation.parse_id(r)[1] for r in ctx.specs})
    data_spec = next(iter(ctx.specs.values())).data
    x, _, _ = eval_batch(data_spec, 1000)
    curves: dict[tuple[str, int], list[np.ndarray]] = {}
    for rid in ctx.specs:
        variant, depth, _ = degradation.parse_id(rid)
        model, _ = load_trained(ctx, rid)
        curves.setdefault((variant, depth), []).append(response_magnitudes(model, x).std)
    mean = {k: [float(c.mean()) for c in v] for k, v in curves.items()}
    table = [{"variant": degradation.LABELS[v], "depth": d, "blocks": len(curves[(v, d)][0]),
              "mean_response_std": float(np.mean(mean[(v, d)])), "sd_over_seeds": float(np.std(mean[(v, d)], ddof=1))}
             for v in VARIANTS for d in depths]
    lo, hi = depths[0], depths[-1]
    checks = [differs(f"residual responds less than plain at depth {d}", mean[("plain", d)], mean[("residual", d)],
                      "lower") for d in depths]
    checks.append(differs(f"residual-{hi} responds less per layer than residual-{lo}", mean[("residual", lo)],
                          mean[("residual", hi)], "lower"))
    checks.append(differs(f"zero-init residual-{hi} responds less per layer than at depth {lo} (informative)",
                          mean[("residual-zero-init", lo)], mean[("residual-zero-init", hi)], "lower"))
    core = [c["passed"] for c in checks[:-1]]
    verdict = verdict_of(core)
    summary = ("Mean response std per block (mean over seeds): " + "; ".join(
        f"{degradation.LABELS[v]} " + ", ".join(f"{d}: {np.mean(mean[(v, d)]):.3f}" for d in depths)
        for v in VARIANTS) + ". Each comparison needs a difference beyond max(2 standard errors, 0.01).")
    return ClaimResult(verdict, summary, checks, table, [_plot(depths, curves, ctx)])


def _plot(depths: list[int], curves: dict, ctx: Context) -> str:
    fig, (ax1, ax2) = new_figure(2, height=4.2)
    styles = ["-", "--", ":", "-."]
    for v in VARIANTS:
        for j, d in enumerate(depths):
            c = np.mean(curves[(v, d)], axis=0)
            kw = dict(color=degradation.COLORS[v], linestyle=styles[j % 4], marker=".",
                      label=f"{degradation.LABELS[v]}, depth {d}")
            ax1.plot(np.arange(1, len(c) + 1), c, **kw)
            ax2.plot(np.arange(1, len(c) + 1), np.sort(c)[::-1], **kw)
    ax1.set(xlabel="block (original order)", title="Responses in layer order (mean over seeds)")
    ax2.set(xlabel="rank of the block's response (largest first)", title="Responses sorted by magnitude")
    for ax in (ax1, ax2):
        ax.set_ylabel("std of the branch output (after its last BN)")
        log_axis(ax)
        integer_axis(ax)
    legend_below(fig)
    return ctx.save_figure(fig, "responses.png")


CLAIM = register_claim(Claim(
    name="responses",
    title="Residual responses are small perturbations",
    statement=("\"learned residual functions have small response magnitudes, and the responses shrink as depth "
               "increases: each layer makes only a small perturbation to its input\"."),
    published=("He et al. 2015 (Fig. 7): std of each 3x3 layer's output after BN on CIFAR-10; ResNets respond "
               "less than their plain counterparts and ResNet-110 < ResNet-56 < ResNet-20 per layer."),
    runs=degradation.plan,
    analyse=analyse,
    paper=degradation.HE_CIFAR,
))
