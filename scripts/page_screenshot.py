"""Screenshot of the web page with photos on it (docs/serve_screenshot.png): starts `python -m src.serve` on a free
port, opens the page in Debian's Chromium through Playwright, chooses the photos and waits for the results.

    .venv/bin/python scripts/page_screenshot.py --model-dir RUN --photos a.jpg b.jpg --out docs/serve_screenshot.png
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--photos", nargs="+", required=True)
    p.add_argument("--out", default=str(ROOT / "docs" / "serve_screenshot.png"))
    p.add_argument("--width", type=int, default=1200)
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "src.serve", "--model-dir", args.model_dir, "--port", str(port),
                               "--device", "cpu"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            chromium = shutil.which("chromium") or "/usr/bin/chromium"
            browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(url)
            page.set_input_files("#files", args.photos)
            page.wait_for_function(f"document.getElementById('status').dataset.done === '{len(args.photos)}'",
                                   timeout=120_000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
