"""Pre-activation: "pre-activation further improves gradient flow" (He et al. 2016, arXiv 1603.05027, Table 2).

He et al. 2016's five activation placements (Fig. 4; :mod:`reslab.models.blocks`) on the CIFAR ResNets of the
``resnet`` family (``placement`` option), trained with the family's recipe (He et al.'s: SGD 0.1, momentum 0.9, weight
decay 1e-4, rate / 10 at 50% and 75% of training) on scikit-learn's 8x8 digits, as the ``ensemble`` and ``shortcuts``
claims' conv nets are, at two depths:

- (a) original ``x_{l+1} = relu(x + BN(W2 relu(BN(W1 x))))`` (no ``placement`` option: at the quick profile's
  ResNet-20 it is the ensemble claim's ``conv-residual-d20-sS`` run, shared);
- (b) BN after addition ``relu(BN(x + W2 relu(BN(W1 x))))``; (c) ReLU before addition
  ``x + relu(BN(W2 relu(BN(W1 x))))``; (d) ReLU-only pre-activation ``x + BN(W2 relu(BN(W1 relu(x))))``;
  (e) full pre-activation ``x + W2 relu(BN(W1 relu(BN(x))))``.

Measures per run (errors in %, their differences in points), as in :mod:`reslab.experiments.shortcuts`: the training
error over the run (mean over epochs of the training error during each epoch: the claim is about optimisation, and on
digits the final training error saturates at 0), the final training error and the held-out error (360 images).
Gradient flow: ``r = ||dL/dx_0|| / ||dL/dx_{L-1}||``, the norm of the loss gradient at the stream entering block 0
relative to the one entering the last block (:func:`reslab.diagnostics.gradients.gradient_profile`: one batch of
training images, batch statistics), at initialisation (a fresh model with the run's seed) and after training.

Checks (a difference counts when it exceeds ``max(2 SE, FLOOR)``, :func:`base.differs`): (1) at each depth full
pre-activation trains no worse than the original; (2) the original-minus-full-pre-activation gap grows with depth
(deeper minus shallower gap above ``max(2 SE, FLOOR)``, the SE of both gaps combined); (3) BN after addition and
(4) ReLU before addition train worse than the original at the deeper depth (He et al. measured both at ResNet-110 and
-164; what they blame, a BN that alters the skip signal and a non-negative branch, compounds over the blocks, so the
deeper net is where it should show; the shallower one is in the table); (5) at initialisation, at the deeper depth,
the gradient reaching the first block relative to the last is at least the original's (``log10 r`` not below it by
more than ``max(2 SE, GRAD_FLOOR)``): He et al.'s eq. (5), ``dE/dx_l = dE/dx_L (1 + ...)``, says the identity path
delivers the last block's gradient to every earlier block undiminished, where the original's ReLU after every
addition can cut it. Not "closer to 1": at initialisation every placement's ``r`` is above 1 on digits (the gradient
grows towards the input), the pre-activation units' most, and mostly at block 0, which reads the bare stem conv's
small output (a BN-fed block passes back a gradient inversely proportional to its input's scale); the ablation
reports ``r`` from block 1 beside it. The verdict needs every check.

Profiles. quick: ResNet-20 (9 blocks; shared with the ensemble claim at 15 epochs, 3 seeds) and ResNet-26 (12 blocks).
Single-thread CPU per run at 15 epochs, measured beside each other on a machine also running another user's jobs:
ResNet-20 11.1-15.5 s (4 runs), ResNet-26 14.0-14.7 s (3), ResNet-32 18.7-19.3 s (2). The 27 new runs (4 placements x 3
seeds at depth 20, 5 x 3 at the deeper depth) cost about 12 x 12.5 + 15 x 14.4 = 370 s with ResNet-26 and 435 s with
ResNet-32, against a budget of about 400 s (200 s on 2 workers): ResNet-26. full: ResNet-56 and ResNet-110 at 30 epochs,
5 seeds (the original's runs are the ensemble claim's ResNet-56 and the shortcuts claim's ResNet-110 identity runs);
with a local CIFAR-10 archive (:func:`base.conv_setting`) ResNet-56 and -110 on CIFAR-10 at He et al.'s 164 epochs,
the original ResNet-110 being the ensemble and shortcuts claims' runs.
smoke: ResNet-8 and ResNet-20 of width 4, one epoch on 256 images, 2 seeds (not 14: ``conv-residual-d14`` is the
ensemble claim's smoke run, at full width); its verdict is no evidence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reslab.data import load_dataset
from reslab.diagnostics.gradients import gradient_profile
from reslab.experiments import ensemble, shortcuts
from reslab.experiments.base import (CIFAR_EPOCHS, Claim, ClaimResult, Context, ablation, check, conv_setting, differs,
                                     eval_batch, initial_model, load_trained, mean_sd, pooled_se, register_claim,
                                     run_measures, verdict_of)
from reslab.experiments.shortcuts import FLOOR
from reslab.models.blocks import PLACEMENTS
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure, series_styles
from reslab.train import TrainConfig

#: the two depths, seeds and epochs per profile; ``extra``: options on top of the recipe (the smoke profile's nets)
PROFILE: dict[str, dict[str, Any]] = {
    "smoke": dict(depths=(8, 20), seeds=2, epochs=1, extra=dict(model_kwargs={"width": 4}, train_samples=256)),
    "quick": dict(depths=(20, 26), seeds=3, epochs=15),
    "full": dict(depths=(56, 110), seeds=5, epochs=30),
    "full_cifar": dict(depths=(56, 110), seeds=5, epochs=CIFAR_EPOCHS, data="cifar10"),
}
#: log10 units (a factor 1.12) below which no difference of the gradient ratio counts
GRAD_FLOOR = 0.05
#: training images the gradient ratio is measured on
GRAD_SAMPLES = {"smoke": 64, "quick": 256, "full": 256}
#: run-id names (the original's is the ensemble claim's), labels, tick labels, He et al. 2016's Table 2 (ResNet-110,
#: ResNet-164; CIFAR-10 test error %)
NAME = {"original": "residual", "bn_after_add": "bn-after-add", "relu_before_add": "relu-before-add",
        "relu_only_preact": "relu-only-preact", "full_preact": "full-preact"}
LABEL = {"original": "(a) original", "bn_after_add": "(b) BN after addition",
         "relu_before_add": "(c) ReLU before addition", "relu_only_preact": "(d) ReLU-only pre-activation",
         "full_preact": "(e) full pre-activation"}
SHORT = {"original": "(a)\noriginal", "bn_after_add": "(b) BN\nafter add", "relu_before_add": "(c) ReLU\nbefore add",
         "relu_only_preact": "(d) ReLU-only\npre-act", "full_preact": "(e) full\npre-act"}
PUBLISHED = {"original": (6.61, 5.93), "bn_after_add": (8.17, 6.50), "relu_before_add": (7.84, 6.14),
             "relu_only_preact": (6.71, 5.91), "full_preact": (6.37, 5.46)}
STYLES = series_styles(LABEL.values())

PAPER = {
    "data": "CIFAR-10, 45k/5k split, pad-4 random crop and horizontal flip",
    "model": "ResNet-110 (54 basic blocks) and ResNet-164 (54 bottleneck blocks) in the five placements of Fig. 4; "
             "ResNet-1001 original and full pre-activation",
    "optimiser": "SGD, lr 0.1 (0.01 for the first 400 iterations of ResNet-110 / 1001), momentum 0.9, batch 128",
    "weight decay": "1e-4",
    "schedule": "lr / 10 at 32k and 48k iterations",
    "training": "64k iterations (~182 epochs); median of 5 runs",
}


def run_id(placement: str, depth: int, seed: int) -> str:
    """``run_id("full_preact", 26, 0) == "conv-full-preact-d26-s0"``; the original is the ensemble claim's
    ``conv-residual-...`` (parsed by :func:`degradation.parse_id`)."""
    return f"conv-{NAME[placement]}-d{depth}-s{seed}"


def config(placement: str, depth: int, seed: int, epochs: int, **options: Any) -> TrainConfig:
    """``resnet{depth}`` in ``placement`` with the family's recipe on digits; the original takes no ``placement``
    option, so that its config is the ensemble claim's; ``options`` on top (the smoke profile's tiny nets)."""
    opts = dict(options)
    kwargs = {**opts.pop("model_kwargs", {}), **({} if placement == "original" else {"placement": placement})}
    if kwargs:
        opts["model_kwargs"] = kwargs
    return TrainConfig.for_model(f"resnet{depth}", residual="identity", epochs=epochs, seed=seed, **opts)


def ids(profile: str) -> dict[tuple[str, int], list[str]]:
    """Run ids by ``(placement, depth)``."""
    p = conv_setting(profile, PROFILE)
    return {(k, d): [run_id(k, d, s) for s in range(p["seeds"])] for d in p["depths"] for k in PLACEMENTS}


def plan(profile: str) -> dict[str, TrainConfig]:
    """Every run of the claim; the original's are the ensemble and shortcuts claims' wherever they train them.

    Raises:
        ValueError: a run id of those claims that this claim would train with another config.
    """
    p = conv_setting(profile, PROFILE)
    out = {rid: config(k, d, s, p["epochs"], data=p["data"], **p.get("extra", {}))
           for (k, d), rids in ids(profile).items() for s, rid in enumerate(rids)}
    shared = {**ensemble.conv_runs(profile), **shortcuts.plan(profile)}
    for rid in sorted(set(out) & set(shared)):
        if out[rid] != shared[rid]:
            raise ValueError(f"run {rid!r} is the ensemble or shortcuts claim's with another config")
    return out


def checks_of(errs: dict[tuple[str, int], list[float]], grads: dict[tuple[str, int], list[float]],
              depths: tuple[int, int]) -> list[dict[str, Any]]:
    """The five checks on the training error over the run (points) and ``log10 r`` at initialisation."""
    lo, hi = depths
    out = [differs(f"(e) full pre-activation trains no worse than (a) the original at depth {d} (difference within "
                   f"max(2 SE, {FLOOR:g} points))", errs[("original", d)], errs[("full_preact", d)], "not higher",
                   floor=FLOOR) for d in depths]
    gap = {d: float(np.mean(errs[("original", d)]) - np.mean(errs[("full_preact", d)])) for d in depths}
    se = math.sqrt(sum(pooled_se(errs[("original", d)], errs[("full_preact", d)]) ** 2 for d in depths))
    growth, margin = gap[hi] - gap[lo], max(2 * se, FLOOR)
    out.append(check(f"the gap (a) original minus (e) full pre-activation grows from depth {lo} to {hi} (by more than "
                     f"max(2 SE, {FLOOR:g} points), the SE of both gaps combined)", growth, growth > margin,
                     gap_shallow=gap[lo], gap_deep=gap[hi], se=se, margin=margin))
    for k in ("bn_after_add", "relu_before_add"):
        out.append(differs(f"{LABEL[k]} trains worse than (a) the original at depth {hi} (by more than max(2 SE, "
                           f"{FLOOR:g} points))", errs[("original", hi)], errs[(k, hi)], "higher", floor=FLOOR))
    g = differs(f"at initialisation, depth {hi}: the gradient reaching the first block relative to the last, "
                f"log10 ||dL/dx_0|| / ||dL/dx_L-1||, of (e) full pre-activation is at least the original's (not below "
                f"it by more than max(2 SE, {GRAD_FLOOR:g}))", grads[("full_preact", hi)], grads[("original", hi)],
                "not higher", floor=GRAD_FLOOR)
    out.append({**g, "difference": -g["difference"]})  # full pre-activation minus the original
    return out


def analyse(ctx: Context) -> ClaimResult:
    by = {k: [r for r in v if r in ctx.specs] for k, v in ids(ctx.profile).items()}
    depths = conv_setting(ctx.profile, PROFILE)["depths"]
    cfg0 = ctx.specs[by[("original", depths[0])][0]]
    data = load_dataset(cfg0.data)
    chance = 100 * (1 - 1 / data.num_classes)
    meas = {rid: run_measures(ctx.run(rid), chance) for rid in ctx.specs}
    x, y, _ = eval_batch(cfg0.data, GRAD_SAMPLES[ctx.profile])
    prof: dict[str, dict[str, np.ndarray]] = {}
    params: dict[str, int] = {}
    for rid in ctx.specs:
        model = load_trained(ctx, rid)[0]
        params[rid] = sum(p.numel() for p in model.parameters())
        init = gradient_profile(initial_model(ctx.specs[rid], data), x, y).stream
        trained = gradient_profile(model, x, y).stream
        prof[rid] = {"init": init / init[-1], "trained": trained / trained[-1]}
    pick = {w: {k: [meas[r][w] for r in rids] for k, rids in by.items()} for w in ("run", "train", "test")}
    errs = pick["run"]
    grad = {w: {k: [float(np.log10(prof[r][w][0])) for r in rids] for k, rids in by.items()}
            for w in ("init", "trained")}
    table = []
    for d in depths:
        for k in PLACEMENTS:
            row = {"placement": LABEL[k], "depth": d, "seeds": len(by[(k, d)]), "parameters": params[by[(k, d)][0]]}
            for what, w in (("training error over the run", "run"), ("final training error", "train"),
                            ("held-out error", "test")):
                row[f"{what}, mean (%)"], row[f"{what}, sd (%)"] = mean_sd(pick[w][(k, d)])
            for w in ("init", "trained"):
                m, s = mean_sd(grad[w][(k, d)])
                row[f"gradient ratio r at {w} (geometric mean)"], row[f"log10 r at {w}, sd"] = 10 ** m, s
            row["diverged runs"] = sum(meas[r]["diverged"] for r in by[(k, d)])
            row["published error (%), ResNet-110 / 164"] = "{} / {}".format(*PUBLISHED[k])
            table.append(row)
    checks = checks_of(errs, grad["init"], depths)
    m = {k: float(np.mean(v)) for k, v in errs.items()}
    t = {k: float(np.mean(v)) for k, v in pick["test"].items()}
    lo, hi = depths
    summary = (f"Training error over the run (mean over epochs of the error during each epoch, mean of "
               f"{len(errs[('original', lo)])} seeds) of resnet-{lo} / resnet-{hi} on {data.name}: "
               + "; ".join(f"{LABEL[k]} {m[(k, lo)]:.2f}% / {m[(k, hi)]:.2f}%" for k in PLACEMENTS)
               + ". Held-out error: "
               + "; ".join(f"{LABEL[k]} {t[(k, lo)]:.2f}% / {t[(k, hi)]:.2f}%" for k in PLACEMENTS)
               + " (He et al., CIFAR-10 ResNet-110: " + ", ".join(f"{PUBLISHED[k][0]}%" for k in PLACEMENTS)
               + f"). Full pre-activation minus the original: {checks[0]['difference']:+.2f} points at depth {lo} "
               f"(margin {checks[0]['margin']:.2f}), {checks[1]['difference']:+.2f} at depth {hi} (margin "
               f"{checks[1]['margin']:.2f}); BN after addition {checks[3]['difference']:+.2f}, ReLU before addition "
               f"{checks[4]['difference']:+.2f} points at depth {hi}. Gradient ratio r at initialisation, depth {hi}: "
               + ", ".join(f"{LABEL[k]} {10 ** np.mean(grad['init'][(k, hi)]):.3g}" for k in PLACEMENTS)
               + f". {sum(c['passed'] for c in checks)} of {len(checks)} checks pass; a difference counts when it "
               f"exceeds max(2 standard errors, {FLOOR:g} points); the verdict needs every check.")
    figures = [_plot(errs, pick["test"], depths, ctx)]
    return ClaimResult(verdict_of([c["passed"] for c in checks]), summary, checks, table, figures,
                       _ablation(errs, grad, prof, by, depths, checks, ctx))


def _ablation(errs: dict, grad: dict, prof: dict, by: dict, depths: tuple[int, int], checks: list[dict[str, Any]],
              ctx: Context) -> dict[str, Any]:
    """Where each placement's difference from the original sits against the seeds' spread, and the gradient ratio per
    placement over depth, with and without the first block (whose input is the stem's output)."""
    rows, parts = [], []
    r1 = {k: float(np.exp(np.mean([np.log(prof[r]["init"][1]) for r in rids]))) for k, rids in by.items()}
    for d in depths:
        base, said = errs[("original", d)], []
        for k in PLACEMENTS[1:]:
            c = differs("", base, errs[(k, d)], "higher", floor=FLOOR)
            beyond = abs(c["difference"]) > c["margin"]
            rows.append({"placement": LABEL[k], "depth": d, "minus the original (points)": c["difference"],
                         "se (points)": c["se"], "margin (points)": c["margin"], "beyond the margin": beyond,
                         "seed sd of the original (points)": mean_sd(base)[1],
                         "seed sd (points)": mean_sd(errs[(k, d)])[1],
                         "r at init": 10 ** float(np.mean(grad["init"][(k, d)])),
                         "r trained": 10 ** float(np.mean(grad["trained"][(k, d)])),
                         "r from block 1 at init": r1[(k, d)]})
            said.append(f"{LABEL[k]} {c['difference']:+.2f} ± {c['se']:.2f}{' (beyond the margin)' if beyond else ''}")
        spread = max(mean_sd(v)[1] for (k, dd), v in errs.items() if dd == d)
        parts.append(f"At depth {d}, training error over the run minus the original's (points ± SE): "
                     + ", ".join(said) + f"; the seeds' sd is up to {spread:.2f} points.")
    r = {k: [10 ** np.mean(grad[w][(k, d)]) for d in depths for w in ("init", "trained")] for k in PLACEMENTS}
    lo, hi = depths
    text = (" ".join(parts) + f" Gradient ratio r = ||dL/dx_0|| / ||dL/dx_L-1|| at init and trained, at depth {lo} "
            f"then {hi}: " + "; ".join(f"{LABEL[k]} " + ", ".join(f"{v:.3g}" for v in vs) for k, vs in r.items())
            + ". " + ("No placement lets the gradient vanish towards the input (every r is at least 1). "
                      if min(min(vs) for vs in r.values()) >= 1 else ""))
    top = max(PLACEMENTS, key=lambda k: r[k][2])
    text += (f"At init at depth {hi} the largest r is {LABEL[top]}'s, and most of it is the first block: from block 1 "
             "on, ||dL/dx_1|| / ||dL/dx_L-1|| is "
             + ", ".join(f"{r1[(k, hi)]:.3g} {LABEL[k][:3]}" for k in PLACEMENTS)
             + ". r measures the stream's scale as much as the flow: a block that normalises its input passes back a "
               "gradient inversely proportional to the input's scale, and the pre-activation units' first block reads "
               "a bare conv's output, small next to the stream it grows into, where (a)-(c) read relu(BN(conv)).")
    g = checks[2]
    if not g["passed"]:
        blocks = [len(prof[by[("original", d)][0]]["init"]) for d in depths]
        text += (f" The gap between the original and full pre-activation changed by {g['value']:+.2f} ± {g['se']:.2f} "
                 f"points from depth {lo} to {hi} (margin {g['margin']:.2f}): {blocks[0]} and {blocks[1]} blocks, "
                 "where He et al.'s gap grows from 0.24 points at 54 blocks (ResNet-110) to 2.69 at 333 (ResNet-1001).")
    return ablation(text, rows, [_plot_grads(grad, prof, by, depths, ctx)])


def _plot(errs: dict, test: dict, depths: tuple[int, int], ctx: Context) -> str:
    fig, axes = new_figure(3, width=4.6, height=4.4)
    x = np.arange(len(PLACEMENTS))
    for ax, vals, what in ((axes[0], errs, "training error over the run"), (axes[1], test, "final held-out error")):
        for j, (d, hollow) in enumerate(zip(depths, (False, True))):
            for i, k in enumerate(PLACEMENTS):
                st, v = STYLES[LABEL[k]], vals[(k, d)]
                m, s = mean_sd(v)
                ax.errorbar(i + 0.3 * j - 0.15, max(m, 0.1), yerr=s, marker="os"[j], color=st["color"],
                            markerfacecolor="none" if hollow else st["color"], linestyle="none", capsize=3)
                ax.scatter(np.full(len(v), i + 0.3 * j - 0.15), np.maximum(v, 0.1), s=8, color=st["color"],
                           alpha=0.5, zorder=3)
        ax.set_xticks(x, [SHORT[k] for k in PLACEMENTS], fontsize=7)
        ax.set(ylabel=f"{what} (%; 0 drawn at 0.1)", title=f"{what.capitalize()}, digits\nmean ± sd, seeds as dots")
        v = np.maximum(np.concatenate([vals[(k, d)] for k in PLACEMENTS for d in depths]), 0.1)
        if v.max() > 3 * v.min():  # a log scale where the errors span more than a factor 3
            log_axis(ax, ticks=(0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100))
        for j, d in enumerate(depths):
            ax.plot([], [], color="0.4", marker="os"[j], markerfacecolor="none" if j else "0.4", linestyle="none",
                    label=f"resnet-{d} ({'filled, left' if j == 0 else 'hollow, right'})")
    for j, depth in enumerate(("ResNet-110", "ResNet-164")):
        axes[2].plot(x, [PUBLISHED[k][j] for k in PLACEMENTS], color="0.3", marker="os"[j], linestyle="-:"[j],
                     label=f"He et al. 2016, CIFAR-10 {depth}")
    axes[2].set_xticks(x, [SHORT[k] for k in PLACEMENTS], fontsize=7)
    axes[2].set(ylabel="test error (%)", title="Published (Table 2)")
    for ax in axes:
        legend_below(ax)
    return ctx.save_figure(fig, "preactivation.png")


def _plot_grads(grad: dict, prof: dict, by: dict, depths: tuple[int, int], ctx: Context) -> str:
    fig, axes = new_figure(3, width=4.6, height=4.4)
    for ax, w in zip(axes[:2], ("init", "trained")):
        for k in PLACEMENTS:
            st = STYLES[LABEL[k]]
            m = [10 ** np.mean(grad[w][(k, d)]) for d in depths]
            ax.plot(depths, m, color=st["color"], marker=st["marker"], linestyle=st["linestyle"], label=LABEL[k])
            for d in depths:
                ax.scatter([d] * len(grad[w][(k, d)]), 10 ** np.asarray(grad[w][(k, d)]), s=8, color=st["color"],
                           alpha=0.5)
        ax.set_xticks(depths, [f"resnet-{d}" for d in depths])
        ax.set(xlabel="depth", ylabel="r = ||dL/dx_0|| / ||dL/dx_L-1||",
               title=f"Gradient ratio, {'at initialisation' if w == 'init' else 'trained'} (batch statistics)")
    hi = depths[-1]
    for k in PLACEMENTS:
        st = STYLES[LABEL[k]]
        p = np.exp(np.mean([np.log(prof[r]["init"]) for r in by[(k, hi)]], axis=0))
        axes[2].plot(np.arange(len(p)), p, color=st["color"], marker=st["marker"], linestyle=st["linestyle"],
                     markersize=3, label=LABEL[k])
    axes[2].set(xlabel="block i", ylabel="||dL/dx_i|| / ||dL/dx_L-1|| (geometric mean over seeds)",
                title=f"Gradient per block at initialisation, resnet-{hi}")
    for ax in axes:
        log_axis(ax, ticks=(0.2, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500))
    integer_axis(axes[2])
    legend_below(fig)
    return ctx.save_figure(fig, "preactivation_gradients.png")


def _ours(profile: str) -> dict[str, str]:
    p = conv_setting(profile, PROFILE)
    shared = set(plan(profile)) & set(ensemble.conv_runs(profile))
    return {"model": f"depths {p['depths'][0]} and {p['depths'][1]}, five placements (basic blocks, option A)"
                     + ("; the original's runs are the ensemble claim's conv runs" if shared else ""),
            "data": "instead of CIFAR-10" if p["data"] == "digits" else "",
            "training": "checks on the training error over the run (mean over epochs of the error during each "
                        "epoch); final training and held-out errors reported beside"}


CLAIM = register_claim(Claim(
    name="preactivation",
    title="Activation placement: pre-activation residual units",
    statement="\"pre-activation further improves gradient flow\": with BN and ReLU moved before the weight layers, "
              "the skip path stays an identity and the net trains better, the more so the deeper it is.",
    published="He et al. 2016 (Table 2), CIFAR-10 test error %, ResNet-110 / ResNet-164: original 6.61 / 5.93, BN "
              "after addition 8.17 / 6.50, ReLU before addition 7.84 / 6.14, ReLU-only pre-activation 6.71 / 5.91, "
              "full pre-activation 6.37 / 5.46; ResNet-1001: original 7.61 -> full pre-activation 4.92.",
    runs=plan,
    analyse=analyse,
    paper=PAPER,
    ours=_ours,
))
