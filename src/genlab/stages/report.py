"""Stage `report`: reports/summary.md and reports/figures/, from the metrics files alone.

Rows are compared only when every metrics file (each family and seed, and the baselines)
records the protocol the current params give; the report reads JSON and writes Markdown and
PNG, and logs them as one `report` MLflow run.
"""

import json
from pathlib import Path

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import read_meta
from genlab.errors import GenlabError
from genlab.evaluation.baselines import COPYCAT as COPYCAT_ROW
from genlab.evaluation.baselines import HELDOUT as HELDOUT_ROW
from genlab.evaluation.baselines import REAL as REAL_ROW
from genlab.evaluation.figures import FIGURES, write_figures
from genlab.evaluation.predict import scorer
from genlab.evaluation.protocol import check_protocols, measurement
from genlab.evaluation.report import (
    COPYCAT,
    HELDOUT,
    REAL,
    Capabilities,
    Row,
    grid_panels,
    reasons,
    summary_markdown,
)
from genlab.evaluation.vocabulary import PROTOCOL
from genlab.io import write_text_atomic
from genlab.models import MODELS
from genlab.sync import push_after_stage
from genlab.tracking import log_report, resolve_stores


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise GenlabError(f"{path} not found: run `dvc repro {stage}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise GenlabError(f"{path} is not valid JSON: re-run `dvc repro {stage}`") from None


def _read_curve(path: Path) -> list[dict[str, float]]:
    """A family's compute curve (evaluate stage), [] where its evaluation predates them. A file
    genlab wrote, read as data: only numbers are kept."""
    if not path.is_file():
        return []
    points = json.loads(path.read_text())
    if not isinstance(points, list):
        raise GenlabError(f"{path}: not a compute curve; re-run `dvc repro` for that family")
    return [
        {str(k): float(x) for k, x in p.items() if isinstance(x, int | float)}
        for p in points
        if isinstance(p, dict)
    ]


def capabilities(params: Params, family: str) -> Capabilities:
    cls = MODELS[family]
    return Capabilities(
        likelihood=cls.likelihood,
        monte_carlo=cls.monte_carlo,
        scores=scorer(cls) is not None,
        has_energy=cls.has_energy,
        has_latent=cls.has_latent,
        conditional=bool(params.family(family).model_kwargs().get("conditional", False)),
    )


def main(params: Params) -> None:
    meta = read_meta(paths.PREPARED)
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, meta)
    files = {
        (f, s): _read_json(paths.family_metrics(f, s), f"evaluate@{f}-{s}")
        for f in params.families
        for s in params.seeds
    }
    baselines_file = _read_json(paths.BASELINE_METRICS, "baselines")
    recorded = {str(paths.family_metrics(f, s)): m.get(PROTOCOL) for (f, s), m in files.items()}
    recorded[str(paths.BASELINE_METRICS)] = baselines_file.get(PROTOCOL)
    check_protocols(recorded, protocol)

    common = {"confidence": protocol.confidence, "split": protocol.reference_split}
    families = []
    for f in params.families:
        c = capabilities(params, f)
        runs = {s: {k: x for k, x in files[(f, s)].items() if k != PROTOCOL} for s in params.seeds}
        families.append(Row(f, runs, capabilities=c, why_not=reasons(f, c), **common))
    baselines = {
        title: Row(title, {0: baselines_file[key]}, **common)
        for title, key in ((COPYCAT, COPYCAT_ROW), (HELDOUT, HELDOUT_ROW), (REAL, REAL_ROW))
        if key in baselines_file
    }
    grid_seed = params.seeds[0]
    grids = grid_panels(families, grid_seed)
    curves = {
        f: {s: _read_curve(paths.family_compute_curve(f, s)) for s in params.seeds}
        for f in params.families
    }
    figures = write_figures(
        families,
        baselines,
        ood_sets=params.prediction.ood_sets,
        grids=grids,
        curves=curves,
        dims=meta.dims,
        out_dir=paths.REPORT_FIGURES,
    )
    summary = summary_markdown(
        families,
        baselines,
        dataset=meta.dataset,
        dims=meta.dims,
        ood_sets=params.prediction.ood_sets,
        figures=list(FIGURES),
        grids=grids,
        grid_seed=grid_seed,
        extractor=protocol.extractor,
        protocol_id=protocol.id,
    )
    write_text_atomic(paths.REPORT_SUMMARY, summary)
    stores = resolve_stores(params.tracking.uri)
    record = log_report(
        stores,
        params.experiment_name,
        data_sha256=meta.data_sha256,
        artifacts=[paths.REPORT_SUMMARY, *figures],
    )
    if record is not None:
        push_after_stage(stores, [record.run_id])  # to the team server, if there is one
    print(summary)
