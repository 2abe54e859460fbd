"""Residual nets behave like ensembles of paths (Veit et al. 2016, section 4).

Two sets of trained nets. The degradation claim's MLPs (shared runs), lesioned on 1000 MNIST-1D training samples;
and conv nets as Veit et al. used: CIFAR ResNets (``resnet`` family, option-A shortcuts) and their plain twins,
trained with the family's own recipe (He et al.'s: SGD 0.1, momentum 0.9, weight decay 1e-4, rate / 10 at 50% and
75% of training) on scikit-learn's 8x8 digits, lesioned on the held-out images (all 360 of digits). Measured on each
net: the error with each single block deleted (through the scheme: a residual block leaves its skip, a plain layer
is removed; a downsampling block of either leaves the option-A skip ``x[::2, ::2]`` zero-padded to its width),
with ``k`` random blocks deleted (several draws; downsampling blocks are never drawn, as Veit et al. kept them),
and after random reorderings of blocks (Kendall tau against the original order). Errors are in %, their rises in
percentage points; downsampling (shape-changing) blocks are reported apart from the ordinary ones.

Ablation: why deleting one block hurts one MLP variant and not another. For every block, the error rise when it is
deleted against the size of what it adds: its response std (the std of the branch output, He et al.'s Fig. 7
measure) and its size relative to what its skip path carries, ``r_i = E_x ||F_i(x_i)|| / ||s_i(x_i)||`` (per-sample
L2 norms; ``x_i`` the stream entering block ``i``, ``s_i`` its skip path: what deleting the block leaves), with
Spearman correlations per variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from reslab.diagnostics.lesion import LesionResult, deletable, lesion_study
from reslab.diagnostics.recorder import record, sample_norms, trunk_of
from reslab.diagnostics.responses import response_magnitudes
from reslab.evaluation import eval_mode
from reslab.experiments import degradation
from reslab.experiments.base import (CIFAR_EPOCHS, Claim, ClaimResult, Context, ablation, check, conv_setting,
                                     eval_batch, load_trained, register_claim)
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure
from reslab.train import TrainConfig

DRAWS = {"smoke": 2, "quick": 4, "full": 10}
#: mean error rise (points) up to which deleting one block "barely hurts"
BARELY = 5.0
#: points from chance within which a lesioned net counts as "near chance"
NEAR_CHANCE = 10.0

#: conv nets per profile, trained with the ``resnet`` family's recipe (``TrainConfig.for_model``) at these epochs.
#: smoke: resnet-14, the smallest depth with an ordinary block besides each downsampling one (resnet-8 has one block
#: per stage, so every block but the first changes shape and a random lesion has a single size). quick: resnet-20
#: at 15 of the recipe's 30 epochs, half the training time: both nets have converged by then (measured, training
#: error in eval mode after epoch 15, 3 seeds: residual 0.0%, plain 0.1-0.4%; held-out 1.1-2.8%). full: resnet-56
#: (27 blocks) at the recipe's 30 epochs, 5 seeds; not Veit et al.'s ResNet-110, whose plain twin does not train
#: (He et al.: plain-110 above 60% error), which would leave the plain check out.
CONV: dict[str, dict[str, int]] = {
    "smoke": dict(depth=14, seeds=3, epochs=3),
    "quick": dict(depth=20, seeds=3, epochs=15),
    "full": dict(depth=56, seeds=5, epochs=30),
    "full_cifar": dict(depth=110, seeds=5, epochs=CIFAR_EPOCHS, data="cifar10"),  # Veit et al.'s ResNet-110
}
#: conv variants (run-id prefix ``conv-``, so they never collide with the MLP variants) and their schemes
CONV_VARIANTS = {"conv-residual": "identity", "conv-plain": "plain"}
CONV_SAMPLES = 1000  # held-out images lesioned (digits holds 360)
LABELS = {**degradation.LABELS, "conv-residual": "conv residual", "conv-plain": "conv plain"}
COLORS = {**degradation.COLORS, "conv-residual": "tab:purple", "conv-plain": "tab:orange"}
MLP_RESIDUAL = ("residual", "residual-zero-init")
#: what the ablation measures of each block: the size of what it adds
SIZES = {"response": "response std (std of the branch output)",
         "relative": "relative size ||F(x)|| / ||s(x)|| (s: the block's skip path)"}


def conv_id(variant: str, depth: int, seed: int) -> str:
    """``conv_id("conv-residual", 20, 0) == "conv-residual-d20-s0"`` (parsed by :func:`degradation.parse_id`)."""
    if variant not in CONV_VARIANTS:
        raise ValueError(f"unknown conv variant {variant!r}; expected one of {', '.join(CONV_VARIANTS)}")
    return f"{variant}-d{depth}-s{seed}"


def is_conv(rid: str) -> bool:
    """Whether run ``rid`` is one of the claim's conv nets (else one of the degradation claim's MLPs)."""
    return degradation.parse_id(rid)[0] in CONV_VARIANTS


def conv_runs(profile: str) -> dict[str, TrainConfig]:
    """The conv runs ``conv-VARIANT-dDEPTH-sSEED``: the ``resnet`` family's recipe on digits (CIFAR-10 in ``full``
    when it is present, :func:`base.conv_setting`), at the profile's epochs."""
    p = conv_setting(profile, CONV)
    return {conv_id(v, p["depth"], seed): TrainConfig.for_model(f"resnet{p['depth']}", residual=scheme,
                                                                epochs=p["epochs"], seed=seed, data=p["data"])
            for v, scheme in CONV_VARIANTS.items() for seed in range(p["seeds"])}


