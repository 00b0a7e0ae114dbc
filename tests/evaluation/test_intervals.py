"""The interval rules (`intervals.py`) against known answers and seeded simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from genlab.evaluation import vocabulary as v
from genlab.evaluation.intervals import (
    UNIT,
    auroc_estimate,
    delong,
    mean_and_se,
    rate,
    sample_metric_interval,
    t_interval,
    wilson,
)


def test_wilson_known_values() -> None:
    # Wilson (1927) for 0/10, 10/10 and 5/10 at 95%: the textbook numbers.
    assert wilson(0, 10, confidence=0.95) == pytest.approx((0.0, 0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10, confidence=0.95) == pytest.approx((1.0, 0.7225, 1.0), abs=1e-4)
    assert wilson(5, 10, confidence=0.95) == pytest.approx((0.5, 0.2366, 0.7634), abs=1e-4)
    assert math.isnan(wilson(0, 0, confidence=0.95).value)
    assert rate(torch.tensor([True, False, False, False]), confidence=0.95).value == 0.25


def test_wilson_covers_a_rate_at_about_the_stated_rate() -> None:
    g = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        k = int(g.binomial(200, 0.03))
        e = wilson(k, 200, confidence=0.95)
        hits += e.low <= 0.03 <= e.high
    assert 0.93 <= hits / 2000 <= 0.98


def test_t_interval_is_the_textbook_t_interval_for_one_variance() -> None:
    x = np.array([1.0, 2.0, 4.0])
    e = t_interval(x.mean(), [(x.var(ddof=1) / 3, 2)], confidence=0.95)
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert e == pytest.approx((x.mean(), x.mean() - half, x.mean() + half))
    # A second variance with many degrees of freedom: Welch-Satterthwaite in between.
    wide = t_interval(0.0, [(1.0, 2), (1.0, 1000)], confidence=0.95)
    assert stats.norm.ppf(0.975) * math.sqrt(2) < wide.high < stats.t.ppf(0.975, 2) * math.sqrt(2)
    assert t_interval(0.5, [(1.0, 1000)], confidence=0.95, bounds=UNIT) == (0.5, 0.0, 1.0)
    assert t_interval(2.0, [(0.0, 3)], confidence=0.95) == (2.0, 2.0, 2.0)


def test_sample_metric_interval_needs_a_spread_for_one_set() -> None:
    with pytest.raises(ValueError, match="set_replicates"):
        sample_metric_interval([1.0], reference_replicates=[1.0, 2.0], confidence=0.95)
    e = sample_metric_interval(
        [1.0], reference_replicates=None, set_replicates=[0.9, 1.1, 1.0, 1.2], confidence=0.95
    )
    assert e.low < 1.0 < e.high


def test_sample_metric_interval_covers_a_mean_at_about_the_stated_rate() -> None:
    """3 sets with unit noise plus a shared reference part of sd 0.5, whose replicates are
    draws of its distribution: the t interval with Welch-Satterthwaite df covers the mean
    (measured 0.929: the approximation is a little liberal with 2 degrees of freedom)."""
    g = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        shared = g.normal(0, 0.5)
        sets = shared + g.normal(0, 1, 3)
        replicates = sets.mean() + g.normal(0, 0.5, 100)
        e = sample_metric_interval(sets, reference_replicates=replicates, confidence=0.95)
        hits += e.low <= 0 <= e.high
    assert 0.92 <= hits / 2000 <= 0.975


def test_mean_and_se() -> None:
    mean, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert (mean, se) == pytest.approx((2.5, np.std([1, 2, 3, 4], ddof=1) / 2))
    assert math.isnan(mean_and_se(torch.tensor([1.0]))[1])


def test_delong_equals_sklearn_and_the_bootstrap_spread() -> None:
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(300, generator=g) + 1, torch.randn(200, generator=g)
    auc, se = delong(pos, neg)
    labels = np.r_[np.ones(300), np.zeros(200)]
    assert auc == pytest.approx(roc_auc_score(labels, np.r_[pos.numpy(), neg.numpy()]), abs=1e-12)
    rng = np.random.default_rng(0)
    boot = [
        roc_auc_score(labels, np.r_[rng.choice(pos.numpy(), 300), rng.choice(neg.numpy(), 200)])
        for _ in range(500)
    ]
    assert se == pytest.approx(np.std(boot), rel=0.15)


def test_auroc_has_no_round_off_above_one() -> None:
    """Perfectly separated float32 scores: exactly 1, never 1.0000001 (the old float32 path)."""
    inside = torch.linspace(10, 11, 447, dtype=torch.float32)
    e = auroc_estimate(inside, torch.linspace(-5, 5, 447, dtype=torch.float32), confidence=0.95)
    assert e.value == 1.0 and e.high <= 1.0
    ties = delong(torch.zeros(5), torch.zeros(5))
    assert ties[0] == 0.5


def test_estimate_reads_an_interval_or_a_standard_error() -> None:
    metrics = {"a": 1.0, v.ci_low("a"): 0.5, v.ci_high("a"): 2.0, "b": 3.0, v.se("b"): 1.0}
    assert v.estimate(metrics, "a") == (1.0, 0.5, 2.0)
    assert v.estimate(metrics, "b") == pytest.approx((3.0, 3 - 1.959964, 3 + 1.959964))
    assert not v.estimate({"c": 1.0}, "c").has_interval
    assert math.isnan(v.estimate({}, "d").value)
    assert v.Estimate(1, 0, 2).overlaps(v.Estimate(3, 2, 4))
    assert not v.Estimate(1, 0, 1.9).overlaps(v.Estimate(3, 2, 4))
