"""The report: one row per family, `n/a` exactly where the contract has no method, ranks only
where the intervals separate, ties elsewhere, and copying called out in words.

Synthetic metrics files (the keys the evaluate and baselines stages write, with intervals) as
the report's only input; real files on disk: figures opened with PIL, the stage run end to end
with a real evaluator and a real MLflow store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from genlab import paths
from genlab.config import Params, parse_params
from genlab.data.prepared import read_meta
from genlab.errors import GenlabError
from genlab.evaluation import vocabulary as v
from genlab.evaluation.figures import FIGURES, write_figures
from genlab.evaluation.protocol import measurement
from genlab.evaluation.report import (
    COPYCAT,
    HELDOUT,
    QUESTIONS,
    REAL,
    Row,
    Verdict,
    copying,
    grid_panels,
    rank,
    reasons,
    seeds_interval,
    summary_markdown,
)
from genlab.evaluation.vocabulary import Estimate
from genlab.io import write_json_atomic
from genlab.models import MODELS
from genlab.stages import report as report_stage
from genlab.tracking import REPORT_TAG

FAMILIES = ["pixelcnn", "flow", "vae", "diffusion", "ebm", "gan"]
CONDITIONAL = {f: f in ("diffusion", "ebm", "gan") for f in FAMILIES}
OOD_SETS = ["noise", "natural"]


def make_params(conditional: dict[str, bool] = CONDITIONAL, **extra: object) -> Params:
    models = {f: {"conditional": flag} for f, flag in conditional.items()}
    return parse_params({"families": list(conditional), "models": models, **extra})


def with_ci(key: str, value: float, half: float) -> dict[str, float]:
    return {key: value, v.ci_low(key): value - half, v.ci_high(key): value + half}


def rates(copies: float, authentic: float) -> dict[str, float]:
    out = {}
    for key, value in ((v.EXACT_COPIES, copies), (v.NN_MEMORISED_PIXELS, copies)):
        out |= with_ci(key, value, 0.01 if 0 < value < 1 else 0.0)
    out |= with_ci(v.NN_MEMORISED_FEATURES, copies, 0.0)
    return out | with_ci(v.AUTHENTICITY, authentic, 0.05)


def synthetic_metrics(family: str, conditional: bool, fid: float) -> dict[str, float]:
    """What evaluate writes for what `family` can do, with intervals."""
    cls = MODELS[family]
    m = with_ci(v.FID, fid, 0.1) | with_ci(v.KID, 0.01, 0.01) | with_ci(v.PRECISION, 0.8, 0.05)
    m |= with_ci(v.RECALL, 0.7, 0.05) | with_ci(v.DENSITY, 0.9, 0.1)
    m |= with_ci(v.COVERAGE, 0.6, 0.05) | with_ci(v.ISC, 5.0, 0.2)
    m |= rates(0.0, 0.55) | with_ci(v.C_T, 1.0, 1.0)
    m |= {v.SAMPLES_PER_S: 100.0, v.NFE_PER_SAMPLE: 1.0, v.SAMPLE_FLOPS: 2.5e6}
    m |= {v.TRAIN_FLOPS: 1.5e12, v.TRAIN_STEPS: 1600.0, v.TRAIN_WALL_S: 61.0}
    m |= {v.NUM_PARAMS: 123456.0}
    if cls.likelihood != "none":
        nats = 80.0 + FAMILIES.index(family)
        m |= {v.nll_key("test", cls.likelihood): nats, v.se(v.nll_key("test", cls.likelihood)): 0.3}
        m |= {v.NLL_GAP: 2.0, v.se(v.NLL_GAP): 0.5}
        if cls.ode_likelihood:
            m |= {v.ode_nll_key("test"): 94.7, v.se(v.ode_nll_key("test")): 1.5}
            bpd = 94.7 / (64 * math.log(2))
            m |= {v.ode_bpd_key("test"): bpd, v.se(v.ode_bpd_key("test")): 1.5 * bpd / 94.7}
            m |= {v.ode_difference_key("test"): 7.3, v.se(v.ode_difference_key("test")): 0.5}
            m |= {v.ODE_IMAGES: 64.0}
        if conditional:
            estimate = cls.monte_carlo == "terms"
            key = v.nll_key("test", cls.likelihood, marginal=True, estimate=estimate)
            m |= {key: 90.0, v.se(key): 0.3}
    if cls.likelihood != "none" or cls.has_energy:
        for j, s in enumerate(OOD_SETS):
            m |= with_ci(v.auroc(s), 0.9 - 0.1 * j, 0.02)
            m |= with_ci(v.auroc(s, typicality=True), 0.8, 0.02)
            m |= with_ci(v.detected(s), 0.7, 0.05)
        if conditional:
            m |= with_ci(v.class_acc("test"), 0.95, 0.02)
    if cls.has_latent:
        m |= with_ci(v.probe_acc("test"), 0.91, 0.03)
    if conditional:
        m |= with_ci(v.COND_ACC, 0.98, 0.01) | with_ci(v.CLASS_FID_MEAN, 3.2, 0.4)
        m |= {v.class_fid(k): 3.0 + 0.1 * k for k in range(10)}
    return m


# FIDs: pixelcnn 1.0 and flow 1.05 tie; vae 2.0 apart; the three conditional ones tie at 1.5.
FIDS = {"pixelcnn": 1.0, "flow": 1.05, "vae": 2.0, "diffusion": 1.5, "ebm": 1.55, "gan": 1.6}


def baselines() -> dict[str, dict[str, float]]:
    copycat = with_ci(v.FID, 1.02, 0.1) | rates(1.0, 0.0) | with_ci(v.C_T, -9.0, 0.5)
    heldout = with_ci(v.FID, 1.0, 0.1) | rates(0.0, 0.55) | with_ci(v.C_T, -2.0, 1.0)
    real = rates(0.0, 0.56) | with_ci(v.class_acc("test"), 0.99, 0.01)
    real |= with_ci(v.probe_acc("test"), 0.94, 0.02)
    return {"copycat": copycat, "heldout": heldout, "real": real}


def family_rows(params: Params, runs: dict[str, dict[int, dict]] | None = None) -> list[Row]:
    from genlab.stages.report import capabilities

    out = []
    for f in params.families:
        c = capabilities(params, f)
        metrics = runs[f] if runs else {0: synthetic_metrics(f, c.conditional, FIDS[f])}
        out.append(Row(f, metrics, 0.95, "test", capabilities=c, why_not=reasons(f, c)))
    return out


def baseline_rows() -> dict[str, Row]:
    b = baselines()
    names = {COPYCAT: "copycat", HELDOUT: "heldout", REAL: "real"}
    return {title: Row(title, {0: b[key]}, 0.95, "test") for title, key in names.items()}


def headline(summary: str) -> dict[str, dict[str, str]]:
    """The first table of the summary as {row name: {question or "memorisation": cell}}."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, *cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[name] = dict(zip([*QUESTIONS, "memorisation"], cells, strict=True))
    return rows


