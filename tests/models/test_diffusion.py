"""DDPM / DDIM on tiny random integer images: forward process, bound math, samplers, guidance,
EMA, DDIM inversion and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from genlab.errors import ConfigError
from genlab.evaluation import vocabulary as v
from genlab.models.diffusion import (
    Diffusion,
    discretized_gaussian_log_prob,
    gaussian_kl,
    make_betas,
)
from genlab.models.ode import Solver

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
TINY = {"channels": 8, "timesteps": 20, "sample_steps": 5, "val_samples": 2, "eval_samples": 3}


def make_model(randomize: bool = True, **overrides) -> Diffusion:
    """A tiny model, unconditional unless `conditional=True`; `randomize` gives it random non-zero
    weights (the U-Net's output layer starts at zero, which would make every prediction eps = 0)
    and copies them into the EMA."""
    torch.manual_seed(0)
    model = Diffusion(
        image_shape=SHAPE,
        levels=LEVELS,
        num_classes=CLASSES,
        **(TINY | {"conditional": False} | overrides),
    )
    if randomize:
        with torch.no_grad():
            for p in model.net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.ema.module.load_state_dict(model.net.state_dict())
    return model.eval()


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, LEVELS, (n, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def seeded_log_prob(model: Diffusion, x: torch.Tensor, y=None, samples: int = 1) -> torch.Tensor:
    torch.manual_seed(123)
    return model.log_prob(x, y, samples=samples)


# -- schedule and forward process ---------------------------------------------------------------
def test_schedules_match_their_papers() -> None:
    linear = make_betas("linear", 1000, first_std=0.1)  # Ho et al.: first_std does not apply
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    # Nichol & Dhariwal's cosine abar(t) = f(t / T) / f(0) is the case tau_1 = 1 / T.
    T, s = 1000, 0.008
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    cosine = make_betas("cosine", T, first_std=math.sqrt(1 - f[0].item()))
    assert (cosine > 0).all() and (cosine <= 0.999).all()
    abar = torch.cumprod(1 - cosine, 0)
    # Equal except the last steps, where beta is clipped at 0.999.
    torch.testing.assert_close(abar[:-5], f[:-5], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_noise", [0.2, 0.5])
def test_cosine_schedule_starts_at_the_requested_noise_in_bins(first_noise: float) -> None:
    model = make_model(randomize=False, first_noise=first_noise, timesteps=1000)
    bin_width = 2 / (LEVELS - 1)
    std_1 = (1 - model.abar[1]).sqrt().item()
    assert std_1 == pytest.approx(first_noise * bin_width, rel=1e-4)  # float32 buffers
    assert model.abar[-1] < 1e-4 and (model.abar[1:] < model.abar[:-1]).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_process_has_the_scheduled_mean_and_variance(schedule: str) -> None:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), checked from n = 20000 draws per pixel.

    The sample mean's standard error is sqrt((1 - abar) / n) and the sample variance's about
    (1 - abar) sqrt(2 / n); over 64 pixels x 3 times, 5 standard errors is never reached by
    chance (p ~ 6e-7 per pixel)."""
    model = make_model(randomize=False, schedule=schedule, timesteps=1000)
    x, _ = images(1)
    x0 = model._scale(x)  # (1, C, H, W)
    n = 20000
    torch.manual_seed(0)
    for t_value in (1, 500, 1000):
        t = torch.full((n,), t_value)
        xt = model.q_sample(x0.expand(n, *SHAPE), t, torch.randn(n, *SHAPE))  # (n, C, H, W)
        abar = model.abar[t_value].double()
        mean_se = ((1 - abar) / n).sqrt()
        var_se = (1 - abar) * math.sqrt(2 / n)
        mean, var = xt.double().mean(0), xt.double().var(0)
        assert ((mean - abar.sqrt() * x0[0]).abs() < 5 * mean_se).all(), t_value
        assert ((var - (1 - abar)).abs() < 5 * var_se).all(), t_value


# -- bound math ---------------------------------------------------------------------------------
def test_discretized_decoder_probabilities_sum_to_one_over_the_levels() -> None:
    torch.manual_seed(0)
    levels = torch.arange(LEVELS, dtype=torch.float64) / (LEVELS - 1) * 2 - 1  # (L,)
    mean = torch.randn(50, 1, dtype=torch.float64) * 0.8  # (50, 1), some outside [-1, 1]
    log_scale = torch.empty(50, 1, dtype=torch.float64).uniform_(math.log(1e-3), math.log(2.0))
    logp = discretized_gaussian_log_prob(levels[None], mean, log_scale, LEVELS)  # (50, L)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(50, dtype=torch.float64))
    # An inner bin is Phi(b) - Phi(a) of N(mean, scale^2) over its width 2 / (L - 1).
    normal = Normal(mean, log_scale.exp())
    half = 1 / (LEVELS - 1)
    inner = normal.cdf(levels[None] + half) - normal.cdf(levels[None] - half)
    big = inner[:, 1:-1] > 1e-6
    torch.testing.assert_close(logp[:, 1:-1].exp()[big], inner[:, 1:-1][big])
    # Far in a tail the probability is tiny but its log is still accurate (no underflow to -inf).
    far = discretized_gaussian_log_prob(
        torch.tensor([0.5]), torch.tensor([-0.5]), torch.tensor([math.log(0.01)]), LEVELS
    )
    assert torch.isfinite(far).all() and far.item() < -1000


def test_gaussian_kl_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 100).unbind(0)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gaussian_kl(m1, lv1, m2, lv2), expected)


