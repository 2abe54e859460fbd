"""Shortcuts: "the differences were minor, confirming that the identity shortcut is the essential ingredient".

Two measurements on the CIFAR ResNets of the ``resnet`` family (post-activation, He et al. 2015), trained with the
family's own recipe (He et al.'s: SGD 0.1, momentum 0.9, weight decay 1e-4, rate / 10 at 50% and 75% of training) on
scikit-learn's 8x8 digits, as the ``ensemble`` claim's conv nets are:

1. Shortcut options (He et al. 2015, Table 3; :mod:`reslab.shortcuts`): A (zero-pad, parameter-free), B (projection
   where the shape changes), C (projection on every block), D (avg-down projection, ResNet-D) with the identity
   scheme at one depth, and the plain twin. The claim holds when the options differ from each other by less than
   their gap to the plain net. Option A and the plain twin are the ``ensemble`` claim's runs
   (``conv-residual-dD-sS``, ``conv-plain-dD-sS``: the same ids and configs, trained once).
2. Multiplicative shortcuts (He et al. 2016, Table 1), each at one depth against the identity (option A):
   constant scaling ``y = 0.5 x + 0.5 F(x)`` (``scaled``, a = b = 0.5); exclusive gating
   ``y = (1 - g(x)) x + g(x) F(x)`` and shortcut-only gating ``y = (1 - g(x)) x + F(x)``, ``g = sigmoid(W_g x + b)``
   with a 1x1-conv gate (``exclusive_gating``, ``shortcut_gating``), each with gate bias ``b = 0`` (closed: the skip
   starts at ``1 - g = 0.5``) and ``b = -6`` (open: ``1 - g = 0.9975``; He et al.'s sign convention, the one that
   trained); a learned 1x1 conv on every shortcut, no BN (``conv_shortcut``); dropout 0.5 on the shortcut
   (``dropout_shortcut``). Every one keeps the post-activation ReLU after the combination (He et al.'s Table 1 used
   the original unit) and multiplies the skip path by something other than 1 at every block, which He et al. blame
   for their higher error: ``x_L = (prod_i lambda_i) x_l + ...``. The claim holds when each trains worse than the
   identity at depth, and opening a gate (bias -6) does much better than closing it (bias 0): below it by more than
   the margin and by at least :data:`MUCH` of the closed gate's excess over the identity.

Measures, per run (errors in %, their differences in percentage points): the *training error over the run*, the mean
over epochs of the training error during each epoch (the area under the training curve of He et al. 2016's Fig. 3,
in training mode as the optimiser sees it); the final training error (eval mode, whole training set); the final
held-out error (digits' 360 held-out images; He et al. report test error). The checks use the training error over
the run: the argument of both papers is about optimisation (He et al. 2016: gating and 1x1 shortcuts "cover the
solution space of identity shortcuts. However, their training error is higher ... the degradation of these models is
caused by optimization issues"), and on digits the final training error saturates: the ensemble claim measured 0.0%
for every identity ResNet-20 after 15 epochs, so a final error can only tie it, while the error over the run measures
how fast each net optimises. The held-out error stands beside it in the table and the summary. A diverged run counts
as chance error. Differences count when they exceed ``max(2 standard errors, FLOOR)`` (:func:`base.differs`).

Depths: quick, both parts on ResNet-20 (9 blocks; the shallowest net the ensemble claim trains, so the deepest this
budget allows) at the ensemble claim's 15 epochs and 3 seeds, so that option A, the identity and the plain twin are
its runs. That leaves 30 new runs, 11-16 s of single-thread CPU each (measured; the gated nets and option C cost
most), about 430 s in all: about 3.5 minutes on 2 cores with 2 workers. full: part 1 on ResNet-56 (the ensemble
claim's full runs: 30 epochs, 5 seeds), part 2 on ResNet-110 (54 blocks, He et al. 2016's depth) with its own identity
runs. ``full`` uses CIFAR-10 with ResNet-110 for both parts at He et al.'s 164 epochs when a local archive is present
(:func:`base.conv_setting`), else digits. Smoke: ResNet-8 of width 4, one epoch on 256 images, 2 seeds: it tests the
pipeline, and its verdict is no evidence.

Ablation (the report's "why not fully reproduced"): the gain of each variant's skip path, per block
``g_i = E_x ||s_i(x_i)|| / ||a_i(x_i)||`` (``s_i`` the variant's skip path: ``0.5 x``, ``(1 - g(x)) x``, ``W x``;
``a_i`` the identity path, option A's subsample-and-pad where the shape changes; on held-out images), at
initialisation (batch statistics: a fresh BN's running statistics are placeholders) and after training (eval mode),
and its product over the blocks, ``prod_i g_i``: what the skip path does to the signal from the first block to the
last; the branch's gain per block, ``E_x ||c_i|| / ||F_i(x_i)||`` (``c_i`` what the block adds: ``g(x) F(x)`` for an
exclusive gate, whose bias -6 opens the skip and shuts the branch); the trained skip gain per block raised to
ResNet-110's 54 blocks. A dropout shortcut has gain 1 in expectation; what it does is cut: a fraction ``(1 - p)^n`` of
the stream's elements passes all ``n`` skips undropped. The text says which variants keep both paths (more than
:data:`KEEP` of the skip signal over all blocks, and of the branch) and whether they are the ones that did not train
worse.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from reslab.data import load_dataset
from reslab.diagnostics.recorder import record, trunk_of
from reslab.evaluation import eval_mode
from reslab.experiments import ensemble
from reslab.experiments.base import (CIFAR_EPOCHS, Claim, ClaimResult, Context, ablation, check, conv_setting, differs,
                                     initial_model, load_trained, mean_sd, pooled_se, register_claim, run_measures,
                                     verdict_of)
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure, series_styles
from reslab.residuals.base import GATE_MIX, ParameterFreeSkip
from reslab.train import TrainConfig

#: depth of part 1 (options) and of part 2 (multiplicative shortcuts), seeds, epochs. quick and full share the
#: ensemble claim's conv runs (:data:`ensemble.CONV`: depth, seeds and epochs must match it).
PROFILE: dict[str, dict[str, Any]] = {
    "smoke": dict(options_depth=8, depth=8, seeds=2, epochs=1, extra=dict(model_kwargs={"width": 4},
                                                                            train_samples=256)),
    "quick": dict(options_depth=20, depth=20, seeds=3, epochs=15),
    "full": dict(options_depth=56, depth=110, seeds=5, epochs=30),
    "full_cifar": dict(options_depth=110, depth=110, seeds=5, epochs=CIFAR_EPOCHS, data="cifar10"),
}
#: percentage points below which no difference of training error over the run counts (about 7 of digits' 1,437
#: training images per epoch), whatever the seeds' spread
FLOOR = 0.5
#: the share of a closed gate's excess error over the identity that opening it must remove to do "much better"
MUCH = 0.5
#: held-out images the ablation measures the skip paths on, per profile
GAIN_SAMPLES = {"smoke": 32, "quick": 128, "full": 360}
#: the ablation's line between keeping and losing a path: the share of the signal a skip path passes over all blocks,
#: or the size at which a branch is added
KEEP = 0.5
#: ResNet-110's residual blocks (He et al. 2016's depth), for the ablation's extrapolation
PAPER_BLOCKS = 54

#: every net: run-id name, label, scheme, shortcut option, scheme arguments, part, published error (%)
NETS: dict[str, dict[str, Any]] = {
    "A": dict(name="residual", label="option A (zero-pad)", residual="identity", part=1, published="25.03"),
    "B": dict(name="option-B", label="option B (projection where the shape changes)", residual="identity",
              shortcut="B", part=1, published="24.52"),
    "C": dict(name="option-C", label="option C (projection on every block)", residual="identity", shortcut="C",
              part=1, published="24.19"),
    "D": dict(name="option-D", label="option D (avg-down projection)", residual="identity", shortcut="D", part=1,
              published="not in the paper"),
    "plain": dict(name="plain", label="plain twin", residual="plain", part=1, published="28.54"),
    "identity": dict(name="residual", label="identity (option A)", residual="identity", part=2, published="6.61"),
    "scaled": dict(name="scaled-0.5", label="constant scaling 0.5 / 0.5", residual="scaled",
                   kwargs={"a": 0.5, "b": 0.5}, part=2, published="12.35"),
    "exclusive-closed": dict(name="exclusive-gating-bias0", label="exclusive gating, bias 0 (closed)",
                             residual="exclusive_gating", kwargs={"gate_bias": 0.0}, part=2,
                             published="fails (bias 0 to -5)"),
    "exclusive-open": dict(name="exclusive-gating-bias-6", label="exclusive gating, bias -6 (open)",
                           residual="exclusive_gating", kwargs={"gate_bias": -6.0}, part=2, published="8.70"),
    "shortcut-closed": dict(name="shortcut-gating-bias0", label="shortcut-only gating, bias 0 (closed)",
                            residual="shortcut_gating", kwargs={"gate_bias": 0.0}, part=2, published="12.86"),
    "shortcut-open": dict(name="shortcut-gating-bias-6", label="shortcut-only gating, bias -6 (open)",
                          residual="shortcut_gating", kwargs={"gate_bias": -6.0}, part=2, published="6.91"),
    "conv1x1": dict(name="1x1-conv-shortcut", label="1x1 conv shortcut", residual="conv_shortcut", part=2,
                    published="12.22"),
    "dropout": dict(name="dropout-shortcut", label="dropout 0.5 on the shortcut", residual="dropout_shortcut",
                    kwargs={"p": 0.5}, part=2, published="fails"),
}
OPTIONS = ("A", "B", "C", "D")
PART1 = (*OPTIONS, "plain")
PART2 = ("identity", "scaled", "exclusive-closed", "exclusive-open", "shortcut-closed", "shortcut-open", "conv1x1",
         "dropout")
MULTIPLICATIVE = PART2[1:]
#: (open, closed) gate pairs
GATES = (("exclusive-open", "exclusive-closed"), ("shortcut-open", "shortcut-closed"))
STYLES = series_styles([NETS[k]["label"] for k in (*PART1, *PART2) if k != "identity"])
STYLES[NETS["identity"]["label"]] = STYLES[NETS["A"]["label"]]  # the same runs at the quick profile
#: tick labels
SHORT = {"A": "A", "B": "B", "C": "C", "D": "D", "plain": "plain", "identity": "identity", "scaled": "scaled\n0.5/0.5",
         "exclusive-closed": "excl.\nb = 0", "exclusive-open": "excl.\nb = -6",
         "shortcut-closed": "skip\nb = 0", "shortcut-open": "skip\nb = -6", "conv1x1": "1x1\nconv",
         "dropout": "dropout\n0.5"}

#: He et al. 2015's ImageNet recipe (Table 3) and He et al. 2016's CIFAR-10 one (Table 1)
PAPER = {
    "data": "options: ImageNet 2012 (1.28M images, 224x224 crops, scale and colour augmentation); multiplicative "
            "shortcuts: CIFAR-10, 45k/5k split, pad-4 random crop and horizontal flip",
    "model": "options: ResNet-34 (A/B/C) and plain-34, post-activation; multiplicative shortcuts: ResNet-110 "
             "(54 post-activation basic blocks), original unit, 1x1-conv gates",
    "optimiser": "SGD, momentum 0.9; ImageNet lr 0.1, batch 256; CIFAR lr 0.1, batch 128 (ResNet-110: 400 "
                 "iterations at 0.01 first)",
    "weight decay": "1e-4",
    "schedule": "ImageNet: lr / 10 when the error plateaus; CIFAR: lr / 10 at 32k and 48k iterations",
    "training": "ImageNet: up to 60e4 iterations; CIFAR: 64k iterations (~182 epochs)",
}


def run_id(key: str, depth: int, seed: int) -> str:
    """``run_id("B", 20, 0) == "conv-option-B-d20-s0"``; option A and the identity are the ensemble claim's
    ``conv-residual-...``, the plain twin its ``conv-plain-...`` (parsed by :func:`degradation.parse_id`)."""
    return f"conv-{NETS[key]['name']}-d{depth}-s{seed}"


def config(key: str, depth: int, seed: int, epochs: int, **options: Any) -> TrainConfig:
    """Net ``key`` at ``depth``: the ``resnet`` family's recipe on digits at ``epochs`` (option A, the identity
    and the plain twin with exactly the ensemble claim's options), ``options`` on top (the smoke profile's tiny
    nets)."""
    net = NETS[key]
    extra: dict[str, Any] = dict(options)
    if net.get("shortcut"):
        extra["shortcut"] = net["shortcut"]
    if net.get("kwargs"):
        extra["residual_kwargs"] = dict(net["kwargs"])
    return TrainConfig.for_model(f"resnet{depth}", residual=net["residual"], epochs=epochs, seed=seed, **extra)


def ids(profile: str) -> dict[str, list[str]]:
    """Every net's run ids for ``profile``, by net: part 1 at the options' depth, part 2 at its depth."""
    p = conv_setting(profile, PROFILE)
    return {k: [run_id(k, p["options_depth"] if k in PART1 else p["depth"], s) for s in range(p["seeds"])]
            for k in (*PART1, *PART2)}


def plan(profile: str) -> dict[str, TrainConfig]:
    """Every run of the claim; option A, the identity and the plain twin are the ensemble claim's conv runs wherever
    it trains them (same id, same config).

    Raises:
        ValueError: a run id of the ensemble claim that this claim would train with another config.
    """
    p = conv_setting(profile, PROFILE)
    out: dict[str, TrainConfig] = {}
    for k in (*PART1, *PART2):
        d = p["options_depth"] if k in PART1 else p["depth"]
        for s in range(p["seeds"]):
            out[run_id(k, d, s)] = config(k, d, s, p["epochs"], data=p["data"], **p.get("extra", {}))
    shared = ensemble.conv_runs(profile)
    for rid in sorted(set(out) & set(shared)):
        if out[rid] != shared[rid]:
            raise ValueError(f"run {rid!r} is the ensemble claim's with another config")
    return out


def options_check(errs: dict[str, list[float]], depth: int) -> list[dict[str, Any]]:
    """Part 1's two checks on the training error over the run.

    1. Every option trains better than the plain twin: the smallest gap ``mean(plain) - mean(option)`` exceeds its
       margin ``max(2 SE, FLOOR)``.
    2. The options differ by less than their gap to plain, with the uncertainty of both sides: the upper bound of
       the largest pairwise difference, ``max over pairs of |mean(o1) - mean(o2)| + 2 SE(o1, o2)``, lies below the
       lower bound of the smallest gap, ``min over options of mean(plain) - mean(o) - 2 SE(o, plain)``.
    """
    gaps = {o: differs(f"{o} vs plain", errs[o], errs["plain"], "higher", floor=FLOOR) for o in OPTIONS}
    worst = min(OPTIONS, key=lambda o: gaps[o]["difference"])
    g = gaps[worst]
    c1 = check(f"every shortcut option of resnet-{depth} trains better than its plain twin (smallest gap, option "
               f"{worst}, above max(2 SE, {FLOOR:g} points))", g["difference"], all(v["passed"] for v in gaps.values()),
               se=g["se"], margin=g["margin"])
    pairs = {(a, b): (abs(float(np.mean(errs[a]) - np.mean(errs[b]))), pooled_se(errs[a], errs[b]))
             for a, b in combinations(OPTIONS, 2)}
    top = max(pairs, key=lambda p: pairs[p][0] + 2 * pairs[p][1])
    upper = pairs[top][0] + 2 * pairs[top][1]
    low = min(OPTIONS, key=lambda o: gaps[o]["difference"] - 2 * gaps[o]["se"])
    lower = gaps[low]["difference"] - 2 * gaps[low]["se"]
    largest = max(v[0] for v in pairs.values())
    c2 = check(f"the options of resnet-{depth} differ by less than their gap to plain (upper 2-SE bound of the "
               f"largest pairwise difference, {top[0]} vs {top[1]}, below the lower 2-SE bound of the smallest gap, "
               f"option {low})", largest, upper < lower, upper_bound=upper, smallest_gap=g["difference"],
               gap_lower_bound=lower)
    return [c1, c2]


def variant_checks(errs: dict[str, list[float]], depth: int) -> list[dict[str, Any]]:
    """Part 2's checks on the training error over the run: each multiplicative shortcut above the identity, and each
    gate opened (bias -6) much better than closed (bias 0): below it by more than the margin and by at least
    :data:`MUCH` of the closed gate's excess over the identity."""
    checks = [differs(f"{NETS[k]['label']} trains worse than the identity at depth {depth}", errs["identity"],
                      errs[k], "higher", floor=FLOOR) for k in MULTIPLICATIVE]
    ident = float(np.mean(errs["identity"]))
    for o, c in GATES:
        d = differs("open vs closed", errs[c], errs[o], "lower", floor=FLOOR)
        excess = float(np.mean(errs[c])) - ident
        share = -d["difference"] / excess if excess > 0 else math.nan
        checks.append(check(f"{NETS[o]['label'].split(',')[0]} at depth {depth}: bias -6 (open) trains much better "
                            f"than bias 0 (closed) (below it by more than max(2 SE, {FLOOR:g} points) and by at "
                            f"least {MUCH:.0%} of the closed gate's excess over the identity)", share,
                            d["passed"] and share >= MUCH, difference=d["difference"], se=d["se"],
                            margin=d["margin"], closed_excess=excess))
    return checks