def plan(profile: str) -> dict[str, TrainConfig]:
    """Every run of the claim: the degradation claim's MLPs (shared) and the conv nets.

    Raises:
        ValueError: a conv run id that is also an MLP run id.
    """
    mlps, convs = degradation.plan(profile), conv_runs(profile)
    clash = sorted(set(mlps) & set(convs))
    if clash:
        raise ValueError(f"conv run id {clash[0]!r} is also an MLP run id")
    return {**mlps, **convs}


@torch.no_grad()
def relative_sizes(model: nn.Module, x: Tensor, batch_size: int = 500) -> np.ndarray:
    """Per block, the size of what it adds relative to what its skip path carries,
    ``r_i = E_x ||F_i(x_i)|| / ||s_i(x_i)||``: ``x_i`` the stream entering block ``i``, ``s_i`` its skip path (the
    identity, option A's subsample-and-pad where the shape changes, i.e. what deleting the block leaves), per-sample
    L2 norms over all non-batch axes; in eval mode. For schemes whose state is the stream (``identity``, ``plain``).
    """
    scheme = trunk_of(model).scheme

    def norms(name: str, i: int, t: Tensor) -> Tensor:
        return sample_norms(scheme.skip(t, i) if name == "resid_pre" else t)

    with eval_mode(model), record(model, names=("resid_pre", "branch_out"), reduce=norms) as rec:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    return np.asarray([float((f.double() / s.double().clamp_min(1e-12)).mean())
                       for f, s in zip(rec.get("branch_out"), rec.get("resid_pre"))])


def downsampling_blocks(model: nn.Module) -> list[int]:
    """The blocks that change shape (stride or width): those :func:`deletable` keeps out of random lesions."""
    return sorted(set(deletable(model, keep_shape_changes=False)) - set(deletable(model)))


@dataclass
class Lesioned:
    """One trained net: its lesions and the size of what each block adds.

    Attributes:
        lesion: the three lesions (:func:`lesion_study`); random lesions draw from the ordinary blocks only.
        response: std of each block's branch output (:func:`response_magnitudes`).
        relative: each block's output size relative to what its skip path carries (:func:`relative_sizes`).
        downsampling: the shape-changing blocks.
    """

    lesion: LesionResult
    response: np.ndarray
    relative: np.ndarray
    downsampling: list[int]

    @property
    def ordinary(self) -> list[int]:
        return [i for i in range(len(self.lesion.single)) if i not in self.downsampling]

    @property
    def rises(self) -> np.ndarray:
        """Error rise (points) with each single block deleted."""
        return 100 * (self.lesion.single - self.lesion.baseline)


