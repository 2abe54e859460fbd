"""The gradient highway: input-side gradients survive depth in residual nets (He et al. 2016, eq. 5).

For each net, ``||dL/dx_i||`` per block on a batch of 256 training samples (training-mode BN, as an optimiser
step sees it), summarised by ``log10(||dL/dx_0|| / ||dL/dx_{L-1}||)``: 0 is a perfect highway, large positive
values mean the gradient explodes towards the input, negative values that it vanishes. Measured at
initialisation for plain, residual and highway MLPs (gate bias -3: gates open the carry path; +3: gates close
the skip, ``1 - T ~ 0.05``), and after training on the degradation claim's runs.
"""

from __future__ import annotations

import numpy as np
import torch

import reslab
from reslab.diagnostics.gradients import gradient_profile
from reslab.experiments import degradation
from reslab.experiments.base import (Claim, ClaimResult, Context, ablation, differs, eval_batch, load_trained,
                                     register_claim, verdict_of)
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure

INIT_NETS = {"plain": ("plain", {}), "residual": ("identity", {}),
             "highway, carry open (b=-3)": ("highway", {"gate_bias": -3.0}),
             "highway, skip closed (b=+3)": ("highway", {"gate_bias": 3.0})}
COLORS = {"plain": degradation.COLORS["plain"], "residual": degradation.COLORS["residual"],
          "highway, carry open (b=-3)": "tab:purple", "highway, skip closed (b=+3)": "tab:orange"}


def analyse(ctx: Context) -> ClaimResult:
    cfg0 = next(iter(ctx.specs.values()))
    depths = sorted({degradation.parse_id(r)[1] for r in ctx.specs})
    seeds = sorted({degradation.parse_id(r)[2] for r in ctx.specs})
    x, y, classes = eval_batch(cfg0.data, 256)
    init: dict[tuple[str, int], list[float]] = {}
    profiles: dict[tuple[str, int], np.ndarray] = {}
    for name, (scheme, kw) in INIT_NETS.items():
        for d in depths:
            for s in seeds:
                torch.manual_seed(s)
                m = reslab.create_model(f"mlp{d}", scheme, num_classes=classes, input_shape=tuple(x.shape[1:]),
                                        residual_kwargs=kw, **cfg0.model_kwargs)
                p = gradient_profile(m, x, y)
                init.setdefault((name, d), []).append(float(np.log10(p.input_to_output_ratio)))
                profiles[(name, d)] = p.stream
    trained: dict[tuple[str, int], list[float]] = {}
    for rid in ctx.specs:
        variant, d, _ = degradation.parse_id(rid)
        model, _ = load_trained(ctx, rid)
        ratio = gradient_profile(model, x, y).input_to_output_ratio
        trained.setdefault((variant, d), []).append(float(np.log10(ratio)))
    table = [{"when": "init", "net": n, "depth": d, "log10_input_over_output": float(np.mean(v)),
              "sd_over_seeds": float(np.std(v, ddof=1))} for (n, d), v in init.items()]
    table += [{"when": "trained", "net": degradation.LABELS[n], "depth": d,
               "log10_input_over_output": float(np.mean(v)), "sd_over_seeds": float(np.std(v, ddof=1))}
              for (n, d), v in sorted(trained.items())]
    hi = depths[-1]
    absv = lambda v: np.abs(v)  # noqa: E731
    checks = [
        differs(f"at init, depth {hi}: residual keeps input/output gradients closer than plain (|log10 ratio|)",
                absv(init[("plain", hi)]), absv(init[("residual", hi)]), "lower"),
        differs(f"after training, depth {hi}: residual closer than plain (|log10 ratio|)",
                absv(trained[("plain", hi)]), absv(trained[("residual", hi)]), "lower"),
        differs(f"at init, depth {hi}: highway gates that close the skip lose the highway (vs open carry)",
                absv(init[("highway, carry open (b=-3)", hi)]), absv(init[("highway, skip closed (b=+3)", hi)]),
                "higher"),
    ]
    core = [c["passed"] for c in checks]
    verdict = verdict_of(core)
    summary = (f"log10(||dL/dx_0|| / ||dL/dx_L-1||), mean over {len(seeds)} seeds, at init: " + "; ".join(
        f"{n} " + ", ".join(f"{d}: {np.mean(init[(n, d)]):+.2f}" for d in depths) for n in INIT_NETS)
        + "; after training: " + "; ".join(
        f"{degradation.LABELS[n]} " + ", ".join(f"{d}: {np.mean(trained[(n, d)]):+.2f}" for d in depths)
        for n in degradation.VARIANTS) + ".")
    return ClaimResult(verdict, summary, checks, table, [_plot(profiles, hi, ctx)],
                       ablation=_seed_ablation(trained, hi, checks[1]))