def analyse(ctx: Context) -> ClaimResult:
    by_net = {k: [r for r in v if r in ctx.specs] for k, v in ids(ctx.profile).items()}
    d1 = ctx.specs[by_net["A"][0]].model.removeprefix("resnet")
    d2 = ctx.specs[by_net["identity"][0]].model.removeprefix("resnet")
    d1, d2 = int(d1), int(d2)
    data = load_dataset(ctx.specs[by_net["A"][0]].data)
    chance = 100 * (1 - 1 / data.num_classes)
    meas = {rid: run_measures(ctx.run(rid), chance) for rid in ctx.specs}
    errs = {k: [meas[r]["run"] for r in v] for k, v in by_net.items()}
    final = {k: [meas[r]["train"] for r in v] for k, v in by_net.items()}
    test = {k: [meas[r]["test"] for r in v] for k, v in by_net.items()}
    models = {k: load_trained(ctx, v[0])[0] for k, v in by_net.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

    table = []
    for k in (*PART1, *PART2):
        net, d = NETS[k], d1 if k in PART1 else d2
        row = {"part": "1: options" if k in PART1 else "2: multiplicative", "net": net["label"], "depth": d,
               "seeds": len(errs[k]), "parameters": params[k]}
        for what, v in (("training error over the run", errs[k]), ("final training error", final[k]),
                        ("held-out error", test[k])):
            m, s = mean_sd(v)
            row[f"{what}, mean (%)"], row[f"{what}, sd (%)"] = m, s
        row["diverged runs"] = sum(meas[r]["diverged"] for r in by_net[k])
        row["published error (%; 1: ImageNet ResNet-34, 2: CIFAR-10 ResNet-110)"] = net["published"]
        table.append(row)

    checks = options_check(errs, d1) + variant_checks(errs, d2)
    verdict = verdict_of([c["passed"] for c in checks])
    m = {k: float(np.mean(v)) for k, v in errs.items()}
    t = {k: float(np.mean(v)) for k, v in test.items()}
    worse = [k for k, c in zip(MULTIPLICATIVE, checks[2:]) if c["passed"]]
    summary = (f"Training error over the run (mean over epochs of the error during each epoch, mean of "
               f"{len(errs['A'])} seeds) of resnet-{d1} on {data.name}: "
               + ", ".join(f"option {o} {m[o]:.2f}%" for o in OPTIONS) + f", plain twin {m['plain']:.2f}%"
               + " (held-out error: " + ", ".join(f"{o} {t[o]:.2f}%" for o in OPTIONS)
               + f", plain {t['plain']:.2f}%). The options differ by up to {checks[1]['value']:.2f} points, their "
               f"smallest gap to plain is {checks[1]['smallest_gap']:.2f} points. Multiplicative shortcuts on "
               f"resnet-{d2}: identity {m['identity']:.2f}% ("
               + "; ".join(f"{NETS[k]['label']} {m[k]:.2f}%" for k in MULTIPLICATIVE)
               + f"); held-out: identity {t['identity']:.2f}% ("
               + "; ".join(f"{NETS[k]['label']} {t[k]:.2f}%" for k in MULTIPLICATIVE)
               + f"). {len(worse)} of {len(MULTIPLICATIVE)} multiplicative shortcuts train worse than the identity"
               + (f" ({', '.join(NETS[k]['label'] for k in worse)})" if worse else "")
               + f". The checks use the training error over the run (the claim is about optimisation, and the "
               f"final training error saturates on digits: identity {np.mean(final['identity']):.2f}% at the end); "
               f"a difference counts when it exceeds max(2 standard errors, {FLOOR:g} points); the verdict needs "
               "every check.")
    figures = [_plot(errs, test, meas, by_net, d1, d2, ctx)]
    steps = max(meas[r]["steps"] for r in by_net["identity"])
    return ClaimResult(verdict, summary, checks, table, figures, _ablation(ctx, by_net, errs, checks, d2, data,
                                                                       steps))


def _points(ax: Any, keys: tuple[str, ...], errs: dict, test: dict) -> None:
    """Per net: mean ± sd of the training error over the run (filled) and of the held-out error (hollow), seeds as
    dots."""
    x = np.arange(len(keys))
    for i, k in enumerate(keys):
        st = STYLES[NETS[k]["label"]]
        m, s = mean_sd(errs[k])
        ax.errorbar(i - 0.12, m, yerr=s, marker=st["marker"], color=st["color"], linestyle="none", capsize=3,
                    label=NETS[k]["label"])
        ax.scatter(np.full(len(errs[k]), i - 0.12), errs[k], s=8, color=st["color"], alpha=0.5, zorder=3)
        m, s = mean_sd(test[k])
        ax.errorbar(i + 0.12, m, yerr=s, marker=st["marker"], color=st["color"], markerfacecolor="none",
                    linestyle="none", capsize=3)
    ax.set_xticks(x, [SHORT[k] for k in keys], fontsize=7)


def _plot(errs: dict, test: dict, meas: dict, by_net: dict, d1: int, d2: int, ctx: Context) -> str:
    fig, (a1, a2, a3) = new_figure(3, width=4.8, height=4.6)
    _points(a1, PART1, errs, test)
    _points(a2, PART2, errs, test)
    for ax in (a1, a2):
        ax.plot([], [], color="0.4", marker="o", linestyle="none", label="training error over the run (filled)")
        ax.plot([], [], color="0.4", marker="o", markerfacecolor="none", linestyle="none",
                label="final held-out error (hollow)")
    a2.axhline(np.mean(errs["identity"]), color=STYLES[NETS["identity"]["label"]]["color"], linestyle=":",
               linewidth=0.8)
    a1.set(ylabel="error (%), mean ± sd over seeds", title=f"Shortcut options, resnet-{d1}")
    a2.set(ylabel="error (%), mean ± sd over seeds", title=f"Multiplicative shortcuts, resnet-{d2}")
    log_axis(a2)
    for k in PART2:
        c = np.nanmean(np.asarray([meas[r]["curve"] for r in by_net[k]], dtype=float), axis=0)
        st = STYLES[NETS[k]["label"]]
        a3.plot(np.arange(1, len(c) + 1), np.maximum(c, 1e-2), color=st["color"], linestyle=st["linestyle"],
                marker=st["marker"], markersize=3, label=NETS[k]["label"])
    a3.set(xlabel="epoch", ylabel="training error during the epoch (%; 0 drawn at 0.01)",
           title=f"Training curves, resnet-{d2} (mean over seeds)")
    log_axis(a3)
    integer_axis(a3)
    legend_below(fig)
    return ctx.save_figure(fig, "shortcuts.png")


# --- ablation: what each skip path does to the signal over depth ------------------------------------------------

def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """``E_x ||a(x)|| / ||b(x)||`` over the samples where ``b(x)`` is not zero (a dead stream has no gain), per-sample
    L2 norms; NaN when there is none."""
    num, den = (torch.linalg.vector_norm(t.flatten(1), dim=1).double() for t in (a, b))
    live = den > 0
    return float((num[live] / den[live]).mean()) if live.any() else math.nan


@torch.no_grad()
def path_gains(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the gain of the skip path and of the branch path.

    Skip: ``g_i = E_x ||s_i(x_i)|| / ||a_i(x_i)||``, the variant's skip path ``s_i`` against the identity path ``a_i``
    (option A's subsample-and-pad where the shape changes) on the stream ``x_i`` entering block ``i``. A gate's skip is
    ``(1 - g(x_i)) shortcut(x_i)`` with the gate it applied in this forward pass; a dropout skip is taken in eval mode
    (the identity: its gain is 1 in expectation). Branch: ``E_x ||c_i|| / ||F_i(x_i)||``, what the block adds (after
    gates and scales) against the branch's raw output: ``g(x)`` for an exclusive gate, ``b`` for constant scaling, 1
    where the branch is added as it is. Per-sample L2 norms, in the model's current mode (train: batch statistics).
    """
    trunk = trunk_of(model)
    scheme = trunk.scheme
    with record(model, names=("resid_pre", "mix", "branch_out", "contribution")) as rec:
        model(x)
    streams, gates = rec.get("resid_pre"), rec.by_depth("mix", len(trunk))
    outs, adds = rec.get("branch_out"), rec.get("contribution")
    gated = scheme.capabilities.mix_shape == GATE_MIX
    skip = []
    with eval_mode(scheme):
        for i, (xi, spec) in enumerate(zip(streams, scheme.specs)):
            s = (1.0 - gates[i]) * scheme.shortcut(i, xi) if gated else scheme.skip(xi, i)
            skip.append(_ratio(s, ParameterFreeSkip(spec)(xi)))
    branch = [_ratio(c, o) for c, o in zip(adds, outs)] if adds else [1.0] * len(streams)
    return np.asarray(skip), np.asarray(branch)


def skip_gains(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The skip path's gain per block (:func:`path_gains`)."""
    return path_gains(model, x)[0]


def _geomean(g: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(g, 1e-300)))))


