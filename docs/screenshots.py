"""Take the README's screenshots of what users see, in Debian's Chromium driven by Playwright:
kedro-viz's finetune graph (docs/kedro-viz-finetune.png) and the MLflow UI's runs of the
project (docs/mlflow-runs.png, then the same runs in its chart view, docs/mlflow-runs-chart.png).

    pip install playwright        # drives /usr/bin/chromium; downloads no browser
    python docs/screenshots.py [PROJECT] [--mlflow-only]   # a project folder (default: this one)
"""

from __future__ import annotations

import os
import random
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
    """A free port below 49152: kedro-viz refuses ports in the ephemeral range."""
    for port in random.sample(range(20000, 49152), 200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise SystemExit("No free TCP port on 127.0.0.1 between 20000 and 49151.")


def serve(command: list[str], cwd: Path, url: str) -> subprocess.Popen:
    """Start a server; return once ``url`` answers."""
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


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


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
        stop(server)


def mlflow_ui(project: Path, browser) -> None:
    import mlflow

    port = free_port()
    server = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                    f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port",
                    str(port), "--workers", "1"], project, f"http://127.0.0.1:{port}/health")
    try:
        experiment = mlflow.MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name(
            "headswap")
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs")
        page.wait_for_timeout(5000)  # the runs load
        for text in ("Model training", "Got it"):  # the UI's mode, a feature tip
            for element in page.get_by_text(text, exact=True).all():
                if element.is_visible():
                    element.click()
        for close in page.get_by_role("button", name="Close").all():  # assistant panel
            if close.is_visible():
                close.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=str(DOCS / "mlflow-runs.png"))
        page.mouse.click(296, 120)  # the view switch's chart button (list | chart | table)
        page.wait_for_timeout(6000)  # the charts render
        page.screenshot(path=str(DOCS / "mlflow-runs-chart.png"))
    finally:
        stop(server)


def main() -> None:
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]
    project = Path(folders[0] if folders else DOCS.parent).resolve()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        if "--mlflow-only" not in sys.argv:
            kedro_viz(project, browser)
        mlflow_ui(project, browser)
        browser.close()
    print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
