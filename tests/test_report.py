"""The HTML report opens in headless Chromium (Debian's package; `make install` adds it) with
every image decoded and every table laid out, and no errors."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api.server import Sidelight
from service.client.report import Report, explanation_report
from sidelight.client import Client
from tests import plot_cases
from tests.conftest import MODELS, background_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000", "--dump-dom"]
# Injected into a copy of the report: after the page has loaded, write what rendered into it.
PROBE = """<script>
const errors = [];
addEventListener("error", e => errors.push(String(e.message || (e.target && e.target.src))), true);
addEventListener("load", () => {
  const images = [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0,
    width: i.naturalWidth, shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table")].map(t => ({rows: t.rows.length,
    shown: t.getBoundingClientRect().height}));
  const out = document.createElement("pre");
  out.id = "rendered";
  out.textContent = JSON.stringify({images, tables, errors});
  document.body.appendChild(out);
});
</script>"""

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's "
                                "package `chromium`; `make install` adds it when it can)")


def rendered(page: str, tmp_path: Path) -> dict[str, Any]:
    """Open the page (with the probe) in headless Chromium; what its images and tables did."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "probed.html"
    path.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    done = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="rendered">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe output; chromium said: {done.stderr[-1500:]}"
    return json.loads(html.unescape(found.group(1)))  # type: ignore[no-any-return]


def assert_renders(page: str, tmp_path: Path, images: int, tables: int) -> None:
    seen = rendered(page, tmp_path)
    assert seen["errors"] == []
    assert len(seen["images"]) == images and all(i["ok"] and i["shown"] > 100
                                                 for i in seen["images"])
    assert len(seen["tables"]) == tables and all(t["rows"] >= 1 and t["shown"] > 10
                                                 for t in seen["tables"])


@pytest.fixture(scope="module")
def client(app: Sidelight) -> Iterator[Client]:
    with Client(f"127.0.0.1:{app.port}") as c:
        yield c


def test_a_report_of_rows_and_dataset_wide_results_renders(client: Client,
                                                           tmp_path: Path) -> None:
    e = client.explain("diabetes_forest", background_of("diabetes_forest")[:12], method="tree",
                       budget_ms=5000)
    report = explanation_report(e, max_rows=3)
    for result in (plot_cases.permutation_importance(), plot_cases.pdp(),
                   plot_cases.pdp_2d(classes=True), plot_cases.activations(),
                   plot_cases.attention(), plot_cases.embedding()):
        report.add(result)
    page = report.html()
    assert "<script" not in page and "http" not in page  # self-contained, nothing to fetch
    # request + (beeswarm, mean |attribution|) + 3 rows + importance, pdp + 6 global figures
    assert_renders(page, tmp_path, images=2 + 3 + 6, tables=1 + 1 + 3 + 2)


def test_image_and_text_reports_render(client: Client, tmp_path: Path) -> None:
    digits = client.explain("digits_cnn", np.load(MODELS / "digits_cnn" / "background.npy")[:2])
    assert_renders(explanation_report(digits).html(), tmp_path / "image", images=2, tables=3)
    words = client.explain("text_sentiment", ["not bad", "a really tedious film"])
    page = explanation_report(words).html()
    assert "tedious" in page
    assert_renders(page, tmp_path / "text", images=2, tables=3)


def test_the_check_sees_a_broken_image(tmp_path: Path) -> None:
    page = Report("broken").paragraph("x").html().replace(
        "</body>", '<img src="data:image/png;base64,AAAA" alt="broken"></body>')
    seen = rendered(page, tmp_path)
    assert [i["ok"] for i in seen["images"]] == [False] and seen["errors"]
