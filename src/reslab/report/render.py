"""The reproduction report: Markdown and a self-contained HTML page, from the saved ``claim.json`` files.

The report opens with the seed document's summary table (property, benefit, limitation), each row holding the
verdicts of the claims measured for it, then one section per claim: the statement, the published number, the
verdict with the checks it was computed from, the measured table and the plots.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from reslab import runs

# The seed's closing summary table; each row lists the claims that measure it.
SUMMARY_ROWS = [
    ("Identity default", "Easy optimization, layers learn perturbations", "Uniform aggregation, no prioritization",
     ["degradation", "responses", "dilution"]),
    ("Gradient highway", "Gradients flow unattenuated to any depth", "", ["gradient_highway"]),
    ("Implicit ensemble (2^L paths)", "Robustness, graceful degradation", "Effective depth much less than nominal",
     ["ensemble", "paths"]),
    ("Additive accumulation", "Simple, parameter-free", "O(L) norm growth, signal dilution at scale",
     ["growth", "dilution", "transformers"]),
]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every column, in first-seen order
    if "passed" in keys:  # a check's outcome reads last
        keys.append(keys.pop(keys.index("passed")))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def load_claims(out: Path) -> list[dict[str, Any]]:
    """Every ``claim.json`` under ``out/claims``, in the order they were run."""
    files = sorted((out / "claims").glob("*/claim.json"), key=lambda p: p.stat().st_mtime)
    return [dict(runs.read_json(p), dir=str(p.parent.relative_to(out))) for p in files]


def render(out: Path, meta: dict[str, str]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out`` from its saved claims."""
    from reslab.experiments import get_claim

    claims = load_claims(out)
    by_name = {c["claim"]: c for c in claims}
    md = ["# reslab reproduction report\n", ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n",
          "## Summary (the seed's table, with our measured verdicts)\n",
          "| Property | Benefit | Limitation | Measured |", "|---|---|---|---|"]
    for prop, benefit, limit, names in SUMMARY_ROWS:
        measured = "; ".join(f"{n}: **{by_name[n]['verdict']}**" for n in names if n in by_name) or "not yet measured"
        md.append(f"| {prop} | {benefit} | {limit} | {measured} |")
    md.append("")
    for c in claims:
        spec = get_claim(c["claim"])
        md += [f"## {spec.title} (`{c['claim']}`, profile {c['profile']})\n",
               f"**Claim.** {spec.statement}\n", f"**Published.** {spec.published}\n",
               f"**Verdict: {c['verdict']}.** {c['summary']}\n", "### Checks\n",
               _md_table([{k: v for k, v in ch.items()} for ch in c["checks"]]),
               "### Measurements\n", _md_table(c["table"])]
        md += [f"![{f}]({c['dir']}/{f})\n" for f in c["figures"]]
    text = "\n".join(md)
    md_path, html_path = out / "report.md", out / "report.html"
    runs.write_text(md_path, text)
    runs.write_text(html_path, _html(text, out))
    return md_path, html_path


def _html(md: str, out: Path) -> str:
    """A small Markdown-to-HTML pass for the subset the report uses; images are embedded."""
    body: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r) <= set("|-")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(x)}</td>" for x in r) + "</tr>" for r in rest)
                        + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("!["):
            src = line[line.index("(") + 1:line.rindex(")")]
            data = base64.b64encode((out / src).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(src)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
             "font-size:0.9em}th{background:#eee}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>reslab report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(s: str) -> str:
    import re

    s = html.escape(s.strip())
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)