@pytest.mark.parametrize("conditional", [False, True])
def test_every_kl_term_is_non_negative(conditional: bool) -> None:
    model = make_model(conditional=conditional)
    x, y = images(8)
    y = y if conditional else None
    T = model.hparams.timesteps
    t = torch.arange(2, T + 1).repeat(8)  # (8 (T-1),) every t for every image
    xs = x.repeat_interleave(T - 1, 0)
    ys = None if y is None else y.repeat_interleave(T - 1, 0)
    torch.manual_seed(0)
    kl = model.bound_terms(xs, ys, t, torch.randn(len(t), *SHAPE))
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert (model.prior_term(model._scale(x)) >= 0).all()


@pytest.mark.parametrize("conditional", [False, True])
def test_log_prob_is_a_bound_on_a_discrete_log_probability(conditional: bool) -> None:
    model = make_model(conditional=conditional)
    x, y = images(16)
    log_prob = seeded_log_prob(model, x, y if conditional else None, samples=4)
    assert log_prob.shape == (16,)
    assert torch.isfinite(log_prob).all() and (log_prob <= 0).all()


def test_log_prob_with_every_term_is_the_full_sum() -> None:
    """samples >= T - 1 uses every t = 2..T once: -(L_T + L_0 + sum_t L_{t-1}), the terms drawn
    with the same noise (t = 1 first, then t = 2..T, per image)."""
    model = make_model()
    T = model.hparams.timesteps
    x, _ = images(4)
    exact = seeded_log_prob(model, x, samples=T - 1)
    torch.testing.assert_close(seeded_log_prob(model, x, samples=10 * T), exact)
    torch.manual_seed(123)
    noise = torch.randn(4, T, *SHAPE)  # (B, T, C, H, W), as log_prob draws it
    t = torch.arange(1, T + 1)
    total = torch.stack(
        [
            model.bound_terms(x[i : i + 1].expand(T, *SHAPE), None, t, noise[i]).sum()
            for i in range(4)
        ]
    )
    torch.testing.assert_close(exact, -(model.prior_term(model._scale(x)) + total))


def test_stratified_estimate_averages_to_the_full_sum() -> None:
    """With K < T - 1 strata the weighted estimate is unbiased: its mean over many draws matches
    the mean of the exact-in-t bound within 5 standard errors of the difference."""
    model = make_model()
    T = model.hparams.timesteps
    x, _ = images(1)
    xs = x.expand(3000, *SHAPE)
    torch.manual_seed(0)
    full = model.log_prob(xs, samples=T - 1).double()
    strat = model.log_prob(xs, samples=3).double()  # strata of 6, 6 and 7 times
    se = (full.var() / len(full) + strat.var() / len(strat)).sqrt()
    assert abs(full.mean() - strat.mean()) < 5 * se, (full.mean(), strat.mean(), se)
    assert strat.var() > full.var()  # fewer terms, a noisier estimate of the same number


