"""The report lists every family and marks `n/a` exactly where the contract has no method.

Synthetic metrics (the keys the evaluate stage writes for what each family can do), real files
on disk: figures opened with PIL, grids written as small PNGs, the stage run end to end with a
real evaluator and a real MLflow store.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from genlab import paths
from genlab.config import Params, parse_params
from genlab.data.prepared import read_meta
from genlab.evaluation.fidelity import measurement
from genlab.evaluation.report import (
    FIGURES,
    QUESTIONS,
    REAL,
    FamilyReport,
    capabilities,
    family_reports,
    grid_panels,
    pixel_probe,
    summary_markdown,
    write_figures,
)
from genlab.models import MODELS
from genlab.models.base import bpd_key, nll_key

FAMILIES = ["pixelcnn", "flow", "vae", "diffusion", "ebm", "gan"]
CONDITIONAL = {
    "pixelcnn": False,
    "flow": False,
    "vae": False,
    "diffusion": True,
    "ebm": True,
    "gan": True,
}
OOD_SETS = ["noise", "inverted", "hflip", "vflip", "rot90", "natural"]
NUM_CLASSES = 10


def unconditional(family: str) -> str:
    return f"n/a: unconditional (set models.{family}.conditional: true)"


# The expected n/a cells of the headline table; every other cell holds a number.
EXPECTED_NA: dict[str, dict[str, str]] = {
    "pixelcnn": {
        "classification": unconditional("pixelcnn"),
        "representation": "n/a: no encoder",
        "conditional": unconditional("pixelcnn"),
    },
    "flow": {"classification": unconditional("flow"), "conditional": unconditional("flow")},
    "vae": {"classification": unconditional("vae"), "conditional": unconditional("vae")},
    "diffusion": {},
    "ebm": {"likelihood": "n/a: unnormalised (energy only)", "representation": "n/a: no encoder"},
    "gan": {
        "likelihood": "n/a: no likelihood or energy",
        "ood": "n/a: no likelihood or energy",
        "classification": "n/a: no likelihood or energy for Bayes' rule",
        "representation": "n/a: no encoder",
    },
}


def make_params(conditional: dict[str, bool] = CONDITIONAL, **extra: object) -> Params:
    models = {f: {"conditional": flag} for f, flag in conditional.items()}
    return parse_params({"families": list(conditional), "models": models, **extra})


def synthetic_metrics(family: str, conditional: bool, i: int) -> dict[str, float]:
    """The metric keys evaluate writes for what `family` can do, with distinct values: FID
    1.111 * (i + 1), nats 80 + i (conditional) and 90 + i (marginal), AUROCs 0.9 - 0.01 j."""
    cls = MODELS[family]
    m = {
        "eval/fid": 1.111 * (i + 1),
        "eval/kid_mean": 0.0123 * (i + 1),
        "eval/precision": 0.8,
        "eval/recall": 0.7,
        "eval/isc_mean": 5.0,
        "eval/samples_per_s": 100.0,
        "eval/nfe_per_sample": 1.0,
    }
    if cls.likelihood != "none":
        m[nll_key("test", cls.likelihood)] = 80.0 + i
        m[bpd_key("test", cls.likelihood)] = (80.0 + i) / (64 * math.log(2))
        if conditional:
            m[
                nll_key("test/marginal", cls.likelihood).replace("test/marginal/", "test/marginal_")
            ] = 90.0 + i
    if cls.likelihood != "none" or cls.has_energy:
        for j, s in enumerate(OOD_SETS):
            m[f"ood/auroc_{s}"] = 0.9 - 0.01 * j
            m[f"ood/auroc_typicality_{s}"] = 0.8
            m[f"ood/detected_{s}"] = 0.7
        m["ood/test_fpr"] = 0.05
        if conditional:
            m["test/class_acc"] = 0.951
    if cls.has_latent:
        m["test/probe_acc"] = 0.912
    if conditional:
        m["eval/cond_acc"] = 0.987
        m["eval/class_fid_mean"] = 3.21
        for k in range(NUM_CLASSES):
            m[f"eval/class_fid_{k}"] = 3.0 + 0.1 * k
    return m


REAL_DATA = {
    "eval/fid": 1.358,
    "eval/kid_mean": 0.003,
    "eval/precision": 0.83,
    "eval/recall": 0.71,
    "eval/isc_mean": 6.43,
    "test/probe_acc": 0.944,
}


@pytest.fixture
def reports() -> list[FamilyReport]:
    params = make_params()
    metrics = {f: synthetic_metrics(f, CONDITIONAL[f], i) for i, f in enumerate(FAMILIES)}
    return family_reports(metrics, params)


def headline(summary: str) -> dict[str, dict[str, str]]:
    """The first table of the summary as {row name: {question: cell}}."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, *cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[name] = dict(zip(QUESTIONS, cells, strict=True))
    return rows


