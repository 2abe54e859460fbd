"""Learning-rate sensitivity: "the effective learning rate for any single layer's parameters decreases" with depth.

The seed (O(L) growth, point 4): "As depth grows, the effective learning rate for any single layer's parameters
decreases because that layer's output is a diminishing fraction of the total. This can slow training and requires
careful learning rate scaling." Two measurements on three residual rules, on Pre-LN residual MLPs
(``preact_mlp``, ``norm="ln"``: ``x_{l+1} = x_l + c_l(F_l(x_l))`` with
``F_l(x) = W2 relu(LN(W1 relu(LN(x))))`` and a final LN-ReLU before the classifier) on MNIST-1D:

- ``identity``: ``c_l(F) = F``, the plain residual sum (Pre-LN);
- ``scaled``: ``c_l(F) = F / sqrt(L)``, the depth-muP branch multiplier (Yang et al. 2023, arXiv 2310.02244;
  Bordelon et al. 2023, arXiv 2309.16620);
- ``block_attnres``: Block Attention Residuals (Kimi Team 2026), a learned softmax aggregation over depth.

1. **Per-layer effective step** (:func:`reslab.diagnostics.update_size.update_sizes` at the final stream, one SGD
   step of rate :data:`STEP_LR`): ``size_l = ||x_L(theta + delta_l) - x_L(theta)|| / ||x_L(theta)||`` for a step
   ``delta_l`` on block ``l``'s branch alone, the whole step's ``||x_L(theta + delta) - x_L(theta)|| / ||x_L||`` and
   each layer's share ``size_l / whole``; on the sweep's runs at :data:`STEP_LR`, as they started (their seeds'
   initialisation) and ended. Summarised per net by the mean over layers and, over depths, by the log-log slope.
2. **Learning-rate transfer across depth**: an SGD sweep over log-spaced rates (half a decade apart) at three
   depths, every cell with the same seeds; the final training loss (eval mode, the whole training set) against the
   rate, per depth. The best rate per depth is the grid minimum of the mean over seeds, with two measures of its
   uncertainty: how often each rate is the minimum when the seeds are resampled (bootstrap, :data:`BOOTSTRAP`
   draws), and the optimum of a parabola in ``log10(rate)`` through the three points around each seed's minimum
   (mean and standard error over seeds; at the grid's edge, the edge).

Checks: (1) the identity's per-layer step falls with depth (slope over depths below 0 by 2 SE over seeds, at
initialisation); (2) the identity's best rate shifts with depth (the fitted optimum at the deepest net lies below
the shallowest's by more than ``max(2 SE, half a grid step)``); (3) the 1/sqrt(L) branch keeps the best grid rate
within one grid step across depths. Block AttnRes is measured and reported beside them, not judged: no paper states
how its best rate moves with depth.

Recipe. SGD with momentum 0.9 at a constant rate (the rate is what is swept; a schedule would mix rates), no weight
decay, batch 128, as in Bordelon et al.'s SGD experiments (which add muP in width; width is fixed here). Why this
family: the cheapest where the effect shows. Measured on one seed (8 epochs, width 64): the identity's best rate
falls 0.3 -> 0.1 -> 0.03 at 2 / 8 / 32 blocks, the 1/sqrt(L) branch's stays at 0.1-0.3; a 32-block run costs
6.5 s of one core (Block AttnRes 11 s; mHC 2-5x more, so Block AttnRes is the learned aggregation here). With LN in
every branch (Pre-LN) the stream's scale never reaches a branch, so the difference between the rules is only in
what the step does; without norms the identity net's stream doubles per block at He initialisation and no rate
trains it, which would measure the explosion, not the learning rate.

Profiles: quick: 2 / 8 / 32 blocks (depths 6 / 18 / 66), rates 0.01-1 (5), 3 seeds, width 64, 5 epochs of 4,000
samples (160 steps): 135 runs, about 320 s of one core. full: 2-128 blocks, rates 0.003-3 (7), 5 seeds, width 128,
20 epochs. smoke: tiny nets, one epoch on 256 samples, 2 seeds: it tests the pipeline, its verdict is no evidence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib import ticker

from reslab import runs
from reslab.data import load_dataset
from reslab.diagnostics.update_size import update_sizes
from reslab.experiments.base import (Claim, ClaimResult, Context, ablation, check, differs, eval_batch, initial_model,
                                     load_trained, register_claim, split_id, verdict_of)
from reslab.report.plots import legend_below, log_axis, new_figure, series_styles
from reslab.train import TrainConfig

#: scheme key -> (registered scheme, its arguments, label)
SCHEMES: dict[str, tuple[str, dict[str, Any], str]] = {
    "identity": ("identity", {}, "identity (Pre-LN)"),
    "scaled": ("scaled", {"b": "1/sqrt(L)"}, "1/sqrt(L) branch (depth-muP)"),
    "block_attnres": ("block_attnres", {}, "Block AttnRes"),
}
PROFILE: dict[str, dict[str, Any]] = {
    "smoke": dict(blocks=(1, 2, 4), rates=(0.01, 0.1, 1.0), seeds=2, epochs=1, width=8, samples=256),
    "quick": dict(blocks=(2, 8, 32), rates=(0.01, 0.03, 0.1, 0.3, 1.0), seeds=3, epochs=5, width=64, samples=None),
    "full": dict(blocks=(2, 8, 32, 128), rates=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0), seeds=5, epochs=20,
                 width=128, samples=None),
}
DATA = "mnist1d"
#: the rate of the step whose effect is measured, and of the trained nets it is measured on (in every grid)
STEP_LR = 0.1
UPDATE_SAMPLES = 512
BOOTSTRAP = 1000
STYLES = series_styles([label for _, _, label in SCHEMES.values()])


def run_id(scheme: str, blocks: int, lr: float, seed: int) -> str:
    """``run_id("scaled", 8, 0.1, 2) == "lrs-scaled-b8-lr0.1-s2"``."""
    return f"lrs-{scheme}-b{blocks}-lr{lr:g}-s{seed}"


def parse_id(rid: str) -> tuple[str, int, float, int]:
    """``"lrs-scaled-b8-lr0.1-s2"`` -> ``("scaled", 8, 0.1, 2)``."""
    return split_id(rid, "lrs-", ("b", int), ("lr", float), ("s", int))


def _config(scheme: str, blocks: int, lr: float, seed: int, p: dict[str, Any]) -> TrainConfig:
    residual, kwargs, _ = SCHEMES[scheme]
    return TrainConfig(model=f"preact_mlp{2 * blocks + 2}", residual=residual, residual_kwargs=dict(kwargs),
                       model_kwargs={"width": p["width"], "norm": "ln"}, data=DATA, epochs=p["epochs"],
                       batch_size=128, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=0.0, schedule="constant",
                       seed=seed, train_samples=p["samples"])


def plan(profile: str) -> dict[str, TrainConfig]:
    """Every cell of the sweep: scheme x blocks x rate x seed."""
    p = PROFILE[profile]
    return {run_id(s, b, lr, seed): _config(s, b, lr, seed, p)
            for s in SCHEMES for b in p["blocks"] for lr in p["rates"] for seed in range(p["seeds"])}


def final_loss(run_dir, chance: float) -> float:
    """The run's final training loss (eval mode); a diverged run counts as the chance loss ``log(classes)``."""
    result = runs.read_json(run_dir / "result.json")
    rows = runs.read_jsonl(run_dir / "metrics.jsonl")
    if result.get("status") != "completed" or not rows:
        return chance
    loss = rows[-1].get("train_eval_loss", rows[-1]["train_loss"])
    return float(loss) if math.isfinite(loss) else chance


