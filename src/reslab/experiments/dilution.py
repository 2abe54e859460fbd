"""Signal dilution and uniform aggregation: each layer's share of the final stream, and who learns to weight them.

The claim: "with L layers, any single layer's contribution is only 1/L of the total signal" and "the final
representation is a uniform sum of all residual functions plus the input, with no learned prioritization". Both
are measured through the scheme's exact decomposition of the final stream into what each component added
(:mod:`reslab.diagnostics.decomposition`):

- dilution: a component's share ``E ||c_j|| / ||x_final||`` (per token) in Pre-LN GPTs of several depths at
  initialisation (all weights ``N(0, 0.02)``) and after training; the mean share over the ``K = 2L + 1``
  components is fitted as ``K^p``. ``p = -1`` is the claimed 1/L; sums of near-orthogonal terms give ``-1/2``.
- aggregation: the weight each component gets in the final stream, ``a_j = E ||c_j|| / ||v_j||`` (``v_j`` its raw
  output, ``x0`` for the embedding). The standard residual has ``a_j = 1`` for every ``j`` by construction; Full
  and Block Attention Residuals and DenseFormer start uniform and learn their weights. Non-uniformity is the
  coefficient of variation of ``a`` over components, on the trained runs of the ``transformers`` claim. The
  figures show the learned depth weights (AttnRes's alpha per site and source, DenseFormer's DWA matrix) and the
  composite stream gain of HC and mHC (the product of their stream-mixing matrices) per depth.
"""

from __future__ import annotations

import numpy as np
import torch

import reslab
from reslab.diagnostics.decomposition import decompose
from reslab.diagnostics.recorder import record
from reslab.experiments import transformers
from reslab.experiments.base import (Claim, ClaimResult, Context, check, differs, eval_batch, load_trained,
                                     register_claim, verdict_of)
from reslab.report.plots import count, integer_axis, legend_below, log_axis, new_figure
from reslab.residuals.hyper import composite_gain

INIT_DEPTHS = {"smoke": (1, 2), "quick": (2, 4, 8, 16), "full": (2, 4, 8, 16, 32)}
INIT_WIDTH = {"smoke": 32, "quick": 128, "full": 256}
LEARNED = ("attnres", "block_attnres", "denseformer")


def _fit(k: np.ndarray, share: np.ndarray) -> float:
    return float(np.polyfit(np.log(k), np.log(share), 1)[0])


