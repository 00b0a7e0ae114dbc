"""Stage `report`: reports/summary.md, reports/figures/, reports/real_data.json.

Families are compared only when every metrics file records the protocol the current params
give (the same one the real-data floor is computed under, from the cached reference features);
reports/real_data.json records it too.
"""

import json
import math
from pathlib import Path

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import read_meta
from genlab.errors import GenlabError
from genlab.evaluation.fidelity import check_protocols, load_reference, measurement
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


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise GenlabError(f"{path} not found: run `dvc repro {stage}` first")
    return json.loads(path.read_text())


def main(params: Params) -> None:
    meta = read_meta(paths.PREPARED)
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, meta)
    files = {f: _read_json(paths.family_metrics(f), f"evaluate@{f}") for f in params.families}
    check_protocols(
        {str(paths.family_metrics(f)): m.get("protocol") for f, m in files.items()}, protocol
    )
    metrics = {f: {k: v for k, v in m.items() if k != "protocol"} for f, m in files.items()}
    evaluator = _read_json(paths.EVALUATOR_METRICS, "evaluator")
    real = real_data_floor(load_reference(paths.REFERENCE, protocol), params.evaluate)
    real["test/probe_acc"] = pixel_probe(paths.PREPARED, c=params.representation.probe_c)
    write_json_atomic(paths.REAL_DATA_METRICS, real | {"protocol": protocol.as_dict()})

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
        extractor=protocol.extractor,
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
