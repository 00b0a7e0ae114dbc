"""Memorisation and novelty statistics: known answers on tiny seeded data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from genlab.evaluation.memorisation import (
    Cells,
    assign_cells,
    authentic,
    c_t,
    cell_distances,
    exact_copies,
    fit_cells,
    mann_whitney_u,
    memorisation,
    nearest_two,
    nn_memorised,
    nn_ratio,
    train_nn_distance,
    zu,
)


def _gaussian(n: int, d: int, *, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, generator=generator, dtype=torch.float64)


def _images(n: int, *, generator: torch.Generator) -> torch.Tensor:
    """uint8 (n, 1, 8, 8) at 17 levels."""
    return torch.randint(0, 17, (n, 1, 8, 8), generator=generator).to(torch.uint8)


# ---------------------------------------------------------------- exact copies


def test_exact_copies() -> None:
    g = torch.Generator().manual_seed(0)
    train = _images(50, generator=g)
    train = torch.cat([train, train[:3]])  # a training set with duplicated images
    drawn = train[torch.randint(0, len(train), (20,), generator=g)]
    assert exact_copies(drawn, train).all()
    assert not exact_copies(_images(20, generator=g), train).any()
    # One pixel off is not a copy.
    near = drawn.clone()
    near[:, 0, 0, 0] = (near[:, 0, 0, 0] + 1) % 17
    assert not exact_copies(near, train).any()


# ---------------------------------------------------------------- nearest neighbours


def test_nearest_two_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    train, query = _gaussian(40, 5, generator=g), _gaussian(23, 5, generator=g)
    d1, d2, index = nearest_two(query.float(), train.float(), chunk=7)  # chunk < N
    full = torch.cdist(query, train, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    sorted_full, order = full.sort(dim=1)
    assert d1.dtype == d2.dtype == torch.float64 and index.dtype == torch.int64
    torch.testing.assert_close(d1, sorted_full[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d2, sorted_full[:, 1], rtol=1e-6, atol=1e-6)
    assert torch.equal(index, order[:, 0])


def test_nn_ratio_zero_over_zero_is_a_copy() -> None:
    ratio = nn_ratio(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, 4.0]))
    assert ratio.dtype == torch.float64
    assert ratio.tolist() == [0.0, 0.0, 0.25]
    # A sample equal to two identical training images.
    train = torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0]])
    d1, d2, _ = nearest_two(train[:1], train)
    assert d1.item() == d2.item() == 0.0
    assert nn_memorised(train[:1], train).item()


def test_nn_memorised_training_rows_and_fresh_samples() -> None:
    g = torch.Generator().manual_seed(0)
    train = _gaussian(500, 8, generator=g)
    copies = train[torch.randint(0, 500, (100,), generator=g)]
    d1, d2, _ = nearest_two(copies, train)
    assert (nn_ratio(d1, d2) == 0).all()
    assert nn_memorised(copies, train).all()
    fresh = _gaussian(1000, 8, generator=g)
    # P(ratio < 1/3) is about (1/3)^8 for a locally uniform density: measured 0/1000.
    assert nn_memorised(fresh, train).double().mean().item() < 0.05


def test_train_nn_distance_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    train = _gaussian(37, 4, generator=g)
    full = torch.cdist(train, train, compute_mode="donot_use_mm_for_euclid_dist")  # (M, M)
    full.fill_diagonal_(math.inf)
    torch.testing.assert_close(train_nn_distance(train, chunk=5), full.min(dim=1).values)
    with_duplicate = torch.cat([train, train[:1]])
    distances = train_nn_distance(with_duplicate, chunk=5)
    assert distances[0].item() == distances[-1].item() == 0.0
    assert (distances[1:-1] > 0).all()


# ---------------------------------------------------------------- authenticity


def test_authenticity() -> None:
    g = torch.Generator().manual_seed(0)
    train = _gaussian(1000, 4, generator=g)
    train_nn = train_nn_distance(train)
    copies = train[torch.randint(0, 1000, (200,), generator=g)]
    assert not authentic(copies, train, train_nn).any()
    fresh = _gaussian(1000, 4, generator=g)
    rate = authentic(fresh, train).double().mean().item()  # train_nn computed inside
    # Held-out real data: measured 0.490 here; on other draws 0.38, 0.47, 0.59, 0.71 at
    # D = 2, 4, 8, 16 (it rises with the dimension).
    assert 0.3 < rate < 0.8
    assert torch.equal(authentic(fresh, train), authentic(fresh, train, train_nn, chunk=64))


# ---------------------------------------------------------------- Z_U and C_T


def test_zu_known_answer_and_scipy() -> None:
    # gen [0, 1] against test [1, 2]: no pair with gen > test, one tie -> U = 1/2;
    # mean 2*2/2 - 0.5 = 1.5, std sqrt(2*2*5/12).
    assert zu(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])) == pytest.approx(
        -1 / math.sqrt(5 / 3)
    )
    g = torch.Generator().manual_seed(0)
    test, gen = _gaussian(300, 1, generator=g)[:, 0].abs(), _gaussian(200, 1, generator=g)[:, 0]
    u = stats.mannwhitneyu(gen.numpy(), test.numpy(), alternative="less").statistic
    n, m = 300, 200
    expected = (u - (n * m / 2 - 0.5)) / math.sqrt(n * m * (n + m + 1) / 12)
    assert zu(test, gen) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_u_is_scipys_with_ties(seed: int) -> None:
    # Bootstrap draws duplicate points and distances repeat: ties within and across samples.
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 12, size=rng.integers(1, 60)).astype(float)
    second = rng.integers(0, 12, size=rng.integers(1, 60)).astype(float)
    expected = stats.mannwhitneyu(first, second, method="asymptotic").statistic
    assert mann_whitney_u(first, second) == expected
    continuous = rng.normal(size=50), rng.normal(size=37)
    expected = stats.mannwhitneyu(*continuous, method="asymptotic").statistic
    assert mann_whitney_u(*continuous) == expected


def test_zu_same_and_smaller_distances() -> None:
    g = torch.Generator().manual_seed(0)
    test = _gaussian(300, 1, generator=g)[:, 0].abs()
    same = _gaussian(300, 1, generator=g)[:, 0].abs()
    assert abs(zu(test, same)) < 3  # measured 0.45
    smaller = same * (test.min() / same.max()) * 0.5
    assert zu(test, smaller) < -5  # U = 0: measured -21.2


def _c_t_of(
    gen: torch.Tensor, test: torch.Tensor, train: torch.Tensor, cells: Cells, *, k: int
) -> float:
    train_cells = assign_cells(cells, train)
    test_cells, gen_cells = assign_cells(cells, test), assign_cells(cells, gen)
    test_dist = cell_distances(test, test_cells, train, train_cells)
    gen_dist = cell_distances(gen, gen_cells, train, train_cells)
    return c_t(test_dist, test_cells, gen_dist, gen_cells, k=k, tau=20 / len(gen))


@pytest.mark.parametrize("k", [3, 5])
def test_c_t_detects_copying_and_underfitting(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    train, test = _gaussian(1000, 4, generator=g), _gaussian(300, 4, generator=g)
    cells = fit_cells(train, k=k, seed=0)
    # Measured C_T (fresh, copies, underfit): k=3 -0.49, -15.2, 5.6; k=5 -0.11, -11.8, 4.5.
    fresh = _gaussian(1000, 4, generator=g)
    assert abs(_c_t_of(fresh, test, train, cells, k=k)) < 3
    copies = train[torch.randint(0, 1000, (1000,), generator=g)]
    assert _c_t_of(copies, test, train, cells, k=k) < -5
    # Noise of scale 1, over twice the median training NN spacing (0.43): overdispersed samples.
    underfit = train[torch.randint(0, 1000, (1000,), generator=g)] + _gaussian(1000, 4, generator=g)
    assert _c_t_of(underfit, test, train, cells, k=k) > 0


def test_c_t_cells_left_out() -> None:
    g = torch.Generator().manual_seed(0)
    test_dist, gen_dist = torch.rand(60, generator=g), torch.rand(50, generator=g)
    test_cells = torch.tensor([0] * 30 + [1] * 20 + [3] * 10)  # no test point in cell 2
    gen_cells = torch.tensor([0] * 20 + [2] * 25 + [3] * 5)  # no generated sample in cell 1
    zu_0 = zu(test_dist[:30], gen_dist[:20])
    zu_3 = zu(test_dist[50:], gen_dist[45:])
    # tau = 0: cells 0 and 3 qualify, weighted by their test mass 30/60 and 10/60.
    both = (30 * zu_0 + 10 * zu_3) / 40
    assert c_t(test_dist, test_cells, gen_dist, gen_cells, k=4, tau=0.0) == pytest.approx(both)
    # tau = 0.1: cell 3 holds 5/50 = 0.1 of the samples, not more.
    only_0 = c_t(test_dist, test_cells, gen_dist, gen_cells, k=4, tau=0.1)
    assert only_0 == pytest.approx(zu_0)
    # Nothing qualifies: no cell above tau, or no qualifying cell with test points.
    assert math.isnan(c_t(test_dist, test_cells, gen_dist, gen_cells, k=4, tau=0.9))
    only_2 = torch.full((50,), 2)
    assert math.isnan(c_t(test_dist, test_cells, gen_dist, only_2, k=4, tau=0.0))


def test_c_t_bootstrap_by_indexing() -> None:
    """Duplicated test points (a bootstrap resample) are ties, and the statistic stays finite."""
    g = torch.Generator().manual_seed(0)
    test_dist, gen_dist = torch.rand(40, generator=g), torch.rand(40, generator=g)
    test_cells, gen_cells = torch.randint(0, 2, (40,), generator=g), torch.randint(0, 2, (40,))
    resample = torch.randint(0, 40, (40,), generator=g)
    value = c_t(test_dist[resample], test_cells[resample], gen_dist, gen_cells, k=2, tau=0.0)
    assert math.isfinite(value)


def test_cells_and_cell_distances() -> None:
    g = torch.Generator().manual_seed(0)
    train, x = _gaussian(200, 3, generator=g), _gaussian(50, 3, generator=g)
    cells = fit_cells(train, k=4, seed=0)
    assert cells.centroids.shape == (4, 3) and cells.centroids.dtype == torch.float64
    torch.testing.assert_close(fit_cells(train, k=4, seed=0).centroids, cells.centroids)
    x_cells, train_cells = assign_cells(cells, x), assign_cells(cells, train)
    assert x_cells.dtype == torch.int64
    assert torch.equal(x_cells, torch.cdist(x, cells.centroids).argmin(dim=1))
    full = torch.cdist(x, train, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    full[x_cells[:, None] != train_cells[None, :]] = math.inf  # other cells' training rows
    distances = cell_distances(x, x_cells, train, train_cells, chunk=8)
    torch.testing.assert_close(distances, full.min(dim=1).values)


# ---------------------------------------------------------------- all of them


def test_memorisation_of_training_images() -> None:
    g = torch.Generator().manual_seed(0)
    train = _images(200, generator=g)
    projection = torch.randn(64, 16, generator=g, dtype=torch.float64)  # fixed random features

    def features(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double() @ projection  # (N, 64) -> (N, 16)

    train_features = features(train)
    cells = fit_cells(train_features, k=3, seed=0)
    statistics = dict(
        train=train,
        train_features=train_features,
        train_nn=train_nn_distance(train_features),
        cells=cells,
        chunk=32,
    )
    samples = train[torch.randperm(200, generator=g)[:40]]
    result = memorisation(samples, features(samples), **statistics)
    assert result.copies.all()
    assert result.memorised_pixels.all()
    assert result.memorised_features.all()
    assert not result.authentic.any()
    assert (result.train_dist == 0).all()
    assert torch.equal(result.cells, assign_cells(cells, features(samples)))
    assert result.train_dist.dtype == torch.float64 and result.cells.dtype == torch.int64

    fresh = _images(40, generator=g)
    result = memorisation(fresh, features(fresh), **statistics)
    assert not result.copies.any()
    assert not result.memorised_pixels.any()
    assert (result.train_dist > 0).all()