def analyse(ctx: Context) -> ClaimResult:
    p = transformers.PROFILE[ctx.profile]
    seeds, depths = p["seeds"], p["depths"]
    cfg0 = next(iter(ctx.specs.values()))
    x, _, vocab = eval_batch(cfg0.data, 16, split="test")
    checks, table = [], []
    # --- dilution at initialisation, Pre-LN at several depths -------------------------------------------------
    init_depths, width = INIT_DEPTHS[ctx.profile], INIT_WIDTH[ctx.profile]
    xi = x[:8]
    share_init = {}
    for L in init_depths:
        vals = []
        for s in seeds:
            torch.manual_seed(s)
            m = reslab.create_model("gpt", "preln", depth=L, num_classes=vocab, input_shape=(p["ctx"],),
                                    d_model=width, n_heads=max(1, width // 32), scaled_out_init=False).eval()
            vals.append(decompose(m, xi).shares())
        share_init[L] = np.mean(vals, 0)
        table.append({"when": "init", "scheme": "Pre-LN", "layers": L, "components": 2 * L + 1,
                      "mean_share": float(share_init[L].mean()), "embedding_share": float(share_init[L][0]),
                      "last_share": float(share_init[L][-1])})
    k = np.array([2 * L + 1 for L in init_depths], float)
    p_init = _fit(k, np.array([share_init[L].mean() for L in init_depths]))
    checks.append(check("at init, Pre-LN: a component's mean share of the final stream falls with depth (fitted "
                        "exponent p of mean share ~ K^p below -0.25)", p_init, p_init < -0.25))
    checks.append(check("at init, Pre-LN: dilution as fast as the claimed 1/L (p within 0.2 of -1)", p_init,
                        abs(p_init + 1) < 0.2))
    # --- after training ------------------------------------------------------------------------------------
    trained: dict[tuple[str, int], list[np.ndarray]] = {}
    shares: dict[tuple[str, int], list[np.ndarray]] = {}
    alphas: dict[str, list] = {}  # scheme -> per seed: token-averaged depth weights per site
    gains: dict[str, list] = {}   # scheme -> per seed: composite stream gain per depth
    dwa = {}
    deep = depths[-1]
    for rid in ctx.specs:
        scheme, L, seed = transformers.parse_id(rid)
        if scheme not in ("preln", "hc", "mhc", *LEARNED):
            continue
        model, _ = load_trained(ctx, rid)
        dec = decompose(model, x)
        trained.setdefault((scheme, L), []).append(dec.weights())
        shares.setdefault((scheme, L), []).append(dec.shares())
        if L == deep:
            with torch.no_grad(), record(model, names=("mix",)) as rec:
                model(x)
            mix = rec.by_depth("mix", len(model.trunk) + 1)
            if scheme in ("attnres", "block_attnres"):
                alphas.setdefault(scheme, []).append(
                    [None if a is None else a.numpy() for a in model.trunk.scheme.depth_weights(mix)])
            elif scheme == "denseformer" and seed == seeds[0]:
                dwa[scheme] = model.trunk.scheme.dwa_matrix().numpy()
            elif scheme in ("hc", "mhc"):
                gains.setdefault(scheme, []).append(composite_gain(mix).numpy())
    cv = {key: [float(np.std(a) / np.mean(a)) for a in v] for key, v in trained.items()}
    for s in ("preln", *LEARNED):
        checks.append(differs(f"after training, {deep} layers: {transformers.LABELS[s]} aggregates non-uniformly "
                              "(coefficient of variation of the weights a_j above Pre-LN's)" if s != "preln" else
                              f"after training, {deep} layers: Pre-LN's weights stay exactly uniform (a_j = 1)",
                              cv[("preln", deep)], cv[(s, deep)], "higher" if s != "preln" else "not higher",
                              floor=0.05))
    checks += _weight_checks(alphas.get("attnres", []), gains, deep)
    for (s, L), v in sorted(trained.items()):
        table.append({"when": "trained", "scheme": transformers.LABELS[s], "layers": L, "components": 2 * L + 1,
                      "mean_share": float(np.mean(shares[(s, L)])), "aggregation_cv": float(np.mean(cv[(s, L)])),
                      "embedding_weight": float(np.mean([a[0] for a in v]))})
    verdict = verdict_of([c["passed"] for c in checks])
    summary = (f"At initialisation (Pre-LN, N(0, 0.02) weights, d={width}), a component's mean share of the final "
               f"stream goes as K^{p_init:.2f} over {', '.join(map(str, init_depths))} layers (K = 2L+1 components; "
               "the claimed 1/L is K^-1, sums of near-orthogonal terms give K^-0.5). After training at "
               f"{deep} layers, coefficient of variation of the aggregation weights: "
               + ", ".join(f"{transformers.LABELS[s]} {np.mean(cv[(s, deep)]):.3f}"
                           for s in ("preln", "hc", "mhc", *LEARNED) if (s, deep) in cv)
               + ". The standard residual's weights are exactly uniform; AttnRes and DenseFormer learn theirs "
               "(figures).")
    first = {k: v[0] for k, v in alphas.items()}
    figs = [_plot_dilution(share_init, init_depths, p_init, ctx),
            _plot_weights(first, dwa, {k: v[0] for k, v in gains.items()}, deep, ctx)]
    return ClaimResult(verdict, summary, checks, table, figs)


def _weight_checks(alphas: list, gains: dict, deep: int) -> list[dict]:
    """The AttnRes paper's description of the learned weights, and the mHC paper's composite gains, per seed."""
    out = []
    if alphas:
        emb = np.array([a[-1][0] - 1 / len(a[-1]) for a in alphas])  # final read: weight on x0 above uniform
        se = emb.std(ddof=1) / np.sqrt(len(emb)) if len(emb) > 1 else 0.0
        out.append(check(f"{deep} layers, Full AttnRes: persistent weight on the embedding (final read's alpha_0 "
                         "minus the uniform 1/S, mean over seeds; passes above 2 SE)", emb.mean(),
                         emb.mean() > 2 * se, se=se))
        diag = np.mean([np.mean([np.argmax(w) == len(w) - 1 for w in a[:-1] if w is not None and len(w) > 1])
                        for a in alphas])
        out.append(check(f"{deep} layers, Full AttnRes: diagonal-dominant (share of sites whose largest weight is "
                         "on the latest source; passes above 1/2)", diag, diag > 0.5))
    if "hc" in gains and "mhc" in gains:
        hc, mhc = [float(g.max()) for g in gains["hc"]], [float(g.max()) for g in gains["mhc"]]
        out.append(check(f"{deep} layers, mHC: composite stream gain stays bounded (largest over depth and seeds "
                         "<= 2; published ~1.6 at 27B)", max(mhc), max(mhc) <= 2.0))
        out.append(differs(f"{deep} layers: HC's composite gain grows beyond mHC's (largest over depth; published "
                           "~3000 at 27B)", mhc, hc, "higher", floor=0.5))
    return out


def _plot_dilution(share: dict, depths: tuple, p: float, ctx: Context) -> str:
    fig, (a1, a2) = new_figure(2, width=5, height=4.2)
    for L in depths:
        a1.plot(np.arange(len(share[L])), share[L], label=count(L, "layer"))
    a1.set(xlabel="component j (0 = embedding, then one per sublayer)", ylabel="share E||c_j|| / ||x_final||",
           title="Pre-LN at init: each component's share")
    integer_axis(a1)
    log_axis(a1)
    legend_below(a1)
    k = np.array([2 * L + 1 for L in depths], float)
    a2.plot(k, [share[L].mean() for L in depths], label=f"measured (p = {p:.2f})")
    a2.plot(k, 1 / k, "k:", label="1/K (the claimed 1/L)")
    a2.plot(k, 1 / np.sqrt(k), "k-.", label="1/sqrt(K) (near-orthogonal sum)")
    a2.set(xlabel="components K = 2L + 1", ylabel="mean share over components", title="Dilution with depth")
    log_axis(a2, "x", ticks=k)
    log_axis(a2)
    legend_below(a2)
    return ctx.save_figure(fig, "dilution.png")


def _plot_weights(alphas: dict, dwa: dict, gains: dict, deep: int, ctx: Context) -> str:
    panels = [("attnres", "Full AttnRes: weight alpha per site and source"),
              ("block_attnres", "Block AttnRes: weight alpha per site and block"),
              ("denseformer", "DenseFormer: learned DWA weights"), ("gain", "HC / mHC: composite stream gain")]
    fig, axes = new_figure(len(panels), width=4.4, height=4.2)
    for ax, (key, title) in zip(axes, panels):
        if key in alphas:
            rows = [a for a in alphas[key] if a is not None]
            mat = np.full((len(rows), max(len(a) for a in rows)), np.nan)
            for i, a in enumerate(rows):
                mat[i, :len(a)] = a
            im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0)
            ax.set(xlabel="source block (0 = embedding)" if key == "block_attnres" else "source (0 = embedding)",
                   ylabel="site: sublayer reading (last = final read)")
            ax.figure.colorbar(im, ax=ax, label="alpha (softmax weight, mean over tokens)")
        elif key in dwa:
            m = dwa[key]
            lim = float(np.abs(m).max())
            im = ax.imshow(np.ma.masked_where(np.triu(np.ones_like(m), 1) > 0, m), aspect="auto", cmap="coolwarm",
                           vmin=-lim, vmax=lim)
            ax.set(xlabel="source X_j: output of layer j (0 = embedding)", ylabel="Y_i, the average taken after layer i")
            ax.figure.colorbar(im, ax=ax, label="weight alpha_ij")
        elif key == "gain":
            for s, g in gains.items():
                ax.plot(np.arange(1, len(g) + 1), g, label=transformers.LABELS[s])
            ax.set(xlabel="sublayer l", ylabel="largest |row sum| of H_res,l ... H_res,1 (1 = kept)")
            log_axis(ax)
            legend_below(ax)
        integer_axis(ax, "x")
        if key != "gain":
            integer_axis(ax, "y")
        ax.set_title(f"{title}, {count(deep, 'layer')}", fontsize=9)
    return ctx.save_figure(fig, "depth_weights.png")


CLAIM = register_claim(Claim(
    name="dilution",
    title="Signal dilution and uniform aggregation",
    statement=("\"With L layers, any single layer's contribution is only 1/L of the total signal ... the final "
               "representation is a uniform sum of all residual functions plus the input, with no learned "
               "prioritization.\""),
    published=("AttnRes paper: learned depth weights are diagonal-dominant with persistent weight on the embedding; "
               "DenseFormer's learned DWA weights are structured, far from uniform."),
    runs=transformers.plan,
    budget="the training windows (tokens seen, one pass) of every language model, up to the whole corpus",
    analyse=analyse,
    paper=transformers.ATTNRES_RECIPE,
    ours=lambda p: {"model": f"also untrained Pre-LN GPTs of {', '.join(map(str, INIT_DEPTHS[p]))} layers, d_model "
                             f"{INIT_WIDTH[p]}, weights N(0, 0.02), measured at initialisation"},
))
