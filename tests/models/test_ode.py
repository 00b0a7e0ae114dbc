"""The ODE machinery of the continuous-time families: divergences against a brute-force Jacobian,
solvers against a flow with a known solution, the change of variables against an analytic
Gaussian density, and the units of the dequantization bounds (uniform and Gaussian)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.distributions import MultivariateNormal

from genlab.models.ode import (
    DequantizedBound,
    LevelScaling,
    Solver,
    dequantized_bound,
    divergence_exact,
    divergence_hutchinson,
    draw_probe,
    gaussian_dequantized_bound,
    integrate,
    integrate_with_divergence,
    level_posterior_log_prob,
    per_image_norm,
    standard_normal_log_prob,
)

SHAPE = (2, 2, 3)  # (C, H, W): D = 12
D = math.prod(SHAPE)


class TimeMLP(nn.Module):
    """A non-linear, time-dependent velocity v(x, t) acting on each image alone, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D + 1, 32), nn.Tanh(), nn.Linear(32, D)).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)  # (B, D + 1)
        return self.net(h).view_as(x)


def brute_force_trace(v: nn.Module, x: torch.Tensor, t: float) -> torch.Tensor:
    """tr(dv/dx) of each image from its full D x D Jacobian, (B,)."""
    traces = []
    for xi in x:
        jac = jacobian(lambda z: v(z[None], torch.tensor([t])).flatten(), xi)  # (D, C, H, W)
        traces.append(torch.trace(jac.reshape(D, D)))
    return torch.stack(traces)


