"""The figures of ``reslab diagnose``: one function per measurement, drawn from its saved arrays.

Every figure is titled with the measurement and the run (model / residual, data), every axis is labelled with
its quantity and unit, and quantities in different units get their own panel. Depth axes name the blocks
(``block0 ...``, or ``attn0, mlp0, ...`` for transformers, whose branches are sublayers); a stream axis runs over
the stream entering each block and ends with ``final``, the trunk's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

_MAX_TICK_LABELS = 16  # name every position on a depth axis up to this many, else plain integer ticks


@dataclass(frozen=True)
class Context:
    """What a figure says about its run.

    Attributes:
        run: ``model / residual (data)``, for titles.
        blocks: a label per branch (``block0, ...`` or ``attn0, mlp0, ...``).
        unit: ``"block"`` or ``"sublayer"`` (transformers).
        target: what the loss and error are per: ``"sample"`` or ``"token"``.
        changes: the blocks that change the stream's shape (stride or width: a CNN's stage boundaries, DenseNet's
            transitions): those that random lesions keep (``scheme.deletable``).
    """

    run: str
    blocks: tuple[str, ...]
    unit: str = "block"
    target: str = "sample"
    changes: tuple[int, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, cfg: Any, y: Tensor) -> "Context":
        from reslab.diagnostics.decomposition import branch_labels
        from reslab.diagnostics.lesion import deletable

        blocks = tuple(branch_labels(model))
        specs = model.trunk.scheme.specs
        unit = "sublayer" if any(s.role in ("attn", "mlp") for s in specs) else "block"  # DenseNet's too
        kept = set(deletable(model))
        changes = tuple(i for i in range(len(specs)) if i not in kept)
        return cls(f"{cfg.model} / {cfg.residual} ({cfg.data})", blocks, unit, "token" if y.dim() > 1 else "sample",
                   changes)

    @property
    def stream_labels(self) -> tuple[str, ...]:
        """Positions on a stream axis: the stream entering each block, then ``final``."""
        return (*self.blocks, "final")


def _plots() -> Any:
    """:mod:`reslab.report.plots`, imported when a figure is drawn (so the registry loads without matplotlib)."""
    from reslab.report import plots

    return plots


def save(fig: Any, path: Path) -> None:
    """Write ``fig`` as PNG (atomically) and close it."""
    _plots().save_figure(fig, path)


def _figure(panels: int, title: str, ctx: Context, width: float = 5.0, height: float = 4.2) -> tuple[Any, list]:
    fig, axes = _plots().new_figure(panels, width=width, height=height)
    fig.suptitle(f"{title}\n{ctx.run}", fontsize=11)
    return fig, list(np.atleast_1d(axes))


def _depth_axis(ax: Any, ctx: Context, stream: bool = False) -> np.ndarray:
    """Label ``ax``'s x axis with the blocks (or the stream positions); returns the x positions."""
    labels = ctx.stream_labels if stream else ctx.blocks
    x = np.arange(len(labels))
    if len(labels) <= _MAX_TICK_LABELS:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45 if ctx.unit == "sublayer" or len(labels) > 8 else 0,
                           ha="right" if ctx.unit == "sublayer" or len(labels) > 8 else "center", fontsize=8)
    ax.set_xlim(-0.5, len(labels) - 0.5)  # the whole depth, also where a quantity has gaps
    # A block that changes the shape starts a new stage: the stream entering the next block has the new shape.
    for i in ctx.changes:
        ax.axvline(i + 0.5 if stream else i - 0.5, color="0.75", linestyle=":", lw=1)
    where = f"stream entering {ctx.unit} (final: trunk output)" if stream else f"{ctx.unit} (depth order, 0-based)"
    ax.set_xlabel(where + ("\ndotted: a stage boundary (the stream changes shape)" if ctx.changes else ""))
    return x


def _from_zero(ax: Any, *values: np.ndarray) -> None:
    """A y axis from 0 to a little above the largest finite value."""
    top = max((float(np.nanmax(v)) for v in values if np.isfinite(v).any()), default=0.0)
    if top > 0:
        ax.set_ylim(0, 1.08 * top)