def summary_of(families: list[Row], base: dict[str, Row] | None = None) -> str:
    return summary_markdown(
        families,
        baseline_rows() if base is None else base,
        dataset="digits",
        dims=64,
        ood_sets=OOD_SETS,
        figures=list(FIGURES),
        grids=grid_panels(families, 0, root=Path("/nonexistent")),
        grid_seed=0,
        extractor="genlab-evaluator",
        protocol_id="0" * 16,
    )


# ---------------------------------------------------------------- what a family can answer


def test_reasons_follow_the_contract_and_the_conditional_flag_not_the_name() -> None:
    from genlab.stages.report import capabilities

    params = make_params()
    gan = reasons("gan", capabilities(params, "gan"))
    assert gan["likelihood"] == "no likelihood or energy" and gan["generation"] is None
    ebm = reasons("ebm", capabilities(params, "ebm"))
    assert ebm["likelihood"] == "unnormalised (energy only)" and ebm["ood"] is None
    flipped = make_params({"vae": True, "diffusion": False})
    assert reasons("vae", capabilities(flipped, "vae"))["classification"] is None
    assert (
        "unconditional" in reasons("diffusion", capabilities(flipped, "diffusion"))["conditional"]
    )


def test_headline_marks_na_with_the_reason_and_numbers_with_intervals() -> None:
    summary = summary_of(family_rows(make_params()))
    rows = headline(summary)
    assert rows["gan"]["likelihood"] == "n/a: no likelihood or energy"
    assert rows["pixelcnn"]["representation"] == "n/a: no encoder"
    assert rows["vae"]["classification"].startswith("n/a: unconditional")
    assert rows["flow"]["likelihood"].startswith("≤ 81.00 [80.41, 81.59]")  # bound, +-1.96 se
    assert rows["pixelcnn"]["likelihood"].startswith("80.00 [79.41, 80.59]")  # exact: no ≤
    # Diffusion's conditional marginal is an estimate (terms): still its headline number, but
    # not marked as a bound; its -log p(x | y) in the likelihood table is one.
    assert rows["diffusion"]["likelihood"].startswith("90.00 [89.41, 90.59]")
    table = summary.split("## Likelihood")[1]
    diffusion = next(line for line in table.splitlines() if line.startswith("| diffusion |"))
    cells = [c.strip() for c in diffusion.split("|")[1:-1]]
    assert cells[1] == "lower_bound (marginal: estimate)"
    assert cells[2].startswith("90.00") and cells[3][0].isdigit() and cells[4].startswith("≤ ")
    assert rows["diffusion"]["ood"].startswith("0.800 [0.780, 0.820] (natural)")  # worst set


