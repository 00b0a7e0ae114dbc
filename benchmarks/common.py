"""What the benchmark scripts share: reading what the last `dvc repro` measured."""

from __future__ import annotations

import argparse
import json
import math
import subprocess

from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.tracking import RunRecord
from genlab.training import RUN_FILE


def read_last_repro(doc: str, argv: list[str] | None) -> None:
    """Command line of a benchmark that reads the last `dvc repro`: `--repro` runs it first."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repro", action="store_true", help="run `dvc repro` first")
    if parser.parse_args(argv).repro:
        subprocess.run(["dvc", "repro"], check=True)


def family_metrics(family: str) -> dict[str, float]:
    return json.loads(paths.family_metrics(family).read_text())


def train_seconds(family: str) -> float:
    """Wall time of the family's training, as its MLflow run recorded it."""
    record = RunRecord.load(paths.family_model_dir(family) / RUN_FILE)
    history = MlflowClient(record.tracking_uri).get_metric_history(record.run_id, "train/wall_s")
    # A re-run that resumes a finished checkpoint logs its few seconds again; the fit is the max.
    return max((m.value for m in history), default=math.nan)
