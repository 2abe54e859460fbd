"""O(L) growth of the residual stream at initialisation, and what each fix does to it (REFERENCE.md section 7).

Two settings, both at initialisation (no training), on the shared trunk and its taps:

1. Xiong et al.'s own (2020, arXiv 2002.04745, Lemma 1): a stack of FFN sublayers ``x + relu(LN(x) W1) W2`` with
   square ``d x d`` weights drawn ``N(0, 1/d)``, LayerNorm at its init (no affine effect), unit-variance input.
   Pre-LN: ``(1 + l/2) d <= E||x_l||^2 <= (1 + 3l/2) d``; Post-LN: ``E||x_l + F(x_l)||^2 = 3d/2`` before every LN.
2. The GPT family at GPT-style widths on real text (pydoc windows): ``E||x_l||^2 / d`` per sublayer for Pre-LN
   with all weights ``N(0, 0.02)``, and for the fixes: Post-LN, GPT-2's ``1/sqrt(2L)`` output-projection init,
   the scaled residual ``1/sqrt(L)``, ReZero, LayerScale, DeepNorm, Full and Block Attention Residuals; HC, mHC
   and DenseFormer equal Pre-LN at initialisation and are shown for reference. Models of several depths; the
   growth ratio ``R`` is ``E||x_final||^2`` of the deepest model over that of the shallowest.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import reslab
from reslab.branch import BranchSpec
from reslab.diagnostics.recorder import record
from reslab.models import init_from_batch
from reslab.experiments.base import Claim, ClaimResult, Context, check, eval_batch, register_claim, verdict_of
from reslab.report.plots import integer_axis, legend_below, log_axis, new_figure, series_styles
from reslab.residuals import create_residual
from reslab.trunk import Trunk

XIONG = {"smoke": dict(d=64, layers=6, n=128, seeds=2), "quick": dict(d=256, layers=32, n=512, seeds=5),
         "full": dict(d=512, layers=64, n=1024, seeds=10)}
GPT = {"smoke": dict(depths=(1, 2), d=32, ctx=32, batch=4, seeds=2),
       "quick": dict(depths=(2, 4, 8, 16), d=128, ctx=64, batch=8, seeds=3),
       "full": dict(depths=(2, 4, 8, 16, 32, 64), d=256, ctx=128, batch=16, seeds=5)}
NORMAL = dict(scaled_out_init=False)
# label -> (scheme, residual kwargs, family kwargs, expected behaviour: "grows" | "flat" | "bounded" | "slower" |
# "reference"); "slower": sub-linear, less than half Pre-LN's ratio (LayerNorm-Scaling's 1/sqrt(l): increments ~ 1/l)
SCHEMES = {
    "Pre-LN": ("preln", {}, NORMAL, "grows"),
    "Post-LN": ("postln", {}, NORMAL, "flat"),
    "Pre-LN + GPT-2 init": ("preln", {}, {}, "bounded"),
    "scaled 1/sqrt(L)": ("scaled", {}, NORMAL, "bounded"),
    "ReZero": ("rezero", {}, NORMAL, "bounded"),
    "LayerScale": ("layerscale", {}, NORMAL, "bounded"),
    "DeepNorm": ("deepnorm", {}, NORMAL, "bounded"),
    "Full AttnRes": ("attnres", {}, NORMAL, "bounded"),
    "Block AttnRes": ("block_attnres", {}, NORMAL, "bounded"),
    "HC": ("hc", {}, NORMAL, "reference"),
    "mHC": ("mhc", {}, NORMAL, "reference"),
    "DenseFormer": ("denseformer", {}, NORMAL, "reference"),
    # the 2024-26 designs (REFERENCE.md section 14)
    "LN-Scaling": ("lnscaling", {}, NORMAL, "slower"),
    "ResiDual": ("resi_dual", {}, NORMAL, "bounded"),
    "Admin": ("admin", {}, NORMAL, "bounded"),
    "nGPT residual": ("ngpt", {}, NORMAL, "bounded"),
    "Peri-LN": ("periln", {}, NORMAL, "reference"),
    "Mix-LN": ("mixln", {}, NORMAL, "reference"),
    "Pre-LN + DyT": ("preln", {"norm_type": "dyt"}, dict(NORMAL, final_norm="dyt"), "reference"),
    "LAuReL (RW+LR)": ("laurel", {}, NORMAL, "reference"),
    "LAuReL (RW+LR+PA)": ("laurel_pa", {}, NORMAL, "reference"),
    "MUDD": ("mudd", {}, NORMAL, "reference"),
    "Frac-connections": ("frac", {}, NORMAL, "reference"),
}
BOUNDED_RATIO = 2.0  # "bounded": less than a doubling of E||x_final||^2 over an 8x deeper model (linear: up to 8x)
DATA = "pydoc"


class XiongFFN(nn.Module):
    """``relu(x W1) W2`` with square weights drawn ``N(0, 1/d)`` from ``generator``."""

    def __init__(self, d: int, generator: torch.Generator) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, d, generator=generator) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(d, d, generator=generator) / math.sqrt(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1) @ self.w2


@torch.no_grad()
def xiong_profile(placement: str, d: int, layers: int, n: int, seed: int) -> np.ndarray:
    """``E||.||^2 / d`` per layer in Xiong et al.'s setting: Pre-LN the stream ``x_0..x_L``; Post-LN the sum
    ``x_l + F(x_l)`` before each LN (``L`` values)."""
    g = torch.Generator().manual_seed(seed)
    branches = [XiongFFN(d, g) for _ in range(layers)]
    scheme = create_residual(placement, [BranchSpec(d, d, 1, "features")] * layers)
    trunk = Trunk(branches, scheme)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float32)
    with record(trunk, names=("resid_pre", "contribution", "final")) as rec:
        trunk(x0)
    msq = lambda t: float(t.double().pow(2).sum(-1).mean() / d)  # noqa: E731
    if placement == "preln":
        return np.asarray([msq(t) for t in rec.get("resid_pre") + rec.get("final")])
    return np.asarray([msq(p + c) for p, c in zip(rec.get("resid_pre"), rec.get("contribution"))])


@torch.no_grad()
def gpt_profile(scheme: str, residual_kwargs: dict, family_kwargs: dict, depth: int, x: torch.Tensor, vocab: int,
                d: int, seed: int) -> np.ndarray:
    """``E||x_l||^2 / d`` per token at the input of every sublayer and at the trunk's output."""
    torch.manual_seed(seed)
    m = reslab.create_model("gpt", scheme, depth=depth, num_classes=vocab, input_shape=(x.shape[1],), d_model=d,
                            n_heads=max(1, d // 32), residual_kwargs=residual_kwargs, **family_kwargs)
    init_from_batch(m, x)  # what a fresh training run does before its first step (Admin's profiling)
    m.eval()
    with record(m, names=("resid_pre", "final")) as rec:
        m(x)
    return np.asarray([float(t.double().pow(2).mean()) for t in rec.get("resid_pre") + rec.get("final")])


def _linear_fit(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: ``(b, a, R^2)``."""
    b, a = np.polyfit(xs, ys, 1)
    res = ys - (a + b * xs)
    r2 = 1 - float(res @ res) / max(float(((ys - ys.mean()) ** 2).sum()), 1e-300)
    return float(b), float(a), r2


def analyse(ctx: Context) -> ClaimResult:
    xs = dict(XIONG[ctx.profile], seeds=XIONG[ctx.profile]["seeds"] * ctx.budget)
    gs = dict(GPT[ctx.profile], seeds=GPT[ctx.profile]["seeds"] * ctx.budget)
    checks, table = [], []
    # --- 1. Xiong et al.'s setting --------------------------------------------------------------------------
    pre = np.array([xiong_profile("preln", xs["d"], xs["layers"], xs["n"], s) for s in range(xs["seeds"])])
    post = np.array([xiong_profile("postln", xs["d"], xs["layers"], xs["n"], s) for s in range(xs["seeds"])])
    ls = np.arange(pre.shape[1])
    m, se = pre.mean(0), pre.std(0, ddof=1) / math.sqrt(len(pre))
    lo_ok = bool(np.all(m + 3 * se >= 1 + ls / 2 - 1e-9))
    hi_ok = bool(np.all(m - 3 * se <= 1 + 3 * ls / 2 + 1e-9))
    slopes = [_linear_fit(ls.astype(float), p)[0] for p in pre]
    slope, slope_se = float(np.mean(slopes)), float(np.std(slopes, ddof=1) / math.sqrt(len(slopes)))
    r2 = _linear_fit(ls.astype(float), m)[2]
    worst = float(np.max((1 + ls / 2 - m) / np.maximum(se, 1e-12)))
    checks.append(check(f"Xiong setting, Pre-LN: E||x_l||^2/d within [1 + l/2, 1 + 3l/2] at every l = 0..{ls[-1]} "
                        "(mean over seeds, +- 3 SE; value: largest shortfall below 1 + l/2 in SE)", worst,
                        lo_ok and hi_ok))
    checks.append(check("Xiong setting, Pre-LN: linear growth (R^2 of a straight-line fit >= 0.99; value: slope per "
                        "layer, mean over seeds)", slope, r2 >= 0.99, se=slope_se, r2=r2))
    pm, pse = post.mean(), post.mean(1).std(ddof=1) / math.sqrt(len(post))
    post_slope = float(np.mean([_linear_fit(np.arange(post.shape[1], dtype=float), p)[0] for p in post]))
    checks.append(check("Xiong setting, Post-LN: E||x_l + F(x_l)||^2/d flat at 3/2 before every LN (mean within "
                        "0.05 of 1.5 and slope below 0.005 per layer)", float(pm),
                        abs(pm - 1.5) < 0.05 and abs(post_slope) < 0.005, slope=post_slope, se=float(pse)))
    table.append({"setting": f"Xiong (d={xs['d']}, FFN only)", "scheme": "Pre-LN", "slope_per_layer": slope,
                  "r2": r2, "value_at_last_layer": float(m[-1]), "bound_low": 1 + ls[-1] / 2,
                  "bound_high": 1 + 3 * ls[-1] / 2})
    table.append({"setting": f"Xiong (d={xs['d']}, FFN only)", "scheme": "Post-LN", "slope_per_layer": post_slope,
                  "r2": float("nan"), "value_at_last_layer": float(post.mean(0)[-1]), "bound_low": 1.5,
                  "bound_high": 1.5})
    # --- 2. GPT at GPT-style widths ------------------------------------------------------------------------
    x, _, vocab = eval_batch(f"{DATA}:{gs['ctx']}", gs["batch"], split="test")
    prof: dict[tuple[str, int], np.ndarray] = {}
    for label, (scheme, rkw, fkw, _) in SCHEMES.items():
        for depth in gs["depths"]:
            prof[(label, depth)] = np.array([gpt_profile(scheme, rkw, fkw, depth, x, vocab, gs["d"], s)
                                             for s in range(gs["seeds"])]).mean(0)
    lo_d, hi_d = gs["depths"][0], gs["depths"][-1]
    ratio = {lab: float(prof[(lab, hi_d)][-1] / prof[(lab, lo_d)][-1]) for lab in SCHEMES}
    deep_pre = prof[("Pre-LN", hi_d)]
    b, a, r2g = _linear_fit(np.arange(len(deep_pre), dtype=float), deep_pre)
    checks.append(check(f"GPT d={gs['d']}, Pre-LN (N(0, 0.02) init): E||x_l||^2/d grows linearly along the "
                        f"{2 * hi_d} sublayers of a {hi_d}-layer model (R^2 >= 0.95; value: slope per sublayer in "
                        "units of the embedding's E||x_0||^2/d)", b / deep_pre[0], r2g >= 0.95 and b > 0, r2=r2g))
    checks.append(check(f"GPT, Pre-LN: output stream energy grows with depth (growth ratio R from {lo_d} to {hi_d} "
                        f"layers > {BOUNDED_RATIO})", ratio["Pre-LN"], ratio["Pre-LN"] > BOUNDED_RATIO))
    flat = prof[("Post-LN", hi_d)][1:]
    checks.append(check("GPT, Post-LN: the stream after every LN stays at E||x||^2/d = 1 (largest deviation)",
                        float(np.abs(flat - 1).max()), bool(np.abs(flat - 1).max() < 0.02)))
    for lab, (_, _, _, expect) in SCHEMES.items():
        if expect == "bounded":
            checks.append(check(f"GPT, {lab}: bounded (R <= {BOUNDED_RATIO} while Pre-LN's is "
                                f"{ratio['Pre-LN']:.1f})", ratio[lab], ratio[lab] <= BOUNDED_RATIO))
        elif expect == "slower":
            checks.append(check(f"GPT, {lab}: grows sub-linearly (R above 1 and below half Pre-LN's "
                                f"{ratio['Pre-LN']:.1f})", ratio[lab], 1.0 < ratio[lab] < ratio["Pre-LN"] / 2))
    for lab in SCHEMES:
        table.append({"setting": f"GPT d={gs['d']}, {lo_d}-{hi_d} layers", "scheme": lab,
                      "growth_ratio_R": ratio[lab],
                      **{f"E|x_final|^2/d at {dd} layers": float(prof[(lab, dd)][-1]) for dd in gs["depths"]}})
    verdict = verdict_of([c["passed"] for c in checks])
    summary = (f"Xiong et al.'s setting (d={xs['d']}, {xs['layers']} FFN layers, {xs['seeds']} seeds): Pre-LN "
               f"E||x_l||^2/d grows by {slope:.3f} +- {slope_se:.3f} per layer (the bound's lower slope is 0.5, "
               f"R^2 {r2:.4f}); Post-LN stays at {pm:.3f} before every LN (3/2 predicted). GPT (d={gs['d']}, "
               f"{gs['seeds']} seeds, pydoc tokens), growth ratio R of E||x_final||^2 from {lo_d} to {hi_d} layers: "
               + ", ".join(f"{lab} {ratio[lab]:.2f}" for lab in SCHEMES)
               + ". GPT-2's 1/sqrt(2L) output init is itself a fix: it keeps Pre-LN's output energy independent of "
               "depth at initialisation. HC, mHC and DenseFormer start as Pre-LN, so they grow like it at init. Of the "
               "2024-26 designs, LN-Scaling's 1/sqrt(l) makes each layer add ~1/l (logarithmic growth); ResiDual, "
               "Admin and nGPT renormalise what they output; Peri-LN's output norm makes each sublayer add ~1 "
               "(linear growth from a larger start); Mix-LN's ratio compares a 2-layer Pre-LN model (floor(L/4) = 0 "
               "Post-LN layers) with a 16-layer one whose first 4 Post-LN layers reset the stream to 1, not a growth; "
               "MUDD and Frac-connections start as Pre-LN exactly and grow like it; LAuReL's bounded ratio comes "
               "from its skip weight beta = 1/2 at init (softmax of equal logits), and DyT's from branch outputs "
               "that stay tiny at this init.")
    return ClaimResult(verdict, summary, checks, table, [_plot(pre, post, prof, gs, ctx)])


def _plot(pre: np.ndarray, post: np.ndarray, prof: dict, gs: dict, ctx: Context) -> str:
    fig, (a1, a2, a3) = new_figure(3, width=4.6, height=5.2)
    ls = np.arange(pre.shape[1])
    a1.fill_between(ls, 1 + ls / 2, 1 + 3 * ls / 2, color="0.85", label="Xiong et al.'s bounds for Pre-LN")
    a1.plot(ls, pre.mean(0), label="Pre-LN stream x_l, measured")
    a1.plot(np.arange(post.shape[1]), post.mean(0), label="Post-LN, x_l + F(x_l) before each LN")
    a1.set(xlabel="layer l", ylabel="E||x_l||^2 / d (mean over seeds)", title="Xiong et al.'s setting (FFN stack)")
    integer_axis(a1)
    legend_below(a1)
    hi = gs["depths"][-1]
    styles = series_styles(SCHEMES)
    for lab in SCHEMES:
        p = prof[(lab, hi)]
        a2.plot(np.arange(len(p)), p, label=lab, **styles[lab])
        a3.plot(gs["depths"], [prof[(lab, d)][-1] for d in gs["depths"]], **styles[lab])
    a2.set(xlabel="sublayer input (last = trunk output)", ylabel="E||x||^2 / d",
           title=f"GPT at init, {hi} layers, d={gs['d']}")
    integer_axis(a2)
    log_axis(a2)
    a3.set(xlabel="layers", ylabel="E||x_final||^2 / d at the trunk output", title="Output stream energy vs depth")
    log_axis(a3, "x", ticks=gs["depths"])
    log_axis(a3)
    legend_below(fig, ncol=6, axes=[a2])
    return ctx.save_figure(fig, "growth.png")


CLAIM = register_claim(Claim(
    name="growth",
    title="O(L) growth of the residual stream, and its fixes",
    statement=("\"in a standard residual network, the representation norm grows linearly with depth ... Pre-norm "
               "... scaled residual connections ... attention-residual ... ReZero\" keep it bounded."),
    published=("Xiong et al. 2020: Pre-LN (1 + l/2) d <= E||x_l||^2 <= (1 + 3l/2) d; Post-LN 3d/2 before each LN "
               "(FFN sublayers, N(0, 1/d) weights)."),
    runs=lambda profile: {},
    analyse=analyse,
    paper={"data": "Xiong et al.: unit-variance input vectors; IWSLT14 De-En and BERT pre-training for their "
                   "training experiments",
           "model": "a stack of FFN sublayers with d x d weights drawn N(0, 1/d), Post-LN or Pre-LN",
           "training": "none: bounds on the expected stream energy at initialisation (Lemma 1)"},
    ours=lambda p: {"data": f"Gaussian unit-variance inputs ({XIONG[p]['n']} vectors); pydoc windows of "
                            f"{GPT[p]['ctx']} characters for the GPTs",
                    "model": f"Xiong's FFN stack (d = {XIONG[p]['d']}, {XIONG[p]['layers']} sublayers); GPTs of "
                             f"{', '.join(map(str, GPT[p]['depths']))} layers, d_model {GPT[p]['d']}, under "
                             f"{len(SCHEMES)} residual schemes",
                    "training": f"none: measured at initialisation, {XIONG[p]['seeds']} / {GPT[p]['seeds']} seeds"},
    budget="the random initialisations (seeds) measured; nothing is trained",
))