def _ablation(ctx: Context, by_net: dict, errs: dict, checks: list, depth: int, data: Any,
              steps: int) -> dict[str, Any]:
    x = data.prepare(data.x_test[:GAIN_SAMPLES[ctx.profile]], train=False)
    gains: dict[str, dict[str, np.ndarray]] = {}
    branch: dict[str, dict[str, float]] = {}
    per_block: dict[str, dict[str, np.ndarray]] = {}
    for k in PART2:
        init, trained = [], []
        for rid in by_net[k]:
            init.append(path_gains(initial_model(ctx.specs[rid], data).train(), x))
            trained.append(path_gains(load_trained(ctx, rid)[0], x))
        gains[k] = {"init": np.mean([g[0] for g in init], 0), "trained": np.mean([g[0] for g in trained], 0)}
        per_block[k] = {"init": np.mean([g[1] for g in init], 0), "trained": np.mean([g[1] for g in trained], 0)}
        branch[k] = {w: float(np.mean(v)) for w, v in per_block[k].items()}
    n = len(gains["identity"]["init"])
    p = NETS["dropout"]["kwargs"]["p"]
    ident = errs["identity"]
    rows, excess = [], {}
    for k, c in zip(MULTIPLICATIVE, checks[2:]):
        gi, gt = gains[k]["init"], gains[k]["trained"]
        per = _geomean(gt)
        excess[k] = float(np.mean(errs[k]) - np.mean(ident))
        rows.append({"net": NETS[k]["label"], "blocks": n, "skip gain per block at init (geometric mean)":
                     _geomean(gi), "skip gain per block trained (geometric mean)": per,
                     "product over the blocks at init": float(np.prod(gi)),
                     "product over the blocks trained": float(np.prod(gt)),
                     f"trained gain per block ^ {PAPER_BLOCKS} (ResNet-110)": per ** PAPER_BLOCKS,
                     "share of the stream passing every skip intact": (1 - p) ** n if k == "dropout" else 1.0,
                     "branch gain per block at init (mean)": branch[k]["init"],
                     "branch gain per block trained (mean)": branch[k]["trained"],
                     "excess training error over the identity (points)": excess[k], "se (points)": c["se"],
                     "trains worse (check)": c["passed"]})
    not_worse = [k for k, c in zip(MULTIPLICATIVE, checks[2:]) if not c["passed"]]
    det = [k for k in MULTIPLICATIVE if k != "dropout"]
    logs = [math.log10(max(float(np.prod(gains[k]["trained"])), 1e-300)) for k in det]
    ex = [excess[k] for k in det]
    rho = float(spearmanr(logs, ex)[0]) if np.ptp(logs) > 0 and np.ptp(ex) > 0 else math.nan
    row = {r["net"]: r for r in rows}

    def says(k: str) -> str:
        r = row[NETS[k]["label"]]
        if k == "dropout":
            return (f"{NETS[k]['label']} (excess {r['excess training error over the identity (points)']:+.2f} ± "
                    f"{r['se (points)']:.2f} points) keeps the skip's gain at 1 in expectation but drops a fraction "
                    f"{p:g} of it at every block: {r['share of the stream passing every skip intact']:.2g} of the "
                    f"stream passes all {n} skips intact ((1 - {p:g})^{n}; {(1 - p) ** PAPER_BLOCKS:.2g} at "
                    f"{PAPER_BLOCKS} blocks)")
        return (f"{NETS[k]['label']} (excess {r['excess training error over the identity (points)']:+.2f} ± "
                f"{r['se (points)']:.2f} points): skip gain per block "
                f"{r['skip gain per block at init (geometric mean)']:.3g} at init, "
                f"{r['skip gain per block trained (geometric mean)']:.3g} trained, a product over the {n} blocks of "
                f"{r['product over the blocks at init']:.3g} at init and {r['product over the blocks trained']:.3g} "
                f"trained ({r[f'trained gain per block ^ {PAPER_BLOCKS} (ResNet-110)']:.2g} at ResNet-110's "
                f"{PAPER_BLOCKS} blocks)")

    if not_worse:
        text = (f"Of the {len(MULTIPLICATIVE)} multiplicative shortcuts of resnet-{depth} ({n} blocks), "
                f"{len(not_worse)} did not train measurably worse than the identity: "
                + "; ".join(says(k) for k in not_worse) + ". ")
    else:
        text = f"Every multiplicative shortcut of resnet-{depth} ({n} blocks) trained worse than the identity. "
    hurt = [k for k in MULTIPLICATIVE if k not in not_worse]
    if hurt:
        text += "Those that did: " + "; ".join(says(k) for k in hurt) + ". "
    text += (f"Over the deterministic skips, the Spearman correlation between the log of the trained product and "
             f"the excess training error is {'undefined (no spread)' if math.isnan(rho) else f'{rho:.2f}'}"
             + ("" if math.isnan(rho) else
                " (negative: the more a skip path shrinks the signal over depth, the worse the net trains)"
                if rho < -0.5 else " (the shrinkage over depth does not order the excess errors)") + ".")
    # which variants keep both paths: the skip passes more than KEEP of the signal over all blocks (for dropout, the
    # share of the stream passing every skip intact) and the branch is added at more than KEEP of its size
    kept = {k: (row[NETS[k]["label"]]["share of the stream passing every skip intact"] if k == "dropout"
                else row[NETS[k]["label"]]["product over the blocks trained"]) for k in MULTIPLICATIVE}
    both = [k for k in MULTIPLICATIVE if kept[k] > KEEP and branch[k]["trained"] > KEEP]
    names = ", ".join(NETS[k]["label"] for k in both) or "none"
    if set(both) == set(not_worse):
        text += (f" The variants that did not train worse are exactly those whose skip path keeps more than {KEEP:g} "
                 f"of the signal over the {n} blocks and whose branch is added at more than {KEEP:g} of its size "
                 f"({names}); every other one shrinks or cuts one of the two paths and trains worse.")
    else:
        text += (f" Keeping more than {KEEP:g} of the skip signal over the {n} blocks and of the branch ({names}) does "
                 "not separate the variants that trained worse from those that did not.")
    for (o, c), chk in zip(GATES, checks[2 + len(MULTIPLICATIVE):]):
        if chk["passed"]:
            continue
        bo, bc = branch[o], branch[c]
        text += (f" {NETS[o]['label'].split(',')[0]}: opening the gate (bias 0 -> -6) changed the training error by "
                 f"{chk['difference']:+.2f} points (margin {chk['margin']:.2f}; the closed gate's excess over the "
                 f"identity is {chk['closed_excess']:+.2f} points). It raised the skip product from "
                 f"{np.prod(gains[c]['init']):.3g} to {np.prod(gains[o]['init']):.3g} at init")
        if NETS[o]["residual"] == "exclusive_gating":
            text += (f", and multiplies the branch by {bo['init']:.3g} at init and {bo['trained']:.3g} after training "
                     f"(closed: {bc['init']:.3g} and {bc['trained']:.3g})")
        if NETS[o]["residual"] == "exclusive_gating" and bo["trained"] < bc["trained"]:
            text += (f": the bias that opens the skip also shuts the branch, and in our {steps:,} steps the open "
                     f"gate let through {bo['trained'] / bc['trained']:.2g} times what the closed one did.")
        else:
            text += "."
    return ablation(text, rows, [_plot_gains(gains, per_block, depth, ctx)])


