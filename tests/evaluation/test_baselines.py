"""The baseline rows on the real digits: the copycat is flagged by every memorisation statistic,
the held-out real images by none, and both are measured like a family."""

from __future__ import annotations

import pytest

from genlab.config import EvaluateParams, RepresentationParams
from genlab.data.prepared import read_meta
from genlab.evaluation import vocabulary as v
from genlab.evaluation.baselines import COPYCAT, HELDOUT, REAL, baseline_metrics
from genlab.evaluation.protocol import compute_reference, measurement
from genlab.evaluation.report import Row, copying

PARAMS = EvaluateParams(num_samples=200, sample_seeds=2, bootstrap=30, kid_subsets=10)


def measure(trained_evaluator, params: EvaluateParams) -> dict[str, dict[str, float]]:
    """The baselines stage's rows under `params`, the reference features computed here."""
    prepared = trained_evaluator.prepared_dir
    extractor, protocol = measurement(params, trained_evaluator.path, read_meta(prepared))
    reference = compute_reference(prepared, extractor, protocol, batch_size=250)
    assert (reference.heldout is None) == (params.split == "val")
    return baseline_metrics(
        prepared,
        reference=reference,
        protocol=protocol,
        extractor=extractor,
        evaluator_path=trained_evaluator.path,
        representation=RepresentationParams(),
        batch_size=250,
    )


@pytest.fixture(scope="module")
def rows(trained_evaluator) -> dict[str, dict[str, float]]:
    return measure(trained_evaluator, PARAMS)


def test_the_copycat_is_caught_by_every_memorisation_statistic(rows: dict) -> None:
    copycat = rows[COPYCAT]
    assert copycat[v.EXACT_COPIES] == 1.0
    assert copycat[v.NN_MEMORISED_PIXELS] > 0.95 and copycat[v.NN_MEMORISED_FEATURES] > 0.95
    assert copycat[v.AUTHENTICITY] < 0.05
    assert copycat[v.ci_high(v.C_T)] < -3  # strongly negative, interval and all


def test_heldout_real_images_are_new(rows: dict) -> None:
    heldout, real = rows[HELDOUT], rows[REAL]
    for row in (heldout, real):
        # The digits hold a few images that appear in two splits; new images are rarely copies.
        assert row[v.EXACT_COPIES] < 0.02
        assert row[v.NN_MEMORISED_PIXELS] < 0.05
        assert 0.3 < row[v.AUTHENTICITY] < 0.8
    assert heldout[v.ci_high(v.C_T)] > rows[COPYCAT][v.ci_high(v.C_T)] + 3


def test_the_report_flags_the_copycat_against_heldout_real(rows: dict) -> None:
    def row(name: str) -> Row:
        return Row(name, {0: rows[name]}, 0.95, "test")

    assert copying(row(COPYCAT), row(HELDOUT)).copies
    assert not copying(row(REAL), row(HELDOUT)).copies


def test_baseline_rows_carry_sample_metrics_with_intervals(rows: dict) -> None:
    for name in (COPYCAT, HELDOUT):
        for key in (v.FID, v.KID, v.PRECISION, v.RECALL, v.DENSITY, v.COVERAGE):
            assert rows[name][v.ci_low(key)] <= rows[name][key] <= rows[name][v.ci_high(key)]
    # The copycat is as close to the test split as held-out real images by FID: what FID alone
    # cannot tell, and why the memorisation rows are there.
    assert rows[COPYCAT][v.FID] < 3 * rows[HELDOUT][v.FID]
    real = rows[REAL]
    assert real[v.class_acc("test")] > 0.5 and real[v.probe_acc("test")] > 0.8


def test_tuning_on_validation_has_no_heldout_row(trained_evaluator) -> None:
    out = measure(trained_evaluator, PARAMS.model_copy(update={"split": "val"}))
    assert set(out) == {COPYCAT, REAL}
    assert v.class_acc("val") in out[REAL] and v.EXACT_COPIES not in out[REAL]