def test_missing_metrics_say_not_measured() -> None:
    params = make_params()
    runs = {f: {0: synthetic_metrics(f, CONDITIONAL[f], FIDS[f])} for f in FAMILIES}
    runs["vae"][0].pop(v.probe_acc("test"))
    rows = headline(summary_of(family_rows(params, runs)))
    assert rows["vae"]["representation"] == "n/a: not measured (re-run evaluate@vae)"


# ---------------------------------------------------------------- ranking with intervals


def test_rank_orders_separated_rows_and_ties_overlapping_ones() -> None:
    ranking = rank(
        {
            "a": Estimate(1.0, 0.9, 1.1),
            "b": Estimate(1.05, 0.95, 1.15),
            "c": Estimate(2.0, 1.9, 2.1),
            "d": Estimate(math.nan, math.nan, math.nan),
        },
        "lower",
    )
    assert ranking.groups == [["a", "b"], ["c"]] and ranking.chain() == "a ≈ b > c"
    assert ranking.tied_with["a"] == ["b"] and ranking.tied_with["c"] == []
    assert ranking.place("b") == 1 and ranking.place("c") == 2
    assert rank({"x": Estimate(0.9, 0.8, 1.0), "y": Estimate(0.5, 0.4, 0.6)}, "higher").chain() == (
        "x > y"
    )


def test_overlap_is_not_transitive_and_each_row_lists_all_its_ties() -> None:
    ranking = rank(
        {
            "a": Estimate(1.0, 0.9, 1.2),
            "b": Estimate(1.25, 1.15, 1.35),
            "c": Estimate(1.4, 1.3, 1.5),
        },
        "lower",
    )
    assert ranking.chain() == "a ≈ b > c"  # a's group holds what overlaps a
    assert ranking.tied_with["b"] == ["a", "c"]


def test_a_value_without_an_interval_ties_with_nothing() -> None:
    ranking = rank({"a": Estimate(1.0, math.nan, math.nan), "b": Estimate(1.0, 0.5, 1.5)}, "lower")
    assert ranking.tied_with == {"a": [], "b": []}


def test_summary_ranks_with_ties_and_reads_families_against_the_baselines() -> None:
    summary = summary_of(family_rows(make_params()))
    assert "- **generation: FID ↓**: pixelcnn ≈ flow > diffusion ≈ ebm ≈ gan > vae" in summary
    rows = headline(summary)
    assert rows["pixelcnn"]["generation"].endswith("#1, tied with flow")
    assert rows["vae"]["generation"].endswith("#3")
    assert (
        "**pixelcnn** (FID 1.000 [0.900, 1.100]): tied with held-out real images; tied with "
        "the copycat: FID cannot tell it from a copy of the training set." in summary
    )
    assert "**vae** (FID 2.000 [1.900, 2.100]): above held-out real images." in summary
    for name in (COPYCAT, HELDOUT, REAL):
        assert f"*{name}*" in rows


def test_the_ode_likelihood_is_a_table_of_its_own_beside_the_family_bound() -> None:
    families = family_rows(make_params())
    summary = summary_of(families)
    lines = summary.splitlines()
    ode = [line for line in lines if line.startswith("| diffusion |") and "94.70" in line]
    assert len(ode) == 1
    # ≤ 94.70 [91.76, 97.64] nats, its bits/dim, the paired difference, the images.
    assert "≤ 94.70 [91.76, 97.64]" in ode[0] and "7.30 [6.32, 8.28]" in ode[0]
    assert "≤ 2.135 [2.068, 2.201]" in ode[0]
    assert ode[0].endswith("| 64 |") and "ODE bound, nats" in summary
    # The family's own bound keeps its place in the likelihood table.
    assert any(line.startswith("| diffusion | lower_bound") for line in lines)
    # Without an ODE number anywhere, no such table.
    for r in families:
        for metrics in r.runs.values():
            for key in [*v.ode_keys("test"), v.ode_difference_key("test"), v.ODE_IMAGES]:
                for name in (key, v.se(key)):
                    metrics.pop(name, None)
    assert "ODE bound, nats" not in summary_of(families)


def test_seeds_aggregate_to_mean_and_t_interval() -> None:
    e = seeds_interval([1.0, 2.0, 3.0], 0.95)
    assert e.value == 2.0 and e.high - e.value == pytest.approx(4.302653 * 1 / math.sqrt(3))
    params = make_params({"vae": False}, seeds=[0, 1])
    runs = {"vae": {s: synthetic_metrics("vae", False, fid) for s, fid in ((0, 1.0), (1, 1.4))}}
    (row,) = family_rows(params, runs)
    assert row.estimate(v.FID).value == pytest.approx(1.2)
    assert row.seed_sd(v.FID) == pytest.approx(math.sqrt(0.08))
    assert set(row.seed_estimates(v.FID)) == {0, 1}
    summary = summary_of([row])
    assert "| vae | eval/fid | 1.000 [0.900, 1.100] | 1.400 [1.300, 1.500] | 1.200 ± 0.283 |" in (
        summary
    )
    assert "Training seeds 0, 1" in summary


