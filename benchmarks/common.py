"""What the benchmark scripts share: reading what the last `dvc repro` measured."""

from __future__ import annotations

import argparse
import json
import math
import subprocess

from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.evaluation import vocabulary as v
from genlab.tracking import RunRecord
from genlab.training import RUN_FILE


def read_last_repro(doc: str, argv: list[str] | None) -> int | None:
    """Command line of a benchmark that reads the last `dvc repro`: `--repro` runs it first;
    `--seed k` picks the training seed whose results are read (default: the first of
    `seeds`). Returns that option (None: the default)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repro", action="store_true", help="run `dvc repro` first")
    parser.add_argument("--seed", type=int, help="training seed (default: the first of seeds)")
    args = parser.parse_args(argv)
    if args.repro:
        subprocess.run(["dvc", "repro"], check=True)
    return args.seed


def family_metrics(family: str, seed: int) -> dict[str, float]:
    return json.loads(paths.family_metrics(family, seed).read_text())


def baseline_metrics() -> dict[str, dict[str, float]]:
    """The copycat, held-out real and real-data rows (metrics/baselines.json)."""
    return json.loads(paths.BASELINE_METRICS.read_text())


def cell(metrics: dict[str, float], key: str, digits: int = 3) -> str:
    """ "1.234 [1.100, 1.400]": the value with its interval (or standard error), "n/a" if absent."""
    e = v.estimate(metrics, key)
    if not math.isfinite(e.value):
        return "n/a"
    if not e.has_interval:
        return f"{e.value:.{digits}f}"
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def train_seconds(family: str, seed: int) -> float:
    """Wall time of the family's training, as its MLflow run recorded it."""
    record = RunRecord.load(paths.family_model_dir(family, seed) / RUN_FILE)
    history = MlflowClient(record.tracking_uri).get_metric_history(record.run_id, v.TRAIN_WALL_S)
    # A re-run that resumes a finished checkpoint logs its few seconds again; the fit is the max.
    return max((m.value for m in history), default=math.nan)