def summary_of(reports: list[FamilyReport], grids: dict | None = None) -> str:
    return summary_markdown(
        reports,
        REAL_DATA,
        evaluator_accuracy=0.9888,
        dataset="digits",
        dims=64,
        ood_sets=OOD_SETS,
        statistic="likelihood",
        fpr=0.05,
        grids=grids if grids is not None else grid_panels(reports, root=Path("/nonexistent")),
    )


def test_capabilities_follow_the_contract_and_config() -> None:
    params = make_params()
    for family in FAMILIES:
        reasons = capabilities(family, params)
        assert set(reasons) == set(QUESTIONS)
        expected = {q: r.removeprefix("n/a: ") for q, r in EXPECTED_NA[family].items()}
        assert {q: r for q, r in reasons.items() if r is not None} == expected, family


def test_capabilities_change_with_the_conditional_flag_not_the_name() -> None:
    flipped = make_params({f: not flag for f, flag in CONDITIONAL.items()})
    # A conditional VAE classifies by Bayes' rule and generates classes; an unconditional EBM
    # and GAN do neither, whatever else they can do.
    assert capabilities("vae", flipped)["classification"] is None
    assert capabilities("vae", flipped)["conditional"] is None
    for family in ("ebm", "gan"):
        assert capabilities(family, flipped)["classification"] == unconditional(family)[5:]
        assert capabilities(family, flipped)["conditional"] == unconditional(family)[5:]
    assert capabilities("ebm", flipped)["ood"] is None  # the energy still ranks images


def test_headline_table_marks_na_exactly_where_the_contract_has_no_method(
    reports: list[FamilyReport],
) -> None:
    rows = headline(summary_of(reports))
    assert list(rows) == [*FAMILIES, REAL]
    for i, family in enumerate(FAMILIES):
        for question, cell in rows[family].items():
            expected = EXPECTED_NA[family].get(question)
            if expected is not None:
                assert cell == expected, (family, question)
            else:
                assert not cell.startswith("n/a"), (family, question, cell)
        # Numbers, formatted, where the family answers.
        assert rows[family]["generation"] == f"{1.111 * (i + 1):.3f} (KID {0.0123 * (i + 1):.4f})"
    assert rows["pixelcnn"]["likelihood"] == "80.00"  # exact: no bound sign
    assert rows["flow"]["likelihood"] == "≤ 81.00"  # a bound on the NLL says so
    assert rows["diffusion"]["likelihood"] == "≤ 93.00 (marginal)"  # -log p(x), not p(x | y)
    assert rows["vae"]["ood"] == "0.875 (worst: natural 0.850)"
    assert rows["ebm"]["ood"] == "0.875 (worst: natural 0.850)"  # energy answers OOD
    assert rows["ebm"]["classification"] == "0.951"
    assert rows["vae"]["representation"] == "0.912"
    assert rows["diffusion"]["conditional"] == "0.987 (class FID 3.21)"
    real = rows[REAL]
    assert real["generation"] == "1.358 (KID 0.0030)"
    assert real["classification"] == "0.989 (evaluator, discriminative)"
    assert real["representation"] == "0.944 (raw pixels)"


def test_missing_metrics_say_not_measured(reports: list[FamilyReport]) -> None:
    """A family that can answer but whose metrics file lacks the key (a stale evaluate) is not
    mistaken for one that cannot."""
    stale = reports[2]._replace(metrics={"eval/fid": 2.0})  # vae
    cell = headline(summary_of([stale]))["vae"]["representation"]
    assert cell == "n/a: not measured (re-run evaluate@vae)"


def test_detailed_tables(reports: list[FamilyReport]) -> None:
    summary = summary_of(reports)
    # Sample quality with the real-data floor, the likelihood table with the family's kind.
    assert "| vae | 3.333 | 0.0369 | 0.800 | 0.700 | 5.00 | n/a | 100 | 1 |" in summary
    assert f"| {REAL} | 1.358 | 0.0030 |" in summary
    assert "| vae | lower_bound | no | ≤ 82.00 | ≤ 1.848 | n/a: unconditional |" in summary
    # diffusion: marginal -log p(x) first, then -log p(x | y) from the test keys.
    assert "| diffusion | lower_bound | yes | ≤ 93.00 | ≤ 2.096 | ≤ 83.00 | ≤ 1.871 |" in summary
    assert "| gan | none | yes | n/a: no likelihood or energy |" in summary
    # OOD: both statistics per set and the detection rate at the calibrated threshold.
    assert (
        "| flow | AUROC, likelihood | 0.900 | 0.890 | 0.880 | 0.870 | 0.860 | 0.850 | 0.875 |"
        in summary
    )
    assert "| flow | AUROC, typicality | 0.800 |" in summary
    assert "| flow | detected (likelihood) | 0.700 |" in summary
    assert "| ebm | AUROC, −energy | 0.900 |" in summary  # the energy stands in for log p(x)
    assert "| gan | — | n/a: no likelihood or energy |" in summary
    # Per-class FID for every class of the conditional families.
    assert "| family | class 0 |" in summary and "| class 9 | mean |" in summary
    assert "| ebm | 3.00 | 3.10 |" in summary
    assert f"| vae | {unconditional('vae')} |" in summary
    for name in FIGURES:
        assert f"(figures/{name}.png)" in summary


