"""Screenshots of the MLflow UI over a genlab store, taken by headless Chromium (docs/mlflow-ui/).

    uv run scripts/mlflow_ui_screenshots.py                       # the repository's mlflow.db
    uv run scripts/mlflow_ui_screenshots.py --store sqlite:////path/mlflow.db --out docs/mlflow-ui

Starts `mlflow server` on a free port of 127.0.0.1 over the store (read only: nothing is logged),
opens the experiment's runs table, a family's training run (overview and model metrics), the
model registry and one registered model version, and saves each as a PNG. Needs a Chromium
(`apt install chromium`); the UI is a JavaScript app, so each page is given time to render
(--virtual-time-budget).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("mlflow_ui_screenshots: no Chromium found; install one (apt install chromium)")


def shoot(browser: str, url: str, out: Path, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1600,1000",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    print(f"{out}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--family", default="diffusion")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow-ui")
    parser.add_argument("--budget-ms", type=int, default=40000, help="render time per page")
    args = parser.parse_args()
    browser = chromium()
    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"mlflow_ui_screenshots: no experiment {args.experiment!r} in {args.store}")
    eid = experiment.experiment_id
    (run,) = client.search_runs([eid], f"tags.family = '{args.family}'", max_results=1)
    name = f"{args.experiment}-{args.family}"
    versions = client.search_model_versions(f"name = '{name}'", max_results=1)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = os.environ | {"MLFLOW_BACKEND_STORE_URI": args.store}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("mlflow_ui_screenshots: the MLflow server did not start")
                time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        rid = run.info.run_id
        pages = {
            "runs.png": f"{base}/#/experiments/{eid}/runs",
            "charts.png": f"{base}/#/experiments/{eid}/runs?compareRunsMode=CHART",
            "training-run.png": f"{base}/#/experiments/{eid}/runs/{rid}",
            "training-run-metrics.png": f"{base}/#/experiments/{eid}/runs/{rid}/model-metrics",
            "system-metrics.png": f"{base}/#/experiments/{eid}/runs/{rid}/system-metrics",
            "models.png": f"{base}/#/models",
        }
        if versions:
            pages["model-version.png"] = f"{base}/#/models/{name}/versions/{versions[0].version}"
        for file, url in pages.items():
            # MLflow 3.17 opens its GenAI workspace whatever the experiment's kind; this query
            # (or the "Model training" switch, which the browser remembers) selects the other.
            url += ("&" if "?" in url else "?") + "workflowType=machine_learning"
            shoot(browser, url, args.out / file, args.budget_ms)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
