"""Memorisation and novelty of generated images against the training set.

Every statistic is a per-sample array (a verdict or a distance), so that the caller can pool
several sample sets and put an interval on the rate (`intervals.py`); the functions are pure
functions on tensors.

- **Exact copies**: a sample identical, pixel for pixel, to some training image (the strictest
  form of the extraction criterion of Carlini et al. 2023, "Extracting Training Data from
  Diffusion Models", USENIX Security).
- **Nearest-neighbour memorisation**: d(x, NN1) / d(x, NN2) < 1/3, with NN1, NN2 the nearest
  and second-nearest training rows (Yoon et al. 2023, "Diffusion Probabilistic Models
  Generalize when They Fail to Memorize", ICML SPIGM workshop, after the relative-distance
  criterion of Carlini et al. 2023): a generation far closer to one training image than to any
  other is that image, whatever the absolute scale of the space. Pixel or feature space alike.
- **Authenticity** (Alaa et al. 2022, "How Faithful is your Synthetic Data? Sample-level Metrics
  for Evaluating and Auditing Generative Models", ICML): a sample is inauthentic when it is
  closer to its nearest training row than that row is to its own nearest training neighbour.
- **The data-copying test C_T** (Meehan, Chaudhuri & Dasgupta 2020, "A Non-Parametric Test to
  Detect Data-Copying in Generative Models", AISTATS): the training set is cut into cells
  (k-means); in each cell the distances of the generated samples to the cell's training points
  are compared with those of held-out test points by a Z-scored Mann-Whitney U, and C_T is the
  test-mass-weighted mean of the cells' Z_U. The formulas are those of the authors' code
  (github.com/casey-meehan/data-copying), continuity correction included.

Distances are Euclidean, in float64. Nearest neighbours are searched `chunk` query rows at a
time (memory O(chunk * M), never N x M) through `torch.cdist`'s matrix-product form; the
distances returned are then recomputed directly from the differences to the chosen rows, so a
copy is at distance exactly 0 (the matrix-product form leaves a rounding residue of ~1e-7).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from sklearn.cluster import KMeans

from genlab.evaluation import vocabulary as v
from genlab.evaluation.intervals import bootstrap_indices, rate, sample_metric_interval


def exact_copies(samples: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """bool (N,): sample i is identical, every pixel, to some training image.

    samples: (N, C, H, W) and train: (M, C, H, W), uint8 (any dtype, the same for both). The
    training images are hashed by their bytes, so the cost is O((N + M) C H W), not N x M.
    """
    if samples.shape[1:] != train.shape[1:] or samples.dtype != train.dtype:
        raise ValueError(
            f"samples {tuple(samples.shape)} {samples.dtype} and train {tuple(train.shape)} "
            f"{train.dtype} are not images of one kind"
        )
    train_rows = train.reshape(len(train), -1).cpu().numpy()  # (M, C*H*W)
    sample_rows = samples.reshape(len(samples), -1).cpu().numpy()  # (N, C*H*W)
    seen = {row.tobytes() for row in train_rows}
    found = [row.tobytes() in seen for row in sample_rows]
    return torch.tensor(found, dtype=torch.bool, device=samples.device)


def _nearest(
    query: torch.Tensor, train: torch.Tensor, *, k: int, chunk: int, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances (N, k) float64 ascending, indices (N, k) int64) of the k nearest training
    rows of each query row; `exclude_self`: query is train, and row i may not pick itself."""
    if query.ndim != 2 or train.ndim != 2 or query.shape[1] != train.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and train {tuple(train.shape)}: want (N, D)")
    if len(train) < k + exclude_self:
        raise ValueError(f"{len(train)} training rows, need at least {k + exclude_self}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    query = query.to(torch.float64)
    train = train.to(torch.float64)
    n = len(query)
    distances = torch.empty(n, k, dtype=torch.float64, device=query.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=query.device)
    for start in range(0, n, chunk):
        q = query[start : start + chunk]  # (c, D)
        full = torch.cdist(q, train, compute_mode="use_mm_for_euclid_dist")  # (c, M)
        if exclude_self:
            rows = torch.arange(len(q), device=q.device)
            full[rows, rows + start] = math.inf
        index = full.topk(k, dim=1, largest=False).indices  # (c, k)
        # Recompute from the differences: exact (a copy is at 0), unlike the expanded form.
        exact = (q[:, None, :] - train[index]).norm(dim=-1)  # (c, k)
        exact, order = exact.sort(dim=1, stable=True)
        distances[start : start + chunk] = exact
        indices[start : start + chunk] = index.gather(1, order)
    return distances, indices


def nearest_two(
    query: torch.Tensor, train: torch.Tensor, *, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d1 (N,), d2 (N,), index of the nearest (N,) int64) for query (N, D) and train (M, D),
    M >= 2, any real dtype: the Euclidean distances, in float64, from each query row to its
    nearest and second-nearest training rows, d1 <= d2. Neighbours within float64 rounding of a
    tie may come in either order."""
    distances, indices = _nearest(query, train, k=2, chunk=chunk)
    return distances[:, 0], distances[:, 1], indices[:, 0]


def nn_ratio(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """float64 (N,): d1 / d2 per sample, d1 (N,) <= d2 (N,) the distances to the nearest and
    second-nearest training rows. 0 / 0 (a sample equal to two identical training images) is
    0: a copy."""
    d1 = d1.to(torch.float64)
    d2 = d2.to(torch.float64)
    return torch.where(d2 > 0, d1 / d2, 0.0)


def nn_memorised(
    query: torch.Tensor, train: torch.Tensor, *, threshold: float = 1 / 3, chunk: int = 1024
) -> torch.Tensor:
    """bool (N,): d(q, NN1) / d(q, NN2) < threshold, NN1 and NN2 the nearest and second-nearest
    rows of train (M, D), M >= 2, to each query row (N, D) (Yoon et al. 2023; Carlini et al.
    2023). Flatten images to vectors first (x.flatten(1)): it works in pixel space and in any
    feature space alike."""
    d1, d2, _ = nearest_two(query, train, chunk=chunk)
    return nn_ratio(d1, d2) < threshold


def train_nn_distance(train: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """float64 (M,): d_NN(t_i) = min over j != i of |t_i - t_j| for train (M, D), M >= 2: each
    training row's distance to its nearest *other* training row (an exact duplicate gives 0)."""
    distances, _ = _nearest(train, train, k=1, chunk=chunk, exclude_self=True)
    return distances[:, 0]


def authentic(
    query: torch.Tensor,
    train: torch.Tensor,
    train_nn: torch.Tensor | None = None,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """bool (N,): the authenticity of Alaa et al. 2022. Query row q_j (N, D) with nearest
    training row t_i* (train: (M, D), M >= 2) is authentic iff

        d(q_j, t_i*) > d_NN(t_i*),

    d_NN(t_i*) the distance from t_i* to its own nearest training neighbour; `train_nn` (M,) is
    `train_nn_distance(train)` when precomputed. The authenticity of a set is the mean: copies
    score 0, held-out real data about 0.5 (on a Gaussian with M = 1000: 0.38 at D = 2, 0.47 at
    D = 4, 0.71 at D = 16; it rises with the dimension)."""
    if train_nn is None:
        train_nn = train_nn_distance(train, chunk=chunk)
    distances, indices = _nearest(query, train, k=1, chunk=chunk)
    return distances[:, 0] > train_nn.to(distances)[indices[:, 0]]


class Cells(NamedTuple):
    """The partition of the data-copying test: each point belongs to its nearest centroid."""

    centroids: torch.Tensor  # (k, D) float64


def fit_cells(train: torch.Tensor, *, k: int, seed: int) -> Cells:
    """k-means of the training rows (M, D): sklearn KMeans(k, n_init=10, random_state=seed), as
    the reference code partitions the training set."""
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed)
    kmeans.fit(train.to(torch.float64).cpu().numpy())
    return Cells(torch.from_numpy(kmeans.cluster_centers_).to(torch.float64))


def assign_cells(cells: Cells, x: torch.Tensor) -> torch.Tensor:
    """int64 (N,): index of the nearest centroid of each row of x (N, D)."""
    x = x.to(torch.float64)
    centroids = cells.centroids.to(x)  # (k, D)
    return torch.cdist(x, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)


def cell_distances(
    x: torch.Tensor,
    x_cells: torch.Tensor,
    train: torch.Tensor,
    train_cells: torch.Tensor,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """float64 (N,): the distance from each row of x (N, D) to the nearest training row (M, D)
    *of its own cell*: L(x) of Meehan et al. 2020, where T is restricted to the cell, as in the
    reference code. x_cells (N,) and train_cells (M,) are `assign_cells` of either; a cell that
    holds rows of x must hold a training row."""
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for cell in torch.unique(x_cells).tolist():
        in_x = x_cells == cell
        in_train = train_cells == cell
        if not in_train.any():
            raise ValueError(f"cell {cell} holds query rows but no training row")
        distances, _ = _nearest(x[in_x], train[in_train], k=1, chunk=chunk)
        out[in_x] = distances[:, 0]
    return out


def zu(test_dist: torch.Tensor, gen_dist: torch.Tensor) -> float:
    """Z_U of Meehan et al. 2020: the Z-scored Mann-Whitney U of the generated samples'
    distances to their nearest training point, L(Q_m) (gen_dist, m of them), against the test
    points', L(P_n) (test_dist, n of them):

        U = #{(j, i): L(Q_m)_j > L(P_n)_i} + #{ties} / 2  (scipy's U of the first sample),
        Z_U = (U - (n m / 2 - 0.5)) / sqrt(n m (n + m + 1) / 12),

    exactly the reference code's formula, with its 0.5 correction (no tie correction of the
    variance). Z_U << 0: the samples are closer to the training set than held-out data are
    (copying); >> 0: farther (underfitting)."""
    n, m = len(test_dist), len(gen_dist)
    u = mann_whitney_u(gen_dist.double().cpu().numpy(), test_dist.double().cpu().numpy())
    return float((u - (n * m / 2 - 0.5)) / math.sqrt(n * m * (n + m + 1) / 12))


def mann_whitney_u(first: np.ndarray, second: np.ndarray) -> float:
    """Mann-Whitney's U of `first` against `second` (1-D float arrays): the pairs (j, i) with
    first_j > second_i, ties counting one half; `scipy.stats.mannwhitneyu(first,
    second).statistic`, which the tests check it against. Counted here by binary search in the
    sorted `second` because scipy's argument handling costs ~0.8 ms a call, and C_T's bootstrap
    makes ~2500 calls per row (cells x sets x draws): 2.07 s -> 0.2 s a row on 2 cores."""
    ordered = np.sort(second)
    below = np.searchsorted(ordered, first, side="left")  # second_i < first_j
    up_to = np.searchsorted(ordered, first, side="right")  # second_i <= first_j
    return float(below.sum() + 0.5 * (up_to - below).sum())


def c_t(
    test_dist: torch.Tensor,
    test_cells: torch.Tensor,
    gen_dist: torch.Tensor,
    gen_cells: torch.Tensor,
    *,
    k: int,
    tau: float,
) -> float:
    """The data-copying statistic of Meehan et al. 2020:

        C_T = sum_{pi in Pi_tau} P_n(pi) Z_U(pi) / sum_{pi in Pi_tau} P_n(pi),
        Pi_tau = {pi : Q_m(pi) > tau and P_n(pi) > 0},

    over the k cells pi, with P_n(pi) and Q_m(pi) the fractions of the test points and of the
    generated samples in pi, and Z_U(pi) = `zu` of the cell's points. Inputs: per-point
    distances to the nearest training point of the point's cell (`cell_distances`; float (n,),
    (m,)) and cell indices (int (n,), (m,)); a bootstrap of the test points indexes these arrays
    (duplicated points are ties). A cell with no test point is left out: the reference code
    raises there, but with few test images a cell can be empty. tau >= 0, so a cell in Pi_tau
    has a generated sample. nan when no cell qualifies."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    test_count = torch.bincount(test_cells.cpu(), minlength=k)  # (k,)
    gen_count = torch.bincount(gen_cells.cpu(), minlength=k)  # (k,)
    p_n = test_count.double() / len(test_cells)
    q_m = gen_count.double() / len(gen_cells)
    qualifying = ((q_m > tau) & (test_count > 0)).nonzero().flatten().tolist()
    if not qualifying:
        return math.nan
    test_cells, gen_cells = test_cells.cpu(), gen_cells.cpu()
    test_dist, gen_dist = test_dist.cpu(), gen_dist.cpu()
    weighted = sum(
        p_n[cell].item() * zu(test_dist[test_cells == cell], gen_dist[gen_cells == cell])
        for cell in qualifying
    )
    return weighted / p_n[qualifying].sum().item()


class Memorisation(NamedTuple):
    """Per-sample statistics of one set of N samples against the training set."""

    copies: torch.Tensor  # bool (N,) exact copies
    memorised_pixels: torch.Tensor  # bool (N,) NN ratio < threshold in pixel space
    memorised_features: torch.Tensor  # bool (N,) NN ratio < threshold in feature space
    authentic: torch.Tensor  # bool (N,) authenticity in feature space
    train_dist: (
        torch.Tensor
    )  # float64 (N,) feature distance to the nearest training row of its cell
    cells: torch.Tensor  # int64 (N,) cell of each sample (for C_T)


def memorisation(
    samples: torch.Tensor,
    features: torch.Tensor,
    *,
    train: torch.Tensor,
    train_features: torch.Tensor,
    train_nn: torch.Tensor,
    cells: Cells,
    threshold: float = 1 / 3,
    chunk: int = 1024,
) -> Memorisation:
    """Every per-sample statistic of one set of samples, uint8 images (N, C, H, W) and their
    features (N, D), against the training set: its images (M, C, H, W), features (M, D),
    `train_nn_distance(train_features)` (M,) and fitted `cells`. `train_dist` is the feature
    distance to the nearest training row *of the sample's own cell* (`cell_distances`), what
    `c_t` compares with the test points' distances from the same function."""
    d1_pixels, d2_pixels, _ = nearest_two(samples.flatten(1), train.flatten(1), chunk=chunk)
    d1, d2, nearest = nearest_two(features, train_features, chunk=chunk)
    sample_cells = assign_cells(cells, features)
    train_cells = assign_cells(cells, train_features)
    return Memorisation(
        copies=exact_copies(samples, train),
        memorised_pixels=nn_ratio(d1_pixels, d2_pixels) < threshold,
        memorised_features=nn_ratio(d1, d2) < threshold,
        # Authenticity as in `authentic`, from the neighbours found once for both.
        authentic=d1 > train_nn.to(d1)[nearest],
        train_dist=cell_distances(features, sample_cells, train_features, train_cells, chunk=chunk),
        cells=sample_cells,
    )


# ---------------------------------------------------------------- a row: S sets, intervals


def memorisation_metrics(
    per_set: list[Memorisation],
    *,
    reference_dist: torch.Tensor,
    reference_cells: torch.Tensor,
    cells: int,
    tau: float,
    bootstrap: int,
    confidence: float,
    seed: int,
) -> dict[str, float]:
    """The row statistics of S sets' per-sample memorisation verdicts, each with its interval:
    the rates of exact copies, of nearest-neighbour memorisation (pixels, features) and of
    authentic samples, pooled over the sets (Wilson intervals); and C_T, the mean over the sets
    with the interval of a sample metric (`intervals.sample_metric_interval`): the spread between
    sets plus a bootstrap of the reference points, or, for one set, a bootstrap of both."""
    out: dict[str, float] = {}
    for key, field in (
        (v.EXACT_COPIES, "copies"),
        (v.NN_MEMORISED_PIXELS, "memorised_pixels"),
        (v.NN_MEMORISED_FEATURES, "memorised_features"),
        (v.AUTHENTICITY, "authentic"),
    ):
        estimate = rate(torch.cat([getattr(m, field) for m in per_set]), confidence=confidence)
        out |= {key: estimate.value, v.ci_low(key): estimate.low, v.ci_high(key): estimate.high}

    def statistic(m: Memorisation, index: torch.Tensor, own: torch.Tensor | None) -> float:
        gen_dist, gen_cells = m.train_dist, m.cells
        if own is not None:
            gen_dist, gen_cells = gen_dist[own], gen_cells[own]
        return c_t(
            reference_dist[index], reference_cells[index], gen_dist, gen_cells, k=cells, tau=tau
        )

    full = torch.arange(len(reference_dist))
    values = [statistic(m, full, None) for m in per_set]
    generator = torch.Generator().manual_seed(seed)
    draws = bootstrap_indices(len(reference_dist), bootstrap, generator)
    single = len(per_set) == 1
    own = bootstrap_indices(len(per_set[0].cells), bootstrap, generator) if single else None
    replicates = [
        statistic(per_set[0], index, own[b])
        if single
        else float(np.nanmean([statistic(m, index, None) for m in per_set]))
        for b, index in enumerate(draws)
    ]
    result = sample_metric_interval(
        [x for x in values if math.isfinite(x)] or [math.nan],
        reference_replicates=None if single else replicates,
        set_replicates=replicates if single else None,
        confidence=confidence,
    )
    out |= {v.C_T: result.value, v.ci_low(v.C_T): result.low, v.ci_high(v.C_T): result.high}
    return out
