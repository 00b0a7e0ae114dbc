"""Sample metrics of sets of images against the reference split, each with its interval.

A row of the comparison (a family, the copycat, the held-out real images) is S sets of images
seen through the protocol's feature extractor. For each set against the reference features:

- FID, KID, precision/recall (Kynkäänniemi et al. 2019) and the Inception-style score come from
  torch-fidelity's features -> metric functions with the arguments `calculate_metrics` passes
  (the reference implementation: the numbers are those of one `calculate_metrics` call);
- density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for
  generative models") from `manifold_metrics`, written here on distance matrices so that the
  bootstrap can reuse them; tests hold it to the authors' `prdc` package and its precision and
  recall to torch-fidelity's. Inside a ball means distance <= radius, as in torch-fidelity.

The row's value is the mean over its sets; the interval follows `intervals.py`: the spread
between sets plus a bootstrap over the reference images. A bootstrap replicate is the metric of
the resampled reference, computed from matrices built once per set (distances, kernel values,
the generated side's covariance factor), which is what keeps B replicates cheap: one
replicate costs index gathers and a batch of small symmetric eigenproblems, not a new feature
pass or a new distance matrix. The replicate statistics equal torch-fidelity's on the full sets
(tested): FID exactly, KID as the one-subset U-statistic (torch-fidelity's point value averages
`kid_subsets` random subsets of it, which has the same expectation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from genlab.evaluation import vocabulary as v
from genlab.evaluation.features import Features
from genlab.evaluation.intervals import (
    NON_NEGATIVE,
    UNBOUNDED,
    UNIT,
    Bounds,
    bootstrap_indices,
    sample_metric_interval,
)
from genlab.evaluation.vocabulary import Estimate

if TYPE_CHECKING:  # protocol.py keeps this module's reference draws in its cache
    from genlab.evaluation.protocol import Protocol

# The range each metric lives in (intervals are clipped to it).
BOUNDS: dict[str, Bounds] = {
    v.FID: NON_NEGATIVE,
    v.KID: UNBOUNDED,
    v.PRECISION: UNIT,
    v.RECALL: UNIT,
    v.F_SCORE: UNIT,
    v.DENSITY: NON_NEGATIVE,
    v.COVERAGE: UNIT,
    v.ISC: NON_NEGATIVE,
    v.CLASS_FID_MEAN: NON_NEGATIVE,
}
# Metrics of the generated images alone: no reference part in their uncertainty.
SET_ONLY = (v.ISC,)


def _kwargs(protocol: Protocol, n: int, m: int) -> dict[str, object]:
    """torch-fidelity's arguments for sets of n generated and m reference images: KID subsets
    and IS splits shrink to the set sizes when those are smaller than the protocol's."""
    return {
        "kid_subset_size": min(protocol.kid_subset_size, n, m),
        "kid_subsets": protocol.kid_subsets,
        "prc_neighborhood": protocol.prc_neighborhood,
        "isc_splits": min(protocol.isc_splits, n),
        "rng_seed": protocol.seed,
        # Precision/recall in row blocks: the same result with less memory.
        "save_cpu_ram": True,
        "verbose": False,
    }


# ---------------------------------------------------------------- density and coverage


def knn_radii(distances: Tensor, k: int) -> Tensor:
    """Each row's distance to its k-th nearest neighbour among the other rows of a square
    distance matrix (N, N) whose diagonal is each point's distance to itself (0): (N,)."""
    if distances.shape[0] <= k:
        raise ValueError(f"need more than k={k} images for k-nearest-neighbour radii")
    return distances.kthvalue(k + 1, dim=1).values


