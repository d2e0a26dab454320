"""Take the README's screenshots of what users see, in Debian's Chromium driven by Playwright:
kedro-viz's finetune graph (docs/kedro-viz-finetune.png).

    pip install playwright        # drives /usr/bin/chromium; downloads no browser
    python docs/screenshots.py [PROJECT]   # a project folder (default: this one)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(command: list[str], cwd: Path, url: str) -> subprocess.Popen:
    log = open(cwd / "screenshots.log", "w")  # noqa: SIM115 - the server writes to it
    server = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True,
                              env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{' '.join(command)} did not start; see {log.name}") from None
            time.sleep(0.5)


def kedro_viz(project: Path, browser) -> None:
    port = free_port()
    server = serve([sys.executable, "-m", "kedro", "viz", "run", "--host", "127.0.0.1",
                    "--port", str(port), "--no-browser"], project,
                   f"http://127.0.0.1:{port}/api/main")
    try:
        page = browser.new_page(viewport={"width": 1600, "height": 1300})
        page.goto(f"http://127.0.0.1:{port}/?pid=finetune")
        page.wait_for_selector("text=train_head")
        page.wait_for_timeout(3000)  # the feature tour opens a moment after the graph
        for close in (".feature-hints__close", "text=Dismiss"):  # feature tour, banner
            for element in page.locator(close).all():
                if element.is_visible():
                    element.click()
        page.wait_for_timeout(6000)  # until the hints toast has gone
        page.screenshot(path=str(DOCS / "kedro-viz-finetune.png"))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    project = Path(sys.argv[1] if len(sys.argv) > 1 else DOCS.parent).resolve()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        kedro_viz(project, browser)
        browser.close()
    print(f"written {DOCS / 'kedro-viz-finetune.png'}")


if __name__ == "__main__":
    main()