def fitted_optimum(rates: np.ndarray, losses: np.ndarray) -> float:
    """``log10`` of the best rate: the vertex of the parabola in ``log10(rate)`` through the grid minimum and its
    two neighbours, clipped to them; the edge itself when the minimum is at the grid's edge."""
    lg = np.log10(rates)
    k = int(np.argmin(losses))
    if k == 0 or k == len(lg) - 1:
        return float(lg[k])
    a, b, _ = np.polyfit(lg[k - 1:k + 2], losses[k - 1:k + 2], 2)
    return float(np.clip(-b / (2 * a), lg[k - 1], lg[k + 1])) if a > 0 else float(lg[k])


def best_rates(rates: np.ndarray, losses: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """The best rate of one (scheme, depth) from its ``(seeds, rates)`` losses (module docstring, part 2)."""
    mean = losses.mean(0)
    k = int(np.argmin(mean))
    draws = rng.integers(0, len(losses), size=(BOOTSTRAP, len(losses)))
    picks = np.bincount(np.argmin(losses[draws].mean(1), axis=1), minlength=len(rates)) / BOOTSTRAP
    opt = np.array([fitted_optimum(rates, row) for row in losses])
    return {"index": k, "rate": float(rates[k]), "bootstrap": picks, "fitted": opt,
            "fitted_mean": float(opt.mean()), "fitted_se": float(opt.std(ddof=1) / math.sqrt(len(opt)))}


def step_sizes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Mean per-layer effective step, whole step and mean share of one SGD step at :data:`STEP_LR`."""
    u = update_sizes(model, x, y, lr=STEP_LR, optimizer="sgd", at="stream")
    return float(u.per_block.mean()), u.whole, float(u.share.mean())


def slope(blocks: list[int], values: np.ndarray) -> np.ndarray:
    """Per seed, the least-squares slope of ``log(values)`` over ``log(blocks)``; ``values`` is ``(depths, seeds)``."""
    return np.polyfit(np.log(blocks), np.log(values), 1)[0]


def analyse(ctx: Context) -> ClaimResult:
    p = PROFILE[ctx.profile]
    blocks, rates, seeds = list(p["blocks"]), np.asarray(p["rates"]), range(p["seeds"])
    x, y, classes = eval_batch(DATA, UPDATE_SAMPLES)
    chance = math.log(classes)
    loss = {(s, b): np.array([[final_loss(ctx.run(run_id(s, b, lr, seed)), chance) for lr in rates] for seed in seeds])
            for s in SCHEMES for b in blocks}
    rng = np.random.default_rng(0)
    best = {key: best_rates(rates, v, rng) for key, v in loss.items()}
    # part 1: (mean per-layer step, whole step, mean share) per net, as the runs at STEP_LR started and ended
    data = load_dataset(DATA)
    init: dict[tuple[str, int], np.ndarray] = {}
    trained: dict[tuple[str, int], np.ndarray] = {}
    for s in SCHEMES:
        for b in blocks:
            rids = [run_id(s, b, STEP_LR, seed) for seed in seeds]
            init[(s, b)] = np.array([step_sizes(initial_model(ctx.specs[r], data), x, y) for r in rids])
            trained[(s, b)] = np.array([step_sizes(load_trained(ctx, r)[0], x, y) for r in rids])
    checks = judge(blocks, rates, best, np.array([init[("identity", b)][:, 0] for b in blocks]))
    table = _table(blocks, rates, loss, best, init, trained)
    figures = [_plot_loss(blocks, rates, loss, best, ctx), _plot_best(blocks, rates, best, ctx),
               _plot_steps(blocks, init, trained, ctx)]
    verdict = verdict_of([c["passed"] for c in checks])
    layer = {k: float(slope(blocks, np.array([init[(k, b)][:, 0] for b in blocks])).mean()) for k in SCHEMES}
    summary = (f"Best SGD rate (grid minimum of the final training loss, mean of {len(seeds)} seeds) per number of "
               "blocks, and the loss there: " + "; ".join(
                   f"{label} " + ", ".join(f"{b}: {best[(k, b)]['rate']:g} ({loss[(k, b)].mean(0).min():.3f})"
                                           for b in blocks) for k, (_, _, label) in SCHEMES.items())
               + f". One layer's effective step at initialisation (mean over layers, relative change of the final "
               f"stream for one SGD step at {STEP_LR:g}) goes as L^{layer['identity']:.2f} for the identity and "
               f"L^{layer['scaled']:.2f} for the 1/sqrt(L) branch; the whole step goes as "
               f"L^{_whole_slope(blocks, init, 'identity'):.2f} and L^{_whole_slope(blocks, init, 'scaled'):.2f}.")
    return ClaimResult(verdict, summary, checks, table, figures,
                       ablation=_ablation(blocks, rates, best, init, trained))


def judge(blocks: list[int], rates: np.ndarray, best: dict, per_layer: np.ndarray) -> list[dict[str, Any]]:
    """The claim's three checks (module docstring) from the best rates and the identity's per-layer steps at
    initialisation, ``(depths, seeds)``."""
    lo, hi = blocks[0], blocks[-1]
    half = 0.5 * float(np.diff(np.log10(rates)).mean())
    sl = slope(blocks, per_layer)
    se = float(sl.std(ddof=1) / math.sqrt(len(sl)))
    idx = [best[("scaled", b)]["index"] for b in blocks]
    return [
        check(f"identity: one layer's effective step falls with depth (log-log slope over {lo}-{hi} blocks, "
              f"at initialisation, below 0 by 2 SE)", float(sl.mean()), float(sl.mean()) + 2 * se < 0, se=se),
        differs(f"identity: the best rate (fitted, log10) at {hi} blocks lies below the one at {lo} blocks",
                best[("identity", lo)]["fitted"], best[("identity", hi)]["fitted"], "lower", floor=half),
        check("1/sqrt(L) branch: the best grid rate stays within one grid step across depths (grid steps between "
              "the highest and lowest best rate)", max(idx) - min(idx), max(idx) - min(idx) <= 1),
    ]


def _whole_slope(blocks: list[int], sizes: dict, scheme: str) -> float:
    return float(slope(blocks, np.array([sizes[(scheme, b)][:, 1] for b in blocks])).mean())


def _bootstrap_text(rates: np.ndarray, picks: np.ndarray) -> str:
    return ", ".join(f"{r:g} ({100 * f:.0f}%)" for r, f in zip(rates, picks) if f > 0)


def _table(blocks, rates, loss, best, init, trained) -> list[dict[str, Any]]:
    rows = []
    for s, (_, _, label) in SCHEMES.items():
        for b in blocks:
            bb, m = best[(s, b)], loss[(s, b)]
            rows.append({"scheme": label, "blocks": b,
                         **{f"loss at {r:g}": f"{m[:, k].mean():.3f} ± {m[:, k].std(ddof=1):.3f}"
                            for k, r in enumerate(rates)},
                         "best rate (grid)": bb["rate"], "best rate over resampled seeds": _bootstrap_text(
                             rates, bb["bootstrap"]),
                         "fitted best rate": f"{10 ** bb['fitted_mean']:.3g} (log10 {bb['fitted_mean']:+.2f} ± "
                                             f"{bb['fitted_se']:.2f})",
                         "layer step at init": float(init[(s, b)][:, 0].mean()),
                         "whole step at init": float(init[(s, b)][:, 1].mean()),
                         "layer step trained": float(trained[(s, b)][:, 0].mean())})
    return rows


def _ablation(blocks, rates, best, init, trained) -> dict[str, Any]:
    """Why the best rate moves: the whole step's growth with depth against the optimum's shift."""
    rows, parts = [], []
    for s, (_, _, label) in SCHEMES.items():
        whole = _whole_slope(blocks, init, s)
        opt = np.array([best[(s, b)]["fitted_mean"] for b in blocks])
        shift = float(np.polyfit(np.log10(blocks), opt, 1)[0])
        for b in blocks:
            for when, d in (("init", init), ("trained", trained)):
                v = d[(s, b)]
                rows.append({"scheme": label, "blocks": b, "when": when, "layer step": float(v[:, 0].mean()),
                             "whole step": float(v[:, 1].mean()), "layer share": float(v[:, 2].mean()),
                             "share x blocks": float(v[:, 2].mean() * b)})
        parts.append(f"{label}: whole step ~ L^{whole:+.2f}, so a rate ~ L^{-whole:+.2f} keeps it fixed; the fitted "
                     f"best rate moved as L^{shift:+.2f}")
    same = max(float(np.max(np.abs(init[("block_attnres", b)] / init[("identity", b)] - 1))) for b in blocks)
    coherent = [r["share x blocks"] for r in rows]
    text = (f"Each layer's share of the whole step times the number of blocks lies in {min(coherent):.2f}-"
            f"{max(coherent):.2f} over every rule, depth and state"
            + (" (near 1: each layer moves the stream by about 1/L of the whole step, and the layers' changes add "
               "up coherently, so the best rate is decided by how the whole step grows with depth). "
               if 0.5 < min(coherent) and max(coherent) < 2 else " (far from 1: the layers' changes do not simply add "
               "up, so the whole step is not L times one layer's). ") + "; ".join(parts)
            + f" (one SGD step of {STEP_LR:g} at initialisation, per-seed log-log fit "
            "over depths; the optimum's fit is over the mean fitted log10 rate per depth). At initialisation Block "
            f"AttnRes's steps equal the identity's to {same:.1e} (relative): its zero-initialised queries read the "
            "mean of the sources, a rescaled sum, and every Pre-LN norm removes the scale; the two differ only in "
            "what the queries learn.")
    return ablation(text, rows)


def _block_axis(ax: Any, blocks: list[int]) -> None:
    """A log x axis labelled at the measured numbers of blocks only."""
    ax.set_xscale("log")
    ax.set_xticks(blocks, [str(b) for b in blocks])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _plot_loss(blocks, rates, loss, best, ctx: Context) -> str:
    fig, axes = new_figure(len(SCHEMES), width=4.2, height=3.8)
    depth_styles = series_styles([f"{b} blocks" for b in blocks])
    top = max(float(v.mean(0).max()) for v in loss.values())
    low = min(float(v.mean(0).min()) for v in loss.values())
    for ax, (s, (_, _, label)) in zip(axes, SCHEMES.items()):
        for b in blocks:
            m, style = loss[(s, b)], depth_styles[f"{b} blocks"]
            ax.errorbar(rates, m.mean(0), yerr=m.std(0, ddof=1), capsize=2, label=f"{b} blocks", **style)
            k = best[(s, b)]["index"]
            ax.plot(rates[k], m.mean(0)[k], marker="*", markersize=13, color=style["color"], linestyle="none")
        ax.set_xscale("log")
        ax.set(xlabel="learning rate (SGD, momentum 0.9)", ylabel="final training loss (nats)", title=label,
               ylim=(low * 0.9, top * 1.05))
        legend_below(ax)
    return ctx.save_figure(fig, "lr_sensitivity_loss.png")


def _plot_best(blocks, rates, best, ctx: Context) -> str:
    fig, ax = new_figure(1, width=6, height=4.2)
    for i, (s, (_, _, label)) in enumerate(SCHEMES.items()):
        xs = np.asarray(blocks) * (1 + 0.06 * (i - 1))
        f = [best[(s, b)] for b in blocks]
        ax.errorbar(xs, [10 ** v["fitted_mean"] for v in f],
                    yerr=[[10 ** v["fitted_mean"] - 10 ** (v["fitted_mean"] - v["fitted_se"]) for v in f],
                          [10 ** (v["fitted_mean"] + v["fitted_se"]) - 10 ** v["fitted_mean"] for v in f]],
                    capsize=3, label=f"{label}: fitted optimum ± SE", **STYLES[label])
        ax.plot(xs, [v["rate"] for v in f], marker="*", markersize=11, linestyle="none", color=STYLES[label]["color"],
                label=f"{label}: grid minimum")
    for r in rates:
        ax.axhline(r, color="0.85", linewidth=0.8, zorder=0)
    _block_axis(ax, blocks)
    ax.set(xlabel="residual blocks L", ylabel="best learning rate", title="Best rate per depth (grid lines: the sweep)")
    log_axis(ax, ticks=list(rates))
    legend_below(ax, ncol=2)
    return ctx.save_figure(fig, "lr_sensitivity_best.png")


def _plot_steps(blocks, init, trained, ctx: Context) -> str:
    fig, axes = new_figure(2, width=4.6, height=4.0)
    for ax, (when, d) in zip(axes, (("at initialisation", init), (f"trained at rate {STEP_LR:g}", trained))):
        for s, (_, _, label) in SCHEMES.items():
            v = np.array([d[(s, b)] for b in blocks])  # (depths, seeds, 3)
            ax.plot(blocks, v[:, :, 0].mean(1), label=f"{label}: one layer", **STYLES[label])
            ax.plot(blocks, v[:, :, 1].mean(1), color=STYLES[label]["color"], marker=STYLES[label]["marker"],
                    linestyle=":", markersize=4, label=f"{label}: whole step")
        _block_axis(ax, blocks)
        ax.set(xlabel="residual blocks L", ylabel="relative change of the final stream", title=when)
        log_axis(ax)
    legend_below(fig, ncol=3, axes=axes)
    return ctx.save_figure(fig, "lr_sensitivity_steps.png")


CLAIM = register_claim(Claim(
    name="lr_sensitivity",
    title="Learning-rate sensitivity and depth-wise transfer",
    statement=("\"As depth grows, the effective learning rate for any single layer's parameters decreases because "
               "that layer's output is a diminishing fraction of the total. This can slow training and requires "
               "careful learning rate scaling.\""),
    published=("No number in the seed. Depth-muP (Yang et al. 2023, arXiv 2310.02244) and Bordelon et al. 2023 "
               "(arXiv 2309.16620): with each branch multiplied by 1/sqrt(L) the best learning rate transfers across "
               "depth (SGD), while with x + F(x) it drifts."),
    runs=plan,
    analyse=analyse,
    budget="the epochs of every run of the sweep",
    paper={"data": "Bordelon et al.: CIFAR-10, ImageNet; Yang et al.: CIFAR-10, Common Crawl",
           "model": "Bordelon et al.: conv ResNets (with and without BatchNorm) and ViTs with branch multiplier "
                    "1/sqrt(L) and muP in width, L up to ~100 blocks; Yang et al.: one-layer blocks (and "
                    "transformers)",
           "optimiser": "SGD (and Adam, whose depth-muP rate also scales as 1/sqrt(L))",
           "weight decay": "none in the transfer sweeps",
           "schedule": "the sweep varies the rate itself",
           "training": "train loss after a fixed number of steps against the rate, per depth"},
    ours=lambda profile: {"model": "Pre-LN MLPs without muP in width (the width is fixed): the cheapest family where "
                                   "the effect shows (a 32-block run of the quick sweep: about 6 s of one core); "
                                   f"effective steps are measured on the runs at rate {STEP_LR:g}, at initialisation "
                                   "and trained",
                          "training": "loss = final training loss in eval mode; a diverged run counts as chance"},
))
