"""Signal dilution and uniform aggregation: each layer's share of the final stream, and who learns to weight them.

The claim: "with L layers, any single layer's contribution is only 1/L of the total signal" and "the final
representation is a uniform sum of all residual functions plus the input, with no learned prioritization". Both
are measured through the scheme's exact decomposition of the final stream into what each component added
(:mod:`reslab.diagnostics.decomposition`):

- dilution: a component's share ``E ||c_j|| / ||x_final||`` (per token) in Pre-LN GPTs of several depths at
  initialisation (all weights ``N(0, 0.02)``) and after training; the mean share over the ``K = 2L + 1``
  components is fitted as ``K^p``. ``p = -1`` is the claimed 1/L; sums of near-orthogonal terms give ``-1/2``.
  The ablation measures which: the mean pairwise cosine ``rho`` between the contributions, and the share it
  predicts (:func:`~reslab.diagnostics.decomposition.share_under_cosine`, ``1 / sqrt(K (1 + (K - 1) rho))`` for
  equal norms; :meth:`~reslab.diagnostics.decomposition.Decomposition.share_from_cosine` with the measured norms),
  at every depth at initialisation and after training; the coherent term ``(K - 1) rho`` against 1 says which law
  holds.
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
from reslab.diagnostics.decomposition import Decomposition, decompose, share_under_cosine
from reslab.diagnostics.recorder import record
from reslab.experiments import transformers
from reslab.experiments.base import (Claim, ClaimResult, Context, ablation, check, differs, eval_batch,
                                     load_trained, register_claim, verdict_of)
from reslab.report.plots import count, integer_axis, legend_below, log_axis, new_figure, series_styles
from reslab.residuals.hyper import composite_gain

INIT_DEPTHS = {"smoke": (1, 2), "quick": (2, 4, 8, 16), "full": (2, 4, 8, 16, 32)}
INIT_WIDTH = {"smoke": 32, "quick": 128, "full": 256}
LEARNED = ("attnres", "block_attnres", "denseformer")


def _fit(k: np.ndarray, share: np.ndarray) -> float:
    return float(np.polyfit(np.log(k), np.log(share), 1)[0])


def _cosine_law(dec: Decomposition) -> tuple[float, float]:
    """``(rho, predicted mean share)``: the measured mean pairwise cosine and the share it predicts with the
    measured norms."""
    rho = dec.pairwise_cosine()
    return rho, dec.share_from_cosine(rho)


def _law_row(when: str, layers: int, share: float, laws: list[tuple[float, float]]) -> dict:
    """A row of the ablation: the measured mean share beside what the mean pairwise cosine predicts (means over
    seeds), the two laws, and the one the coherent term ``(K - 1) rho`` puts the depth under (below 1: the sum of
    squared norms dominates ``||x_final||^2``, ``K^-1/2``; above: the cross terms do, ``1/K``)."""
    k = 2 * layers + 1
    rho, pred = (float(v) for v in np.mean(laws, 0))
    return {"when": when, "layers": layers, "components": k, "mean_share": float(share),
            "mean_pairwise_cosine": rho, "coherent_term": (k - 1) * rho, "share_from_cosine": pred,
            "share_equal_norms": float(share_under_cosine(k, rho)), "K^-1/2": k ** -0.5, "1/K": 1 / k,
            "law": "K^-1/2" if (k - 1) * rho < 1 else "1/K"}


def analyse(ctx: Context) -> ClaimResult:
    p = transformers.PROFILE[ctx.profile]
    seeds, depths = p["seeds"], p["depths"]
    cfg0 = next(iter(ctx.specs.values()))
    x, _, vocab = eval_batch(cfg0.data, 16, split="test")
    checks, table = [], []
    # --- dilution at initialisation, Pre-LN at several depths -------------------------------------------------
    init_depths, width = INIT_DEPTHS[ctx.profile], INIT_WIDTH[ctx.profile]
    xi = x[:8]
    share_init, law_rows = {}, []
    for L in init_depths:
        vals, laws = [], []
        for s in seeds:
            torch.manual_seed(s)
            m = reslab.create_model("gpt", "preln", depth=L, num_classes=vocab, input_shape=(p["ctx"],),
                                    d_model=width, n_heads=max(1, width // 32), scaled_out_init=False).eval()
            dec = decompose(m, xi)
            vals.append(dec.shares())
            laws.append(_cosine_law(dec))
        share_init[L] = np.mean(vals, 0)
        law_rows.append(_law_row("init", L, share_init[L].mean(), laws))
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
    preln_laws: dict[int, list[tuple[float, float]]] = {}  # depth -> per seed: (rho, share predicted from rho)
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
        if scheme == "preln":
            preln_laws.setdefault(L, []).append(_cosine_law(dec))
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
    law_rows += [_law_row("trained", L, np.mean(shares[("preln", L)]), v) for L, v in sorted(preln_laws.items())]
    return ClaimResult(verdict, summary, checks, table, figs,
                       ablation(_ablation_text(law_rows, p_init) + _where_weights_sit(alphas.get("attnres", []), deep),
                                law_rows, [_plot_law(law_rows, ctx)]))


def where_weights_sit(sites: list[np.ndarray]) -> dict[str, float]:
    """Where each site's depth weights ``alpha`` (over its ``S`` sources, embedding first, latest last) put their
    largest weight, and how far they are from the uniform ``1/S`` they start at: the shares of sites whose argmax
    is the embedding, the latest source or another one; the mean normalised entropy ``H(alpha) / ln S`` (1 for
    uniform weights); and the mean largest weight over the uniform one, ``S max(alpha)`` (1 for uniform)."""
    top = np.array([np.argmax(a) for a in sites])
    last = np.array([len(a) - 1 for a in sites])
    entropy = [float(-(a * np.log(np.clip(a, 1e-30, None))).sum() / np.log(len(a))) for a in sites]
    return {"embedding": float(np.mean(top == 0)), "latest": float(np.mean(top == last)),
            "other": float(np.mean((top != 0) & (top != last))), "entropy": float(np.mean(entropy)),
            "peak": float(np.mean([len(a) * a.max() for a in sites]))}


def _where_weights_sit(alphas: list, deep: int) -> str:
    """The ablation's sentence on the diagonal-dominance check: where Full AttnRes's learned weights sit."""
    sites = [w for a in alphas for w in a[:-1] if w is not None and len(w) > 1]
    if not sites:
        return ""
    w = where_weights_sit(sites)
    return (f" Full AttnRes's learned depth weights at {deep} layers ({len(sites)} sites over the seeds): the largest "
            f"weight sits on the embedding at {100 * w['embedding']:.0f}% of sites, on the latest source at "
            f"{100 * w['latest']:.0f}%, elsewhere at {100 * w['other']:.0f}%; their normalised entropy is "
            f"{w['entropy']:.3f} (1 = the uniform weights they start at) and the largest weight is {w['peak']:.2f}x "
            "the uniform 1/S. " + ("The weights are still close to their uniform start, and what they learned "
                                  "favours the embedding over the latest source: the paper's diagonal dominance, "
                                  "measured after billions of tokens, has not formed at our budget."
                                  if w["entropy"] > 0.9 and w["embedding"] > w["latest"] else
                                  "The weights moved away from their uniform start."
                                  if w["entropy"] <= 0.9 else ""))


def _values(rows: list[dict], key: str, fmt: str = ".3f") -> str:
    """``a, b, c``: a row key's values over depth, in order."""
    return ", ".join(format(r[key], fmt) for r in rows)


