"""Stage `report`: reports/summary.md, reports/comparison.png, reports/real_data.json."""

import json

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import read_meta
from genlab.evaluation.report import comparison_figure, real_data_floor, summary_markdown
from genlab.io import write_json_atomic, write_text_atomic
from genlab.tracking import log_report


def main(params: Params) -> None:
    meta = read_meta(paths.PREPARED)
    families = {f: json.loads(paths.family_metrics(f).read_text()) for f in params.families}
    floor = real_data_floor(paths.PREPARED, paths.EVALUATOR, params.evaluate)
    write_json_atomic(paths.REAL_DATA_METRICS, floor)
    comparison_figure(families, floor, paths.REPORT_FIGURE)
    write_text_atomic(paths.REPORT_SUMMARY, summary_markdown(families, floor, meta.dataset))
    log_report(
        params.tracking.uri,
        params.experiment_name,
        floor,
        data_sha256=meta.data_sha256,
        artifacts=[paths.REPORT_SUMMARY, paths.REPORT_FIGURE, paths.REAL_DATA_METRICS],
    )
    print(paths.REPORT_SUMMARY.read_text())