def _by_role(ax: Any, x: np.ndarray, v: np.ndarray, ctx: Context, style: str = "o-", **kw) -> None:
    """Plot ``v`` per block; transformers get one series per sublayer role (attention, MLP; the caller adds the
    legend)."""
    roles = sorted({b.rstrip("0123456789") for b in ctx.blocks})
    if len(roles) == 1:
        ax.plot(x, v, style, ms=4, **kw)
        return
    for role in roles:
        idx = np.asarray([i for i, b in enumerate(ctx.blocks) if b.rstrip("0123456789") == role])
        if not np.isfinite(v[idx]).any():
            continue  # nothing measured for this role (a DenseNet transition cannot be deleted): no empty legend entry
        label = f"{role} sublayers" if ctx.unit == "sublayer" else f"{role}s"  # DenseNet: blocks, transitions
        ax.plot(x[idx], v[idx], style, ms=4, label=label, **kw)


def responses(a: dict, ctx: Context) -> Any:
    fig, (ax1, ax2) = _figure(2, "Residual responses: std of each branch output F_i(x)", ctx)
    _by_role(ax1, _depth_axis(ax1, ctx), a["std"], ctx)
    _plots().legend_below(ax1)
    ylabel = "std of the branch output $F_i(x)$\n(per channel, mean over channels)"
    ax1.set(ylabel=ylabel, title="in layer order")
    ax2.plot(np.arange(1, len(a["sorted"]) + 1), a["sorted"], "o-", ms=4)
    ax2.set(xlabel=f"rank of the {ctx.unit} (largest response first)", ylabel=ylabel,
            title="sorted (He et al. 2015, Fig. 7 bottom)")
    _plots().integer_axis(ax2)
    for ax in (ax1, ax2):
        _from_zero(ax, a["std"])
    return fig


def stream(a: dict, ctx: Context) -> Any:
    fig, (ax1, ax2, ax3) = _figure(3, "Residual stream: norm per depth and contributions", ctx, width=4.6)
    x = _depth_axis(ax1, ctx, stream=True)
    ax1.plot(x, a["norm"], "o-", ms=4)
    ax1.set(ylabel=rf"mean $\|x_i\|$ per {ctx.target} (L2 norm)", title="stream norm")
    _from_zero(ax1, a["norm"])
    x = _depth_axis(ax2, ctx, stream=True)
    ax2.plot(x, a["norm_sq_per_dim"], "o-", ms=4, color="C1")
    ax2.set(ylabel=r"$E\|x_i\|^2 / d$ (energy per coordinate)", title="stream energy per coordinate")
    _from_zero(ax2, a["norm_sq_per_dim"])
    x = _depth_axis(ax3, ctx)
    share, proj = np.asarray(a["share"], float), np.asarray(a["projection"], float)
    ax3.plot(x, share, "o-", ms=4, color="C2", label=r"share $E\|c_i\| / \|x_{final}\|$")
    ax3.plot(x, proj, "s--", ms=4, color="C3", label=r"projection $\langle c_i, x_{final}\rangle / \|x_{final}\|^2$")
    ax3.axhline(0, color="0.6", lw=0.8)
    ax3.set(ylabel="fraction of the final stream (dimensionless)", title=f"what each {ctx.unit} added (c_i)")
    _plots().legend_below(ax3)
    if not np.isfinite(share).all():
        ax3.set_title(f"what each {ctx.unit} added (c_i)\n(none where c_i has another shape than the final stream)",
                      fontsize=10)
    return fig


def grads(a: dict, ctx: Context) -> Any:
    fig, (ax1, ax2) = _figure(2, "Gradient per depth (L: mean training loss in nats, one batch in training mode)",
                              ctx)
    x = _depth_axis(ax1, ctx)
    ax1.plot(x, a["stream"], "o-", ms=4)
    _plots().log_axis(ax1)
    ax1.set(ylabel=r"$\|\partial L/\partial x_i\|$" + "\n(Frobenius norm over the batch)",
            title=f"gradient reaching the stream entering each {ctx.unit}")
    x = _depth_axis(ax2, ctx)
    _by_role(ax2, x, np.where(a["params"] > 0, a["params"], np.nan), ctx)
    _plots().legend_below(ax2)
    _plots().log_axis(ax2)
    ax2.set(ylabel=r"$\|\partial L/\partial \theta_i\|$" + "\n(all parameters of branch i)",
            title="gradient of each branch's parameters")
    return fig