def _ablation_text(rows: list[dict], p_init: float) -> str:
    """Which law the measured shares follow and why, every number and the conclusion computed from ``rows``."""
    init = [r for r in rows if r["when"] == "init"]
    k = np.array([r["components"] for r in init], float)
    p_pred = _fit(k, np.array([r["share_from_cosine"] for r in init]))
    rho = [r["mean_pairwise_cosine"] for r in init]
    coherent = [r["coherent_term"] for r in init]
    gap = max(abs(r["share_from_cosine"] / r["mean_share"] - 1) for r in init)
    by_fit = "K^-1/2" if abs(p_init + 0.5) < abs(p_init + 1) else "1/K"
    by_cos = {r["law"] for r in init}
    text = ("The seed's 1/L holds for contributions that add coherently; near-orthogonal ones dilute as K^-1/2. "
            "With K contributions of equal norm and mean pairwise cosine rho, ||x_final||^2 = K n^2 (1 + (K-1) rho): "
            "a share of 1/sqrt(K (1 + (K-1) rho)), K^-1/2 at rho = 0 and 1/K at rho = 1; the coherent term (K-1) rho "
            f"against 1 says which law holds. At initialisation (Pre-LN, K = {_values(init, 'components', 'd')}) the "
            f"measured mean pairwise cosine is between {min(rho):.4f} and {max(rho):.4f}, a coherent term "
            f"between {min(coherent):.3f} and {max(coherent):.3f}. The share this cosine predicts with each token's "
            f"measured norms is {_values(init, 'share_from_cosine')} against the measured "
            f"{_values(init, 'mean_share')} (at most {100 * gap:.1f}% apart; fitted exponent {p_pred:.2f} against "
            f"the measured {p_init:.2f}); K^-1/2 is {_values(init, 'K^-1/2')} and 1/K {_values(init, '1/K')}. ")
    if by_cos == {by_fit} == {"K^-1/2"}:
        text += ("The data follow the K^-1/2 law, not 1/K: the contributions are near-orthogonal, so at our scale "
                 f"the seed's \"1/L\" is wrong and a component's share dilutes as K^-1/2 (measured K^{p_init:.2f}); "
                 "what remains between the shares and K^-1/2 comes from the components' unequal norms and their "
                 "small residual cosine (equal norms at the measured cosine would give "
                 f"{_values(init, 'share_equal_norms')}), not from coherence.")
    elif by_cos == {by_fit} == {"1/K"}:
        text += ("The data follow the 1/K law: the contributions add coherently (coherent term above 1 at every "
                 f"depth), as the seed's 1/L assumes (measured K^{p_init:.2f}).")
    else:
        text += (f"Neither law holds cleanly: the fitted exponent {p_init:.2f} is nearer {by_fit}, while the "
                 f"coherent term puts {sum(r['law'] == 'K^-1/2' for r in init)} of {len(init)} depths under "
                 "K^-1/2.")
    trained = [r for r in rows if r["when"] == "trained"]
    if trained:
        text += " After training (Pre-LN): " + "; ".join(
            f"{count(r['layers'], 'layer')}, mean pairwise cosine {r['mean_pairwise_cosine']:.3f} (coherent term "
            f"{r['coherent_term']:.2f}, the {r['law']} law), share {r['mean_share']:.3f} measured, "
            f"{r['share_from_cosine']:.3f} predicted, {r['K^-1/2']:.3f} under K^-1/2, {r['1/K']:.3f} under 1/K"
            for r in trained) + "."
        trained_laws = {r["law"] for r in trained}
        if trained_laws == {"1/K"}:
            text += (" Training aligns the contributions: their coherent term exceeds 1 at every trained depth, the "
                     "regime of the seed's 1/L" + (", which describes the trained net, not the one at initialisation."
                                                   if by_cos == {"K^-1/2"} else "."))
        elif trained_laws == {"K^-1/2"}:
            text += " The trained contributions stay near-orthogonal: K^-1/2 holds after training too."
    return text


