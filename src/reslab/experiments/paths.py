"""Short effective paths: most gradient flows through paths far shorter than the nominal depth
(Veit et al. 2016, section 5; REFERENCE.md section 3).

Residual MLPs with 3, 9, 27 and 54 blocks (quick profile: the degradation claim's nets of depth 8, 20 and 56,
shared, and depth 110, Veit et al.'s ResNet-110 block count) are trained with the degradation claim's recipe;
on a batch of 64 training samples we measure the gradient per path length both exactly (the polynomial
coefficients ``||c_k||``, which include cancellation between paths) and with Veit et al.'s sampling estimate
(mean single-path norm times ``C(n, k)``), their effective depths (gradient-weighted mean path length) and the
range of lengths holding 90% of the gradient, then fit ``effective depth ~ a n^p`` over the depths. The check
against the binomial mean ``n/2`` is made at the deepest net, as Veit et al.'s statement is (a 3-block net uses its
whole depth; that says nothing about deep nets).
"""

from __future__ import annotations

import numpy as np
import torch

from reslab.diagnostics.paths import analyse_paths, binomial_length_distribution
from reslab.experiments import degradation
from reslab.experiments.base import (Claim, ClaimResult, Context, check, eval_batch, load_trained,
                                     register_claim, verdict_of)
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure

#: residual blocks per net: the degradation claim's depths (shared runs) and Veit et al.'s 54 (ResNet-110)
BLOCKS = {"smoke": (1, 3), "quick": (3, 9, 27, 54), "full": (3, 9, 15, 27, 54)}
SAMPLES = {"smoke": 5, "quick": 10, "full": 200}
VARIANTS = ("residual", "residual-zero-init")


def plan(profile: str) -> dict:
    return degradation.mlp_runs(profile, VARIANTS, tuple(2 * n + 2 for n in BLOCKS[profile]))


def _fit(n: np.ndarray, eff: np.ndarray) -> tuple[float, float]:
    """Least-squares ``log eff = p log n + log a``: returns ``(p, a)``."""
    p, loga = np.polyfit(np.log(n), np.log(eff), 1)
    return float(p), float(np.exp(loga))


def analyse(ctx: Context) -> ClaimResult:
    data_spec = next(iter(ctx.specs.values())).data
    x, y, _ = eval_batch(data_spec, 64)
    prof: dict[tuple[str, int], list] = {}
    for rid in ctx.specs:
        variant, depth, seed = degradation.parse_id(rid)
        model, _ = load_trained(ctx, rid)
        g = torch.Generator().manual_seed(seed)
        prof.setdefault((variant, len(model.trunk)), []).append(
            analyse_paths(model, x, y, samples=SAMPLES[ctx.profile], generator=g))
    blocks = sorted({n for _, n in prof})
    table, checks, fits = [], [], {}
    for v in VARIANTS:
        eff = np.array([[p.effective_depth("exact") for p in prof[(v, n)]] for n in blocks])  # (depths, seeds)
        veit = np.array([[p.effective_depth("veit") for p in prof[(v, n)]] for n in blocks])
        for j, n in enumerate(blocks):
            lo, hi = prof[(v, n)][0].mass_range("exact")
            table.append({"variant": degradation.LABELS[v], "blocks": n, "effective_depth_exact": float(eff[j].mean()),
                          "sd": float(eff[j].std(ddof=1)), "effective_depth_veit": float(veit[j].mean()),
                          "binomial_mean": n / 2, "90%_range_exact_seed0": f"{lo}-{hi}"})
        sizes = np.array(blocks, float)
        per_seed = [_fit(sizes, eff[:, s])[0] for s in range(eff.shape[1])]
        p_mean, p_sd = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
        fits[v] = (p_mean, p_sd, _fit(sizes, eff.mean(1)), _fit(sizes, veit.mean(1)))
        ratio = float(eff[-1].mean() / blocks[-1])  # Veit et al.'s statement is about their deepest net
        checks.append(check(f"{degradation.LABELS[v]}, {blocks[-1]} blocks: exact effective depth below the "
                            "binomial mean n/2 (effective depth / n)", ratio, ratio < 0.5))
        upper = p_mean + 2 * p_sd / np.sqrt(len(per_seed))
        checks.append(check(f"{degradation.LABELS[v]}: effective depth grows sublinearly (fitted exponent p, "
                            "mean over seeds; passes if p + 2 SE < 1)", p_mean, upper < 1,
                            se=p_sd / np.sqrt(len(per_seed))))
    core = [c["passed"] for c in checks]
    verdict = verdict_of(core)
    summary = ("Effective path length (exact, mean over seeds) at " + ", ".join(map(str, blocks)) + " blocks: "
               + "; ".join(f"{degradation.LABELS[v]} " + ", ".join(
                   f"{r['effective_depth_exact']:.1f}" for r in table if r["variant"] == degradation.LABELS[v])
                   for v in VARIANTS)
               + ". Fitted growth exponent p (effective depth ~ n^p; the claimed O(sqrt(L)) is p = 0.5): "
               + "; ".join(f"{degradation.LABELS[v]} exact {fits[v][0]:.2f} +- {fits[v][1]:.2f}, Veit's estimate "
                           f"{fits[v][3][0]:.2f}" for v in VARIANTS)
               + ". Veit's estimate ignores cancellation between paths and so puts more weight on long paths.")
    return ClaimResult(verdict, summary, checks, table, [_plot(prof, blocks, fits, ctx)])


