"""The report, from saved claims: tables keep their columns whatever the cells hold, summary cells link to the
claims' sections, smoke verdicts say they are no evidence; and the shared figure helpers."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from reslab import runs
from reslab.report.render import render

NOT_EVIDENCE = "smoke test of the pipeline, not evidence"


def _claim(out: Path, name: str, profile: str, verdict: str = "partly reproduced", **extra) -> None:
    runs.write_json(out / "claims" / name / "claim.json", {
        "claim": name, "title": f"The {name} claim", "statement": "a statement", "published": "a number",
        "profile": profile, "verdict": verdict, "summary": f"{name} measured E||x_l||^2/d.",
        "checks": [], "table": [{"scheme": "Pre-LN", "value": 1.0}], "figures": [], **extra}, sort_keys=False)
    runs.write_json(out / "reproduce.json", {"profile": profile})


def _md_tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table: rows of cells, split on unescaped ``|``, the ``---`` line dropped."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if not all(set(c) <= set("-") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


class _Tables(HTMLParser):
    """Cells per row of every ``<table>``, the ids of all elements and the targets of all links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _html(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    return parser


def test_cells_with_pipes_keep_their_columns_in_markdown_and_html(tmp_path):
    checks = [{"check": "residual closer than plain (|log10 ratio|)", "difference": -0.5, "passed": True}]
    table = [{"scheme": "Pre-LN", "E|x_final|^2/d at 2 layers": 1.5, "note": "E||x_l||^2/d <grows> & more"},
             {"scheme": "a|b", "E|x_final|^2/d at 2 layers": 2.5, "note": "||"}]
    _claim(tmp_path, "growth", "quick", checks=checks, table=table)
    md_path, html_path = render(tmp_path)
    md_tables = _md_tables(md_path.read_text())
    html_tables = _html(html_path).tables
    assert len(md_tables) == len(html_tables) == 3  # summary, checks, measurements
    for tables in (md_tables, html_tables):
        for t in tables:
            assert {len(row) for row in t} == {len(t[0])}, t
        summary, check_rows, measured = tables
        assert check_rows == [["check", "difference", "passed"],
                              ["residual closer than plain (|log10 ratio|)", "-0.5", "yes"]]
        assert measured == [["scheme", "E|x_final|^2/d at 2 layers", "note"],
                            ["Pre-LN", "1.5", "E||x_l||^2/d <grows> & more"], ["a|b", "2.5", "||"]]


def test_summary_cells_link_to_the_claims_sections(tmp_path):
    for name in ("degradation", "paths", "growth"):
        _claim(tmp_path, name, "quick")
    md_path, html_path = render(tmp_path)
    md, page = md_path.read_text(), _html(html_path)
    for name in ("degradation", "paths", "growth"):
        assert f"[{name}](#claim-{name})" in md and f'<a id="claim-{name}"></a>' in md
        assert f"#claim-{name}" in page.hrefs and f"claim-{name}" in page.ids
    assert page.tables[0][2] == ["Gradient highway", "Gradients flow unattenuated to any depth", "",
                                 "not yet measured"]


@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_smoke_verdicts_say_they_are_no_evidence_everywhere(tmp_path, profile):
    _claim(tmp_path, "degradation", profile, verdict="reproduced")
    _claim(tmp_path, "responses", profile, verdict="not reproduced")
    md_path, html_path = render(tmp_path)
    md, html = md_path.read_text(), html_path.read_text()
    # Every verdict, in the summary table and in each section, carries the note on smoke runs (and only on those).
    md_verdicts = re.findall(r"\*\*(?:Verdict: )?((?:not |partly )?reproduced)\*\*( \([^)]*\))?", md)
    html_verdicts = re.findall(r"<b>(?:Verdict: )?((?:not |partly )?reproduced)</b>( <span[^>]*>\([^)]*\))?", html)
    for found in (md_verdicts, html_verdicts):
        assert len(found) == 4  # two claims, each in the summary and in its section
        assert all((NOT_EVIDENCE in note) == (profile == "smoke") for _, note in found), found
    assert (NOT_EVIDENCE in md) == (NOT_EVIDENCE in html) == (profile == "smoke")


def test_log_labels_never_collide_and_styles_stay_distinct():
    from reslab.report.plots import LogLabels, log_axis, new_figure, series_styles

    fig, (a, b, c) = new_figure(3)
    a.plot([2, 4], [0.3, 0.4])
    b.plot([1, 2], [1e-5, 1.0])
    for ax in (a, b):
        log_axis(ax, "x")
        log_axis(ax)
    c.plot([2, 4, 8, 16], [1, 2, 3, 4])
    log_axis(c, "x", ticks=[2, 4, 8, 16])
    fig.canvas.draw()

    def labels(axis):
        return [t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels() if t.get_text()]

    assert set(labels(a.xaxis)) >= {"2", "3", "4"} and all("times" not in t for t in labels(a.xaxis))
    assert all(re.fullmatch(r"\$\\mathdefault\{10\^\{-?\d+\}\}\$", t) for t in labels(b.yaxis)), labels(b.yaxis)
    assert labels(c.xaxis) == ["2", "4", "8", "16"]
    assert isinstance(a.yaxis.get_major_formatter(), LogLabels)
    styles = list(series_styles([f"s{i}" for i in range(12)]).values())
    assert len({s["color"] for s in styles}) == len({s["marker"] for s in styles}) == 12
    look = {(s["color"], s["marker"], s.get("markerfacecolor"))
            for s in series_styles([f"s{i}" for i in range(24)]).values()}
    assert len(look) == 24  # colour, marker shape and fill: the line style alone is hard to tell apart
    plt.close(fig)


def test_reslab_report_rebuilds_from_artifacts_byte_for_byte(tmp_path, capsys, monkeypatch):
    """A smoke reproduction, rebuilt by `reslab report` with no experiment code importable: identical files."""
    import sys

    from reslab.cli import main

    out = tmp_path / "rep"
    assert main(["reproduce", "--profile", "smoke", "--only", "gradient_highway,growth", "--out", str(out),
                 "--jobs", "1", "--quiet"]) == 0
    first = {p: (out / p).read_bytes() for p in ("report.md", "report.html")}
    (out / "report.md").unlink()
    (out / "report.html").write_text("stale")
    monkeypatch.setitem(sys.modules, "reslab.experiments", None)  # rendering must not need the claims' code
    assert main(["report", str(out)]) == 0
    assert {p: (out / p).read_bytes() for p in first} == first
    assert "gradient_highway" in first["report.md"].decode() and b"data:image/png;base64," in first["report.html"]


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "holds no measured claims"),
    (lambda d: runs.write_json(d / "claims" / "growth" / "claim.json", {"claim": "growth"}), "missing title"),
    (lambda d: _claim(d, "growth", "quick", figures=["nope.png"]), "nope.png is missing"),
])
def test_report_of_a_folder_without_a_reproduction_is_one_line(tmp_path, capsys, setup, needle):
    from reslab.cli import main

    setup(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("verdict,title", [("partly reproduced", "Why not fully reproduced"),
                                           ("reproduced", "Ablation")])
def test_the_ablation_is_titled_by_the_verdict_it_explains(tmp_path, verdict, title):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    (tmp_path / "claims" / "dilution").mkdir(parents=True)
    fig.savefig(tmp_path / "claims" / "dilution" / "cause.png")
    plt.close(fig)
    _claim(tmp_path, "dilution", "quick", verdict=verdict,
           ablation={"text": "mean pairwise cosine 0.02: the K^-1/2 law", "table": [{"K": 5, "cosine": 0.02}],
                     "figures": ["cause.png"]},
           recipe=[{"": "data", "published": "CIFAR-10", "ours": "mnist1d"}])
    md_path, html_path = render(tmp_path)
    md, page = md_path.read_text(), _html(html_path)
    assert f"### {title}\n" in md and "the K^-1/2 law" in md and "![cause.png](claims/dilution/cause.png)" in md
    assert f"<h3>{title}</h3>" in html_path.read_text()
    assert ["", "published", "ours"] in page.tables[1] and ["K", "cosine"] in page.tables[-1]
    assert html_path.read_text().count("data:image/png;base64,") == 1


def test_every_summary_row_is_measured_by_registered_claims():
    """Each row of the seed's summary table names at least one claim, every named claim is one `reproduce` runs,
    and the seed's statements measured since (projection shortcuts, pre-activation, learning-rate sensitivity) sit in
    the rows they qualify."""
    from reslab.experiments import list_claims
    from reslab.report.render import SUMMARY_ROWS

    registered = {c.name for c in list_claims()}
    rows = {prop: names for prop, _, _, names in SUMMARY_ROWS}
    assert all(names and set(names) <= registered for names in rows.values()), rows
    assert "shortcuts" in rows["Identity default"] and "preactivation" in rows["Gradient highway"]
    assert "lr_sensitivity" in rows["Additive accumulation"]
