"""Residual nets behave like ensembles of paths (Veit et al. 2016, section 4).

On the degradation claim's trained MLPs, on 1000 training samples: the error with each single block deleted
(through the scheme: a residual block leaves its skip, a plain layer is removed), with ``k`` random blocks
deleted (several draws), and after random reorderings of blocks (Kendall tau against the original order). Errors
are in %, their rises in percentage points.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from reslab.diagnostics.lesion import lesion_study
from reslab.experiments import degradation
from reslab.experiments.base import Claim, ClaimResult, Context, check, eval_batch, load_trained, register_claim
from reslab.report.plots import integer_axis, legend_below, new_figure

DRAWS = {"smoke": 2, "quick": 4, "full": 10}


def analyse(ctx: Context) -> ClaimResult:
    depths = sorted({degradation.parse_id(r)[1] for r in ctx.specs})
    data_spec = next(iter(ctx.specs.values())).data
    x, y, classes = eval_batch(data_spec, 1000)
    chance = 100 * (1 - 1 / classes)  # %
    res: dict[tuple[str, int], list] = {}
    for rid in ctx.specs:
        variant, d, seed = degradation.parse_id(rid)
        model, _ = load_trained(ctx, rid)
        n = len(model.trunk)
        ks = sorted({k for k in (1, 2, n // 4, n // 2) if 1 <= k <= n})
        res.setdefault((variant, d), []).append(lesion_study(model, x, y, ks, [1, 2, 4, max(1, n)], DRAWS[ctx.profile],
                                                             seed=seed))
    table = []
    for (v, d), rs in sorted(res.items()):
        table.append({"variant": degradation.LABELS[v], "depth": d, "blocks": len(rs[0].single),
                      "error intact (%)": 100 * float(np.mean([r.baseline for r in rs])),
                      "error, one block deleted, mean (%)": 100 * float(np.mean([r.single.mean() for r in rs])),
                      "error, one block deleted, worst (%)": 100 * float(np.mean([r.single.max() for r in rs])),
                      "error, half the blocks deleted (%)": 100 * float(np.mean([r.k_errors[-1].mean() for r in rs])),
                      "error, reordered, mean (%)": 100 * float(np.mean([r.reorder_errors.mean() for r in rs]))})
    lo, hi = depths[0], depths[-1]

    def rise(v: str, d: int) -> float:
        """Mean error rise when one block is deleted, in points."""
        return 100 * float(np.mean([r.single.mean() - r.baseline for r in res[(v, d)]]))

    def smooth(v: str, d: int) -> tuple[float, float]:
        ks = np.concatenate([np.repeat(r.ks, r.k_errors.shape[1]) for r in res[(v, d)]])
        errs = np.concatenate([r.k_errors.ravel() for r in res[(v, d)]])
        taus = np.concatenate([r.taus for r in res[(v, d)]])
        rerr = np.concatenate([r.reorder_errors for r in res[(v, d)]])
        return float(spearmanr(ks, errs)[0]), float(spearmanr(taus, rerr)[0])

    plain_lesion = 100 * float(np.mean([r.single.mean() for r in res[("plain", lo)]]))
    checks = [check(f"deleting one layer of plain-{lo} (which trains) leaves it near chance (error in %, within 10 "
                    "points of chance)", plain_lesion, plain_lesion >= chance - 10, chance=chance)]
    for v in ("residual", "residual-zero-init"):
        r = rise(v, hi)
        checks.append(check(f"deleting one block of {degradation.LABELS[v]}-{hi} barely hurts (mean error rise "
                            "<= 5 points)", r, r <= 5))
    for v in ("residual", "residual-zero-init"):
        rho_k, rho_tau = smooth(v, hi)
        checks.append(check(f"{degradation.LABELS[v]}-{hi}: error grows with k deleted (Spearman rho > 0.5)",
                            rho_k, rho_k > 0.5))
        checks.append(check(f"{degradation.LABELS[v]}-{hi}: error grows with disorder (Spearman rho(tau, err) < 0)",
                            rho_tau, rho_tau < 0))
    passed = {c["check"]: c["passed"] for c in checks}
    p = list(passed.values())
    any_res = p[1] or p[2]
    verdict = ("reproduced" if all(p) else "partly reproduced" if p[0] and any_res else "not reproduced")
    summary = (f"Mean error rise when deleting one block at depth {hi}: "
               + ", ".join(f"{degradation.LABELS[v]} {rise(v, hi):.1f} points" for v in degradation.VARIANTS)
               + f"; at depth {lo}: " + ", ".join(f"{degradation.LABELS[v]} {rise(v, lo):.1f} points"
                                                  for v in degradation.VARIANTS)
               + f". Chance error is {chance:.0f}%. The verdict needs every check.")
    return ClaimResult(verdict, summary, checks, table, [_plot(res, hi, ctx)])


def _plot(res: dict, depth: int, ctx: Context) -> str:
    fig, (a1, a2, a3) = new_figure(3, width=4.2, height=4.0)
    for v in degradation.VARIANTS:
        rs = res[(v, depth)]
        kw = dict(color=degradation.COLORS[v], label=degradation.LABELS[v])
        a1.plot(np.arange(len(rs[0].single)), 100 * np.mean([r.single for r in rs], axis=0), marker=".",
                linestyle="-", **kw)
        a1.axhline(100 * np.mean([r.baseline for r in rs]), color=degradation.COLORS[v], linestyle=":",
                   label="no block deleted (dotted, colour of its net)")
        a2.errorbar(rs[0].ks, 100 * np.mean([r.k_errors.mean(1) for r in rs], axis=0),
                    yerr=100 * np.mean([r.k_errors.std(1) for r in rs], axis=0), marker="o", linestyle="-", capsize=3,
                    **kw)
        a3.scatter(np.concatenate([r.taus for r in rs]), 100 * np.concatenate([r.reorder_errors for r in rs]),
                   s=10, **kw)
    a1.set(xlabel="deleted block", ylabel="error (%)", title=f"Delete one block, depth {depth}")
    a2.set(xlabel="blocks deleted (k)", ylabel="error (%), mean ± sd over draws",
           title=f"Delete k random blocks, depth {depth}")
    a3.set(xlabel="Kendall tau of the new order (1 = unchanged)", ylabel="error (%)",
           title=f"Reorder blocks, depth {depth}")
    for ax in (a1, a2):
        integer_axis(ax)
    legend_below(fig)
    return ctx.save_figure(fig, "ensemble.png")


CLAIM = register_claim(Claim(
    name="ensemble",
    title="The implicit ensemble: lesions",
    statement=("\"randomly deleting individual residual blocks at test time causes graceful degradation (unlike "
               "plain networks, where removing a layer is catastrophic)\"."),
    published=("Veit et al. 2016 (Fig. 3, 4): deleting a single block barely changes a 110-layer ResNet's CIFAR-10 "
               "error (except downsampling blocks); deleting any layer of VGG drops it to chance; error rises "
               "smoothly with the number of deleted blocks and with the Kendall-tau disorder of reordering."),
    runs=degradation.plan,
    analyse=analyse,
    paper=dict(degradation.HE_CIFAR, model="ResNet-110 (54 residual blocks, 3 stages, 2 downsampling blocks) and "
               "VGG-15 for the plain comparison; blocks deleted or reordered at test time only"),
))
