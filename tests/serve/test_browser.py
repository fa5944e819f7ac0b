"""The page in a real browser: `python -m src.serve` on a free port, Debian's Chromium driven by Playwright (no
browser download), two photos through the page's file input; the numbers on the page equal the API's; the quadrat
area is remembered; the CSV holds what is shown; a screenshot is saved."""
from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from biomass5head.constants import TARGETS

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="no Chromium on this machine: install Debian's package (apt-get install chromium; .ci/run does)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_predict(url: str, paths: list[Path]) -> dict:
    import httpx

    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return {r["name"]: r for r in httpx.post(f"{url}/api/predict", files=files, timeout=60).json()["results"]}


@pytest.fixture
def server(serve_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "src.serve", "--model-dir", str(serve_run), "--port", str(port),
                             "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stdout.read()[-2000:]}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}" in out  # the address to open is logged


def test_two_photos_through_the_page_show_the_apis_numbers(server, tiny_data, tmp_path):
    from playwright.sync_api import sync_playwright

    photos = sorted((tiny_data / "test").iterdir())[:2]
    api = _api_predict(server, photos)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
        page.goto(server)
        page.wait_for_function("!document.getElementById('model-info').textContent.startsWith('Loading')")
        assert "test_vit" in page.inner_text("#model-info")
        page.set_input_files("#files", [str(p) for p in photos])
        page.wait_for_function("document.getElementById('status').dataset.done === '2'", timeout=60_000)
        cards = page.query_selector_all("article.card")
        assert sorted(c.get_attribute("data-name") for c in cards) == sorted(p.name for p in photos)
        for c in cards:
            name = c.get_attribute("data-name")
            for t in TARGETS:
                shown = float(c.query_selector(f"tr[data-target='{t}'] td.grams").get_attribute("data-value"))
                assert shown == pytest.approx(api[name]["grams"][t], rel=1e-12)
                lo = float(c.query_selector(f"tr[data-target='{t}'] td.range").get_attribute("data-lo"))
                assert lo == pytest.approx(api[name]["range"][t][0], rel=1e-12)
            total = c.query_selector("tr[data-target='Dry_Total_g'] td.kgha").inner_text().replace(",", "")
            assert float(total) == pytest.approx(round(api[name]["kg_per_ha"]["Dry_Total_g"]), abs=1)
        page.wait_for_timeout(300)  # the tile-weight overlays draw when the images have loaded
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("BIOMASS5HEAD_SCREENSHOT"):
            shutil.copy(shot, os.environ["BIOMASS5HEAD_SCREENSHOT"])

        with page.expect_download() as download:
            page.click("#download")
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert sorted(r["image"] for r in rows) == sorted(p.name for p in photos)
        for r in rows:
            assert float(r["Dry_Total_g"]) == pytest.approx(api[r["image"]]["grams"]["Dry_Total_g"], rel=1e-9)

        # The quadrat area: kg/ha follows it, and the browser remembers it.
        page.fill("#area", "0.42")
        name = cards[0].get_attribute("data-name")
        cell = f"article.card[data-name='{name}'] tr[data-target='Dry_Total_g'] td.kgha"
        assert float(page.inner_text(cell).replace(",", "")) == pytest.approx(
            round(api[name]["grams"]["Dry_Total_g"] / 0.42 * 10), abs=1)
        page.reload()
        assert page.input_value("#area") == "0.42"
        browser.close()
