"""Uncertainty of genlab's estimates: the rules, in one place.

Every number the report compares carries an interval (95% unless `evaluate.confidence` says
otherwise), built by one of four rules:

- **Sample metrics** (FID, KID, precision, recall, density, coverage, IS, per-class FID, C_T):
  the point value is the mean over S independent sample sets; its uncertainty has two sources,
  the samples and the finite reference set, and both are in the interval. The samples' part is
  the variance between the S sets divided by S (S - 1 degrees of freedom); the reference's part
  is the variance of the metric over a bootstrap of the reference images (each replicate
  averaged over the S sets, B - 1 degrees of freedom). The interval is mean +- t * sqrt(sum),
  with the Welch-Satterthwaite degrees of freedom of the sum: with 3 sets and a dominant sample
  part, t is about 4, not 1.96 — what 3 sets can say. A row with one fixed set of images (the
  held-out real images) gets its samples' part from a bootstrap of those images instead.
- **Rates of per-image verdicts** (exact copies, nearest-neighbour memorisation, authenticity,
  conditional accuracy, classification and probe accuracy): the Wilson score interval of the
  pooled count (Wilson 1927), which stays inside [0, 1] and is sensible at 0 and 1.
- **Means over images** (held-out NLL and bits/dim): the standard error over images. Each image
  gets its own Monte Carlo draws where the estimate is stochastic, so the spread between images
  holds the Monte Carlo noise too.
- **AUROC**: DeLong's variance (DeLong et al. 1988, in the fast form of Sun & Xu 2014).

Replicate spreads only enter as variances, so the bias a bootstrap adds to a statistic (FID
rises when a resample repeats images) does not move the interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from genlab.evaluation.vocabulary import Estimate, z_value

Bounds = tuple[float, float]
UNBOUNDED: Bounds = (-math.inf, math.inf)
NON_NEGATIVE: Bounds = (0.0, math.inf)
UNIT: Bounds = (0.0, 1.0)


def _clip(value: float, bounds: Bounds) -> float:
    return min(max(value, bounds[0]), bounds[1])


def t_interval(
    value: float,
    variances: Sequence[tuple[float, float]],
    *,
    confidence: float,
    bounds: Bounds = UNBOUNDED,
) -> Estimate:
    """value +- t * sqrt(sum of variances), each variance given with its degrees of freedom,
    t from the Welch-Satterthwaite degrees of freedom of the sum; clipped to `bounds`."""
    total = sum(v for v, _ in variances)
    if not math.isfinite(value) or not math.isfinite(total):
        return Estimate(value, math.nan, math.nan)
    if total <= 0:
        return Estimate(value, _clip(value, bounds), _clip(value, bounds))
    denominator = sum(v * v / df for v, df in variances if v > 0)
    df = total * total / denominator
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(total)
    return Estimate(value, _clip(value - half, bounds), _clip(value + half, bounds))


def sample_metric_interval(
    per_set: Sequence[float],
    *,
    reference_replicates: Sequence[float] | None,
    set_replicates: Sequence[float] | None = None,
    confidence: float,
    bounds: Bounds = UNBOUNDED,
) -> Estimate:
    """The interval of a sample metric measured on S >= 1 sets of images (see the module
    docstring): `per_set` holds the metric of each set against the full reference,
    `reference_replicates` its mean over the sets for each bootstrap draw of the reference (None:
    the metric does not depend on the reference), `set_replicates` the metric over a bootstrap
    of the images when there is only one set."""
    values = np.asarray(per_set, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a sample metric needs at least one set of images")
    variances = []
    if values.size > 1:
        variances.append((float(values.var(ddof=1)) / values.size, values.size - 1))
    elif set_replicates is None:
        raise ValueError("one set of images: pass set_replicates (a bootstrap of its images)")
    for replicates in (set_replicates, reference_replicates):
        if replicates is not None:
            r = np.asarray(replicates, dtype=np.float64)
            r = r[np.isfinite(r)]
            if r.size < 2:
                return Estimate(float(values.mean()), math.nan, math.nan)
            variances.append((float(r.var(ddof=1)), r.size - 1))
    return t_interval(float(values.mean()), variances, confidence=confidence, bounds=bounds)


def wilson(successes: int, n: int, *, confidence: float) -> Estimate:
    """The rate successes / n with its Wilson score interval."""
    if n <= 0:
        return Estimate(math.nan, math.nan, math.nan)
    z = z_value(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def rate(flags: torch.Tensor, *, confidence: float) -> Estimate:
    """The share of True in bool flags (any shape), with its Wilson interval."""
    return wilson(int(flags.sum()), flags.numel(), confidence=confidence)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-image values (N,) and its standard error sd / sqrt(N) (nan for N < 2)."""
    x = values.double().flatten()
    if x.numel() < 2:
        return float(x.mean()) if x.numel() else math.nan, math.nan
    return float(x.mean()), float(x.std(unbiased=True) / math.sqrt(x.numel()))


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    return stats.rankdata(x, method="average")


def delong(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[float, float]:
    """AUROC of telling `positives` (higher scores) from `negatives` and its DeLong standard
    error: Sun & Xu 2014, "Fast implementation of DeLong's algorithm", eq. (1)-(4) for one
    classifier. Exact in float64 (no float32 round-off above 1); ties count one half."""
    x = positives.double().flatten().numpy()
    y = negatives.double().flatten().numpy()
    m, n = x.size, y.size
    if m < 2 or n < 2:
        raise ValueError(f"AUROC needs at least 2 scores on each side, got {m} and {n}")
    tz = _midranks(np.concatenate([x, y]))
    tx, ty = _midranks(x), _midranks(y)
    auc = (tz[:m].sum() / m - (m + 1) / 2) / n
    v01 = (tz[:m] - tx) / n  # structural components of the positives
    v10 = 1 - (tz[m:] - ty) / m  # ... and of the negatives
    variance = v01.var(ddof=1) / m + v10.var(ddof=1) / n
    return float(auc), float(math.sqrt(max(variance, 0.0)))


def auroc_estimate(
    positives: torch.Tensor, negatives: torch.Tensor, *, confidence: float
) -> Estimate:
    """AUROC with the normal interval of its DeLong standard error, clipped to [0, 1]."""
    auc, error = delong(positives, negatives)
    half = z_value(confidence) * error
    return Estimate(auc, max(0.0, auc - half), min(1.0, auc + half))


def bootstrap_indices(n: int, replicates: int, generator: torch.Generator) -> torch.Tensor:
    """int64 (replicates, n): each row a draw of n indices with replacement."""
    return torch.randint(n, (replicates, n), generator=generator)
