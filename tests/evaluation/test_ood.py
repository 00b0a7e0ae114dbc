"""Out-of-distribution sets and statistics: shapes, determinism, and the statistics' meaning."""

from __future__ import annotations

import pytest
import torch

from genlab.evaluation import vocabulary as v
from genlab.evaluation.intervals import auroc_estimate, wilson
from genlab.evaluation.ood import (
    auroc,
    calibrate,
    calibrate_threshold,
    ood_metrics,
    ood_sets,
    statistic,
)

NAMES = ["noise", "inverted", "hflip", "vflip", "rot90", "natural"]


def digits_like(n: int = 40, shape=(1, 8, 8), levels: int = 17) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(levels, (n, *shape), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_every_set_is_valid_images_of_the_data_shape_and_deterministic(shape) -> None:
    x = digits_like(shape=shape)
    a = ood_sets(NAMES, x, 17, seed=3)
    b = ood_sets(NAMES, x, 17, seed=3)
    for name in NAMES:
        assert a[name].dtype == torch.uint8 and a[name].shape == x.shape, name
        assert int(a[name].max()) <= 16
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(ood_sets(["noise"], x, 17, seed=4)["noise"], a["noise"])
    # A set does not depend on which other sets are asked for.
    assert torch.equal(ood_sets(["natural"], x, 17, seed=3)["natural"], a["natural"])


def test_transforms_of_the_data() -> None:
    x = digits_like()
    sets = ood_sets(["inverted", "hflip", "vflip", "rot90"], x, 17, seed=0)
    assert torch.equal(sets["inverted"].long() + x.long(), torch.full(x.shape, 16))
    assert torch.equal(sets["hflip"][..., 0], x[..., -1])
    assert torch.equal(sets["vflip"][..., 0, :], x[..., -1, :])
    assert torch.equal(sets["rot90"].rot90(-1, dims=(-2, -1)), x)


def test_natural_patches_are_smooth_unlike_noise() -> None:
    """Photographs have strongly correlated neighbouring pixels; uniform noise has none."""
    x = digits_like(n=200)
    sets = ood_sets(["natural", "noise"], x, 17, seed=0)

    def neighbour_corr(images: torch.Tensor) -> float:
        a, b = images[..., :-1].double().flatten(), images[..., 1:].double().flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_corr(sets["natural"]) > 0.5
    assert abs(neighbour_corr(sets["noise"])) < 0.1
    assert sets["natural"].double().std() > 1.0  # not a constant grey


def test_auroc_and_the_threshold() -> None:
    inside, outside = torch.arange(10.0, 20.0), torch.arange(0.0, 10.0)
    assert auroc(inside, outside) == 1.0
    assert auroc(outside, inside) == 0.0
    assert auroc(inside, inside) == pytest.approx(0.5)
    reference = torch.arange(100.0)
    threshold = calibrate_threshold(reference, 0.05)
    assert float((reference < threshold).double().mean()) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no finite reference"):
        calibrate_threshold(torch.tensor([float("-inf")]), 0.05)


def test_typicality_penalises_both_tails() -> None:
    """An image far above the typical log-likelihood is as atypical as one far below it."""
    log_px = torch.tensor([-100.0, -60.0, -20.0])
    typ = statistic(log_px, -60.0, "typicality")
    assert typ[1] > typ[0] and typ[0] == typ[2]
    assert torch.equal(statistic(log_px, -60.0, "likelihood"), log_px)


def test_ood_metrics_carry_delong_and_wilson_intervals() -> None:
    """Per set: both AUROCs with DeLong intervals inside [0, 1] (float64: a perfect separation is
    exactly 1, never 1.0000001) and the flagged share with its Wilson interval; the held-out
    false-positive rate (`ood/fpr`) likewise, at the threshold calibrated on validation."""
    g = torch.Generator().manual_seed(0)
    val = torch.randn(200, generator=g, dtype=torch.float64) - 50
    heldout = torch.randn(150, generator=g, dtype=torch.float64) - 50
    sets = {
        "noise": torch.randn(150, generator=g, dtype=torch.float64) - 500,  # far below
        "hflip": torch.randn(120, generator=g, dtype=torch.float64) - 51,  # overlapping
    }
    calibration = calibrate(val, "likelihood", 0.1)
    metrics = ood_metrics(heldout, sets, calibration, confidence=0.9)

    def interval(key: str) -> tuple[float, float, float]:
        return metrics[key], metrics[v.ci_low(key)], metrics[v.ci_high(key)]

    keys = {v.OOD_FPR, v.OOD_THRESHOLD}
    for name in sets:
        keys |= {v.auroc(name), v.auroc(name, typicality=True), v.detected(name)}
    assert set(metrics) == keys | {
        f(k) for k in keys - {v.OOD_THRESHOLD} for f in (v.ci_low, v.ci_high)
    }
    assert metrics[v.OOD_THRESHOLD] == calibration.threshold
    assert interval(v.auroc("noise")) == (1.0, 1.0, 1.0)
    for name, outside in sets.items():
        assert interval(v.auroc(name)) == tuple(auroc_estimate(heldout, outside, confidence=0.9))
        typical = auroc_estimate(
            statistic(heldout, calibration.reference_mean, "typicality"),
            statistic(outside, calibration.reference_mean, "typicality"),
            confidence=0.9,
        )
        assert interval(v.auroc(name, typicality=True)) == tuple(typical)
        flagged = int((outside < calibration.threshold).sum())
        assert interval(v.detected(name)) == tuple(wilson(flagged, len(outside), confidence=0.9))
        for key in (v.auroc(name), v.auroc(name, typicality=True), v.detected(name)):
            low, high = metrics[v.ci_low(key)], metrics[v.ci_high(key)]
            assert 0.0 <= low <= metrics[key] <= high <= 1.0, key
    overlapping = v.auroc("hflip")
    assert metrics[v.ci_low(overlapping)] < metrics[overlapping] < metrics[v.ci_high(overlapping)]
    fp = int((heldout < calibration.threshold).sum())
    assert interval(v.OOD_FPR) == tuple(wilson(fp, len(heldout), confidence=0.9))
    assert 0 < fp < len(heldout)