def measure(model: nn.Module, x: Tensor, y: Tensor, draws: int, seed: int) -> Lesioned:
    """Lesion ``model`` on ``(x, y)``: every single block; ``k`` in ``{1, 2, m/4, m/2}`` of its ``m`` ordinary
    blocks; ``1, 2, 4, n`` swaps of same-shape blocks, ``draws`` times each."""
    n, m = len(model.trunk), len(deletable(model))
    ks = sorted({k for k in (1, 2, m // 4, m // 2) if 1 <= k <= m})
    return Lesioned(lesion_study(model, x, y, ks, [1, 2, 4, max(1, n)], draws, seed=seed),
                    response_magnitudes(model, x).std, relative_sizes(model, x), downsampling_blocks(model))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho, NaN where either side is constant (no ranking to correlate)."""
    a, b = np.ravel(a), np.ravel(b)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b)[0])


def _rise(rs: list[Lesioned], ordinary: bool = False) -> float:
    """Mean over seeds of the mean error rise (points) with one block deleted (one of the ordinary blocks only)."""
    return float(np.mean([r.rises[r.ordinary if ordinary else slice(None)].mean() for r in rs]))


def _smooth(rs: list[Lesioned]) -> tuple[float, float]:
    """Spearman rho of (k deleted, error) and of (Kendall tau of a reordering, error), pooled over seeds."""
    ls = [r.lesion for r in rs]
    ks = np.concatenate([np.repeat(r.ks, r.k_errors.shape[1]) for r in ls])
    return (_spearman(ks, np.concatenate([r.k_errors.ravel() for r in ls])),
            _spearman(np.concatenate([r.taus for r in ls]), np.concatenate([r.reorder_errors for r in ls])))


def analyse(ctx: Context) -> ClaimResult:
    mlp_ids, conv_ids = [r for r in ctx.specs if not is_conv(r)], [r for r in ctx.specs if is_conv(r)]
    x, y, classes = eval_batch(ctx.specs[mlp_ids[0]].data, 1000)
    xc, yc, classes_c = eval_batch(ctx.specs[conv_ids[0]].data, CONV_SAMPLES, split="test")
    chance, chance_c = 100 * (1 - 1 / classes), 100 * (1 - 1 / classes_c)  # %
    res: dict[tuple[str, int], list[Lesioned]] = {}
    for rid in ctx.specs:
        variant, d, seed = degradation.parse_id(rid)
        model, _ = load_trained(ctx, rid)
        xs, ys = (xc, yc) if variant in CONV_VARIANTS else (x, y)
        res.setdefault((variant, d), []).append(measure(model, xs, ys, DRAWS[ctx.profile], seed))
    depths = sorted({d for v, d in res if v not in CONV_VARIANTS})
    lo, hi = depths[0], depths[-1]
    dc = max(d for v, d in res if v in CONV_VARIANTS)
    table = [row for v in degradation.VARIANTS for d in depths for row in _rows(v, d, res[(v, d)])]
    table += [row for v in CONV_VARIANTS for row in _rows(v, dc, res[(v, dc)])]

    plain_lesion = 100 * float(np.mean([r.lesion.single.mean() for r in res[("plain", lo)]]))
    checks = [check(f"deleting one layer of plain-{lo} (which trains) leaves it near chance (error in %, within 10 "
                    "points of chance)", plain_lesion, plain_lesion >= chance - NEAR_CHANCE, chance=chance)]
    plain_ok, barely_ok = [checks[0]["passed"]], []
    for v in MLP_RESIDUAL:
        r = _rise(res[(v, hi)])
        checks.append(check(f"deleting one block of {LABELS[v]}-{hi} barely hurts (mean error rise "
                            "<= 5 points)", r, r <= BARELY))
        barely_ok.append(checks[-1]["passed"])
    for v in MLP_RESIDUAL:
        rho_k, rho_tau = _smooth(res[(v, hi)])
        checks.append(check(f"{LABELS[v]}-{hi}: error grows with k deleted (Spearman rho > 0.5)",
                            rho_k, rho_k > 0.5))
        checks.append(check(f"{LABELS[v]}-{hi}: error grows with disorder (Spearman rho(tau, err) < 0)",
                            rho_tau, rho_tau < 0))
    conv_res, conv_plain = res[("conv-residual", dc)], res[("conv-plain", dc)]
    r = _rise(conv_res, ordinary=True)
    checks.append(check(f"deleting one ordinary block of conv residual-{dc} barely hurts (mean error rise <= 5 "
                        "points; downsampling blocks apart)", r, r <= BARELY))
    barely_ok.append(checks[-1]["passed"])
    plain_intact = 100 * float(np.mean([p.lesion.baseline for p in conv_plain]))
    plain_lesion_c = 100 * float(np.mean([p.lesion.single[p.ordinary].mean() for p in conv_plain]))
    plain_trained = plain_intact < chance_c - NEAR_CHANCE  # else "near chance" holds before any deletion
    if plain_trained:
        checks.append(check(f"deleting one ordinary layer of conv plain-{dc} (which trains) leaves it near chance "
                            "(error in %, within 10 points of chance)", plain_lesion_c,
                            plain_lesion_c >= chance_c - NEAR_CHANCE, chance=chance_c, intact=plain_intact))
        plain_ok.append(checks[-1]["passed"])
    rho_k = _smooth(conv_res)[0]
    checks.append(check(f"conv residual-{dc}: error grows with k ordinary blocks deleted (Spearman rho > 0.5)",
                        rho_k, rho_k > 0.5))
    p = [c["passed"] for c in checks]
    verdict = ("reproduced" if all(p) else "partly reproduced" if any(plain_ok) and any(barely_ok)
               else "not reproduced")
    ds = conv_res[0].downsampling
    summary = (f"MLPs (MNIST-1D, 1000 training samples): mean error rise when deleting one block at depth {hi}: "
               + ", ".join(f"{LABELS[v]} {_rise(res[(v, hi)]):.1f} points" for v in degradation.VARIANTS)
               + f"; at depth {lo}: " + ", ".join(f"{LABELS[v]} {_rise(res[(v, lo)]):.1f} points"
                                                  for v in degradation.VARIANTS)
               + f". Chance error is {chance:.0f}%. Conv nets of depth {dc} ({ctx.specs[conv_ids[0]].data}, "
               f"lesioned on {len(yc)} held-out "
               f"images; {len(conv_res[0].ordinary)} ordinary blocks and the downsampling blocks "
               f"{', '.join(map(str, ds))}): conv residual {100 * np.mean([r.lesion.baseline for r in conv_res]):.1f}% "
               f"error intact; deleting one ordinary block adds {_rise(conv_res, ordinary=True):.1f} points on average "
               f"(worst block {np.mean([r.rises[r.ordinary].max() for r in conv_res]):.1f}), deleting a downsampling "
               "block adds " + ", ".join(f"{np.mean([r.rises[i] for r in conv_res]):.1f} (block {i})" for i in ds)
               + f"; conv plain {plain_intact:.1f}% intact, {plain_lesion_c:.1f}% with one ordinary layer deleted"
               + ("" if plain_trained else " (it did not train: intact, it is already within 10 points of chance, so "
                                           "its lesion check is left out)")
               + ". The verdict needs every check; 'partly reproduced' needs a plain-net check and a 'barely hurts' "
               "check.")
    figures = [_plot(res, hi, dc, chance_c, ctx)]
    return ClaimResult(verdict, summary, checks, table, figures, _ablation(res, depths, dc, ctx))


def _rows(v: str, d: int, rs: list[Lesioned]) -> list[dict[str, Any]]:
    """The table rows of one variant at one depth, means over seeds: deleting one of its ordinary blocks, then each
    downsampling block on a row of its own."""

    def pct(f: Callable[[Lesioned], float]) -> float:
        return 100 * float(np.mean([f(r) for r in rs]))

    r0 = rs[0]
    n, ds = len(r0.lesion.single), r0.downsampling
    intact = pct(lambda r: r.lesion.baseline)
    head = {"variant": LABELS[v], "depth": d, "blocks": n}
    rows = [{**head, "blocks deleted": f"ordinary ({len(r0.ordinary)} of {n})" if ds else "any (none changes shape)",
             "error intact (%)": intact,
             "error, one block deleted, mean (%)": pct(lambda r: r.lesion.single[r.ordinary].mean()),
             "error, one block deleted, worst (%)": pct(lambda r: r.lesion.single[r.ordinary].max()),
             "error, half the blocks deleted (%)": pct(lambda r: r.lesion.k_errors[-1].mean()),
             "error, reordered, mean (%)": pct(lambda r: r.lesion.reorder_errors.mean())}]
    return rows + [{**head, "blocks deleted": f"downsampling block {i}", "error intact (%)": intact,
                    "error, one block deleted, mean (%)": pct(lambda r: r.lesion.single[i])} for i in ds]


def _plot(res: dict, depth: int, dc: int, chance: float, ctx: Context) -> str:
    fig, (a1, a2, a3, a4) = new_figure(4, width=4.2, height=4.0)
    intact_label = "no block deleted (dotted, colour of its net)"
    for v in degradation.VARIANTS:
        rs = [r.lesion for r in res[(v, depth)]]
        kw = dict(color=COLORS[v], label=LABELS[v])
        a1.plot(np.arange(len(rs[0].single)), 100 * np.mean([r.single for r in rs], axis=0), marker=".",
                linestyle="-", **kw)
        a1.axhline(100 * np.mean([r.baseline for r in rs]), color=COLORS[v], linestyle=":", label=intact_label)
        a2.errorbar(rs[0].ks, 100 * np.mean([r.k_errors.mean(1) for r in rs], axis=0),
                    yerr=100 * np.mean([r.k_errors.std(1) for r in rs], axis=0), marker="o", linestyle="-", capsize=3,
                    **kw)
        a3.scatter(np.concatenate([r.taus for r in rs]), 100 * np.concatenate([r.reorder_errors for r in rs]),
                   s=10, **kw)
    for v in CONV_VARIANTS:
        rs = res[(v, dc)]
        err = 100 * np.mean([r.lesion.single for r in rs], axis=0)
        ds = rs[0].downsampling
        a4.plot(np.arange(len(err)), err, marker=".", linestyle="-", color=COLORS[v], label=LABELS[v])
        a4.scatter(ds, err[ds], s=70, marker="D", facecolors="none", edgecolors=COLORS[v], zorder=3)
        a4.axhline(100 * np.mean([r.lesion.baseline for r in rs]), color=COLORS[v], linestyle=":", label=intact_label)
    for j, i in enumerate(res[("conv-residual", dc)][0].downsampling):
        a4.axvline(i, color="0.6", linestyle="--", linewidth=0.8, zorder=0,
                   label="downsampling block of the conv nets (dashed; its points are diamonds)" if j == 0 else None)
    a4.axhline(chance, color="0.3", linestyle="-.", linewidth=0.8, label="chance")
    a1.set(xlabel="deleted block", ylabel="error (%)", title=f"Delete one block, MLPs of depth {depth}")
    a2.set(xlabel="blocks deleted (k)", ylabel="error (%), mean ± sd over draws",
           title=f"Delete k random blocks, depth {depth}")
    a3.set(xlabel="Kendall tau of the new order (1 = unchanged)", ylabel="error (%)",
           title=f"Reorder blocks, depth {depth}")
    a4.set(xlabel="deleted block", ylabel="held-out error (%)", title=f"Delete one block, conv nets of depth {dc}")
    for ax in (a1, a2, a4):
        integer_axis(ax)
    legend_below(fig)
    return ctx.save_figure(fig, "ensemble.png")


def _rho_text(r: float) -> str:
    return "undefined (no spread)" if math.isnan(r) else f"{r:.2f}"


def _ablation(res: dict, depths: list[int], dc: int, ctx: Context) -> dict[str, Any]:
    """Error rise per deleted block against the size of what the block adds (response std, relative size): the
    table per net, the paragraph from the deepest MLPs and the conv residual net, and the scatter figure."""
    hi = depths[-1]
    nets = [(v, d) for v in MLP_RESIDUAL for d in depths] + [(v, dc) for v in CONV_VARIANTS]
    cat = {k: {m: np.concatenate([getattr(r, m) for r in res[k]]) for m in ("rises", *SIZES)} for k in nets}
    conv_data = ctx.specs[conv_id("conv-residual", dc, 0)].data
    table = [{"net": f"conv ({conv_data})" if v in CONV_VARIANTS else "MLP (MNIST-1D)", "variant": LABELS[v],
              "depth": d,
              "blocks": len(res[(v, d)][0].lesion.single),
              "error rise, one block deleted, mean (points)": float(c["rises"].mean()),
              "response std, mean": float(c["response"].mean()),
              "relative size ||F(x)|| / ||s(x)||, mean": float(c["relative"].mean()),
              "Spearman rho(response std, rise)": _spearman(c["response"], c["rises"]),
              "Spearman rho(relative size, rise)": _spearman(c["relative"], c["rises"])}
             for (v, d), c in cat.items()]
    a, b = sorted(MLP_RESIDUAL, key=lambda v: -cat[(v, hi)]["rises"].mean())  # a: the variant hurt more
    ra, rb = (float(cat[(v, hi)]["rises"].mean()) for v in (a, b))
    hurt = [v for v, r in ((a, ra), (b, rb)) if r > BARELY]
    name = {v: f"{LABELS[v]}-{hi}" for v in (a, b)}
    if len(hurt) == 1:
        text = (f"Deleting one block hurts {name[a]} (mean error rise {ra:.1f} points, above the {BARELY:g}-point "
                f"bound) but not {name[b]} ({rb:.1f} points). ")
    else:
        text = (f"Deleting one block hurts {'both' if hurt else 'neither of'} {name[a]} ({ra:.1f} points) and "
                f"{name[b]} ({rb:.1f} points) beyond the {BARELY:g}-point bound. ")
    explains = {}
    for m, what in SIZES.items():
        ma, mb = (float(cat[(v, hi)][m].mean()) for v in (a, b))
        within = {v: _spearman(cat[(v, hi)][m], cat[(v, hi)]["rises"]) for v in (a, b)}
        pooled = _spearman(np.concatenate([cat[(v, hi)][m] for v in (a, b)]),
                           np.concatenate([cat[(v, hi)]["rises"] for v in (a, b)]))
        explains[m] = (ma - mb) * (ra - rb) > 0 and pooled > 0.5 and all(within[v] > 0.5 for v in hurt)
        text += (f"A block's {what} averages {ma:.3g} in {name[a]} and {mb:.3g} in {name[b]} "
                 f"({'larger' if ma > mb else 'not larger'} in the net whose deletions hurt more); its Spearman "
                 f"correlation with the error rise is {_rho_text(within[a])} within {name[a]}, "
                 f"{_rho_text(within[b])} within {name[b]} and {_rho_text(pooled)} over the blocks of both. ")
    if explains["response"]:
        text += "So the size of what a block adds, its response std, explains which deletions hurt."
    elif explains["relative"]:
        rel, rise = (np.mean([getattr(r, m) for r in res[(a, hi)]], axis=0) for m in ("relative", "rises"))
        text += ("So the size of what a block adds explains which deletions hurt when it is measured against what "
                 f"the block's skip path carries, not as a response std: in {name[a]} the first block adds "
                 f"{rel[0]:.2f} times what its skip carries and costs {rise[0]:.1f} points when deleted, the last "
                 f"adds {rel[-1]:.2f} times and costs {rise[-1]:.1f}.")
    else:
        text += "So the size of what a block adds, by either measure, does not explain which deletions hurt."
    conv = res[("conv-residual", dc)]
    rel, rise = (np.mean([getattr(r, m) for r in conv], axis=0) for m in ("relative", "rises"))
    top = int(np.argmax(rise))
    rest = [i for i in conv[0].ordinary if i != top]
    text += (f" In conv residual-{dc} block {top} hurts most ({rise[top]:.1f} points; it adds {rel[top]:.2f} times "
             "what its skip carries)" + "".join(f"; downsampling block {i} costs {rise[i]:.1f} points and adds "
                                                f"{rel[i]:.2f} times" for i in conv[0].downsampling if i != top)
             + (f"; the other ordinary blocks cost {rise[rest].mean():.1f} points on average and add "
                f"{rel[rest].mean():.2f} times" if rest else "")
             + f" (Spearman rho of relative size and rise "
             f"{_rho_text(_spearman(cat[('conv-residual', dc)]['relative'], cat[('conv-residual', dc)]['rises']))}).")
    return ablation(text, table, [_plot_sizes(res, hi, dc, ctx)])


def _plot_sizes(res: dict, hi: int, dc: int, ctx: Context) -> str:
    fig, axes = new_figure(2, width=5.0, height=4.2)
    for ax, m in zip(axes, SIZES):
        for v, d in [(v, hi) for v in MLP_RESIDUAL] + [(v, dc) for v in CONV_VARIANTS]:
            for r in res[(v, d)]:
                size, rise = getattr(r, m), r.rises
                keep = [i for i in r.ordinary if size[i] > 0]  # a log axis shows positive sizes only
                ax.scatter(size[keep], rise[keep], s=12, alpha=0.7, color=COLORS[v], label=f"{LABELS[v]}-{d}")
                ds = [i for i in r.downsampling if size[i] > 0]
                if ds:
                    ax.scatter(size[ds], rise[ds], s=45, marker="D", facecolors="none", edgecolors=COLORS[v],
                               label=f"{LABELS[v]}-{d}, downsampling blocks (diamonds)")
        ax.axhline(BARELY, color="0.5", linestyle="--", linewidth=0.8, label=f"{BARELY:g}-point bound")
        ax.set(xlabel=SIZES[m], ylabel="error rise when the block is deleted (points)",
               title=f"Damage vs {m} size (every block and seed)")
        log_axis(ax, "x")
    legend_below(fig)
    return ctx.save_figure(fig, "ensemble_ablation.png")


CLAIM = register_claim(Claim(
    name="ensemble",
    title="The implicit ensemble: lesions",
    statement=("\"randomly deleting individual residual blocks at test time causes graceful degradation (unlike "
               "plain networks, where removing a layer is catastrophic)\"."),
    published=("Veit et al. 2016 (Fig. 3, 4): deleting a single block barely changes a 110-layer ResNet's CIFAR-10 "
               "error (except downsampling blocks); deleting any layer of VGG drops it to chance; error rises "
               "smoothly with the number of deleted blocks and with the Kendall-tau disorder of reordering."),
    runs=plan,
    analyse=analyse,
    paper=dict(degradation.HE_CIFAR, model="ResNet-110 (54 residual blocks, 3 stages, 2 downsampling blocks) and "
               "VGG-15 for the plain comparison; blocks deleted or reordered at test time only"),
    ours=lambda profile: {k: f"MLPs: {v}; conv nets: the resnet family's recipe" for k, v in
                          degradation.MLP_NOTES.items()},
))