def _plot_law(rows: list[dict], ctx: Context) -> str:
    """Mean share against K with what the measured cosine predicts and the two laws; the cosine against K."""
    fig, (a1, a2) = new_figure(2, width=5, height=4.2)
    whens = [w for w in ("init", "trained") if any(r["when"] == w for r in rows)]
    styles = series_styles([f"{w}: measured" for w in whens] + [f"{w}: predicted from cosine" for w in whens])
    label = {"init": "at init", "trained": "trained"}
    for w in whens:
        rs = [r for r in rows if r["when"] == w]
        k = [r["components"] for r in rs]
        a1.plot(k, [r["mean_share"] for r in rs], label=f"{label[w]}: measured", **styles[f"{w}: measured"])
        a1.plot(k, [r["share_from_cosine"] for r in rs], label=f"{label[w]}: predicted from the cosine",
                **{**styles[f"{w}: predicted from cosine"], "linestyle": "none", "markerfacecolor": "none",
                   "markersize": 8})
        a2.plot(k, [r["mean_pairwise_cosine"] for r in rs], label=label[w], **styles[f"{w}: measured"])
    ks = np.array(sorted({r["components"] for r in rows}), float)
    grid = np.geomspace(ks[0], ks[-1], 50) if len(ks) > 1 else ks
    a1.plot(grid, 1 / np.sqrt(grid), "k-.", label="K^-1/2 (orthogonal, rho = 0)")
    a1.plot(grid, 1 / grid, "k:", label="1/K (coherent, rho = 1: the claimed 1/L)")
    a1.set(xlabel="components K = 2L + 1", ylabel="mean share E||c_j|| / ||x_final||",
           title="Pre-LN: which law the shares follow")
    log_axis(a1, "x", ticks=ks)
    log_axis(a1)
    legend_below(a1)
    a2.plot(grid, 1 / (grid - 1), "k:", label="1/(K-1): coherent term (K-1) rho = 1")
    a2.axhline(0, color="0.6", linewidth=0.8)
    a2.set(xlabel="components K = 2L + 1", ylabel="mean pairwise cosine rho of the contributions",
           title="Pre-LN: how coherently the contributions add")
    log_axis(a2, "x", ticks=ks)
    legend_below(a2)
    return ctx.save_figure(fig, "dilution_ablation.png")


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
            ax.set(xlabel="source X_j: output of layer j (0 = embedding)",
                   ylabel="Y_i, the average taken after layer i")
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