def write_grid(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_every_figure_is_a_png_and_grids_handle_missing_files(
    reports: list[FamilyReport], tmp_path: Path
) -> None:
    root = tmp_path / "repo"
    written = {
        ("vae", "samples"),
        ("vae", "interpolation"),
        ("vae", "traversal"),
        ("diffusion", "samples"),
        ("diffusion", "classes"),
        ("gan", "samples"),
    }
    where = {
        "samples": paths.family_samples,
        "classes": paths.family_class_grid,
        "interpolation": paths.family_interpolation,
        "traversal": paths.family_traversal,
    }
    for i, (family, kind) in enumerate(sorted(written)):
        write_grid(root / where[kind](family), i)
    grids = grid_panels(reports, root=root)
    for family, panels in grids.items():
        for kind, panel in panels.items():
            if (family, kind) in written:
                assert panel == root / where[kind](family)
            else:
                assert isinstance(panel, str) and panel.startswith("n/a: "), (family, kind)
    assert grids["gan"]["interpolation"] == "n/a: no encoder"
    assert grids["vae"]["classes"] == unconditional("vae")
    assert grids["pixelcnn"]["samples"].startswith("n/a: no samples grid")

    out = tmp_path / "figures"
    figures = write_figures(
        reports,
        REAL_DATA,
        evaluator_accuracy=0.9888,
        ood_sets=OOD_SETS,
        grids=grids,
        out_dir=out,
    )
    assert sorted(p.name for p in figures) == sorted(f"{n}.png" for n in FIGURES)
    for path in figures:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100, path
            im.verify()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in figures)  # no .tmp
    with Image.open(out / "grids.png") as im:  # a row per family
        assert im.height > im.width

    summary = summary_of(reports, grids)
    assert "| vae | ![vae samples](families/vae/samples.png) |" in summary
    assert "| gan | ![gan samples](families/gan/samples.png) | n/a: no classes grid" in summary


def test_pixel_probe_beats_chance(prepared_digits: Path) -> None:
    acc = pixel_probe(prepared_digits, c=1.0)
    assert 0.8 < acc <= 1.0  # a linear classifier on the raw 8x8 digits is ~95% accurate


def test_stage_writes_summary_figures_and_real_data(
    trained_evaluator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`genlab report` on a working directory holding what the earlier stages write."""
    from genlab.stages import reference, report

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_evaluator.prepared_dir, paths.PREPARED)
    paths.EVALUATOR.parent.mkdir(parents=True)
    shutil.copy(trained_evaluator.path, paths.EVALUATOR)
    paths.METRICS_DIR.mkdir()
    paths.EVALUATOR_METRICS.write_text(json.dumps({"test/accuracy": 0.9}))
    families = ["vae", "gan"]
    params = make_params(
        {f: CONDITIONAL[f] for f in families},
        evaluate={"num_samples": 200, "kid_subset_size": 50, "kid_subsets": 5},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    reference.main(params)  # the real data's features, which the floor reads
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED))
    for i, family in enumerate(families):
        metrics = synthetic_metrics(family, CONDITIONAL[family], i)
        metrics["protocol"] = protocol.as_dict()  # what evaluate@<family> records
        paths.family_metrics(family).write_text(json.dumps(metrics))
    write_grid(paths.family_samples("vae"), 0)
    report.main(params)

    real = json.loads(paths.REAL_DATA_METRICS.read_text())
    assert real.pop("protocol") == protocol.as_dict()
    assert real["eval/fid"] >= 0 and 0.8 < real["test/probe_acc"] <= 1
    rows = headline(paths.REPORT_SUMMARY.read_text())
    assert list(rows) == [*families, REAL]
    assert rows["gan"]["representation"] == "n/a: no encoder"
    assert rows[REAL]["classification"] == "0.900 (evaluator, discriminative)"
    assert rows[REAL]["representation"] == f"{real['test/probe_acc']:.3f} (raw pixels)"
    for name in FIGURES:
        with Image.open(paths.REPORT_FIGURES / f"{name}.png") as im:
            assert im.format == "PNG"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.family = 'real_data'"
    )
    assert run.data.metrics["test/probe_acc"] == pytest.approx(real["test/probe_acc"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert logged == {
        "report/summary.md",
        "report/real_data.json",
        *(f"report/{name}.png" for name in FIGURES),
    }