def gates(a: dict, ctx: Context) -> Any:
    fig, (ax1, ax2) = _figure(2, "Highway transform gates T (0: carry, 1: transform)", ctx)
    from matplotlib.ticker import MaxNLocator

    n = len(a["mean"])
    im = ax1.imshow(a["hist"].T, origin="lower", aspect="auto", extent=(-0.5, n - 0.5, 0, 1), cmap="viridis")
    ax1.plot(np.arange(n), a["mean"], "o-", color="C3", ms=3, label="mean gate T per layer")
    _depth_axis(ax1, ctx)
    ax1.set(ylabel="gate value T (dimensionless)", title="distribution of gate values per layer")
    _plots().legend_below(ax1)
    ax1.figure.colorbar(im, ax=ax1, label="fraction of gate values")
    im = ax2.imshow(a["per_class"].T, origin="lower", aspect="auto", extent=(-0.5, n - 0.5, -0.5,
                    a["per_class"].shape[1] - 0.5), cmap="viridis")  # own colour range: classes differ by little
    _depth_axis(ax2, ctx)
    target = "next-token class" if ctx.target == "token" else "class of the sample"
    ax2.set(ylabel=target, title="mean gate per class (colour range: these values)")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.figure.colorbar(im, ax=ax2, label="mean gate value T")
    return fig


def lesion(a: dict, ctx: Context) -> Any:
    fig, (ax1, ax2, ax3) = _figure(3, f"Lesions: deleting and reordering {ctx.unit}s at test time", ctx, width=4.6)
    base = 100 * float(a["baseline"])
    ylabel = f"error (% of {ctx.target}s)"
    x = _depth_axis(ax1, ctx)
    _by_role(ax1, x, 100 * a["single"], ctx)
    ax1.set(ylabel=ylabel, title=f"one {ctx.unit} deleted")
    ks, errs = a["ks"], 100 * np.asarray(a["k_errors"]).reshape(len(a["ks"]), -1)
    for k, e in zip(ks, errs):
        ax2.plot(np.full(len(e), k), e, ".", color="C0", alpha=0.5)
    if len(ks):
        ax2.plot(ks, errs.mean(1), "o-", color="C0", label="mean of random draws")
        ax2.set_xticks(ks)
    ax2.set(xlabel=f"number of random {ctx.unit}s deleted", ylabel=ylabel, title=f"k random {ctx.unit}s deleted")
    ax3.plot(a["taus"], 100 * a["reorder_errors"], "o", ms=4, alpha=0.7)
    if not len(a["taus"]):
        ax3.text(0.5, 0.5, "no reordering under this scheme", ha="center", va="center", transform=ax3.transAxes)
        ax3.set_xticks([])
    ax3.set(xlabel="Kendall tau of the order (1: unchanged)", ylabel=ylabel,
            title=f"{ctx.unit}s reordered (random swaps)")
    top = min(100.0, max(base, np.nanmax(100 * a["single"]), np.max(errs, initial=0),
                         np.max(100 * a["reorder_errors"], initial=0)))
    for ax in (ax1, ax2, ax3):
        ax.axhline(base, color="k", linestyle=":", label=f"intact {base:.1f}%")
        ax.set_ylim(0, top * 1.08 + 1)  # one scale on all three panels, every point inside the frame
        _plots().legend_below(ax)
    return fig


def paths(a: dict, ctx: Context) -> Any:
    from reslab.diagnostics.paths import PathProfile, binomial_length_distribution, plot_paths

    fig, (ax1, ax2) = _figure(2, "Gradient per path length", ctx)
    prof = PathProfile(lengths=a["lengths"], exact_norm=a["exact_norm"], veit_mean=a.get("veit_mean"),
                       veit_total=a.get("veit_total"), path_counts=a["path_counts"],
                       full_grad_norm=float(a.get("full_grad_norm", np.nan)))
    plot_paths(prof, ax1)
    ax1.get_legend().remove()
    _plots().log_axis(ax1)
    _plots().legend_below(ax1)
    k = a["lengths"]
    n = len(k) - 1
    ax1.set(ylabel="norm of the gradient at the trunk input\n(Frobenius over the batch)",
            title=f"gradient norm per path length (true gradient {prof.full_grad_norm:.3g})")
    for ax in (ax1, ax2):
        _plots().integer_axis(ax)
    exact = a["exact_norm"] / a["exact_norm"].sum()
    ax2.plot(k, exact, "o-", ms=3, label=rf"exact $\|c_k\|$ (mean length {float(a['effective_depth_exact']):.2f})")
    if "veit_total" in a:
        veit = np.nan_to_num(a["veit_total"]) / np.nansum(a["veit_total"])
        ax2.plot(k, veit, "s--", ms=3, label=f"Veit estimate (mean {float(a['effective_depth_veit']):.2f})")
    ax2.plot(k, binomial_length_distribution(n), ":", color="0.4", label=f"path counts $C(n,k)/2^n$ (mean {n / 2:g})")
    ax2.set(xlabel="path length k (branches on the path)", ylabel="fraction of the total (dimensionless)",
            title="share per path length (mean: effective depth)")
    _plots().legend_below(ax2)
    return fig


