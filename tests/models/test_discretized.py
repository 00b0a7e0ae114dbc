"""The discretized logistic mixture (nn/discretized.py) that PixelCNN and the VAE decode with."""

from __future__ import annotations

import pytest
import torch

from genlab.nn.discretized import (
    MIN_LOG_SCALE,
    level_log_probs,
    log_mass,
    mode,
    observed_log_probs,
    sample,
)

LEVELS = 256


def reference_probs(params: torch.Tensor, levels: int) -> torch.Tensor:
    """Every level's probability as the difference of the logistic CDFs at its bin edges, in
    float64, (L,): params (K logits, K means, K log-scales) of one pixel."""
    logit, mu, log_s = params.double().view(3, -1)
    s = log_s.clamp(min=MIN_LOG_SCALE).exp()
    edges = torch.linspace(-1.0, 1.0, levels, dtype=torch.float64)[:, None] + 1.0 / (levels - 1)
    cdf = torch.sigmoid((edges - mu) / s)  # (L, K), at each bin's upper edge
    cdf[-1] = 1.0  # the last bin reaches +inf
    mass = torch.diff(cdf, dim=0, prepend=torch.zeros(1, len(mu), dtype=torch.float64))
    return (mass * logit.softmax(0)).sum(1)  # (L,)


@pytest.mark.parametrize(
    "mu, log_s",
    [(0.0, 0.0), (0.3, -5.0), (-0.9, -9.0), (4.0, -3.0), (-30.0, 2.0)],
    ids=["wide", "narrow", "below-the-floor", "far-above", "far-below"],
)
def test_the_masses_are_the_cdf_differences_and_sum_to_one(mu: float, log_s: float) -> None:
    """Against the CDF differences in float64 where those are exact, and finite in the tails,
    where float32's difference of two sigmoids would be exactly 0 (log -inf)."""
    params = torch.tensor([0.5, -0.2, mu, mu + 0.05, log_s, log_s + 0.5]).view(1, 1, 6, 1, 1)
    log_p = level_log_probs(params, LEVELS)[0, :, 0, 0, 0]  # (L,)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(
        log_p.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0
    )
    expected = reference_probs(params.view(6), LEVELS)
    shown = expected > 1e-8  # where float64's difference of two CDFs near 1 is still exact
    torch.testing.assert_close(log_p.double()[shown], expected[shown].log(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_the_observed_levels_score_what_the_all_levels_table_gives(levels: int) -> None:
    g = torch.Generator().manual_seed(0)
    params = torch.randn(4, 3, 9, 5, 6, generator=g) * 2  # (B, C, 3K, H, W), K = 3
    x = torch.randint(0, levels, (4, 3, 5, 6), generator=g, dtype=torch.uint8)
    table = level_log_probs(params, levels)  # (B, L, C, H, W)
    picked = table.gather(1, x.long().unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(observed_log_probs(params, x, levels), picked)
    torch.testing.assert_close(table.logsumexp(1), torch.zeros(4, 3, 5, 6), atol=1e-5, rtol=0)


def test_gradients_stay_finite_at_the_edge_levels_and_extreme_scales() -> None:
    """The first and last bins reach -inf/+inf; the where() in log_mass must not let an inf or a
    NaN from the branch it drops into the gradient."""
    params = torch.tensor([0.0, 0.0, -5.0, 5.0, -20.0, 20.0]).view(1, 1, 6, 1, 1)
    params = params.expand(2, 1, 6, 1, 1).clone().requires_grad_()
    x = torch.tensor([0, LEVELS - 1], dtype=torch.uint8).view(2, 1, 1, 1)
    observed_log_probs(params, x, LEVELS).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_one_logistic_centred_on_a_level_puts_most_mass_on_it() -> None:
    """A narrow logistic (s = a quarter of half a bin) at level 100's centre: that bin holds all
    but 2 sigmoid(-4) of the mass."""
    centre = 100 / (LEVELS - 1) * 2 - 1
    params = torch.tensor([0.0, centre, torch.log(torch.tensor(0.25 / (LEVELS - 1)))])
    value = torch.tensor(centre).view(1, 1, 1)
    got = log_mass(params.view(3, 1, 1), value, LEVELS, torch.tensor(False), torch.tensor(False))
    expected = torch.log1p(-2 * torch.sigmoid(torch.tensor(-4.0)))
    torch.testing.assert_close(got.view(()), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_samples_are_drawn_with_the_levels_masses(levels: int) -> None:
    """The component-then-logistic-then-round sampler draws each level (edge bins included)
    with its mass in the table, for a mixture with mass at both edges and inside."""
    n = 40000
    params = torch.tensor([0.3, 0.0, -0.5, -1.1, 0.2, 1.2, -2.0, -2.5, -1.5]).view(1, 9, 1, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample(params.expand(n, 9, 1, 1), levels, lambda shape: torch.rand(shape, generator=g))
    assert drawn.shape == (n, 1, 1) and drawn.min() >= 0 and drawn.max() <= levels - 1
    freq = torch.bincount(drawn.flatten(), minlength=levels).double() / n
    p = level_log_probs(params[None], levels)[0, :, 0, 0, 0].double().exp()  # (L,)
    # Kolmogorov distance of the CDFs: 1.36 / sqrt(n) = 0.007 at 95%; a level drawn from a
    # neighbour's bin moves it by that bin's mass.
    assert (freq.cumsum(0) - p.cumsum(0)).abs().max() < 0.012


def test_the_mode_in_chunks_is_the_whole_tables_argmax(monkeypatch) -> None:
    params = torch.randn(7, 3, 9, 4, 5, generator=torch.Generator().manual_seed(1))
    whole = level_log_probs(params, LEVELS).argmax(dim=1)  # (B, C, H, W)
    monkeypatch.setattr("genlab.nn.discretized.MODE_TABLE_ENTRIES", 2 * LEVELS * 3 * 3 * 4 * 5)
    torch.testing.assert_close(mode(params, LEVELS), whole)
