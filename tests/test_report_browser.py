"""The HTML report in a real browser (Debian's headless Chromium, which `make test` installs): it loads with no
script or console error, every embedded figure decodes, and a screenshot of it is not blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from reslab.cli import main

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="headless Chromium not installed (make test installs Debian's chromium)")

# Runs on load: counts images that failed to decode and collects script errors into an attribute of <body>.
PROBE = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.setAttribute('data-probe', JSON.stringify({images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt), errors: window.__errors}));
});</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is missing: make test installs it"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "rep"
    assert main(["reproduce", "--profile", "smoke", "--only", "gradient_highway,growth", "--out", str(out),
                 "--jobs", "1", "--quiet"]) == 0
    return out / "report.html"


def test_report_loads_without_errors_and_every_figure_decodes(report):
    probed = report.with_name("probed.html")
    probed.write_text(report.read_text().replace("<head>", "<head>" + PROBE, 1))
    run = _chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'data-probe="([^"]*)"', run.stdout)
    assert found, "the page never finished loading"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["images"] >= 2 and probe["broken"] == [] and probe["errors"] == [], probe
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console


def test_screenshot_is_not_blank(report, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    ink = (pixels < 0.9).any(axis=-1).mean()  # share of pixels that are not near-white
    assert pixels.shape[:2] == (1600, 1200) and 0.02 < ink < 0.9, ink
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50  # text, tables and a figure, not one colour