def test_stratified_times_cover_each_stratum_once() -> None:
    model = make_model(randomize=False, timesteps=11)
    torch.manual_seed(0)
    t, weight = model.stratified_times(1000, 4)  # 10 times {2..11} in strata of 2, 3, 2, 3
    assert weight.tolist() == [2, 3, 2, 3]
    starts = torch.tensor([2, 4, 7, 9])
    assert ((t >= starts) & (t < starts + weight.long())).all()
    assert set(t.flatten().tolist()) == set(range(2, 12))


# -- samplers and guidance ----------------------------------------------------------------------
def test_ddim_with_eta_zero_is_deterministic_for_a_fixed_start() -> None:
    model = make_model(conditional=True, guidance_scale=2.0)
    _, y = images(6)
    xT = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    runs = [
        model.sample_from(xT, y, g, sampler="ddim", eta=0.0)
        for g in (None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # eta > 0 draws noise from the generator: then the generator matters.
    a = model.sample_from(xT, y, torch.Generator().manual_seed(1), sampler="ddim", eta=1.0)
    b = model.sample_from(xT, y, torch.Generator().manual_seed(2), sampler="ddim", eta=1.0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_is_uint8_in_levels_and_seeded(sampler: str) -> None:
    model = make_model()
    s = model.sample(5, generator=torch.Generator().manual_seed(0), sampler=sampler, eta=1.0)
    assert s.dtype == torch.uint8 and s.shape == (5, *SHAPE)
    assert int(s.max()) <= LEVELS - 1
    again = model.sample(5, generator=torch.Generator().manual_seed(0), sampler=sampler, eta=1.0)
    other = model.sample(5, generator=torch.Generator().manual_seed(1), sampler=sampler, eta=1.0)
    assert torch.equal(s, again) and not torch.equal(s, other)


def test_guidance_scale_zero_and_one_are_the_unconditional_and_conditional_predictions() -> None:
    model = make_model(conditional=True)
    net = model.ema.module
    _, y = images(6)
    xt = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 3, 7, 10, 15, 20])
    with torch.no_grad():
        eps_c = net(xt, t, y)
        eps_u = net(xt, t, torch.full_like(y, CLASSES))  # the null class
        torch.testing.assert_close(model.guided_eps(net, xt, t, y, 0.0), eps_u, rtol=0, atol=0)
        torch.testing.assert_close(model.guided_eps(net, xt, t, y, 1.0), eps_c, rtol=0, atol=0)
        # The two-pass formula eps_u + w (eps_c - eps_u) meets them at w = 0 and w = 1.
        for w in (0.0, 0.5, 1.0, 3.0):
            mixed = model.guided_eps(net, xt, t, y, w + 1e-12 if w in (0.0, 1.0) else w)
            torch.testing.assert_close(mixed, eps_u + w * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eps_c, eps_u)
    # And sampling at w = 1 is sampling the conditional model: one pass per step.
    assert model.nfe_per_sample == TINY["sample_steps"]
    assert make_model(conditional=True, guidance_scale=2.0).nfe_per_sample == 2 * 5
    assert make_model(conditional=True, sampler="ddpm").nfe_per_sample == TINY["timesteps"]
    assert make_model(guidance_scale=2.0).nfe_per_sample == 5  # unconditional: no second pass


def test_unconditional_model_ignores_labels() -> None:
    model = make_model()
    x, y = images(4)
    torch.testing.assert_close(seeded_log_prob(model, x, y), seeded_log_prob(model, x))
    g = torch.Generator
    assert torch.equal(
        model.sample(4, y, g().manual_seed(0)), model.sample(4, None, g().manual_seed(0))
    )


def test_conditional_model_requires_labels_and_depends_on_them() -> None:
    model = make_model(conditional=True, guidance_scale=3.0)
    x, y = images(8)
    for call in (lambda: model.sample(4), lambda: model.log_prob(x)):
        with pytest.raises(ValueError, match="class-conditional"):
            call()
    g = torch.Generator
    s = model.sample(8, y, g().manual_seed(0))
    assert not torch.equal(s, model.sample(8, (y + 1) % CLASSES, g().manual_seed(0)))


@pytest.mark.parametrize("conditional", [False, True])
def test_ddim_inversion_decodes_back_to_the_image(conditional: bool) -> None:
    """encode runs the DDIM (eta = 0) updates backwards, decode runs them forwards. Each encode
    step uses eps at x_s in place of eps at x_t, exact when eps does not depend on x: a network
    whose output is its (non-zero) bias must invert to the image up to float rounding."""
    model = make_model(randomize=False, conditional=conditional, sample_steps=10)
    with torch.no_grad():
        model.ema.module.out.bias.fill_(0.3)
    x, y = images(16)
    y = y if conditional else None
    z = model.encode(x, y)
    assert z.shape == (16, *SHAPE) and torch.isfinite(z).all()
    assert (z - model._scale(x)).abs().mean() > 0.1  # a latent, not the image itself
    assert torch.equal(model.decode(z, y), x)


def test_encode_without_labels_uses_the_unconditional_prediction() -> None:
    """Trained with label dropout, a conditional model encodes an unlabelled image through the
    null label (so a linear probe sees class information); without dropout it needs labels."""
    model = make_model(conditional=True, sample_steps=10)
    assert not model.encodes_with_labels
    x, y = images(6)
    null = torch.full((6,), CLASSES)
    z = model.encode(x)
    assert torch.equal(z, model.encode(x, null))
    assert not torch.equal(z, model.encode(x, y))
    assert torch.equal(model.decode(z), model.decode(z, null))
    strict = make_model(conditional=True, p_uncond=0.0)
    assert strict.encodes_with_labels
    with pytest.raises(ValueError, match="class-conditional"):
        strict.encode(x)


def test_latent_time_sets_how_far_encode_inverts() -> None:
    model = make_model(sample_steps=10, latent_time=0.5)
    taus = model.latent_timesteps()
    assert taus == sorted(taus) and max(taus) <= model.hparams.timesteps // 2
    assert make_model(sample_steps=10, latent_time=1.0).latent_timesteps()[-1] == (
        model.hparams.timesteps
    )


# -- training -----------------------------------------------------------------------------------
def test_training_on_a_fixed_batch_lowers_the_loss() -> None:
    model = make_model(randomize=False).train()
    x, _ = images(32)
    x0 = model._scale(x)
    optimiser = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = model.loss_simple(x0, None)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_lightning_checkpoint_round_trip_and_ema(fit_and_reload, conditional: bool) -> None:
    model = make_model(randomize=False, conditional=conditional).train()
    x, y = images(32)
    trainer, loaded = fit_and_reload(model, x, y)
    assert torch.isfinite(trainer.callback_metrics[v.nll_key("val", "lower_bound")])
    assert torch.isfinite(trainer.callback_metrics[v.bpd_key("val", "lower_bound")])
    # One EMA update per optimizer step, and the averaged weights are not the raw ones.
    assert int(model.ema.n_averaged) == trainer.global_step == 4
    raw = dict(model.net.named_parameters())
    assert any(not torch.equal(p, raw[name]) for name, p in model.ema.module.named_parameters())

    assert loaded.conditional is conditional
    labels = y[:4] if conditional else None
    assert torch.equal(
        seeded_log_prob(model, x[:4], labels), seeded_log_prob(loaded, x[:4], labels)
    )


# -- the probability-flow ODE likelihood ---------------------------------------------------------
def test_an_ode_horizon_before_step_one_is_a_config_error() -> None:
    """0.04 x 20 timesteps ends the ODE before step 1, where its likelihood starts."""
    with pytest.raises(ConfigError, match=r"ode_horizon 0\.04 x timesteps 20 .* raise ode_horizon"):
        make_model(ode_horizon=0.04)


def test_ode_schedule_meets_the_discrete_one_at_every_step() -> None:
    """abar(tau) equals abar_t at integer tau, and log abar is linear in between, so beta(tau)
    is constant on each interval (t - 1, t]: -log(1 - beta_t)."""
    model = make_model(randomize=False)
    T = model.hparams.timesteps
    t = torch.arange(0, T + 1).double()
    abar, _ = model.ode_schedule(t)
    torch.testing.assert_close(abar.float(), model.abar, rtol=1e-5, atol=1e-7)
    tau = torch.tensor([2.25, 2.5, 2.75], dtype=torch.float64)
    abar, beta = model.ode_schedule(tau)
    log_abar = abar.log()
    assert beta[0] == beta[1] == beta[2]
    torch.testing.assert_close(log_abar[1] - log_abar[0], log_abar[2] - log_abar[1])
    torch.testing.assert_close(beta[0].float(), -torch.log1p(-model.betas[3]))


class GaussianDataEps(nn.Module):
    """E[eps | x_tau] for data N(0, c^2 I): x_tau ~ N(0, V I), V = abar c^2 + 1 - abar, so
    eps_hat = sqrt(1 - abar) x / V. A net(x, t, y) for the model's EMA slot, reading the model's
    continuous abar(tau)."""

    def __init__(self, model: Diffusion, c2: float) -> None:
        super().__init__()
        self.model, self.c2 = [model], c2  # a list: not a submodule

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        abar, _ = self.model[0].ode_schedule(t)
        abar = abar[:, None, None, None].to(x.dtype)
        return (1 - abar).sqrt() * x / (abar * self.c2 + 1 - abar)


@pytest.mark.parametrize("t_min", [1.0, 0.5])
def test_ode_log_density_of_gaussian_data_is_its_analytic_density(t_min: float) -> None:
    """With the exact eps of N(0, c^2 I) data the probability-flow ODE is linear and x scales as
    sqrt(V(tau)); from N(0, I) at ode_t_max the model's density at t_min is
    N(0, V(t_min) / V(t_max) I).
    Its Jacobian is a multiple of I, whose trace a Rademacher probe gives exactly."""
    model = make_model(randomize=False).double()
    c2 = 0.3
    model.ema.module = GaussianDataEps(model, c2)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, *SHAPE, generator=g, dtype=torch.float64) * 0.5
    solver = Solver("dopri5", rtol=1e-9, atol=1e-9)
    log_p = model.ode_log_density(s, None, t_min=t_min, solver=solver, divergence="hutchinson")
    abar_min = model.ode_schedule(torch.tensor([t_min], dtype=torch.float64))[0]
    abar_T = model.ode_schedule(torch.tensor([model.ode_t_max], dtype=torch.float64))[0]
    var = (1 + abar_min * (c2 - 1)) / (1 + abar_T * (c2 - 1))
    expected = Normal(0, var.sqrt()).log_prob(s).flatten(1).sum(1)
    torch.testing.assert_close(log_p, expected, rtol=1e-6, atol=0)