# ---------------------------------------------------------------- copying, in words


def test_the_copycat_is_flagged_and_a_family_like_real_data_is_not() -> None:
    base = baseline_rows()
    copycat = copying(base[COPYCAT], base[HELDOUT])
    assert copycat.copies and "100% exact copies of training images" in copycat.words
    assert "C_T -9.0 (real new images: -2.0)" in copycat.words
    (vae,) = [r for r in family_rows(make_params()) if r.name == "vae"]
    assert copying(vae, base[HELDOUT]) == Verdict(False, "no sign of copying")
    rows = headline(summary_of(family_rows(make_params())))
    assert rows["*copycat*"]["memorisation"].startswith("**copies**")
    assert rows["*held-out real*"]["memorisation"] == "—"  # the yardstick itself


def test_without_a_heldout_row_c_t_is_judged_against_zero() -> None:
    row = Row("m", {0: with_ci(v.C_T, -3.0, 1.0)}, 0.95, "val")
    assert copying(row, None).copies
    assert not copying(Row("m", {0: with_ci(v.C_T, -0.5, 1.0)}, 0.95, "val"), None).copies


# ---------------------------------------------------------------- figures and the stage


def test_every_figure_is_a_png_and_grids_handle_missing_files(tmp_path: Path) -> None:
    families = family_rows(make_params())
    grid = paths.family_samples("vae", 0)
    (tmp_path / grid).parent.mkdir(parents=True)
    Image.new("RGB", (20, 20), "white").save(tmp_path / grid)
    grids = grid_panels(families, 0, root=tmp_path)
    assert grids["vae"]["samples"] == tmp_path / grid
    assert grids["gan"]["interpolation"] == "n/a: no encoder"
    assert grids["vae"]["traversal"].startswith("n/a: no traversal grid")
    curves = {
        "vae": {0: [{"steps": 10.0, "flops": 1e9, "val/nll_bound_nats": 120.0, v.CURVE_FID: 9.0}]},
        "flow": {0: [{"steps": 10.0, "flops": 2e9, "val/nll_bound_nats": 110.0}] * 2},
        "gan": {0: [{"steps": 4.0, "flops": 5e8, v.CURVE_FID: 30.0}]},
        "ebm": {0: []},
    }
    written = write_figures(
        families,
        baseline_rows(),
        ood_sets=OOD_SETS,
        grids=grids,
        curves=curves,
        dims=64,
        out_dir=tmp_path / "figures",
    )
    assert [p.stem for p in written] == list(FIGURES)
    for path in written:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not list((tmp_path / "figures").glob(".*"))  # no temporary files left


def test_stage_reads_json_and_writes_summary_and_figures(project_dir: Path) -> None:
    tmp_path = project_dir
    params = make_params(tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED))
    record = {"protocol": protocol.as_dict()}
    for f in FAMILIES:
        write_json_atomic(
            paths.family_metrics(f, 0), synthetic_metrics(f, CONDITIONAL[f], FIDS[f]) | record
        )
    write_json_atomic(paths.BASELINE_METRICS, baselines() | record)
    report_stage.main(params)
    summary = paths.REPORT_SUMMARY.read_text()
    assert "pixelcnn ≈ flow > diffusion ≈ ebm ≈ gan > vae" in summary
    # The cost of each family, as train.json and the evaluation measured it.
    compute = summary.split("## Compute")[1].split("##")[0]
    assert "| vae | 123,456 | 1,600 | 1.5e+12 | 61 | 2.5e+06 | 1 | 10 |" in compute
    for name in FIGURES:
        assert (paths.REPORT_FIGURES / f"{name}.png").is_file()
    client = MlflowClient(params.tracking.uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.family = '{REPORT_TAG}'"
    )
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/summary.md" in logged

    # A file of another protocol: refused, nothing compared.
    write_json_atomic(paths.BASELINE_METRICS, baselines() | {"protocol": {"id": "x"}})
    with pytest.raises(GenlabError, match=r"metrics/baselines\.json was measured under protocol x"):
        report_stage.main(params)
    paths.family_metrics("gan", 0).write_text("{torn")
    with pytest.raises(GenlabError, match=r"not valid JSON"):
        report_stage.main(params)
    json.loads(paths.family_metrics("vae", 0).read_text())  # the others untouched
