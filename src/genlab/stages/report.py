"""Stage `report`: reports/summary.md, reports/figures/, reports/real_data.json."""

import json
import math
from pathlib import Path

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import read_meta
from genlab.errors import GenlabError
from genlab.evaluation.report import (
    family_reports,
    grid_panels,
    pixel_probe,
    real_data_floor,
    summary_markdown,
    write_figures,
)
from genlab.io import write_json_atomic, write_text_atomic
from genlab.tracking import log_report


def _read_json(path: Path, stage: str) -> dict[str, float]:
    if not path.is_file():
        raise GenlabError(f"{path} not found: run `dvc repro {stage}` first")
    return json.loads(path.read_text())


def main(params: Params) -> None:
    meta = read_meta(paths.PREPARED)
    metrics = {f: _read_json(paths.family_metrics(f), f"evaluate@{f}") for f in params.families}
    evaluator = _read_json(paths.EVALUATOR_METRICS, "evaluator")
    real = real_data_floor(paths.PREPARED, paths.EVALUATOR, params.evaluate)
    real["test/probe_acc"] = pixel_probe(paths.PREPARED, c=params.representation.probe_c)
    write_json_atomic(paths.REAL_DATA_METRICS, real)

    families = family_reports(metrics, params)
    grids = grid_panels(families)
    evaluator_accuracy = float(evaluator.get("test/accuracy", math.nan))
    figures = write_figures(
        families,
        real,
        evaluator_accuracy=evaluator_accuracy,
        ood_sets=params.prediction.ood_sets,
        grids=grids,
        out_dir=paths.REPORT_FIGURES,
    )
    summary = summary_markdown(
        families,
        real,
        evaluator_accuracy=evaluator_accuracy,
        dataset=meta.dataset,
        dims=meta.dims,
        ood_sets=params.prediction.ood_sets,
        statistic=params.prediction.statistic,
        fpr=params.prediction.fpr,
        grids=grids,
    )
    write_text_atomic(paths.REPORT_SUMMARY, summary)
    log_report(
        params.tracking.uri,
        params.experiment_name,
        real,
        data_sha256=meta.data_sha256,
        artifacts=[paths.REPORT_SUMMARY, paths.REAL_DATA_METRICS, *figures],
    )
    print(summary)