def update(a: dict, ctx: Context) -> Any:
    fig, (ax,) = _figure(1, f"Effective update size: one step on one {ctx.unit}", ctx, width=6.5)
    x = _depth_axis(ax, ctx)
    ax.plot(x, a["adam"], "o-", ms=4, label="Adam first step, lr 1e-3")
    ax.plot(x, a["sgd"], "s--", ms=4, label="SGD step, lr 0.1")
    _plots().log_axis(ax)
    ax.set(ylabel=r"$\|f(\theta + \delta_i) - f(\theta)\| \,/\, \|f(\theta)\|$" + "\n(relative output change)",
           title=f"one optimiser step on the parameters of {ctx.unit} i alone")
    _plots().legend_below(ax)
    return fig


def decomposition(a: dict, ctx: Context) -> Any:
    dla = "direct_logit_attribution" in a
    fig, axes = _figure(3 if dla else 2, "Residual decomposition of the final stream", ctx,
                        width=4.6 if dla else 5.0)
    labels = list(a["labels"])
    x = np.arange(len(labels))
    panels = [(a["shares"], r"norm share $E\|c_j\| / \|x_{final}\|$" + "\n(dimensionless)", "size of each component"),
              (a["projections"], r"projection $\langle c_j, x_{final}\rangle / \|x_{final}\|^2$"
               + "\n(dimensionless, sums to 1)",
               f"fraction of the final stream explained (sum {a['projections'].sum():.3f})")]
    if dla:
        panels.append((a["direct_logit_attribution"], "direct effect on the target logit\n(logit units, nats)",
                       "direct logit attribution (frozen final norm)"))
    roles = np.asarray([labels[0]] + [b.rstrip("0123456789") for b in labels[1:]])
    ticks = x[:: -(-len(x) // _MAX_TICK_LABELS)]  # at most _MAX_TICK_LABELS named components
    for ax, (v, ylabel, title) in zip(axes, panels):
        for k, role in enumerate(dict.fromkeys(roles)):
            idx = np.flatnonzero(roles == role)
            ax.bar(x[idx], np.asarray(v)[idx], color="C7" if k == 0 else f"C{k - 1}",
                   label=role if k == 0 else f"{role} {ctx.unit}s")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[i] for i in ticks], rotation=45, ha="right", fontsize=8)
        ax.set(xlabel=f"component ({labels[0]}, then each {ctx.unit})", ylabel=ylabel, title=title)
    if len(set(roles)) > 2:  # transformers: which colour is which sublayer
        _plots().legend_below(axes[0])
    return fig


def lens(a: dict, ctx: Context) -> Any:
    has_loss = bool(np.isfinite(a["loss"]).any())
    fig, axes = _figure(2 if has_loss else 1, "Logit lens: each depth's stream decoded with the model's head", ctx,
                        width=5.0 if has_loss else 6.5)
    panels = [(a["kl"], "KL(final output || decoded stream)", "distance to the model's output", "C1")]
    if has_loss:
        panels.insert(0, (a["loss"], "loss of the decoded stream", "loss against the targets", "C0"))
    for ax, (v, what, title, color) in zip(axes, panels):
        x = _depth_axis(ax, ctx, stream=True)
        ax.plot(x, v, "o-", ms=4, color=color)
        ax.set(ylabel=f"{what}\n(nats per {ctx.target})", title=title)
        _from_zero(ax, v)
        if not np.isfinite(v).all():
            ax.set_title(f"{title}\n(streams of another shape: not decoded)", fontsize=10)
    return fig