def _plot(prof: dict, blocks: list[int], fits: dict, ctx: Context) -> str:
    fig, (a1, a2, a3) = new_figure(3, width=4.4, height=4.6)
    n = blocks[-1]
    p0 = prof[("residual", n)][0]
    k = p0.lengths
    a1.plot(k, p0.exact_norm / p0.exact_norm.sum(), label="exact: ||c_k||")
    if p0.veit_total is not None:
        a1.plot(k, p0.veit_total / np.nansum(p0.veit_total), label="Veit's estimate: mean path x C(n,k)")
    a1.plot(k, binomial_length_distribution(n), color="k", linestyle=":", marker="",
            label="share of paths: C(n,k) / 2^n")
    a1.set(xlabel="path length k (blocks)", ylabel="share of the total", title=f"Per path length, residual, {n} blocks")
    log_axis(a1)
    integer_axis(a1)
    legend_below(a1)
    for v in VARIANTS:
        c, label = degradation.COLORS[v], degradation.LABELS[v]
        eff = [np.mean([p.effective_depth("exact") for p in prof[(v, b)]]) for b in blocks]
        a2.plot(blocks, eff, "o-", color=c, label=f"{label}, exact (p = {fits[v][0]:.2f})")
        ve = [np.mean([p.effective_depth("veit") for p in prof[(v, b)]]) for b in blocks]
        a2.plot(blocks, ve, "s--", color=c, alpha=0.6, label=f"{label}, Veit's estimate (p = {fits[v][3][0]:.2f})")
    b = np.array(blocks, float)
    a2.plot(b, b / 2, "k:", label="n/2 (binomial mean)")
    a2.plot(b, np.sqrt(b), "k-.", label="sqrt(n)")
    a2.set(xlabel="blocks n", ylabel="effective depth (blocks)", title="Effective depth vs n (mean over seeds)")
    log_axis(a2, "x", ticks=blocks)
    log_axis(a2)
    legend_below(a2)
    for v in VARIANTS:
        p = prof[(v, n)][0]
        a3.plot(k, np.cumsum(p.exact_norm) / p.exact_norm.sum(), color=degradation.COLORS[v], marker="",
                linestyle="-", label=f"{degradation.LABELS[v]}, exact")
    a3.plot(k, np.cumsum(binomial_length_distribution(n)), "k:", label="share of paths")
    a3.set(xlabel="path length k (blocks)", ylabel="cumulative share, paths up to length k",
           title=f"Where the gradient comes from, {n} blocks")
    integer_axis(a3)
    legend_below(a3)
    return ctx.save_figure(fig, "paths.png")


CLAIM = register_claim(Claim(
    name="paths",
    title="The implicit ensemble: short effective paths",
    statement=("\"most of the gradient during training flows through paths of moderate length ... The useful "
               "paths are O(sqrt(L)) in length on average for a network of L blocks\"."),
    published=("Veit et al. 2016 (Fig. 6): in a 54-block ResNet >95% of paths have 19-35 blocks, but almost all "
               "gradient comes from paths 5-17 blocks long (0.45% of paths)."),
    runs=plan,
    analyse=analyse,
    paper=dict(degradation.HE_CIFAR, model="ResNet-110 (54 residual blocks); the gradient per path length is "
               "estimated by sampling paths (about 1,000 per length)"),
    ours=lambda profile: degradation.MLP_NOTES,
))
