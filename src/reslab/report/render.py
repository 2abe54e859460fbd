"""The reproduction report: Markdown and a self-contained HTML page, both built from the saved ``claim.json`` files.

The report opens with the summary table of residual connections' properties (property, benefit, limitation) from
the text the claims are quoted from, each row linking the claims measured for it to their sections with their
verdicts; then one section per claim: the statement, the published number, the verdict with the checks it was
computed from, the measured table and the plots. A verdict measured on the ``smoke`` profile says, wherever it
appears, that it tests the pipeline and is no evidence. The HTML is rendered from the claim data with Jinja2
(autoescaped), never parsed back from the Markdown; Markdown table cells escape ``|``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jinja2

from reslab import runs

# The closing summary table of the text the claims are quoted from; each row lists the claims that measure it.
SUMMARY_ROWS = [
    ("Identity default", "Easy optimization, layers learn perturbations", "Uniform aggregation, no prioritization",
     ["degradation", "responses", "dilution", "shortcuts"]),
    ("Gradient highway", "Gradients flow unattenuated to any depth", "", ["gradient_highway", "preactivation"]),
    ("Implicit ensemble (2^L paths)", "Robustness, graceful degradation", "Effective depth much less than nominal",
     ["ensemble", "paths"]),
    ("Additive accumulation", "Simple, parameter-free", "O(L) norm growth, signal dilution at scale",
     ["growth", "dilution", "transformers", "lr_sensitivity"]),
]
SUMMARY_TITLE = "Summary: the properties of residual connections, with our measured verdicts"
SUMMARY_HEADER = ["Property", "Benefit", "Limitation", "Measured (verdict per claim)"]
SMOKE_NOTE = "smoke test of the pipeline, not evidence"
SMOKE_BANNER = ("Smoke profile: tiny models trained for a few steps, to check that every stage of the pipeline runs. "
                "Its verdicts are computed like real ones but say nothing for or against any claim; the quick and "
                "full profiles measure the claims.")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> dict[str, list]:
    """``{"header": [...], "rows": [[...], ...]}`` of formatted cells: every key, in first-seen order, the
    outcome of a check (``passed``) last."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if "passed" in keys:
        keys.append(keys.pop(keys.index("passed")))
    return {"header": keys, "rows": [[_fmt(r.get(k, "")) for k in keys] for r in rows]}


CLAIM_KEYS = ("claim", "title", "statement", "published", "profile", "verdict", "summary", "checks", "table",
              "figures")


def load_claims(out: Path) -> list[dict[str, Any]]:
    """Every ``claim.json`` under ``out/claims``: in the order of ``reproduce.json``'s ``claims``, then by name.

    Raises:
        ValueError: no claims there, or a ``claim.json`` without the keys a report needs.
    """
    files = {p.parent.name: p for p in (out / "claims").glob("*/claim.json")}
    if not files:
        raise ValueError(f"{out} holds no measured claims (no claims/*/claim.json): nothing to report")
    order = list(read_meta(out).get("claims", []))
    claims = []
    for name in sorted(files, key=lambda n: (order.index(n) if n in order else len(order), n)):
        c = runs.read_json(files[name])
        missing = [k for k in CLAIM_KEYS if not isinstance(c, dict) or k not in c]
        if missing:
            raise ValueError(f"{files[name]} is not a reslab claim result (missing {', '.join(missing)})")
        claims.append(dict(c, dir=f"claims/{name}"))
    return claims


def read_meta(out: Path) -> dict[str, Any]:
    """``reproduce.json``: the profile, version, date and claim order of the reproduction in ``out``."""
    path = out / "reproduce.json"
    meta = runs.read_json(path) if path.exists() else {}
    return meta if isinstance(meta, dict) else {}