def _plot_gains(gains: dict, branch: dict, depth: int, ctx: Context) -> str:
    fig, (a1, a2, a3) = new_figure(3, width=4.6, height=4.4)
    for ax, when in ((a1, "init"), (a2, "trained")):
        for k in PART2:
            st = STYLES[NETS[k]["label"]]
            g = np.cumprod(gains[k][when])
            ax.plot(np.arange(len(g)), g, color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                    markersize=3, label=NETS[k]["label"])
        ax.set(xlabel="block", ylabel="skip-path gain over blocks 0..i (product of the g_j)",
               title=f"Skip path, resnet-{depth}, {'at initialisation' if when == 'init' else 'trained'}")
    for k in PART2:
        st = STYLES[NETS[k]["label"]]
        for when, ls in (("init", ":"), ("trained", "-")):
            b = branch[k][when]
            a3.plot(np.arange(len(b)), b, color=st["color"], linestyle=ls, marker=st["marker"], markersize=3,
                    label=NETS[k]["label"] if when == "trained" else None)
    a3.plot([], [], color="0.4", linestyle=":", label="at initialisation (dotted)")
    a3.plot([], [], color="0.4", linestyle="-", label="trained (solid)")
    a3.set(xlabel="block", ylabel="branch gain per block, E ||added|| / ||F(x)||",
           title=f"Branch path, resnet-{depth}")
    for ax in (a1, a2, a3):
        log_axis(ax)
        integer_axis(ax)
    legend_below(fig)
    return ctx.save_figure(fig, "shortcuts_ablation.png")