def test_ode_log_prob_bounds_a_normalised_distribution_over_the_discrete_images() -> None:
    """Every 2x2 image of 3 levels scored: the bounds' probabilities sum to at most 1 (a bound
    on a distribution over the 81 images), and not far below it (without log q(x_1 | x_0)
    the sum is ~19x too large). The eps
    network is the exact one of Gaussian data, so the ODE's x_1 has a known, broad density."""
    levels, shape = 3, (1, 2, 2)
    torch.manual_seed(0)
    model = Diffusion(
        image_shape=shape, levels=levels, num_classes=CLASSES, **TINY, conditional=False
    ).double()
    model.ema.module = GaussianDataEps(model, c2=2 / 3)  # the levels' -1, 0, 1: variance 2/3
    grid = torch.cartesian_prod(*[torch.arange(levels)] * 4).to(torch.uint8).view(-1, *shape)
    solver = Solver("dopri5", rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    log_p = model.ode_log_prob(grid, samples=64, solver=solver, divergence="exact")
    total = log_p.exp().sum().item()
    assert 0.7 < total <= 1.0  # 0.865 over seeds 0-3


@pytest.mark.parametrize("conditional", [False, True])
def test_ode_log_prob_is_a_seeded_bound_on_a_discrete_log_probability(conditional: bool) -> None:
    model = make_model(conditional=conditional)
    assert model.ode_likelihood
    x, y = images(4)
    y = y if conditional else None
    solver = Solver("dopri5", rtol=1e-2, atol=1e-2)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model.ode_log_prob(x, y, samples=2, solver=solver, divergence="hutchinson"))
    assert runs[0].shape == (4,) and torch.isfinite(runs[0]).all() and (runs[0] <= 0).all()
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    if conditional:
        with pytest.raises(ValueError, match="class-conditional"):
            model.ode_log_prob(x)