def sections(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What both formats show of each claim, from its ``claim.json`` alone, cells formatted."""
    out = []
    for c in claims:
        note = SMOKE_NOTE if c.get("profile") == "smoke" else ""
        out.append({"name": c["claim"], "anchor": f"claim-{c['claim']}", "title": c["title"],
                    "statement": c["statement"], "published": c["published"], "profile": c["profile"],
                    "verdict": c["verdict"], "note": note, "summary": c["summary"],
                    "recipe": _table(c.get("recipe", [])),
                    "checks": _table(c["checks"]), "measurements": _table(c["table"]),
                    "budget": _budget(c.get("budget")), "ablation": _ablation(c),
                    "figures": [f"{c['dir']}/{f}" for f in c["figures"]]})
    return out


def _ablation(c: dict[str, Any]) -> dict[str, Any] | None:
    """The ablation part of a section, titled by what it is for: explaining a verdict below ``reproduced``."""
    a = c.get("ablation")
    if not a:
        return None
    title = "Why not fully reproduced" if c["verdict"] != "reproduced" else "Ablation"
    return {"title": title, "text": a["text"], "table": _table(a.get("table", [])),
            "figures": [f"{c['dir']}/{f}" for f in a.get("figures", [])]}


def _budget(b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The budget-stability part of a section: what K multiplied, both verdicts and the per-check table."""
    if not b:
        return None
    k = b["factor"]
    text = (f"Rerun at {k}x the budget ({k}x {b['what']}): verdict {b['verdict_1x']} at 1x, "
            f"{b[f'verdict_{k}x']} at {k}x; " + ("every check has the same outcome at both budgets." if b["agree"]
                                                 else "some checks change outcome, so the verdict is inconclusive "
                                                      "at this budget."))
    return {"text": text, "table": _table(b["checks"])}


def _figures(sec: dict[str, Any]) -> list[str]:
    return sec["figures"] + (sec["ablation"]["figures"] if sec["ablation"] else [])


def summary_rows(secs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary table's rows, each with the sections of the claims measured for it."""
    by_name = {s["name"]: s for s in secs}
    return [{"cells": [prop, benefit, limit], "claims": [by_name[n] for n in names if n in by_name]}
            for prop, benefit, limit, names in SUMMARY_ROWS]


def render(out: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` from its saved artifacts only (``reproduce.json`` and
    each ``claims/NAME/claim.json`` with its figures): the same files give byte-identical reports.

    Raises:
        ValueError: ``out`` holds no claims, or a claim file or figure is missing.
    """
    secs = sections(load_claims(out))
    missing = [f for sec in secs for f in _figures(sec) if not (out / f).is_file()]
    if missing:
        raise ValueError(f"figure {out / missing[0]} is missing: rerun `reslab reproduce` on {out}")
    info = read_meta(out)
    meta = {k: info[k] for k in ("profile", "reslab", "date") if k in info}
    summary = summary_rows(secs)
    md_path, html_path = out / "report.md", out / "report.html"
    runs.write_text(md_path, markdown(meta, summary, secs))
    images = {f: "data:image/png;base64," + base64.b64encode((out / f).read_bytes()).decode()
              for s in secs for f in _figures(s)}
    runs.write_text(html_path, _TEMPLATE.render(meta=meta, summary=summary, sections=secs, images=images,
                                                smoke=any(s["note"] for s in secs), banner=SMOKE_BANNER,
                                                summary_title=SUMMARY_TITLE, summary_header=SUMMARY_HEADER))
    return md_path, html_path


# --- Markdown ---------------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    """A table cell: ``|`` escaped, one line."""
    return " ".join(text.replace("|", "\\|").split())


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    line = lambda cells: "| " + " | ".join(map(_md_cell, cells)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)]) + "\n"


def _md_verdict(s: dict[str, Any], prefix: str = "") -> str:
    return f"**{prefix}{s['verdict']}**" + (f" ({s['note']})" if s["note"] else "")


def markdown(meta: dict[str, str], summary: list[dict[str, Any]], secs: list[dict[str, Any]]) -> str:
    """The report as Markdown."""
    md = ["# reslab reproduction report\n", ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n"]
    if any(s["note"] for s in secs):
        md.append(f"> **{SMOKE_BANNER}**\n")
    measured = ["; ".join(f"[{s['name']}](#{s['anchor']}): {_md_verdict(s)}" for s in row["claims"])
                or "not yet measured" for row in summary]
    md += [f"## {SUMMARY_TITLE}\n",
           _md_table(SUMMARY_HEADER, [row["cells"] + [m] for row, m in zip(summary, measured)])]
    for s in secs:
        md += [f'<a id="{s["anchor"]}"></a>\n', f"## {s['title']} (`{s['name']}`, profile {s['profile']})\n",
               f"**Claim.** {s['statement']}\n", f"**Published.** {s['published']}\n",
               *(["### Recipe: published and ours\n", _md_table(**s["recipe"])] if s["recipe"]["rows"] else []),
               f"{_md_verdict(s, 'Verdict: ')}. {s['summary']}\n",
               "### Checks\n", _md_table(**s["checks"])]
        if s["budget"]:
            md += ["### Budget stability\n", s["budget"]["text"] + "\n", _md_table(**s["budget"]["table"])]
        md += ["### Measurements\n", _md_table(**s["measurements"])]
        md += [f"![{Path(f).name}]({f})\n" for f in s["figures"]]
        if s["ablation"]:
            a = s["ablation"]
            md += [f"### {a['title']}\n", a["text"] + "\n", _md_table(**a["table"])]
            md += [f"![{Path(f).name}]({f})\n" for f in a["figures"]]
    return "\n".join(md)


# --- HTML -------------------------------------------------------------------------------------------------------

_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
          "table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto;max-width:100%}"
          "td,th{border:1px solid #bbb;padding:3px 8px;font-size:0.9em;vertical-align:top}th{background:#eee}"
          "img{max-width:100%}.smoke{color:#a04000}"
          "p.banner{border:2px solid #a04000;background:#fff4e8;padding:0.6em 1em}")

#: what every reslab HTML page shares: an autoescaping environment and the table macro (nothing for no rows)
ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
TABLE_MACRO = """\
{% macro table(t) %}
{% if t.rows %}
<table>
<tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in t.rows %}
<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% endif %}
{% endmacro %}
"""

_TEMPLATE = ENV.from_string(TABLE_MACRO + """\
{% macro verdict(s, prefix="") %}<b>{{ prefix }}{{ s.verdict }}</b>\
{% if s.note %} <span class="smoke">({{ s.note }})</span>{% endif %}\
{% endmacro %}
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reslab reproduction report</title>
<style>""" + _STYLE + """</style></head>
<body>
<h1>reslab reproduction report</h1>
<p>{% for k, v in meta.items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</p>
{% if smoke %}<p class="banner smoke"><b>{{ banner }}</b></p>{% endif %}
<h2>{{ summary_title }}</h2>
<table>
<tr>{% for h in summary_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in summary %}
<tr>{% for cell in row.cells %}<td>{{ cell }}</td>{% endfor %}<td>
{%- for s in row.claims %}<a href="#{{ s.anchor }}">{{ s.name }}</a>: {{ verdict(s) }}\
{% if not loop.last %}; {% endif %}\
{% else %}not yet measured{% endfor %}</td></tr>
{% endfor %}
</table>
{% for s in sections %}
<h2 id="{{ s.anchor }}">{{ s.title }} (<code>{{ s.name }}</code>, profile {{ s.profile }})</h2>
<p><b>Claim.</b> {{ s.statement }}</p>
<p><b>Published.</b> {{ s.published }}</p>
{% if s.recipe.rows %}
<h3>Recipe: published and ours</h3>
{{ table(s.recipe) }}
{% endif %}
<p>{{ verdict(s, "Verdict: ") }}. {{ s.summary }}</p>
<h3>Checks</h3>
{{ table(s.checks) }}
{% if s.budget %}
<h3>Budget stability</h3>
<p>{{ s.budget.text }}</p>
{{ table(s.budget.table) }}
{% endif %}
<h3>Measurements</h3>
{{ table(s.measurements) }}
{% for f in s.figures %}
<p><img alt="{{ f }}" src="{{ images[f] }}"></p>
{% endfor %}
{% if s.ablation %}
<h3>{{ s.ablation.title }}</h3>
<p>{{ s.ablation.text }}</p>
{{ table(s.ablation.table) }}
{% for f in s.ablation.figures %}
<p><img alt="{{ f }}" src="{{ images[f] }}"></p>
{% endfor %}
{% endif %}
{% endfor %}
</body></html>
""")
