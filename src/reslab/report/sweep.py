"""The sweep report: a table of a final metric over the sweep's axes (mean and spread over seeds) and one plot per
axis, as Markdown and a self-contained HTML page, built from ``sweep.json`` and the run directories only.

A config is a point of the grid without its seed; its cell averages the final metric of its finished runs (a
diverged run's metric is not averaged: the cell says how many diverged). Each plot puts one axis on x (points,
not lines, for a categorical axis) and draws one series per value of the ``residual`` axis (when it is an axis and
not the one on x), averaging over every other axis, with the standard deviation over the averaged runs as error
bars.
"""

from __future__ import annotations

import base64
import math
import statistics
from pathlib import Path
from typing import Any

from reslab import runs
from reslab.report.render import _STYLE, ENV, TABLE_MACRO, _md_table
from reslab.sweep import METRICS, STATES, _final

SERIES_AXIS = "residual"


def load(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The plan and one row per run: ``id``, ``axes``, ``state`` (from its directory, or the index's ``failed``
    with its error) and ``final`` metrics."""
    plan = runs.read_json(root / "sweep.json")
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list):
        raise ValueError(f"{root / 'sweep.json'} is not a sweep plan")
    index = runs.read_json(root / "index.json").get("runs", {}) if (root / "index.json").exists() else {}
    rows = []
    for r in plan["runs"]:
        state, final = _final(root / "runs" / r["id"])
        old = index.get(r["id"], {})
        if state == "pending" and old.get("state") in ("failed", "running"):
            state = old["state"]
        rows.append({"id": r["id"], "axes": r["axes"], "state": state, "final": final,
                     "error": old.get("error") if state == "failed" else None})
    return plan, rows


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def grid_table(plan: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> dict[str, list]:
    """One row per config (axes without ``seed``): its axis values, finished runs, the metric's mean ± sd."""
    axes = [a for a in plan["axes"] if a != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(repr(r["axes"][a]) for a in axes), []).append(r)
    header = axes + ["runs", f"{metric} (mean ± sd over seeds)"]
    out = []
    for members in groups.values():
        vals = [m["final"][metric] for m in members if m["state"] == "done" and m["final"]
                and m["final"].get(metric) is not None]
        states = ", ".join(f"{n} {s}" for s in STATES if (n := sum(m["state"] == s for m in members)))
        out.append([str(members[0]["axes"][a]) for a in axes] + [states, _stat(vals)])
    return {"header": header, "rows": out}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_axis(plan: dict[str, Any], rows: list[dict[str, Any]], axis: str, metric: str, path: Path) -> bool:
    """``metric`` against ``axis``; False when no run has finished."""
    from reslab.report import plots

    values = plan["axes"][axis]
    series = plan["axes"].get(SERIES_AXIS, [None]) if axis != SERIES_AXIS else [None]
    numeric = all(_is_number(v) for v in values)
    xs = values if numeric else list(range(len(values)))
    fig, ax = plots.new_figure(width=5.5, height=4.0)
    styles = plots.series_styles([str(s) for s in series])
    drawn = False
    for s in series:
        mean, sd = [], []
        for v in values:
            vals = [r["final"][metric] for r in rows if r["state"] == "done" and r["final"]
                    and r["final"].get(metric) is not None and r["axes"][axis] == v
                    and (s is None or r["axes"][SERIES_AXIS] == s)]
            mean.append(statistics.fmean(vals) if vals else math.nan)
            sd.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if all(math.isnan(m) for m in mean):
            continue
        drawn = True
        label = None if s is None else f"{SERIES_AXIS} = {s}"
        style = styles[str(s)] if numeric else {**styles[str(s)], "linestyle": "none"}  # categories: no line
        ax.errorbar(xs, mean, yerr=sd, capsize=3, label=label, **style)
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return False
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
        plots.log_axis(ax, "x", ticks=values)
    elif numeric:
        ax.set_xticks(values, [f"{v:g}" for v in values])
    else:
        ax.set_xticks(xs, [str(v) for v in values], rotation=30 if max(len(str(v)) for v in values) > 8 else 0)
    ax.set_xlabel(axis)
    ax.set_ylabel(f"final {metric}")
    others = [a for a in plan["axes"] if a not in (axis, SERIES_AXIS)]
    ax.set_title(f"{metric} vs {axis}" + (f" (mean over {', '.join(others)})" if others else ""), fontsize=9)
    plots.legend_below(ax)
    plots.save_figure(fig, path)
    return True


def render_sweep(root: Path, metric: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/metric_vs_AXIS.png`` into the sweep folder ``root``."""
    plan, rows = load(root)
    metric = metric or plan.get("metric", "test_error")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    counts = {s: n for s in STATES if (n := sum(r["state"] == s for r in rows))}
    table = grid_table(plan, rows, metric)
    failed = {"header": ["run", "error"], "rows": [[r["id"], r["error"] or ""] for r in rows if r["state"] == "failed"]}
    figures = []
    for axis, values in plan["axes"].items():
        if axis != "seed" and len(values) > 1:
            rel = f"figures/{metric}_vs_{axis.replace('.', '_')}.png"
            (root / "figures").mkdir(exist_ok=True)
            if plot_axis(plan, rows, axis, metric, root / rel):
                figures.append(rel)
    axes_line = "; ".join(f"{a}: {', '.join(map(str, v))}" for a, v in plan["axes"].items())
    state_line = ", ".join(f"{n} {s}" for s, n in counts.items())
    md = ["# reslab sweep report\n", f"{len(rows)} runs: {state_line}. Metric: final `{metric}`.\n",
          f"Axes: {axes_line}.\n", "## Results\n", _md_table(**table)]
    md += [f"![{Path(f).name}]({f})\n" for f in figures]
    if failed["rows"]:
        md += ["## Failed runs\n", _md_table(**failed)]
    md_path, html_path = root / "report.md", root / "report.html"
    runs.write_text(md_path, "\n".join(md))
    images = {f: "data:image/png;base64," + base64.b64encode((root / f).read_bytes()).decode() for f in figures}
    runs.write_text(html_path, _TEMPLATE.render(n=len(rows), states=state_line, metric=metric, axes=axes_line,
                                                results=table, figures=figures, images=images, failed=failed))
    return md_path, html_path


_TEMPLATE = ENV.from_string(TABLE_MACRO + """\
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reslab sweep report</title>
<style>""" + _STYLE + """</style></head>
<body>
<h1>reslab sweep report</h1>
<p>{{ n }} runs: {{ states }}. Metric: final <code>{{ metric }}</code>.</p>
<p>Axes: {{ axes }}.</p>
<h2>Results</h2>
{{ table(results) }}
{% for f in figures %}
<p><img alt="{{ f }}" src="{{ images[f] }}"></p>
{% endfor %}
{% if failed.rows %}
<h2>Failed runs</h2>
{{ table(failed) }}
{% endif %}
</body></html>
""")