def _ours(profile: str) -> dict[str, str]:
    p = conv_setting(profile, PROFILE)
    shared = set(plan(profile)) & set(ensemble.conv_runs(profile))
    return {"model": f"part 1 at depth {p['options_depth']}, part 2 at depth {p['depth']}"
                     + ("; option A, the identity and the plain twin are the ensemble claim's conv runs" if shared
                        else ""),
            "data": ("CIFAR-10 for both parts (a local archive is present)" if p["data"] == "cifar10" else
                     f"{p['data']} instead of ImageNet (options) and CIFAR-10 (multiplicative shortcuts)"),
            "training": "checks on the training error over the run (mean over epochs of the error during each "
                        "epoch); final training and held-out errors reported beside"}


CLAIM = register_claim(Claim(
    name="shortcuts",
    title="Projection shortcuts and multiplicative skips",
    statement=("\"the differences were minor, confirming that the identity shortcut is the essential "
               "ingredient\": projection options barely matter, while any multiplicative change of the shortcut "
               "hampers training."),
    published=("He et al. 2015 (Table 3), ImageNet ResNet-34 top-1 error: option A 25.03%, B 24.52%, C 24.19%, "
               "plain-34 28.54%. He et al. 2016 (Table 1), ResNet-110 on CIFAR-10, error: identity 6.61%; "
               "constant scaling 0.5/0.5 12.35%; exclusive gating fails for gate bias 0 to -5, 8.70% at -6; "
               "shortcut-only gating 12.86% (bias 0) / 6.91% (-6); 1x1 conv shortcut 12.22%; dropout shortcut "
               "fails."),
    runs=plan,
    analyse=analyse,
    paper=PAPER,
    ours=_ours,
))
