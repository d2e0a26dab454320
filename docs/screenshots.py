"""Regenerate every picture the documentation shows, from a fresh run of the embedded example.

In a throw-away copy of the project it runs ``kedro run --env example --pipeline example``,
then ``compare`` and ``lr_find`` on the example (``--label-efficiency`` adds that pipeline, a
few minutes more), unless ``--project`` names a folder where they ran. Then:

* it copies the run's own figures, each dataset's latest version under ``data/08_reporting/``:
  docs/run/ (confusion matrix, learning curves, misclassified images, Grad-CAM, data quality,
  the classification report that docs/getting-started.md shows),
  docs/compare/ (the comparison plot and table), docs/lr_find.png, docs/label_efficiency/;
* it opens kedro-viz and the MLflow UI of that project in Debian's Chromium, driven by
  Playwright, and takes: the finetune graph at a zoom where node labels read
  (docs/kedro-viz-finetune.png), the runs table (docs/mlflow-runs.png), the runs' chart view
  (docs/mlflow-runs-chart.png), the example run's per-epoch validation charts
  (docs/mlflow-run-metrics.png) and its registered model with the ``champion`` alias
  (docs/mlflow-registry.png).

    pip install -e ".[screenshots]"        # playwright; it drives /usr/bin/chromium
    python docs/screenshots.py [--project FOLDER] [--label-efficiency] [--no-browser]

Look at every picture it writes before committing them.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM = "/usr/bin/chromium"
#: docs/<picture>: data/08_reporting/<dataset> (each dataset's latest version)
FIGURES = {
    "run/confusion_matrix.png": "confusion_matrix.png",
    "run/learning_curves.png": "learning_curves.png",
    "run/misclassified.png": "misclassified.png",
    "run/grad_cam.png": "grad_cam.png",
    "run/data_quality.png": "data_quality.png",
    "run/classification_report.txt": "classification_report.txt",
    "compare/comparison_curves.png": "comparison_curves.png",
    "compare/comparison.md": "comparison.md",
    "lr_find.png": "lr_find.png",
    "label_efficiency/label_efficiency.png": "label_efficiency.png",
    "label_efficiency/label_efficiency.md": "label_efficiency.md",
}
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}


def fresh_run(label_efficiency: bool) -> Path:
    """A copy of the project (conf without local settings, src, pyproject.toml) in a temporary
    folder, where the example, then compare and lr_find on it, ran."""
    project = Path(tempfile.mkdtemp(prefix="headswap_pictures_")) / "project"
    for name in ("conf", "src"):
        shutil.copytree(ROOT / name, project / name,
                        ignore=shutil.ignore_patterns("local", "__pycache__"))
    (project / "conf" / "local").mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    for local in ("data/01_raw/fashion-mnist",):  # your own copy of the IDX files, if any
        if (ROOT / local).is_dir():
            shutil.copytree(ROOT / local, project / local)
    pipelines = ["example", "compare", "lr_find"] + (["label_efficiency"] * label_efficiency)
    for pipeline in pipelines:
        command = [sys.executable, "-m", "kedro", "run", "--env", "example", "--pipelines",
                   pipeline]
        print("$", " ".join(command[2:]), f"(in {project})", flush=True)
        subprocess.run(command, cwd=project, env=ENV, check=True)
    return project


def latest(project: Path, name: str) -> Path | None:
    """The latest version of ``data/08_reporting/<name>`` (a versioned dataset's folder of
    versions, or a plain file), or None when the run did not write it."""
    path = project / "data" / "08_reporting" / name
    if path.is_dir():
        versions = sorted(v for v in path.iterdir() if (v / name).is_file())
        return versions[-1] / name if versions else None
    return path if path.is_file() else None


def copy_figures(project: Path) -> None:
    for target, name in FIGURES.items():
        source = latest(project, name)
        if source is None:
            print(f"not written by the run, kept as it was: docs/{target}")
            continue
        (DOCS / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, DOCS / target)
        print(f"docs/{target}  <-  {source.relative_to(project)}")


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
                              start_new_session=True, env=ENV)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise SystemExit(f"{' '.join(command)} did not start; see {log.name}") from None
            time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def click_visible(page, selector: str) -> None:
    for element in page.locator(selector).all():
        if element.is_visible():
            element.click()


def kedro_viz(project: Path, browser) -> None:
    """The finetune graph, menu and minimap hidden, zoomed in on the recipe's nodes (about 60%)
    so that every label in the picture reads."""
    port = free_port()
    server = serve([sys.executable, "-m", "kedro", "viz", "run", "--host", "127.0.0.1",
                    "--port", str(port), "--no-browser"], project,
                   f"http://127.0.0.1:{port}/api/main")
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.goto(f"http://127.0.0.1:{port}/?pid=finetune")
        page.wait_for_selector("text=train_head")
        page.wait_for_timeout(3000)  # the feature tour opens a moment after the graph
        for selector in (".feature-hints__close", "text=Dismiss", '[aria-label="Hide menu"]',
                         '[aria-label="Turn minimap off"]'):
            click_visible(page, selector)
        page.wait_for_timeout(1000)
        anchor = page.locator("svg text", has_text=re.compile(r"^swap_head$")).first
        box = anchor.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"])
        for _ in range(4):  # d3 zooms around the pointer
            page.mouse.wheel(0, -120)
            page.wait_for_timeout(300)
        page.mouse.move(1290, 1390)  # no node hovered
        page.wait_for_timeout(6000)  # until the hints toast has gone
        page.screenshot(path=str(DOCS / "kedro-viz-finetune.png"))
    finally:
        stop(server)


def mlflow_ui(project: Path, browser) -> None:
    import mlflow

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                    f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port",
                    str(port), "--workers", "1"], project, f"{url}/health")
    try:
        client = mlflow.MlflowClient(url)
        experiment = client.get_experiment_by_name("headswap").experiment_id
        run = next(r for r in client.search_runs([experiment])
                   if r.info.run_name.startswith("example - "))
        model = client.search_registered_models()[0].name
        page = browser.new_page(viewport={"width": 1600, "height": 1000})

        def show(path: str, picture: str | None = None) -> None:
            page.goto(url + path)
            page.wait_for_timeout(6000)  # the page loads its data
            for text in ("Model training", "Got it"):  # the UI's mode, a feature tip
                for element in page.get_by_text(text, exact=True).all():
                    if element.is_visible():
                        element.click()
            click_visible(page, '[data-component-id="mlflow.assistant.chat_panel.close"]')
            page.wait_for_timeout(2000)
            if picture:
                page.screenshot(path=str(DOCS / picture))

        page.set_viewport_size({"width": 1600, "height": 480})
        show(f"/#/experiments/{experiment}/runs", "mlflow-runs.png")
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.locator('input[name="runs-view-mode"][value="CHART"]').evaluate("e => e.click()")
        page.wait_for_timeout(3000)
        page.get_by_placeholder("Search metric charts").fill("accuracy")
        page.wait_for_timeout(6000)  # the charts render
        page.screenshot(path=str(DOCS / "mlflow-runs-chart.png"))
        show(f"/#/experiments/{experiment}/runs/{run.info.run_id}/model-metrics")
        page.get_by_placeholder("Search metric charts").fill("epoch.")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(DOCS / "mlflow-run-metrics.png"))
        page.set_viewport_size({"width": 1600, "height": 620})
        show(f"/#/models/{model}", "mlflow-registry.png")
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path,
                        help="a project folder where the example, compare and lr_find ran")
    parser.add_argument("--label-efficiency", action="store_true",
                        help="also run label_efficiency on the example (a few minutes more)")
    parser.add_argument("--no-browser", action="store_true",
                        help="copy the run's figures only, take no screenshot")
    args = parser.parse_args()
    project = (args.project or fresh_run(args.label_efficiency)).resolve()
    copy_figures(project)
    if args.no_browser:
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        kedro_viz(project, browser)
        mlflow_ui(project, browser)
        browser.close()
    print(f"pictures written under {DOCS}; look at each before committing them")


if __name__ == "__main__":
    main()
