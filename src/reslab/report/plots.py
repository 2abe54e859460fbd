"""Figure helpers shared by every claim: a headless backend, one panel layout with legends outside the data,
series styles that stay distinct (and the same in every panel), readable log axes, and atomic PNG writes."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from cycler import cycler  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from reslab import runs  # noqa: E402

# Twelve colours, markers and line styles: twelve series differ in colour and marker, neighbours also in line style;
# series 13-24 reuse the colours with hollow markers of another shape and a dotted line, so that no two of 24
# series share colour, marker shape and fill (a claim comparing 23 designs). Every axes of :func:`new_figure` cycles
# through the colours and line styles (no markers, which would clutter dense curves); :func:`series_styles` adds the
# markers.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#000000", "#b8860b"]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p"]
LINESTYLES = ["-", "--", "-.", ":"]
STYLES = [dict(color=c, marker=m, linestyle=LINESTYLES[i % 3], markersize=4)
          for i, (c, m) in enumerate(zip(COLORS, MARKERS))]
CYCLE = cycler(color=[s["color"] for s in STYLES]) + cycler(linestyle=[s["linestyle"] for s in STYLES])


def series_styles(labels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A fixed style (colour, marker, line style) per label, in order: pass the same labels to every panel and
    figure of a claim so that one series looks the same everywhere."""
    out = {}
    n = len(STYLES)
    for i, label in enumerate(labels):
        style = dict(STYLES[i % n])
        if i >= n:
            style.update(marker=MARKERS[(i + n // 2) % n], markerfacecolor="none", linestyle=LINESTYLES[3])
        out[label] = style
    return out


def new_figure(panels: int = 1, width: float = 5.0, height: float = 3.8) -> tuple[Any, Any]:
    """A figure of ``panels`` side-by-side panels (one axes, or a list of them).

    Each panel is a subfigure of its own, so :func:`legend_below` can put a panel's legend under it, outside the
    data; every axes cycles through :data:`CYCLE`.
    """
    fig = plt.figure(figsize=(width * panels, height), layout="constrained")
    axes = [fig.add_subplot()] if panels == 1 else [sub.add_subplot() for sub in fig.subfigures(1, panels)]
    for ax in axes:
        ax.set_prop_cycle(CYCLE)
    return fig, axes[0] if panels == 1 else axes


def legend_below(target: Any, ncol: int | None = None, fontsize: float = 7.5,
                 axes: Sequence[Any] | None = None) -> None:
    """A legend under the data, never over it.

    ``target`` an axes: that panel's legend, under the panel. ``target`` a figure: one legend for the series of
    ``axes`` (default: all its panels), each label once, under the whole figure, for series shared between panels.
    """
    if isinstance(target, Axes):
        axes, host = [target], target.figure
    else:
        axes, host = (target.axes if axes is None else axes), target
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if not seen:
        return
    col = 0.5 + 0.55 * fontsize / 72 * max(map(len, seen))  # inches: handle and text of the longest label
    ncol = ncol or max(1, min(len(seen), int(0.95 * host.bbox.width / host.dpi / col)))
    host.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=ncol, fontsize=fontsize,
                frameon=False)


class LogLabels(ticker.LogFormatterSciNotation):
    """Log-axis labels that never run into each other: plain numbers (``0.02``, ``3``) when every visible value lies
    in ``[0.001, 10000)``, otherwise powers of ten on the decades only (other ticks unlabelled, unless the view holds
    fewer than two decades)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = super().__call__(x, pos)
        if not label:
            return label
        lo, hi = sorted(self.axis.get_view_interval())
        if lo >= 1e-3 and hi < 1e4:
            return f"{x:g}"
        decades = math.floor(math.log10(hi)) - math.ceil(math.log10(max(lo, 1e-300))) + 1
        is_decade = abs(math.log10(abs(x)) - round(math.log10(abs(x)))) < 1e-9 if x else False
        return label if is_decade or decades < 2 else ""


def log_axis(ax: Any, axis: str = "y", ticks: Sequence[float] | None = None) -> None:
    """Put ``ax``'s ``axis`` ("x" or "y") on a log scale with :class:`LogLabels`; with ``ticks`` (e.g. the depths
    measured), ticks exactly there, labelled as plain numbers, and no minor ticks."""
    getattr(ax, f"set_{axis}scale")("log")
    a = getattr(ax, f"{axis}axis")
    if ticks is not None:
        a.set_major_locator(ticker.FixedLocator(list(ticks)))
        a.set_major_formatter(ticker.FixedFormatter([f"{t:g}" for t in ticks]))
        a.set_minor_locator(ticker.NullLocator())
    else:
        a.set_major_formatter(LogLabels())
        a.set_minor_formatter(LogLabels(labelOnlyBase=False))


def integer_axis(ax: Any, axis: str = "x") -> None:
    """Ticks on integers only, for indices (blocks, sublayers, epochs, sources)."""
    getattr(ax, f"{axis}axis").set_major_locator(ticker.MaxNLocator(integer=True))


def count(n: int, noun: str) -> str:
    """``count(1, "layer") == "1 layer"``, ``count(4, "layer") == "4 layers"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    runs.write_bytes(path, buf.getvalue())