def manifold_metrics(
    d_gr: Tensor, generated_radii: Tensor, reference_radii: Tensor, k: int
) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)
    from the distances between generated and reference features d_gr (N, M) and each side's
    k-NN radii (N,), (M,):

    - precision: share of generated points inside some reference ball;
    - recall: share of reference points inside some generated ball;
    - density: (1 / kN) sum over generated points of the reference balls holding them;
    - coverage: share of reference balls holding at least one generated point.
    """
    inside = d_gr <= reference_radii[None, :]  # (N, M): generated i in reference ball j
    return {
        v.PRECISION: float(inside.any(dim=1).double().mean()),
        v.RECALL: float((d_gr <= generated_radii[:, None]).any(dim=0).double().mean()),
        v.DENSITY: float(inside.sum(dim=1).double().mean() / k),
        v.COVERAGE: float(inside.any(dim=0).double().mean()),
    }


def density_coverage(generated: Tensor, reference: Tensor, k: int) -> dict[str, float]:
    """Density and coverage of generated features (N, D) against reference features (M, D)."""
    g, r = generated.double(), reference.double()
    out = manifold_metrics(
        torch.cdist(g, r), knn_radii(torch.cdist(g, g), k), knn_radii(torch.cdist(r, r), k), k
    )
    return {key: out[key] for key in (v.DENSITY, v.COVERAGE)}


# ---------------------------------------------------------------- one set against the reference


def class_fids(
    generated: Tensor, generated_y: Tensor, reference: Tensor, reference_y: Tensor, classes: int
) -> dict[int, float]:
    """FID between the generated and the reference features of each class (torch-fidelity's
    statistics and Frechet distance), {class: fid}; a class with fewer than two images on either
    side is left out. Features (N, D); labels int64 (N,).

    Per-class sets are small (here ~35 generated against ~45 test images of a class), and FID is
    biased upwards at small N: compare per-class FIDs across families, not with the overall FID.
    """
    out = {}
    for k in range(classes):
        a, b = generated[generated_y == k], reference[reference_y == k]
        if len(a) < 2 or len(b) < 2:
            continue
        out[k] = frechet_distance(a, b)
    return out


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FID between two sets of features (N, D), torch-fidelity's statistics and distance in
    float64."""
    stats = [fid_features_to_statistics(f.double().cpu()) for f in (a, b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[torch_fidelity.KEY_METRIC_FID])


def point_metrics(generated: Features, reference: Features, protocol: Protocol) -> dict[str, float]:
    """Every sample metric of one set against the reference: FID, KID, precision/recall and the
    Inception(-style) score by torch-fidelity's features -> metric functions, density and
    coverage by `manifold_metrics`."""
    n, m = len(generated), len(reference)
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 images on each side, got {n} and {m}")
    if generated.features.shape[1] != reference.features.shape[1]:
        raise ValueError(
            f"generated features are {generated.features.shape[1]}-d but reference features are "
            f"{reference.features.shape[1]}-d: they come from different extractors"
        )
    kw = _kwargs(protocol, n, m)
    g, r = generated.features, reference.features
    isc = isc_featuresdict_to_metric({"logits": generated.logits}, "logits", **kw)
    stats = [fid_features_to_statistics(f) for f in (g, r)]
    fid = fid_statistics_to_metric(*stats, verbose=False)
    kid = kid_features_to_metric(g, r, **kw)
    prc = prc_features_to_metric(g, r, **kw)
    return {
        v.FID: fid[torch_fidelity.KEY_METRIC_FID],
        v.KID: kid[torch_fidelity.KEY_METRIC_KID_MEAN],
        v.KID_STD: kid[torch_fidelity.KEY_METRIC_KID_STD],
        v.PRECISION: prc[torch_fidelity.KEY_METRIC_PRECISION],
        v.RECALL: prc[torch_fidelity.KEY_METRIC_RECALL],
        v.F_SCORE: prc[torch_fidelity.KEY_METRIC_F_SCORE],
        **density_coverage(g, r, protocol.prc_neighborhood),
        v.ISC: isc[torch_fidelity.KEY_METRIC_ISC_MEAN],
        v.ISC_STD: isc[torch_fidelity.KEY_METRIC_ISC_STD],
    }


# ---------------------------------------------------------------- bootstrap replicates


def _covariance(x: Tensor) -> Tensor:
    """Unbiased covariance (D, D) of rows x (n, D), float64."""
    centred = x - x.mean(dim=0)
    return centred.T @ centred / (x.shape[0] - 1)


def _factor(x: Tensor) -> Tensor:
    """F with F F^T = cov(x): the centred rows / sqrt(n - 1) when n <= D, else the symmetric
    square root of the covariance; (D, min(n, D))."""
    n, d = x.shape
    if n <= d:
        return (x - x.mean(dim=0)).T / math.sqrt(n - 1)
    values, vectors = torch.linalg.eigh(_covariance(x))
    return vectors * values.clamp(min=0).sqrt() @ vectors.T


def _frechet(
    mu_g: Tensor, trace_g: Tensor, factor_g: Tensor, mu_r: Tensor, cov_r: Tensor
) -> Tensor:
    """FID between a generated Gaussian (mean, trace of covariance, factor F: (D, r)) and a
    reference Gaussian (mean, covariance): |mu_g - mu_r|^2 + tr S_g + tr S_r - 2 tr sqrt(S_g S_r),
    the last through the eigenvalues of F^T S_r F, which are those of S_g S_r."""
    inner = factor_g.T @ cov_r @ factor_g  # (r, r), symmetric PSD
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    return ((mu_g - mu_r) ** 2).sum() + trace_g + cov_r.diagonal().sum() - 2 * trace_sqrt


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's polynomial kernel (a b^T / D + 1)^3, torch-fidelity's defaults."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _offdiagonal_mean(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


@dataclass(frozen=True)
class ReferenceDraws:
    """The bootstrap draws of the reference rows, with the parts of their replicates that need
    the reference's (M, M) kernel and distance matrices: the same for every row of a
    comparison, so the reference stage computes them once per protocol (`reference_draws`) and
    every row reads them. (Per row, at MNIST's M = 10000 test images, each draw gathered and
    ranked a 10000 x 10000 matrix: 150 s of a family's evaluation at 50 draws on 2 cores.)"""

    index: Tensor  # (B, M) int64: the rows of each draw
    radii: Tensor  # (B, M) float64: each drawn row's k-NN radius within its draw
    kernel_rr: Tensor  # (B,) float64: KID's reference term of each draw

    def as_dict(self) -> dict[str, Tensor]:
        return {"index": self.index, "radii": self.radii, "kernel_rr": self.kernel_rr}

    def check(self, rows: int, replicates: int) -> None:
        """Raises ValueError unless these are `replicates` draws of `rows` reference rows."""
        b, m = replicates, rows
        if not (
            self.index.shape == (b, m)
            and self.index.dtype == torch.int64
            and (m == 0 or (int(self.index.min()) >= 0 and int(self.index.max()) < m))
            and self.radii.shape == (b, m)
            and self.kernel_rr.shape == (b,)
        ):
            raise ValueError(f"not {b} bootstrap draws of {m} reference rows")


def reference_draws(reference: Features, index: Tensor, k: int) -> ReferenceDraws:
    """The draws `index` (B, M) of the reference rows with their k-NN radii and KID terms."""
    x = reference.features.double()
    kernel, distances = _kernel(x, x), torch.cdist(x, x)  # (M, M) each
    radii, kernel_rr = [], []
    for rows in index:
        m = rows.numel()
        counts = torch.bincount(rows, minlength=x.shape[0]).double()
        # Positions a != b of the draw; copies of one image at two positions are such a pair.
        pairs = counts @ kernel @ counts - (counts * kernel.diagonal()).sum()
        kernel_rr.append(pairs / (m * (m - 1)))
        radii.append(knn_radii(distances[rows[:, None], rows], k))
    return ReferenceDraws(index=index, radii=torch.stack(radii), kernel_rr=torch.stack(kernel_rr))


def protocol_draws(reference: Features, protocol: Protocol) -> ReferenceDraws:
    """The protocol's draws: `bootstrap` of them, from a generator seeded by its seed (the
    first numbers `sample_metrics` draws from it)."""
    generator = torch.Generator().manual_seed(protocol.seed)
    index = bootstrap_indices(len(reference), protocol.bootstrap, generator)
    return reference_draws(reference, index, protocol.prc_neighborhood)


@dataclass(frozen=True)
class _Reference:
    """The reference side of every replicate (float64)."""

    x: Tensor  # (M, D) features
    y: Tensor | None  # (M,) labels
    draws: ReferenceDraws
    k: int  # nearest neighbours of a ball

    @classmethod
    def of(
        cls, reference: Features, labels: Tensor | None, draws: ReferenceDraws, k: int
    ) -> _Reference:
        return cls(x=reference.features.double(), y=labels, draws=draws, k=k)

    def draw(self, b: int) -> _Draw:
        """What every set's replicate against the reference's draw b shares."""
        index = self.draws.index[b]
        x = self.x[index]
        by_class = {}
        if self.y is not None:
            y = self.y[index]
            for c in y.unique().tolist():
                xc = x[y == c]
                if len(xc) >= 2:
                    by_class[c] = (xc.mean(dim=0), _covariance(xc))
        return _Draw(
            index=index,
            counts=torch.bincount(index, minlength=self.x.shape[0]).double(),
            mean=x.mean(dim=0),
            cov=_covariance(x),
            kernel_rr=self.draws.kernel_rr[b],
            radii=self.draws.radii[b],
            by_class=by_class,
        )


@dataclass(frozen=True)
class _Draw:
    """One bootstrap draw of the reference rows, and what its replicates reuse."""

    index: Tensor  # (M,) rows drawn
    counts: Tensor  # (M,) times each row was drawn
    mean: Tensor  # (D,)
    cov: Tensor  # (D, D)
    kernel_rr: Tensor  # KID's reference term
    radii: Tensor  # (M,) k-NN radii within the draw
    by_class: dict[int, tuple[Tensor, Tensor]]  # class -> mean, covariance (>= 2 rows drawn)


class _Set:
    """One set of generated features against the reference: the matrices its replicates reuse."""

    def __init__(
        self, x: Tensor, logits: Tensor, labels: Tensor | None, ref: _Reference, *, classes: int
    ) -> None:
        self.x, self.logits, self.labels, self.ref = x, logits, labels, ref
        self.mu, self.factor = x.mean(dim=0), _factor(x)
        self.trace = _covariance(x).diagonal().sum()
        self.kernel_gr = _kernel(x, ref.x)  # (N, M)
        self.kernel_gg = _offdiagonal_mean(_kernel(x, x))
        self.d_gr = torch.cdist(x, ref.x)  # (N, M)
        self.radii = knn_radii(torch.cdist(x, x), ref.k)  # (N,)
        # Per class with at least two samples (conditional sets): mean, trace, factor.
        self.by_class = {} if labels is None else _class_stats(x, labels, classes)

    def against(self, draw: _Draw) -> dict[str, float]:
        """The metrics of this set against a bootstrap draw of the reference."""
        n, m = self.x.shape[0], draw.index.numel()
        out = {v.FID: float(_frechet(self.mu, self.trace, self.factor, draw.mean, draw.cov))}
        cross = (self.kernel_gr @ draw.counts).sum() / (n * m)
        out[v.KID] = float(self.kernel_gg + draw.kernel_rr - 2 * cross)
        out |= manifold_metrics(self.d_gr[:, draw.index], self.radii, draw.radii, self.ref.k)
        out[v.F_SCORE] = _f_score(out[v.PRECISION], out[v.RECALL])
        if self.by_class:
            out[v.CLASS_FID_MEAN] = _class_fid_mean(self.by_class, draw)
        return out

    def resampled(self, index: Tensor, draw: _Draw) -> dict[str, float]:
        """The metrics of the images `index` of this set against a bootstrap draw of the
        reference, both resampled at once: for a row with one fixed set (the held-out real
        images), whose samples' noise only a bootstrap of its images can show. (Resampling the
        two sides one at a time and adding the variances counts their interaction twice: in a
        seeded simulation that widened the intervals by half.)"""
        x, n, m = self.x[index], index.numel(), draw.index.numel()
        cov = _covariance(x)
        out = {
            v.FID: float(_frechet(x.mean(0), cov.diagonal().sum(), _factor(x), draw.mean, draw.cov))
        }
        cross = (self.kernel_gr[index] @ draw.counts).sum() / (n * m)
        out[v.KID] = float(_offdiagonal_mean(_kernel(x, x)) + draw.kernel_rr - 2 * cross)
        radii = knn_radii(torch.cdist(x, x), self.ref.k)
        out |= manifold_metrics(self.d_gr[index][:, draw.index], radii, draw.radii, self.ref.k)
        out[v.F_SCORE] = _f_score(out[v.PRECISION], out[v.RECALL])
        if self.by_class:
            stats = _class_stats(x, self.labels[index], max(self.by_class) + 1)
            same = stats.keys() == self.by_class.keys()
            out[v.CLASS_FID_MEAN] = _class_fid_mean(stats, draw) if same else math.nan
        return out


def _class_stats(x: Tensor, labels: Tensor, classes: int) -> dict[int, tuple[Tensor, ...]]:
    """Per class with at least two rows: mean, covariance trace and factor of its rows."""
    out = {}
    for c in range(classes):
        xc = x[labels == c]
        if len(xc) >= 2:
            out[c] = (xc.mean(dim=0), _covariance(xc).diagonal().sum(), _factor(xc))
    return out


def _class_fid_mean(stats: dict[int, tuple[Tensor, ...]], draw: _Draw) -> float:
    """Mean per-class FID of generated class statistics against a reference draw; nan when a
    class has fewer than two rows in the draw."""
    fids = []
    for c, (mean, trace, factor) in stats.items():
        if c not in draw.by_class:
            return math.nan
        fids.append(float(_frechet(mean, trace, factor, *draw.by_class[c])))
    return float(np.mean(fids))


def _f_score(precision: float, recall: float) -> float:
    """torch-fidelity's F-score of precision and recall."""
    return 2 * precision * recall / max(1e-5, precision + recall)


# ---------------------------------------------------------------- a row: S sets, intervals


def _isc(logits: Tensor, protocol: Protocol) -> float:
    kw = _kwargs(protocol, len(logits), len(logits))
    isc = isc_featuresdict_to_metric({"logits": logits}, "logits", **kw)
    return isc[torch_fidelity.KEY_METRIC_ISC_MEAN]


def sample_metrics(
    sets: list[Features],
    reference: Features,
    protocol: Protocol,
    *,
    labels: list[Tensor] | None = None,
    reference_labels: Tensor | None = None,
    num_classes: int = 0,
    draws: ReferenceDraws | None = None,
) -> dict[str, float]:
    """Every sample metric of a row of S sets of images against the reference, each the mean
    over the sets with its interval (``<name>_ci_low``/``_ci_high``), plus per-class FIDs when
    the sets are class-conditional (`labels`: the class asked for, per set).

    With one set (a row of fixed real images) the samples' part of each interval comes from a
    bootstrap of its images; with several, from the spread between the sets (`intervals.py`).
    The reference bootstrap draws come from a generator seeded by the protocol's seed, so every
    row of a comparison sees the same reference draws; `draws`, the reference stage's cache of
    them (`protocol_draws`), saves computing their radii and KID terms again."""
    if not sets:
        raise ValueError("no sets of images to measure")
    conditional = labels is not None
    if conditional and (reference_labels is None or len(labels) != len(sets)):
        raise ValueError("class-conditional sets need a label tensor per set and reference labels")
    k, confidence = protocol.prc_neighborhood, protocol.confidence
    per_set = [point_metrics(s, reference, protocol) for s in sets]
    per_class: list[dict[int, float]] = []
    if conditional:
        for metrics, s, y in zip(per_set, sets, labels, strict=True):
            fids = class_fids(s.features, y, reference.features, reference_labels, num_classes)
            per_class.append(fids)
            metrics[v.CLASS_FID_MEAN] = float(np.mean(list(fids.values())))

    generator = torch.Generator().manual_seed(protocol.seed)
    index = bootstrap_indices(len(reference), protocol.bootstrap, generator)
    if draws is None:
        draws = reference_draws(reference, index, k)
    elif not torch.equal(draws.index, index):
        raise ValueError(
            "the cached reference draws are not this protocol's: re-run the reference stage"
        )
    ref = _Reference.of(reference, reference_labels, draws, k)
    prepared = [
        _Set(s.features.double(), s.logits, y, ref, classes=num_classes)
        for s, y in zip(sets, labels if conditional else [None] * len(sets), strict=True)
    ]
    # Several sets: each draw of the reference against every set, averaged over the sets. One
    # set: the set's images are redrawn with the reference (`_Set.resampled`).
    own = bootstrap_indices(len(sets[0]), protocol.bootstrap, generator) if len(sets) == 1 else None
    replicates: dict[str, list[float]] = {}
    for b in range(protocol.bootstrap):
        draw = ref.draw(b)
        if own is None:
            per = [p.against(draw) for p in prepared]
            replicate = {key: float(np.mean([r[key] for r in per])) for key in per[0]}
        else:
            replicate = prepared[0].resampled(own[b], draw)
            replicate[v.ISC] = _isc(sets[0].logits[own[b]], protocol)
        for key, value in replicate.items():
            replicates.setdefault(key, []).append(value)

    out: dict[str, float] = {v.SAMPLE_SETS: float(len(sets))}
    for key in per_set[0]:
        values = [p[key] for p in per_set]
        if key not in BOUNDS:  # torch-fidelity's own spreads: reported as they are
            out[key] = float(np.mean(values))
            continue
        result = sample_metric_interval(
            values,
            reference_replicates=None if own is not None or key in SET_ONLY else replicates[key],
            set_replicates=None if own is None else replicates.get(key),
            confidence=confidence,
            bounds=BOUNDS[key],
        )
        out |= _with_interval(key, result)
    for c in sorted({c for fids in per_class for c in fids}):
        values = [fids[c] for fids in per_class if c in fids]
        out[v.class_fid(c)] = float(np.mean(values))
    return out


def _with_interval(key: str, result: Estimate) -> dict[str, float]:
    return {key: result.value, v.ci_low(key): result.low, v.ci_high(key): result.high}