def with_graph(v: nn.Module, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    return v(x, torch.full((x.shape[0],), t, dtype=x.dtype)), x


def linear_field(seed: int = 0) -> tuple[torch.Tensor, callable]:
    """v(x) = A x on flattened images, A random (D, D) float64, and v as a velocity."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.4

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ a.T).view_as(x)

    return a, v


def points(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)


# -- divergences -------------------------------------------------------------------------------
def test_exact_divergence_is_the_trace_of_the_brute_force_jacobian() -> None:
    v, x = TimeMLP(), points(5)
    out, xg = with_graph(v, x, 0.3)
    torch.testing.assert_close(divergence_exact(out, xg), brute_force_trace(v, x, 0.3))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_averages_to_the_trace(probe: str) -> None:
    """The mean of eps^T J eps over 4000 probes is within 5 standard errors of tr(J), and each
    probe is +-1 (Rademacher) or has unit variance (Gaussian)."""
    v, x = TimeMLP(), points(3)
    n = 4000
    xs = x.repeat_interleave(n, 0)  # (3n, C, H, W): one probe per copy
    out, xg = with_graph(v, xs, 0.7)
    torch.manual_seed(0)
    eps = draw_probe(xg, probe)
    est = divergence_hutchinson(out, xg, eps).view(3, n)  # (3, n)
    trace = brute_force_trace(v, x, 0.7)
    se = est.std(1) / math.sqrt(n)
    assert ((est.mean(1) - trace).abs() < 5 * se).all(), (est.mean(1), trace, se)
    if probe == "rademacher":
        assert set(eps.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs(eps.var().item() - 1) < 0.01


def test_hutchinson_with_rademacher_probes_is_exact_on_a_diagonal_jacobian() -> None:
    """eps^T diag(a) eps = sum a_i when eps_i^2 = 1: no variance left (why Rademacher)."""
    a = torch.linspace(-1, 2, D, dtype=torch.float64)
    x = points(4).requires_grad_(True)
    out = x * a.view(SHAPE)
    torch.manual_seed(0)
    est = divergence_hutchinson(out, x, draw_probe(x, "rademacher"))
    torch.testing.assert_close(est, a.sum().expand(4))


# -- solvers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("t0", "t1"), [(0.0, 1.0), (1.0, 0.0)], ids=["forward", "backward"])
def test_adaptive_solver_meets_its_tolerance_on_a_linear_flow(t0: float, t1: float) -> None:
    """dx/dt = A x has x(t1) = expm((t1 - t0) A) x(t0) and ∫ tr(A) dt = (t1 - t0) tr(A)."""
    a, v = linear_field()
    x = points(4)
    expected = (x.flatten(1) @ torch.matrix_exp((t1 - t0) * a).T).view_as(x)
    for tol in (1e-4, 1e-8):
        sol = integrate_with_divergence(v, x, t0, t1, Solver("dopri5", rtol=tol, atol=tol), "exact")
        # The global error of a tolerance-controlled solve is a small multiple of the tolerance.
        scale = tol * (1 + expected.abs().max())
        assert (sol.x - expected).abs().max() < 10 * scale, tol
        torch.testing.assert_close(
            sol.delta_log_p, ((t1 - t0) * torch.trace(a)).expand(4), rtol=0, atol=10 * tol
        )
        plain = integrate(v, x, t0, t1, Solver("dopri5", rtol=tol, atol=tol))
        assert (plain.x - expected).abs().max() < 10 * scale, tol


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_fixed_step_solvers_converge_at_their_order(method: str, order: int) -> None:
    """Doubling the steps divides the error by about 2^order."""
    a, v = linear_field()
    x = points(2)
    expected = (x.flatten(1) @ torch.matrix_exp(a).T).view_as(x)
    errors = [
        (integrate(v, x, 0.0, 1.0, Solver(method, steps=n)).x - expected).abs().max()
        for n in (32, 64)
    ]
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.15)


@pytest.mark.parametrize(("method", "per_step"), [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_nfe_counts_every_evaluation(method: str, per_step: int) -> None:
    _, v = linear_field()
    calls = 0

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return v(x, t)

    sol = integrate(counted, points(2), 0.0, 1.0, Solver(method, steps=7))
    assert sol.nfe == calls == 7 * per_step
    calls = 0
    sol = integrate_with_divergence(counted, points(2), 0.0, 1.0, Solver("dopri5"), "exact")
    assert sol.nfe == calls > 6  # at least one Dormand-Prince step (6 evaluations) and a start


def test_per_image_norm_is_the_largest_image_rms() -> None:
    err = torch.zeros(3, *SHAPE, dtype=torch.float64)
    err[1] = 2.0  # RMS 2
    err[2, 0, 0, 0] = math.sqrt(D)  # RMS 1
    assert per_image_norm(err).item() == pytest.approx(2.0)
    # A tupled state: every part of each image on its own (the log-density error in full).
    assert per_image_norm((err, torch.tensor([0.0, 0.0, 5.0]))).item() == pytest.approx(5.0)


# -- change of variables -----------------------------------------------------------------------
def test_log_density_of_a_linear_flow_is_the_analytic_gaussian() -> None:
    """x(1) = M x(0), M = expm(A), with x(1) ~ N(0, I): x(0) ~ N(0, M^-1 M^-T), and
    log N(x(1); 0, I) + ∫_0^1 tr(A) dt is its log-density."""
    a, v = linear_field(seed=3)
    x = points(6)
    sol = integrate_with_divergence(v, x, 0.0, 1.0, Solver("dopri5", rtol=1e-9, atol=1e-9), "exact")
    m_inv = torch.matrix_exp(-a)
    gaussian = MultivariateNormal(torch.zeros(D, dtype=torch.float64), m_inv @ m_inv.T)
    log_p = standard_normal_log_prob(sol.x) + sol.delta_log_p
    torch.testing.assert_close(log_p, gaussian.log_prob(x.flatten(1)), rtol=0, atol=1e-6)


def test_hutchinson_log_density_is_unbiased_for_a_nonlinear_flow() -> None:
    """Many Hutchinson solves of one point (one probe each, fixed along its solve) average to
    the exact-trace solve, within 5 standard errors."""
    v, x = TimeMLP(), points(1)
    solver = Solver("dopri5", rtol=1e-8, atol=1e-8)
    exact = integrate_with_divergence(v, x, 1.0, 0.0, solver, "exact").delta_log_p
    torch.manual_seed(0)
    est = integrate_with_divergence(v, x.expand(2000, *SHAPE), 1.0, 0.0, solver, "hutchinson")
    se = est.delta_log_p.std() / math.sqrt(2000)
    assert (est.delta_log_p.mean() - exact).abs() < 5 * se
    assert est.delta_log_p.std() > 0  # an estimate, not the value


def test_a_solve_is_reproducible_for_a_seed_and_draws_from_the_global_generator() -> None:
    v, x = TimeMLP(), points(3)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(integrate_with_divergence(v, x, 1.0, 0.0, Solver("heun", 4), "hutchinson"))
    assert torch.equal(runs[0].delta_log_p, runs[1].delta_log_p)
    assert not torch.equal(runs[0].delta_log_p, runs[2].delta_log_p)


# -- the discrete bound ------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("samples", [1, 7])
def test_a_uniform_density_scores_exactly_log2_levels_bits_per_dim(levels: int, samples: int):
    """A density uniform on the scaled data range scores -D log L, i.e. log2 L bits/dim, for
    both scalings the families use: [-1, 1) (flow matching) and the level centres at
    2k / (L - 1) - 1 with bins around them (diffusion's ODE)."""
    x = torch.randint(0, levels, (5, *SHAPE), generator=torch.Generator().manual_seed(0))
    for scaling in (
        LevelScaling(2 / levels, -1.0),
        LevelScaling(2 / (levels - 1), -1 - 1 / (levels - 1)),
    ):
        width = levels * scaling.scale  # of the scaled range [shift, shift + L scale)

        def uniform(s: torch.Tensor, lo: float = scaling.shift, width: float = width):
            assert ((s >= lo) & (s < lo + width)).all()  # every draw inside the range
            return torch.full((s.shape[0],), -D * math.log(width), dtype=torch.float64)

        bound = dequantized_bound(uniform, x, scaling, samples)
        expected = torch.full((5,), -D * math.log(levels)).double()
        torch.testing.assert_close(bound.mean, expected)
        torch.testing.assert_close(bound.importance_weighted, expected)
        bits_per_dim = -bound.mean / (D * math.log(2))
        torch.testing.assert_close(bits_per_dim, torch.full((5,), math.log2(levels)).double())


def test_dequantization_draws_fill_each_level_bin() -> None:
    """Every draw of level k lies in [k, k + 1) before scaling: the bins tile the range."""
    x = torch.randint(0, 17, (4, *SHAPE), generator=torch.Generator().manual_seed(0))
    seen = []

    def record(s: torch.Tensor) -> torch.Tensor:
        seen.append(s)
        return torch.zeros(s.shape[0])

    dequantized_bound(record, x, LevelScaling(1.0, 0.0), samples=50)
    v = seen[0].view(50, *x.shape)  # draw-major
    assert ((v >= x) & (v < x + 1)).all()
    assert (v - x).flatten().std() == pytest.approx(1 / math.sqrt(12), rel=0.05)


def test_the_draws_combine_by_their_mean_or_by_importance_weighting() -> None:
    log_p = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = DequantizedBound(log_p)
    torch.testing.assert_close(draws.mean, log_p.mean(0))
    torch.testing.assert_close(draws.importance_weighted, log_p.exp().mean(0).log())
    assert (draws.importance_weighted >= draws.mean).all()  # Jensen: never below the average
    one = DequantizedBound(log_p[:1])
    torch.testing.assert_close(one.importance_weighted, one.mean)


def test_importance_weighting_of_noisy_log_densities_is_biased_upwards() -> None:
    """Why Hutchinson estimates are averaged, not importance-weighted: exact log-densities all
    equal to c give c; add zero-mean noise of sd 3 and the log-mean-exp of 32 draws lands far
    above c (towards c + var / 2 = c + 4.5), while the mean stays unbiased."""
    g = torch.Generator().manual_seed(0)
    noisy = DequantizedBound(-50 + 3 * torch.randn(32, 2000, generator=g, dtype=torch.float64))
    assert noisy.importance_weighted.mean() > -50 + 2.0
    assert abs(noisy.mean.mean() + 50) < 5 * 3 / math.sqrt(32 * 2000)


# -- the Gaussian dequantization bound ---------------------------------------------------------
def level_mixture(scaling: LevelScaling, sigma: float, levels: int):
    """log p(s) (N,) of the density (1/L) sum_k N(c_k, sigma^2) in every dimension."""
    centres = scaling(torch.arange(levels, dtype=torch.float64) + 0.5)

    def log_p(s: torch.Tensor) -> torch.Tensor:
        z = (s.double().flatten(1)[..., None] - centres) / sigma  # (N, D, L)
        per_dim = torch.logsumexp(-0.5 * z**2, 2) - math.log(levels)
        return (per_dim - 0.5 * math.log(2 * math.pi * sigma**2)).sum(1)

    return log_p


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("width", [0.25, 1.0])  # sigma in bin widths
def test_a_gaussian_mixture_over_the_levels_scores_exactly_log2_levels(levels: int, width: float):
    """The density whose every dimension is (1/L) sum_k N(c_k, sigma^2) is the model "a level
    uniformly at random, then q(s | level)": each draw's log-weight log p(s) + log P(x | s) -
    log q(s | x) is exactly -D log L, whatever the draw (the decoder is that model's posterior)."""
    scaling = LevelScaling(2 / levels, -1.0)
    sigma = width * scaling.scale
    x = torch.randint(0, levels, (5, *SHAPE), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    bound = gaussian_dequantized_bound(
        level_mixture(scaling, sigma, levels), x, scaling, sigma, levels, samples=3
    )
    assert bound.log_p.shape == (3, 5)
    expected = torch.full((3, 5), -D * math.log(levels), dtype=torch.float64)
    torch.testing.assert_close(bound.log_p.double(), expected, rtol=0, atol=2e-3)


def test_gaussian_draws_are_centred_on_the_bins_with_std_sigma() -> None:
    levels, sigma = 17, 0.03
    scaling = LevelScaling(2 / levels, -1.0)
    x = torch.randint(0, levels, (4, *SHAPE), generator=torch.Generator().manual_seed(0))
    seen = []

    def record(s: torch.Tensor) -> torch.Tensor:
        seen.append(s)
        return torch.zeros(s.shape[0])

    gaussian_dequantized_bound(record, x, scaling, sigma, levels, samples=200)
    offset = seen[0].view(200, *x.shape) - scaling(x.float() + 0.5)  # draw-major
    assert offset.mean().abs() < 4 * sigma / math.sqrt(offset.numel())
    assert offset.std().item() == pytest.approx(sigma, rel=0.03)


def test_the_level_posterior_is_a_distribution_over_the_levels(monkeypatch) -> None:
    """For any s, P(k | s) over the L levels sums to 1 in each dimension; near a bin's centre
    with a narrow sigma it is that level's; the row chunks do not change the numbers."""
    levels, sigma = 5, 0.1
    scaling = LevelScaling(2 / levels, -1.0)
    s = torch.rand(7, 1, 1, 3, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    per_level = torch.stack(
        [
            level_posterior_log_prob(s, torch.full(s.shape, k), scaling, sigma, levels)
            for k in range(levels)
        ]
    )  # (L, 7): each the sum over the 3 dimensions of log P(k | s_d)
    one = s[..., :1]  # the sum over levels is 1 per dimension
    total = sum(
        level_posterior_log_prob(one, torch.full(one.shape, k), scaling, sigma, levels).exp()
        for k in range(levels)
    )
    torch.testing.assert_close(total, torch.ones(7))
    centres = scaling(torch.arange(levels).float() + 0.5).view(levels, 1, 1, 1)
    at_centre = level_posterior_log_prob(
        centres, torch.arange(levels).view(levels, 1, 1, 1), scaling, 0.02, levels
    )
    assert (at_centre > -1e-6).all()
    monkeypatch.setattr("genlab.models.ode.POSTERIOR_ELEMENTS", 2 * levels)  # 1-row chunks
    chunked = torch.stack(
        [
            level_posterior_log_prob(s, torch.full(s.shape, k), scaling, sigma, levels)
            for k in range(levels)
        ]
    )
    torch.testing.assert_close(chunked, per_level)


def test_the_gaussian_bound_is_below_the_exact_discrete_log_probability() -> None:
    """Under the density N(0, I) with the level posterior as its decoder, the discrete model
    P(x) = prod_d ∫ N(s; 0, 1) P(x_d | s) ds is computed by quadrature; the bound's average
    over many draws is below log P(x) for every level of a one-pixel image, whose P(x) sum
    to 1."""
    levels, sigma = 4, 0.2
    scaling = LevelScaling(2 / levels, -1.0)
    grid = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    step = grid[1] - grid[0]
    pixel = grid.view(-1, 1, 1, 1)

    def log_p_level(k: int) -> float:
        post = level_posterior_log_prob(pixel, torch.full(pixel.shape, k), scaling, sigma, levels)
        return torch.logsumexp(post + standard_normal_log_prob(pixel), 0).item() + step.log()

    exact = [log_p_level(k) for k in range(levels)]
    assert sum(math.exp(e) for e in exact) == pytest.approx(1.0, abs=1e-6)
    x = torch.arange(levels).view(levels, 1, 1, 1)
    torch.manual_seed(0)
    bound = gaussian_dequantized_bound(
        standard_normal_log_prob, x, scaling, sigma, levels, samples=4000
    )
    se = bound.log_p.std(0).double() / math.sqrt(4000)
    gap = torch.tensor(exact) - bound.mean.double()
    assert (gap > -3 * se).all()  # a bound, up to the draws' noise
    assert (gap < 1).all()  # and a tight one here: 0.5 nats at the two outer levels, ~0 inside
