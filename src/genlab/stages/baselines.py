"""Stage `baselines`: metrics/baselines.json, the copycat, held-out real and real-data rows.

Measured under the protocol every family is (`evaluation/baselines.py`), and logged to MLflow
as one `baselines` run.
"""

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import read_meta
from genlab.evaluation.baselines import baseline_metrics
from genlab.evaluation.protocol import load_reference, measurement
from genlab.evaluation.vocabulary import PROTOCOL, is_uncertainty
from genlab.io import write_json_atomic
from genlab.sync import push_after_stage
from genlab.tracking import flatten, log_baselines, resolve_stores


def main(params: Params) -> None:
    meta = read_meta(paths.PREPARED)
    extractor, protocol = measurement(params.evaluate, paths.EVALUATOR, meta)
    rows = baseline_metrics(
        paths.PREPARED,
        reference=load_reference(paths.REFERENCE, protocol),
        protocol=protocol,
        extractor=extractor,
        evaluator_path=paths.EVALUATOR,
        representation=params.representation,
        batch_size=params.evaluate.batch_size,
        device=params.trainer.eval_device,
    )
    write_json_atomic(paths.BASELINE_METRICS, rows | {PROTOCOL: protocol.as_dict()})
    stores = resolve_stores(params.tracking.uri)
    record = log_baselines(
        stores,
        params.experiment_name,
        flatten(rows),
        data_sha256=meta.data_sha256,
        protocol=protocol.as_dict(),
        artifacts=[paths.BASELINE_METRICS],
    )
    if record is not None:
        push_after_stage(stores, [record.run_id])  # to the team server, if there is one
    for name, metrics in rows.items():
        shown = {k: round(x, 4) for k, x in metrics.items() if not is_uncertainty(k)}
        print(f"{name}: {shown}")