def _seed_ablation(trained: dict, depth: int, after: dict) -> dict:
    """The trained nets' gradient ratio seed by seed at the deepest depth: what decides the after-training check."""
    rows = [{"net": degradation.LABELS[v], "depth": depth, "seed": s, "log10_input_over_output": val}
            for v in degradation.VARIANTS for s, val in enumerate(trained[(v, depth)])]
    spread = {v: float(np.ptp(trained[(v, depth)])) for v in degradation.VARIANTS}
    per_seed = "; ".join(f"{degradation.LABELS[v]} " + ", ".join(f"{t:+.2f}" for t in trained[(v, depth)])
                         for v in degradation.VARIANTS)
    text = (f"After training, at depth {depth}, log10(||dL/dx_0|| / ||dL/dx_L-1||) seed by seed: {per_seed}. "
            f"The check needs the residual nets' |log10 ratio| below the plain nets' by more than max(2 SE, 0.01); "
            f"the difference is {after['difference']:+.2f} against a margin of {after['margin']:.2f}, so it "
            + ("passes. " if after["passed"] else "fails. ")
            + f"The values span {spread['plain']:.2f} decades over the plain nets' seeds and {spread['residual']:.2f} "
              f"over the residual nets'" + (": the seeds disagree more than the nets differ." if not after["passed"]
                                            and max(spread["plain"], spread["residual"]) > abs(after["difference"])
                                            else ".")
            + " A trained net's gradient ratio is whatever its training left, not a property of the skip alone; at "
              "initialisation, where the skip is all that differs, the first check isolates the highway.")
    return ablation(text, rows)


def _plot(profiles: dict, depth: int, ctx: Context) -> str:
    fig, ax = new_figure(1, width=6, height=4.4)
    for name in INIT_NETS:
        g = profiles[(name, depth)]
        ax.plot(np.arange(len(g)), g, color=COLORS[name], label=name)
    ax.set(xlabel="block i (0 = nearest the input)", ylabel="||dL/dx_i||, gradient norm at block i's input",
           title=f"Gradient per depth at initialisation, depth {depth} (last seed)")
    log_axis(ax)
    integer_axis(ax)
    legend_below(ax)
    return ctx.save_figure(fig, "gradient_highway.png")


CLAIM = register_claim(Claim(
    name="gradient_highway",
    title="The gradient highway",
    statement=("\"the 1 provides an unattenuated gradient path from the loss all the way back to any layer\"; "
               "in highway networks \"when T(x) approaches zero ... the gradient highway is effectively shut off\"."),
    published=("He et al. 2016, eq. (5): dE/dx_l = dE/dx_L (1 + d/dx_l sum F); Srivastava et al. 2015 initialise "
               "gate biases negative (-1/-2/-3 at depth 10/20/30) so that gradients flow; no single number."),
    runs=degradation.plan,
    analyse=analyse,
    paper=dict(degradation.HE_CIFAR, model="He et al. 2016: an analytical property (eq. 5), shown on ResNet-110/164/"
               "1001; Srivastava et al. 2015: highway MLPs of 10-100 layers on MNIST, gate bias -1 to -3"),
    ours=lambda profile: {**degradation.MLP_NOTES,
                          "model": "also untrained plain, residual and highway MLPs (gate bias -3 and +3) of the "
                                   "same depths and width, measured at initialisation"},
))
