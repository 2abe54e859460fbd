"""Residual responses are small, and smaller per layer in deeper nets (He et al. 2015, Fig. 7).

Measured on the degradation claim's trained MLPs (the same runs, shared): the std of each block's branch output
(after its last BN, before the addition) on 1000 training samples, for the plain twins and the residual nets.

Ablation: a branch ends in BatchNorm, ``y = gamma * (z - mu) / sigma + beta`` per channel, so in eval mode its
response std is ``|gamma|`` times the std of the normalised input (about 1). What sets the responses is therefore
the learned BN scale, which starts at 1 (0 with zero-init) and shrinks only when the loss or the weight decay
pulls it down. We measure, per block, the response std against ``rms(gamma)`` of its last BN.
"""

from __future__ import annotations

import numpy as np

from reslab.diagnostics.responses import response_magnitudes
from reslab.experiments import degradation
from reslab.experiments.base import (Claim, ClaimResult, Context, ablation, differs, eval_batch, load_trained,
                                     register_claim, verdict_of)
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure

VARIANTS = ("plain", "residual", "residual-zero-init")


def analyse(ctx: Context) -> ClaimResult:
    depths = sorted({degradation.parse_id(r)[1] for r in ctx.specs})
    data_spec = next(iter(ctx.specs.values())).data
    x, _, _ = eval_batch(data_spec, 1000)
    curves: dict[tuple[str, int], list[np.ndarray]] = {}
    gammas: dict[tuple[str, int], list[np.ndarray]] = {}
    for rid in ctx.specs:
        variant, depth, _ = degradation.parse_id(rid)
        model, _ = load_trained(ctx, rid)
        curves.setdefault((variant, depth), []).append(response_magnitudes(model, x).std)
        gammas.setdefault((variant, depth), []).append(last_bn_scale(model))
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
    return ClaimResult(verdict, summary, checks, table, [_plot(depths, curves, ctx)],
                       ablation=_scale_ablation(depths, curves, gammas, ctx))


def last_bn_scale(model) -> np.ndarray:
    """``rms(gamma)`` of each block's last BN (the module that writes the branch output)."""
    return np.asarray([float(b.last_module().weight.detach().double().pow(2).mean().sqrt())
                       for b in model.trunk.branches])


def _scale_ablation(depths: list[int], curves: dict, gammas: dict, ctx: Context) -> dict:
    """Responses against the BN scale that sets them, per block; the cause of what the checks found."""
    rows, xs, ys = [], [], []
    for v in VARIANTS:
        for d in depths:
            r, g = np.concatenate(curves[(v, d)]), np.concatenate(gammas[(v, d)])
            xs.append(g)
            ys.append(r)
            rows.append({"variant": degradation.LABELS[v], "depth": d, "mean response std": float(r.mean()),
                         "mean rms(gamma) of the last BN": float(g.mean()),
                         "response std / rms(gamma)": float(np.mean(r / np.maximum(g, 1e-12)))})
    x, y = np.concatenate(xs), np.concatenate(ys)
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    lo, hi = depths[0], depths[-1]
    g = {(v, d): float(np.concatenate(gammas[(v, d)]).mean()) for v in VARIANTS for d in depths}
    text = (f"Over all {len(x)} blocks of every trained net, the response std and the rms scale gamma of the "
            f"block's last BN correlate with Pearson r = {r:.3f}: "
            + ("a block responds as much as its BN scale lets it. " if r > 0.9 else
               "the BN scale alone does not set the responses. ")
            + "The scale starts at 1 (0 with zero-init) and moves only by training: mean rms(gamma) "
            + "; ".join(f"{degradation.LABELS[v]} {g[(v, lo)]:.3f} at depth {lo}, {g[(v, hi)]:.3f} at depth {hi}"
                        for v in VARIANTS)
            + ". " + _moved("residual", g, depths) + " " + _zero_init_pattern(curves, depths)
            + " He et al.'s nets trained 64k iterations at lr 0.1 with weight decay 1e-4 on every scale (see the "
              "recipe for ours).")
    return ablation(text, rows, [_plot_scale(xs, ys, depths, ctx)])


def _moved(v: str, g: dict, depths: list[int]) -> str:
    """Whether variant ``v``'s BN scales moved from their initial 1 in training (more than 10% at some depth)."""
    off = max(abs(g[(v, d)] - 1) for d in depths)
    if off > 0.1:
        return f"The {degradation.LABELS[v]} nets' scales moved up to {100 * off:.0f}% from their initial 1."
    return (f"The {degradation.LABELS[v]} nets kept their BN scales within {100 * off:.1f}% of their initial 1 at "
            "every depth: their responses are still the initialisation's, so the checks that compare them with the "
            "plain nets and across depths measure the initialisation, not what training learned.")


def _zero_init_pattern(curves: dict, depths: list[int]) -> str:
    """What the residual nets whose scales are learned from 0 show: He et al.'s Fig. 7 pattern or not."""
    m = {(v, d): float(np.mean([c.mean() for c in curves[(v, d)]])) for v in VARIANTS for d in depths}
    v = "residual-zero-init"
    below = all(m[(v, d)] < m[("plain", d)] for d in depths)
    falling = all(m[(v, a)] > m[(v, b)] for a, b in zip(depths, depths[1:]))
    seq = " -> ".join(f"{m[(v, d)]:.3f}" for d in depths)
    return (f"The zero-init residual nets, whose scales are learned from 0, respond {seq} at depths "
            f"{', '.join(map(str, depths))}: " + ("below the plain nets at every depth" if below else
                                                  "not below the plain nets at every depth")
            + (" and less the deeper the net" if falling else " and not less at every greater depth")
            + (", He et al.'s Fig. 7 pattern." if below and falling else "."))


def _plot_scale(xs: list, ys: list, depths: list[int], ctx: Context) -> str:
    fig, ax = new_figure(1, width=6, height=4.6)
    markers = ["o", "s", "^", "D", "v"]
    i = 0
    for v in VARIANTS:
        for j, d in enumerate(depths):
            ax.scatter(xs[i], ys[i], s=12, color=degradation.COLORS[v], marker=markers[j % len(markers)],
                       label=f"{degradation.LABELS[v]}, depth {d}")
            i += 1
    ax.set(xlabel="rms(gamma) of the block's last BN", ylabel="std of the branch output",
           title="Responses follow the BN scale (every block, every seed)")
    log_axis(ax, "x")
    log_axis(ax)
    legend_below(ax)
    return ctx.save_figure(fig, "responses_bn_scale.png")


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
    ours=lambda profile: degradation.MLP_NOTES,
))
