"""Dense connections: "strengthens feature reuse but increases memory cost" (Huang et al. 2017; Pleiss et al. 2017).

Three measurements on the ``densenet_bc`` family (DenseNet-BC, growth rate 12, bottleneck 4k, compression 0.5;
:mod:`reslab.models.densenet`, run by the ``concat`` scheme):

1. **Memory.** Peak training memory of one step (forward, cross-entropy, backward) against depth, for both memory
   modes: naive concatenation, where every layer keeps its own concatenated copy and the BN and ReLU outputs of it
   for backward (``sum_l (k0 + l k) = O(n^2)`` per block of ``n`` layers), and ``memory_efficient`` (Pleiss et al.:
   concatenation, BN, ReLU and the first conv recomputed in backward, ``O(n)``). Measured with the allocator: the
   CPU allocator's every allocation and free of the step, in order, from ``torch.profiler`` (``profile_memory``),
   whose running sum peaks at the step's peak (parameters, allocated before, excluded; on CUDA
   ``torch.cuda.max_memory_allocated`` counts the same). On one thread the count is deterministic (the same ops
   allocate the same bytes), so one measurement per point is exact; with two, per-thread scratch buffers added 6%
   to the memory-efficient peak (found when the 4x run, measured after in-process training had set two threads,
   disagreed with the 1x run), so :func:`~reslab.footprint.step_peak_bytes` measures on one. Random CIFAR-shaped
   inputs (3x32x32: the values do not change what is allocated). Each mode gets a linear and a quadratic
   least-squares fit ``m(L)`` and a power law ``m = a + b L^p`` (``p`` by a grid search with ``a, b`` by least
   squares): the fitted exponent ``p``.
2. **Accuracy per parameter.** DenseNet-BCs and ResNets (the ``resnet`` family, He et al.'s CIFAR nets) of about
   the same sizes trained on the same images (scikit-learn's 8x8 digits; CIFAR-10 in ``full`` where a local copy
   exists) for the same epochs, each with its paper's recipe (Huang et al.: SGD 0.1 Nesterov, batch 64; He et al.:
   SGD 0.1, batch 128; both weight decay 1e-4 and the rate / 10 at 50% and 75%): held-out error against parameters.
   The ResNet-20 and -26 runs are the ensemble and preactivation claims' (shared).
3. **Feature reuse** (Huang et al. Fig. 5), in the larger DenseNet-BC's trained runs.
   :func:`~reslab.diagnostics.feature_reuse.feature_reuse` gives Huang et al.'s measure: for each layer ``t`` of each
   dense block (and the transition or classifier reading the whole block) and each earlier source ``s`` (``0``: the
   block's input, the stem's or the transition's output), the mean absolute weight of ``t``'s first weights over
   ``s``'s feature maps; the same at initialisation is its reference. Measured: at our budget these weights stay
   within 2% of their He-normal initialisation, which gives every source the same expected mean, so the heatmap
   shows the initialisation (Huang et al. trained 300 epochs, where weight decay also shrinks unused weights).
   :func:`~reslab.diagnostics.feature_reuse.feature_use` measures instead what each layer draws from each source on
   held-out images: ``mean |<dL/dx_s, x_s>|`` per feature map, the first-order loss change when ``t`` loses ``x_s``.
   Each target's column is divided by its largest entry, then averaged over seeds: a heatmap per block, both measures.

Checks: (1) naive's peak memory grows faster than linearly, the power law's exponent ``p >= 1.5`` (closer to 2
than to 1: the linear terms, the bottleneck outputs and the stem, keep it below 2 at these depths); (2) the
memory-efficient mode's ``p <= 1.2`` (linear); (3) memory-efficient / naive at the deepest net ``<= 0.6`` (Pleiss et
al.: 0.56 at BC-100, batch 64, on a GPU); (4) each DenseNet-BC's held-out error is no worse than the ResNet closest
to it in parameters (difference within ``max(2 SE, FLOOR)``); (5) the larger DenseNet-BC is no worse than a ResNet
with 1.5-3x its parameters (Huang et al.: DenseNet-BC needs about a third of a ResNet's parameters for the same
error); on the measured use: (6) the last dense layer of every block and the layer reading the whole block draw from
every source at least 10% of what they draw from their most-used one (early features are read directly by deep
layers); (7) in blocks 2 and 3 the dense layers draw less from the transition's output than from their other sources
on average (Huang et al.: "the transition layer outputs many redundant features"); (8) the classifier draws more
from the later half of the last block's features than from the earlier half (Huang et al.: it "concentrates towards
final feature-maps"). The verdict needs every check.

Profiles: quick: depths 16, 28, 46, 64, 82, 100 at batch 8 for memory; DenseNet-BC-22 (71k parameters) and -40 (176k)
against ResNet-8 (75k), -14 (172k), -20 (269k) and -26 (367k), 3 seeds, 15 epochs on digits. full: memory to depth
190 at batch 64; DenseNet-BC-100 (0.8M) against ResNet-56 (0.85M) and -110 (1.7M), 30 epochs, 5 seeds (CIFAR-10 at
Huang et al.'s 300 / He et al.'s 164 epochs where present). smoke: tiny nets, one epoch; its verdict is no evidence.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from reslab.data import load_dataset
from reslab.diagnostics.feature_reuse import feature_reuse, feature_use
from reslab.experiments import ensemble, preactivation, shortcuts
from reslab.experiments.base import (CIFAR_EPOCHS, Claim, ClaimResult, Context, ablation, check, conv_setting, differs,
                                     eval_batch, initial_model, load_trained, mean_sd, register_claim, run_measures,
                                     verdict_of)
from reslab.report.plots import legend_below, log_axis, new_figure, series_styles
from reslab.train import TrainConfig

#: per profile: memory depths and batch; the DenseNet-BC and ResNet depths trained, seeds, epochs; ``extra``: options
#: on top of the recipe (the smoke profile's tiny nets)
PROFILE: dict[str, dict[str, Any]] = {
    "smoke": dict(mem_depths=(10, 16, 22), mem_batch=2, dense=(10, 16), resnets=(8, 20), seeds=2, epochs=1,
                  extra=dict(train_samples=256), dense_extra=dict(growth=4), resnet_extra=dict(width=4)),
    "quick": dict(mem_depths=(16, 28, 46, 64, 82, 100), mem_batch=8, dense=(22, 40), resnets=(8, 14, 20, 26),
                  seeds=3, epochs=15),
    "full": dict(mem_depths=(16, 40, 64, 88, 100, 130, 160, 190), mem_batch=64, dense=(100,), resnets=(56, 110),
                 seeds=5, epochs=30),
    "full_cifar": dict(mem_depths=(16, 40, 64, 88, 100, 130, 160, 190), mem_batch=64, dense=(100,),
                       resnets=(56, 110), seeds=5, epochs=CIFAR_EPOCHS, dense_epochs=300, data="cifar10"),
}
#: points below which no difference of held-out errors counts (the conv claims' floor)
FLOOR = shortcuts.FLOOR
STYLES = series_styles(["naive concatenation", "memory-efficient", "DenseNet-BC (k=12)",
                        "ResNet (He et al. 2015, CIFAR)"])


def dense_id(depth: int, seed: int) -> str:
    """``dense_id(40, 1) == "densenet-bc40-s1"``."""
    return f"densenet-bc{depth}-s{seed}"


def plan(profile: str) -> dict[str, TrainConfig]:
    """Every run: the DenseNet-BCs (Huang et al.'s recipe, the family's) and the ResNets (He et al.'s, as the
    preactivation claim's original placement: ``conv-residual-dD-sS``), shared where other claims train them.

    Raises:
        ValueError: a shared run id that this claim would train with another config.
    """
    p = conv_setting(profile, PROFILE)
    extra = p.get("extra", {})
    dense = {dense_id(d, s): TrainConfig.for_model(f"densenet_bc{d}", epochs=p.get("dense_epochs", p["epochs"]),
                                                   seed=s, data=p["data"],
                                                   **({"model_kwargs": p["dense_extra"]} if "dense_extra" in p else {}),
                                                   **extra)
             for d in p["dense"] for s in range(p["seeds"])}
    res_extra = {**extra, **({"model_kwargs": p["resnet_extra"]} if "resnet_extra" in p else {})}
    resnets = {preactivation.run_id("original", d, s): preactivation.config("original", d, s, p["epochs"],
                                                                            data=p["data"], **res_extra)
               for d in p["resnets"] for s in range(p["seeds"])}
    shared = {**ensemble.conv_runs(profile), **shortcuts.plan(profile), **preactivation.plan(profile)}
    for rid in sorted(set(resnets) & set(shared)):
        if resnets[rid] != shared[rid]:
            raise ValueError(f"run {rid!r} is another claim's with another config")
    return {**dense, **resnets}


# --- 1. memory against depth --------------------------------------------------------------------------------------

#: CIFAR-shaped inputs of the memory measurement, and the image classes
MEM_INPUT, MEM_CLASSES = (3, 32, 32), 10
#: the power-law exponent's search grid
EXPONENTS = np.round(np.arange(0.5, 3.0001, 0.001), 3)


def measure_memory(depths: tuple[int, ...], batch: int) -> list[dict[str, Any]]:
    """Peak training memory (MiB) of one step of ``densenet_bc{depth}`` in both modes, same weights and batch."""
    from reslab import create_model
    from reslab.footprint import step_peak_bytes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *MEM_INPUT, generator=g)
    y = torch.randint(0, MEM_CLASSES, (batch,), generator=g)
    rows = []
    for depth in depths:
        row: dict[str, Any] = {"depth": depth}
        for efficient in (False, True):
            torch.manual_seed(0)
            model = create_model(f"densenet_bc{depth}", num_classes=MEM_CLASSES, input_shape=MEM_INPUT,
                                 memory_efficient=efficient).train()
            row["parameters"] = sum(p.numel() for p in model.parameters())
            row["efficient" if efficient else "naive"] = step_peak_bytes(model, x, y) / 2 ** 20
        rows.append(row)
    return rows


def fits(depths: np.ndarray, mem: np.ndarray) -> dict[str, Any]:
    """Linear and quadratic least-squares fits of ``mem(depth)`` (coefficients, highest power first, and the
    largest relative residual), and the power law ``a + b L^p`` (``p`` on :data:`EXPONENTS`, ``a, b`` by least
    squares)."""
    out: dict[str, Any] = {}
    for name, deg in (("linear", 1), ("quadratic", 2)):
        c = np.polyfit(depths, mem, deg)
        out[name] = {"coef": c.tolist(), "max_rel_residual": float(np.max(np.abs(np.polyval(c, depths) - mem) / mem))}
    best = (math.inf, 1.0, (0.0, 0.0))
    for p in EXPONENTS:
        a = np.stack([np.ones_like(depths), depths ** p], 1)
        coef = np.linalg.lstsq(a, mem, rcond=None)[0]
        sse = float(((a @ coef - mem) ** 2).sum())
        if sse < best[0]:
            best = (sse, float(p), tuple(map(float, coef)))
    out["power"] = {"p": best[1], "a": best[2][0], "b": best[2][1]}
    return out


def memory_checks(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The fits of both modes and checks (1)-(3)."""
    depths = np.array([r["depth"] for r in rows], dtype=float)
    f = {mode: fits(depths, np.array([r[mode] for r in rows])) for mode in ("naive", "efficient")}
    pn, pe = f["naive"]["power"]["p"], f["efficient"]["power"]["p"]
    ratio = rows[-1]["efficient"] / rows[-1]["naive"]
    return f, [
        check("naive concatenation's peak training memory grows faster than linearly in depth: fitted exponent p of "
              "a + b L^p at least 1.5 (closer to 2 than to 1)", pn, pn >= 1.5,
              quadratic_max_rel_residual=f["naive"]["quadratic"]["max_rel_residual"],
              linear_max_rel_residual=f["naive"]["linear"]["max_rel_residual"]),
        check("memory-efficient DenseNet's peak training memory grows linearly in depth: fitted exponent p at most "
              "1.2", pe, pe <= 1.2, linear_max_rel_residual=f["efficient"]["linear"]["max_rel_residual"]),
        check(f"memory-efficient / naive peak at the deepest net (DenseNet-BC-{rows[-1]['depth']}) at most 0.6 "
              "(Pleiss et al.: 0.56 at BC-100)", ratio, ratio <= 0.6),
    ]


# --- 2. accuracy per parameter ------------------------------------------------------------------------------------

#: Huang et al. 2017 Table 2, CIFAR-10 with augmentation: (net, parameters in millions, test error %)
PUBLISHED = [("ResNet-110", 1.7, 6.41), ("pre-act ResNet-164", 1.7, 5.46), ("pre-act ResNet-1001", 10.2, 4.62),
             ("DenseNet-BC-100 (k=12)", 0.8, 4.51), ("DenseNet-BC-250 (k=24)", 15.3, 3.62),
             ("DenseNet-BC-190 (k=40)", 25.6, 3.46)]


def nets(profile: str) -> dict[str, list[str]]:
    """Run ids by net label, DenseNet-BCs first."""
    p = conv_setting(profile, PROFILE)
    out = {f"DenseNet-BC-{d}": [dense_id(d, s) for s in range(p["seeds"])] for d in p["dense"]}
    out.update({f"ResNet-{d}": [preactivation.run_id("original", d, s) for s in range(p["seeds"])]
                for d in p["resnets"]})
    return out


def accuracy_checks(errs: dict[str, list[float]], params: dict[str, int]) -> list[dict[str, Any]]:
    """Checks (4) each DenseNet-BC against the ResNet closest in parameters, (5) the largest against a ResNet with
    1.5-3x its parameters (the one closest to twice)."""
    dense = [k for k in errs if k.startswith("DenseNet")]
    resnets = [k for k in errs if k.startswith("ResNet")]
    out = []
    for k in dense:
        r = min(resnets, key=lambda j: abs(math.log(params[j] / params[k])))
        out.append(differs(f"{k} ({params[k] / 1e3:.0f}k parameters) errs no more on held-out images than {r} "
                           f"({params[r] / 1e3:.0f}k; difference within max(2 SE, {FLOOR:g} points))", errs[r],
                           errs[k], "not higher", floor=FLOOR))
    big = max(dense, key=lambda k: params[k])
    bigger = [j for j in resnets if 1.5 <= params[j] / params[big] <= 3]
    if bigger:
        r = min(bigger, key=lambda j: abs(math.log(params[j] / params[big] / 2)))
        out.append(differs(f"{big} errs no more than {r}, {params[r] / params[big]:.1f}x its parameters (within "
                           f"max(2 SE, {FLOOR:g} points))", errs[r], errs[big], "not higher", floor=FLOOR))
    return out


# --- 3. feature reuse ---------------------------------------------------------------------------------------------

def by_column(m: np.ndarray) -> np.ndarray:
    """Each target's column divided by its largest entry."""
    return m / np.nanmax(m, axis=0, keepdims=True)


def reuse_checks(use: list[np.ndarray]) -> list[dict[str, Any]]:
    """Checks (6)-(8) on the measured use per feature map, columns normalised, mean over seeds."""
    deep = min(float(np.nanmin(u[:, -2:])) for u in use)
    later = [float(np.nanmean(u[0, 1:-1] - np.array([np.nanmean(u[1:t + 1, t]) for t in range(1, u.shape[1] - 1)])))
             for u in use[1:]]
    cls = use[-1][:, -1]
    half = len(cls) // 2
    late, early = float(np.mean(cls[half:])), float(np.mean(cls[:half]))
    return [
        check("deep layers read early features directly: the last dense layer of every block and the layer reading "
              "the whole block (transition, classifier) draw from every source at least 10% of what they draw "
              "from their most-used one (per feature map)", deep, deep >= 0.1),
        check("in blocks 2 and 3 the dense layers draw less from the transition's output (source 0) than from the "
              "other sources on average (Huang et al.: the transition outputs redundant features)",
              max(later) if later else math.nan, bool(later) and max(later) < 0),
        check("the classifier draws more from the last block's later half of features than from its earlier half",
              late - early, late > early, later_half=late, earlier_half=early),
    ]


# --- the analysis -------------------------------------------------------------------------------------------------

#: relative change of Huang et al.'s weight measure below which it still shows the initialisation
INIT_BOUND = 0.05
#: held-out images the feature use is measured on
USE_SAMPLES = {"smoke": 64, "quick": 360, "full": 1000}


def analyse(ctx: Context) -> ClaimResult:
    p = conv_setting(ctx.profile, PROFILE)
    mem = measure_memory(tuple(p["mem_depths"]), p["mem_batch"])
    f, checks = memory_checks(mem)
    by = {k: [r for r in v if r in ctx.specs] for k, v in nets(ctx.profile).items()}
    data = load_dataset(ctx.specs[by[next(iter(by))][0]].data)
    chance = 100 * (1 - 1 / data.num_classes)
    meas = {rid: run_measures(ctx.run(rid), chance) for rids in by.values() for rid in rids}
    errs = {k: [meas[r]["test"] for r in rids] for k, rids in by.items()}
    params = {k: sum(q.numel() for q in initial_model(ctx.specs[rids[0]], data).parameters()) for k, rids in by.items()}
    checks += accuracy_checks(errs, params)
    x, y, _ = eval_batch(ctx.specs[by[next(iter(by))][0]].data, USE_SAMPLES[ctx.profile], "test")
    reuse: dict[str, list[list[np.ndarray]]] = {"use": [], "weights": [], "weights at init": []}
    largest = max((k for k in by if k.startswith("DenseNet")), key=lambda k: params[k])
    for rid in by[largest]:
        model = load_trained(ctx, rid)[0]
        reuse["use"].append([by_column(u) for u in feature_use(model, x, y)])
        reuse["weights"].append(feature_reuse(model))
        reuse["weights at init"].append(feature_reuse(initial_model(ctx.specs[rid], data)))
    use = [np.mean(blocks, axis=0) for blocks in zip(*reuse["use"])]
    checks += reuse_checks(use)
    table = [{"part": "memory", "net": f"DenseNet-BC-{r['depth']}", "parameters": r["parameters"],
              f"peak MiB, naive (batch {p['mem_batch']})": r["naive"],
              f"peak MiB, memory-efficient (batch {p['mem_batch']})": r["efficient"],
              "efficient / naive": r["efficient"] / r["naive"]} for r in mem]
    for k, rids in by.items():
        row = {"part": "accuracy", "net": k, "parameters": params[k], "seeds": len(rids)}
        row["held-out error, mean (%)"], row["held-out error, sd (%)"] = mean_sd(errs[k])
        row["training error over the run, mean (%)"] = float(np.mean([meas[r]["run"] for r in rids]))
        row["diverged runs"] = sum(meas[r]["diverged"] for r in rids)
        table.append(row)
    pn, pe = f["naive"]["power"]["p"], f["efficient"]["power"]["p"]
    deepest = mem[-1]
    m = {k: float(np.mean(v)) for k, v in errs.items()}
    moved = [float(np.mean([np.nanmean(np.abs(w / w0 - 1)[:, :-1]) for w, w0 in zip(ws, w0s)]))
             for ws, w0s in zip(zip(*reuse["weights"]), zip(*reuse["weights at init"]))]
    init_bound = max(moved) < INIT_BOUND
    summary = (f"Peak training memory of one step (allocator, batch {p['mem_batch']}, 3x32x32) of DenseNet-BC at "
               f"depths {mem[0]['depth']}-{deepest['depth']}: naive {mem[0]['naive']:.0f} -> {deepest['naive']:.0f} "
               "MiB, "
               f"memory-efficient {mem[0]['efficient']:.0f} -> {deepest['efficient']:.0f} MiB; fitted exponent "
               f"p (a + b L^p) {pn:.2f} naive, {pe:.2f} memory-efficient (the quadratic fit leaves "
               f"{100 * f['naive']['quadratic']['max_rel_residual']:.2g}% of naive's memory unexplained, the linear "
               f"{100 * f['naive']['linear']['max_rel_residual']:.2g}%); at DenseNet-BC-{deepest['depth']} "
               f"({deepest['parameters']:,} parameters) memory-efficient / naive = "
               f"{deepest['efficient'] / deepest['naive']:.2f} (Pleiss et al. 0.56). Held-out error on {data.name} "
               f"(mean of {len(errs[largest])} seeds, {p.get('dense_epochs', p['epochs'])} epochs): "
               + "; ".join(f"{k} ({params[k] / 1e3:.0f}k parameters) {m[k]:.2f}%" for k in by)
               + f". Feature reuse in {largest}: the trained weights' mean |w| per source is within "
               f"{100 * max(moved):.1f}% of its initial value in every block"
               + (", so Huang et al.'s weight heatmap shows the initialisation at this budget" if init_bound else "")
               + "; the checks read what the layers draw from each source on held-out images (|gradient x features| "
               "per feature map). "
               f"{sum(c['passed'] for c in checks)} of {len(checks)} checks pass; the verdict needs every check.")
    figures = [_plot_memory(mem, f, ctx), _plot_accuracy(errs, params, ctx)]
    weights = [by_column(np.mean(ws, 0)) for ws in zip(*reuse["weights"])]
    rows = [{"block": b + 1, "target": _target(t, u.shape[1], b, len(use)), "source": _source(s),
             "use (per feature map, column max 1)": float(u[s, t]),
             "weight measure, trained (column max 1)": float(weights[b][s, t]),
             "weight measure, trained / init": float(np.mean([w[b][s, t] / w0[b][s, t] for w, w0 in
                                                            zip(reuse["weights"], reuse["weights at init"])]))}
            for b, u in enumerate(use) for t in range(u.shape[1]) for s in range(t + 1)]
    text = (f"Huang et al.'s measure, the mean |w| a layer's first weights give each source, moved from its initial "
            f"value by {', '.join(f'{100 * v:.1f}%' for v in moved)} on average in blocks 1-{len(moved)} (dense "
            f"layers; the classifier, initialised small, grows) in {p.get('dense_epochs', p['epochs'])} epochs"
            + (": it still shows the He-normal initialisation, which gives every source the same expected |w|, so a "
               "learned reuse pattern cannot show in it. Huang et al. trained 300 epochs, where weight decay also "
               "shrinks the weights a layer does not use. " if init_bound else ". ")
            + "The checks read the measured use (the first-order loss change when a layer loses a source), shown "
              "beside the weights per block and source.")
    return ClaimResult(verdict_of([c["passed"] for c in checks]), summary, checks, table, figures,
                       ablation(text, rows, [_plot_reuse(use, reuse, ctx)]))


def _target(t: int, n1: int, block: int, blocks: int) -> str:
    return f"layer {t + 1}" if t < n1 - 1 else ("classifier" if block == blocks - 1 else "transition")


def _source(s: int) -> str:
    return "block input" if s == 0 else f"layer {s}"


# --- figures ------------------------------------------------------------------------------------------------------

def _plot_memory(mem: list[dict[str, Any]], f: dict[str, dict[str, Any]], ctx: Context) -> str:
    fig, axes = new_figure(2, width=5.2, height=4.2)
    d = np.array([r["depth"] for r in mem], dtype=float)
    grid = np.linspace(d[0], d[-1], 200)
    for mode, label in (("naive", "naive concatenation"), ("efficient", "memory-efficient")):
        st = STYLES[label]
        axes[0].plot(d, [r[mode] for r in mem], color=st["color"], marker=st["marker"], linestyle="none",
                     label=f"{label} (measured)")
        pw = f[mode]["power"]
        axes[0].plot(grid, pw["a"] + pw["b"] * grid ** pw["p"], color=st["color"], linestyle="-", linewidth=1,
                     label=f"{label}: a + b L^{pw['p']:.2f}")
        axes[0].plot(grid, np.polyval(f[mode]["linear"]["coef"], grid), color=st["color"], linestyle=":",
                     linewidth=1, label=f"{label}: linear fit")
        axes[0].plot(grid, np.polyval(f[mode]["quadratic"]["coef"], grid), color=st["color"], linestyle="--",
                     linewidth=1, label=f"{label}: quadratic fit")
    axes[0].set(xlabel="depth L (DenseNet-BC, k=12)", ylabel="peak memory of a training step (MiB)",
                title=f"Peak training memory, batch {_batch(ctx)}, 3x32x32\n(allocator, parameters excluded)")
    axes[1].plot(d, [r["efficient"] / r["naive"] for r in mem], color="0.2", marker="o", label="measured (CPU)")
    axes[1].scatter([100], [1.605 / 2.863], color="#d62728", marker="*", s=80, zorder=3,
                    label="Pleiss et al. 2017, BC-100, batch 64 (GPU)")
    axes[1].axhline(0.6, color="0.5", linestyle=":", linewidth=1, label="target 0.6")
    axes[1].set(xlabel="depth L", ylabel="memory-efficient / naive", ylim=(0, 1), title="Memory ratio")
    for ax in axes:
        legend_below(ax, ncol=2)
    return ctx.save_figure(fig, "densenet_memory.png")


def _batch(ctx: Context) -> int:
    return conv_setting(ctx.profile, PROFILE)["mem_batch"]


def _plot_accuracy(errs: dict[str, list[float]], params: dict[str, int], ctx: Context) -> str:
    fig, axes = new_figure(2, width=5.2, height=4.2)
    for family, label in (("DenseNet", "DenseNet-BC (k=12)"), ("ResNet", "ResNet (He et al. 2015, CIFAR)")):
        keys = sorted((k for k in errs if k.startswith(family)), key=lambda k: params[k])
        st = STYLES[label]
        m = [mean_sd(errs[k]) for k in keys]
        axes[0].errorbar([params[k] for k in keys], [a for a, _ in m], yerr=[s for _, s in m], color=st["color"],
                         marker=st["marker"], linestyle=st["linestyle"], capsize=3, label=label)
        for k in keys:
            axes[0].scatter([params[k]] * len(errs[k]), errs[k], s=8, color=st["color"], alpha=0.5, zorder=3)
            axes[0].annotate(k.split("-", 1)[1], (params[k], float(np.mean(errs[k]))), textcoords="offset points",
                             xytext=(4, 4), fontsize=7, color=st["color"])
    data = next(iter(ctx.specs.values())).data
    axes[0].set(xlabel="parameters", ylabel="held-out error (%)",
                title=f"Held-out error against parameters\n(mean ± sd, seeds as dots; {data})")
    log_axis(axes[0], "x")
    for family, label in (("DenseNet", "DenseNet-BC (k=12)"), ("ResNet", "ResNet (He et al. 2015, CIFAR)")):
        pts = sorted((p, e, n) for n, p, e in PUBLISHED if family in n)
        axes[1].plot([p for p, _, _ in pts], [e for _, e, _ in pts], color=STYLES[label]["color"],
                     marker=STYLES[label]["marker"], linestyle="none", label=f"Huang et al., {family}")
        for p_, e, n in pts:
            axes[1].annotate(n, (p_, e), textcoords="offset points", xytext=(4, 4), fontsize=6.5)
    axes[1].set(xlabel="parameters (millions)", ylabel="CIFAR-10+ test error (%)", title="Published (Table 2)")
    log_axis(axes[1], "x")
    for ax in axes:
        legend_below(ax)
    return ctx.save_figure(fig, "densenet_accuracy.png")


def _plot_reuse(use: list[np.ndarray], reuse: dict[str, list[list[np.ndarray]]], ctx: Context) -> str:
    weights = [by_column(np.mean(ws, 0)) for ws in zip(*reuse["weights"])]
    blocks = len(use)
    fig = plt.figure(figsize=(4.2 * blocks, 8.0), layout="constrained")
    rows = fig.subfigures(2, 1)
    for sub, (mats, what) in zip(rows, ((use, "What each layer draws from each source on held-out images: "
                                               "mean |<dL/dx_s, x_s>| per feature map (trained, mean over seeds)"),
                                              (weights, "Huang et al.'s Fig. 5 measure: mean |w| of the first weights "
                                                        "over each source's feature maps (trained, mean over seeds)"))):
        sub.suptitle(what, fontsize=9.5)
        axes = sub.subplots(1, blocks, squeeze=False)[0]
        for b, mat in enumerate(mats):
            ax = axes[b]
            n1 = mat.shape[1]
            im = ax.imshow(np.ma.masked_invalid(mat), cmap="viridis", vmin=0, vmax=1, origin="upper")
            ax.set_xticks(range(n1), [str(t + 1) for t in range(n1 - 1)] + ["C" if b == blocks - 1 else "T"],
                          fontsize=7)
            ax.set_yticks(range(n1), ["in"] + [str(s) for s in range(1, n1)], fontsize=7)
            ax.set(xlabel="target layer (T: transition, C: classifier)", ylabel="source layer (in: block input)",
                   title=f"Block {b + 1}")
            sub.colorbar(im, ax=ax, shrink=0.8, label="column max 1" if b == blocks - 1 else None)
    return ctx.save_figure(fig, "densenet_reuse.png")


def _ours(profile: str) -> dict[str, str]:
    p = conv_setting(profile, PROFILE)
    return {"model": f"DenseNet-BC depths {', '.join(map(str, p['dense']))} (k=12) against ResNets "
                     f"{', '.join(map(str, p['resnets']))} (option A); memory: DenseNet-BC at depths "
                     f"{', '.join(map(str, p['mem_depths']))}, batch {p['mem_batch']}, random 3x32x32 inputs, CPU "
                     "allocator (torch.profiler)",
            "data": "instead of CIFAR-10" if p["data"] == "digits" else "",
            "training": "the ResNets with He et al.'s recipe (batch 128, no Nesterov), the same epochs"}


CLAIM = register_claim(Claim(
    name="densenet",
    title="Dense connections: feature reuse at a memory cost",
    statement="DenseNet \"strengthens feature reuse but increases memory cost\": concatenating every earlier "
              "layer's output makes naive feature memory quadratic in depth (linear with shared storage and "
              "recomputation), reaches a ResNet's accuracy with fewer parameters, and deep layers read early "
              "features directly.",
    published="Pleiss et al. 2017: DenseNet-BC-100, batch 64, 2.863 GB naive -> 1.605 GB memory-efficient (0.56x) at "
              "15-20% more time. Huang et al. 2017 (Table 2, CIFAR-10+): DenseNet-BC-100 (0.8M parameters) 4.51% "
              "vs ResNet-110 (1.7M) 6.41%, pre-activation ResNet-1001 (10.2M) 4.62%: about a third of the "
              "parameters for the same error (Fig. 4); Fig. 5: layers spread their weights over all earlier "
              "layers, and weight the transition's output least.",
    runs=plan,
    analyse=analyse,
    paper={"data": "CIFAR-10, 45k/5k split, pad-4 random crop and horizontal flip (C10+)",
           "model": "DenseNet-BC L=100 k=12 (0.8M) to L=190 k=40; ResNets and pre-activation ResNets (Table 2)",
           "optimiser": "SGD, lr 0.1, Nesterov momentum 0.9, batch 64",
           "weight decay": "1e-4",
           "schedule": "lr / 10 at 50% and 75% of training",
           "training": "300 epochs"},
    ours=_ours,
))
