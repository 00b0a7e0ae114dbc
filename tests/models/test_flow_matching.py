"""Flow matching on tiny random integer images: the probability path and its objective, the ODE
likelihood against analytic densities and its units, samplers, guidance, the ODE latent, EMA
and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genlab.errors import ConfigError
from genlab.evaluation import vocabulary as v
from genlab.models.flow_matching import FlowMatching
from genlab.models.ode import Solver, level_posterior_log_prob, standard_normal_log_prob

SHAPE = (1, 4, 4)  # D = 16: the exact trace stays cheap
D = math.prod(SHAPE)
LEVELS = 17
CLASSES = 10
# 16 channels: GroupNorm then has two channels per group, so the time and label embeddings, added
# per channel, are not normalised away (with 8, every group is one channel and they vanish).
TINY = {"channels": 16, "sample_steps": 4, "val_images": 8}


def make_model(randomize: bool = True, **overrides) -> FlowMatching:
    """A tiny model, unconditional unless `conditional=True`; `randomize` gives it random non-zero
    weights (the U-Net's output layer starts at zero: v = 0) and copies them into the EMA."""
    torch.manual_seed(0)
    model = FlowMatching(
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


def seeded_log_prob(model: FlowMatching, x: torch.Tensor, y=None, samples: int = 1):
    torch.manual_seed(123)
    return model.log_prob(x, y, samples=samples)


class GaussianDataVelocity(nn.Module):
    """The exact marginal velocity of the rectified-flow path (sigma_min = 0) for data
    N(0, c^2 I): x_t ~ N(0, S(t) I), S(t) = (1 - t)^2 + c^2 t^2, and the flow that keeps that
    marginal is v(x, t) = S'(t) / (2 S(t)) x. A net(x, t, y) for the model's EMA slot."""

    def __init__(self, c2: float) -> None:
        super().__init__()
        self.c2 = c2

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        t = t[:, None, None, None]
        s = (1 - t) ** 2 + self.c2 * t**2
        ds = -2 * (1 - t) + 2 * self.c2 * t
        return ds / (2 * s) * x


# -- scaling and the probability path ---------------------------------------------------------
def test_levels_scale_to_bins_that_tile_minus_one_to_one() -> None:
    model = make_model(randomize=False)
    x, _ = images(64)
    centres = model._bin_centres(x)
    assert torch.equal(model._quantize(centres), x)
    # Every point of a bin quantizes to its level; the bins tile [-1, 1).
    for u in (0.001, 0.999):  # (an exact bin edge may round either way in float32)
        assert torch.equal(model._quantize(model.scaling(x.float() + u)), x)
    assert model.scaling(torch.tensor(0.0)) == -1 and model.scaling(torch.tensor(LEVELS)) == 1


@pytest.mark.parametrize(
    ("dequantization", "time_power"), [("uniform", 1.0), ("gaussian", 1.0), ("uniform", 2.0)]
)
def test_cfm_loss_regresses_the_path_velocity(dequantization: str, time_power: float) -> None:
    """With a network that outputs the conditional velocity x_1 - (1 - sigma_min) x_0 exactly
    (it can, given the draws), the loss is zero: the path and target are Lipman et al.'s psi_t
    (sec. 4.1) and its time derivative. Checked by replaying loss_cfm's draws: x_1 dequantized
    uniformly or the bins' centres ("gaussian": the path's sigma is the dequantizer's,
    `dequantization_sigma` bin widths), and t = 1 - (1 - u)^time_power."""
    if dequantization == "gaussian":
        sigma = {"dequantization_sigma": 0.01 / (2 / LEVELS)}  # 0.01 in the model's units
    else:
        sigma = {"sigma_min": 0.01}
    model = make_model(
        randomize=False, dequantization=dequantization, time_power=time_power, **sigma
    )
    assert model.path_sigma == pytest.approx(0.01)
    x, _ = images(8)
    torch.manual_seed(0)
    if dequantization == "gaussian":
        x1 = model.scaling(x.float() + 0.5)
    else:
        x1 = model.scaling(x.float() + torch.rand(x.shape))
    x0 = torch.randn_like(x1)
    t = 1 - (1 - torch.rand(8)[:, None, None, None]) ** time_power
    # d psi_t / dt by a central finite difference of the path
    h = 1e-3

    def psi(t: torch.Tensor) -> torch.Tensor:
        return (1 - 0.99 * t) * x0 + t * x1

    d_psi = (psi(t + h) - psi(t - h)) / (2 * h)
    torch.testing.assert_close(d_psi, x1 - 0.99 * x0, rtol=1e-3, atol=1e-3)
    # psi_0 is the noise, psi_1 the data (up to sigma_min's share of noise)
    torch.testing.assert_close(psi(torch.zeros(())), x0)
    torch.testing.assert_close(psi(torch.ones(())), x1 + 0.01 * x0)
    truth = x1 - 0.99 * x0

    class Oracle(nn.Module):
        def forward(self, xt_in, t_in, y):
            assert torch.allclose(xt_in, psi(t), atol=1e-6)  # the model's x_t is psi_t(x_0)
            return truth

    model.net = Oracle()
    torch.manual_seed(0)
    assert model.loss_cfm(x, None).item() == pytest.approx(0.0, abs=1e-10)


def test_time_power_draws_times_towards_the_data() -> None:
    """t = 1 - (1 - u)^k has P(t > 1/2) = 2^(-1/k): 1/2 for k = 1, 0.707 for k = 2."""
    seen = {}
    for k in (1.0, 2.0):
        model = make_model(randomize=False, time_power=k)

        class Record(nn.Module):
            def forward(self, xt, t, y, k=k):
                seen[k] = t
                return torch.zeros_like(xt)

        model.net = Record()
        torch.manual_seed(0)
        model.loss_cfm(torch.zeros(4000, *SHAPE, dtype=torch.uint8), None)
        assert (seen[k] >= 0).all() and (seen[k] <= 1).all()
        assert (seen[k] > 0.5).float().mean() == pytest.approx(2 ** (-1 / k), abs=0.025)


def test_gaussian_dequantization_sets_the_paths_sigma_in_bin_widths() -> None:
    for levels in (17, 256):
        model = FlowMatching(
            image_shape=SHAPE, levels=levels, num_classes=CLASSES, dequantization="gaussian"
        )
        assert model.path_sigma == pytest.approx(0.38 * 2 / levels)
    with pytest.raises(ConfigError, match="leave sigma_min at 0"):
        make_model(dequantization="gaussian", sigma_min=0.01)


def test_gaussian_bound_of_a_zero_velocity_model_replays_its_draws() -> None:
    """v = 0 leaves the base N(0, I) as p_1: the gaussian bound is then log N(s; 0, I) +
    log P(x | s) - log q(s | x) at s = centre + sigma * noise, from the same noise."""
    model = make_model(randomize=False, dequantization="gaussian", dequantization_sigma=0.25)
    sigma = 0.25 * 2 / LEVELS
    x, _ = images(6)
    torch.manual_seed(7)
    noise = torch.randn(1, *x.shape)[0]
    s = model.scaling(x.float() + 0.5) + sigma * noise
    log_q = standard_normal_log_prob(noise) - D * math.log(sigma)
    decoder = level_posterior_log_prob(s, x, model.scaling, sigma, LEVELS)
    expected = standard_normal_log_prob(s) + decoder - log_q
    torch.manual_seed(7)
    torch.testing.assert_close(model.log_prob(x), expected)


def test_training_on_a_fixed_batch_lowers_the_loss() -> None:
    model = make_model(randomize=False).train()
    x, _ = images(32)
    optimiser = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = model.loss_cfm(x, None)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


# -- likelihood ---------------------------------------------------------------------------------
def test_a_zero_velocity_model_is_its_gaussian_base() -> None:
    """The U-Net starts with v = 0 (zero output layer): the ODE does not move, so log p_1 is
    log N(s; 0, I), and the uniform bound is that at the dequantized draw plus D log(2 / L)."""
    model = make_model(randomize=False, dequantization="uniform")
    x, _ = images(6)
    torch.manual_seed(7)
    u = torch.rand(1, *x.shape)[0]
    expected = standard_normal_log_prob(model.scaling(x.float() + u)) + D * math.log(2 / LEVELS)
    torch.manual_seed(7)
    torch.testing.assert_close(model.log_prob(x), expected)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_log_density_of_gaussian_data_velocity_is_the_data_gaussian(divergence: str) -> None:
    """With the exact velocity of N(0, c^2 I) data, the ODE's log p_1 is log N(s; 0, c^2 I): the
    change of variables through the family's own solve. The Jacobian is c I-like (isotropic), so
    a Rademacher probe gives its trace exactly too."""
    model = make_model(randomize=False, hutchinson_probe="rademacher")
    c2 = 0.3
    model.ema.module = GaussianDataVelocity(c2)
    s = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0)) * 0.6
    solver = Solver("dopri5", rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    log_p = model.log_density(s, None, solver=solver, divergence=divergence)
    expected = torch.distributions.Normal(0, math.sqrt(c2)).log_prob(s).flatten(1).sum(1)
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("conditional", "dequantization"), [(False, "uniform"), (True, "uniform"), (True, "gaussian")]
)
def test_log_prob_is_a_bound_on_a_discrete_log_probability(
    conditional: bool, dequantization: str
) -> None:
    model = make_model(conditional=conditional, dequantization=dequantization)
    x, y = images(12)
    log_prob = seeded_log_prob(model, x, y if conditional else None, samples=2)
    assert log_prob.shape == (12,)
    assert torch.isfinite(log_prob).all() and (log_prob <= 0).all()
    # A seeded call is reproducible.
    assert torch.equal(log_prob, seeded_log_prob(model, x, y if conditional else None, samples=2))


def test_exact_divergence_up_to_the_threshold_and_hutchinson_above() -> None:
    """exact_divergence_dims picks the trace: at D <= it the number does not depend on the
    probes' seed; above, Hutchinson's estimate, unbiased for it (the mean of 100 probes within 5
    standard errors)."""
    x, _ = images(1)
    exact_model = make_model(exact_divergence_dims=D)
    hutch_model = make_model(exact_divergence_dims=D - 1)
    s = exact_model._bin_centres(x)
    solver = Solver("dopri5", rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    exact = exact_model.log_density(s, None, solver=solver)
    torch.manual_seed(1)
    assert torch.equal(exact_model.log_density(s, None, solver=solver), exact)
    est = hutch_model.log_density(s.expand(100, *SHAPE), None, solver=solver)  # (100,)
    se = est.std() / math.sqrt(100)
    assert est.std() > 0 and (est.mean() - exact).abs() < 5 * se


def test_draws_are_averaged_and_importance_weighting_is_tighter() -> None:
    """log_prob averages its K draws (`monte_carlo` "terms": the same bound, less variance);
    with the exact trace the draws also give the importance-weighted bound, which is above the
    average for every image (IWAE-k >= the k = 1 bound's estimate)."""
    model = make_model(exact_divergence_dims=D)
    x, _ = images(8)
    torch.manual_seed(0)
    draws = model.bound(x, None, samples=4)
    assert draws.log_p.shape == (4, 8)
    torch.manual_seed(0)
    torch.testing.assert_close(model.log_prob(x, samples=4), draws.mean)
    assert (draws.importance_weighted > draws.mean).all()


def test_validation_scores_the_first_images_with_the_test_estimator_seeded_by_the_batch():
    model = make_model(val_images=12)
    x, y = images(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    values = []
    for _ in range(2):
        model.on_validation_epoch_start()
        for i, batch in enumerate(batches):
            model.validation_step(batch, i)
        assert model.val_nll.weight == 12  # 8 of the first batch, 4 of the second
        values.append(model.val_nll.compute())
        model.val_nll.reset()
    assert values[0] == values[1]  # every epoch on the same random numbers
    torch.manual_seed(0)
    first = model.log_prob(x[:8])
    torch.manual_seed(1)
    second = model.log_prob(x[8:12])
    torch.testing.assert_close(values[0], -torch.cat([first, second]).mean())


def test_unconditional_model_ignores_labels() -> None:
    model = make_model()
    x, y = images(4)
    torch.testing.assert_close(seeded_log_prob(model, x, y), seeded_log_prob(model, x))
    g = torch.Generator
    assert torch.equal(
        model.sample(4, y, g().manual_seed(0)), model.sample(4, None, g().manual_seed(0))
    )


# -- sampling and guidance ----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "heun", "dopri5"])
def test_sample_is_uint8_in_levels_and_seeded(sampler: str) -> None:
    model = make_model(sampler=sampler)
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (5, *SHAPE)
    assert int(s.max()) <= LEVELS - 1
    assert torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(1)))


def test_samplers_agree_as_their_steps_grow() -> None:
    """Euler and Heun with many steps approach a tight dopri5 solve of the same start."""
    model = make_model()
    x0 = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    ref, _ = model.sample_from(x0, sampler="dopri5", guidance_scale=1.0)
    err = {
        (name, n): (model.sample_from(x0, sampler=name, steps=n)[0] - ref).abs().max()
        for name in ("euler", "heun")
        for n in (4, 32)
    }
    assert err["euler", 32] < err["euler", 4] and err["heun", 32] < err["heun", 4]
    assert err["heun", 32] < err["euler", 32] < 0.05


def test_sampling_cost_counts_steps_stages_and_guidance() -> None:
    assert make_model(sampler="euler").nfe_per_sample == 4
    assert make_model(sampler="heun").nfe_per_sample == 8
    assert make_model(sampler="heun", conditional=True).nfe_per_sample == 8  # w = 1: one pass
    assert make_model(sampler="heun", conditional=True, guidance_scale=2.0).nfe_per_sample == 16
    assert make_model(sampler="heun", guidance_scale=2.0).nfe_per_sample == 8  # unconditional
    # dopri5 adapts its steps: its cost is measured over the sample calls, two passes guided.
    model = make_model(sampler="dopri5", conditional=True, guidance_scale=2.0)
    assert math.isnan(model.nfe_per_sample)
    y = torch.arange(4)
    x0 = model.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    _, passes = model.sample_from(x0, y)
    model.sample(4, y, generator=torch.Generator().manual_seed(0))
    assert model.nfe_per_sample == passes and passes % 2 == 0 and passes > 12


def test_final_denoise_returns_the_paths_end_point_and_costs_one_pass() -> None:
    """At t = 1 the path is x = sigma x_0 + x_1 with velocity x_1 - (1 - sigma) x_0: `denoise`
    gives back x_1 exactly. Sampling spends one more pass on it (two when guided), and none
    where the path ends without noise (sigma_min = 0, uniform dequantization)."""
    model = make_model(dequantization="gaussian", final_denoise=True)
    sigma = model.path_sigma
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    denoised = model.denoise(sigma * x0 + x1, x1 - (1 - sigma) * x0)
    torch.testing.assert_close(denoised, x1)
    assert model.nfe_per_sample == 9  # heun, 4 steps: 8 + 1
    guided = make_model(
        dequantization="gaussian", final_denoise=True, conditional=True, guidance_scale=2.0
    )
    assert guided.nfe_per_sample == 18
    assert make_model(dequantization="uniform", final_denoise=True).nfe_per_sample == 8
    x0 = model.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    plain = make_model(dequantization="gaussian")
    end, passes = model.sample_from(x0)
    assert passes == 9
    noisy, _ = plain.sample_from(x0)  # the same weights and solve, without the last pass
    v = plain.velocity(None, 1.0)(noisy, torch.ones(2))
    torch.testing.assert_close(end, model.denoise(noisy, v))


def test_guidance_scale_zero_and_one_are_the_unconditional_and_conditional_velocities() -> None:
    model = make_model(conditional=True)
    net = model.ema.module
    _, y = images(6)
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 1, 6)
    with torch.no_grad():
        v_c = net(x, t, y)
        v_u = net(x, t, torch.full_like(y, CLASSES))  # the null class
        torch.testing.assert_close(model.guided_velocity(net, x, t, y, 0.0), v_u, rtol=0, atol=0)
        torch.testing.assert_close(model.guided_velocity(net, x, t, y, 1.0), v_c, rtol=0, atol=0)
        torch.testing.assert_close(
            model.guided_velocity(net, x, t, y, 3.0), v_u + 3 * (v_c - v_u), rtol=1e-5, atol=1e-5
        )
    assert not torch.allclose(v_c, v_u)


def test_conditional_model_requires_labels_and_depends_on_them() -> None:
    model = make_model(conditional=True, guidance_scale=3.0)
    x, y = images(8)
    for call in (lambda: model.sample(4), lambda: model.log_prob(x)):
        with pytest.raises(ValueError, match="class-conditional"):
            call()
    g = torch.Generator
    s = model.sample(8, y, g().manual_seed(0))
    assert torch.equal(s, model.sample(8, y, g().manual_seed(0)))
    assert not torch.equal(s, model.sample(8, (y + 1) % CLASSES, g().manual_seed(0)))
    assert not torch.equal(seeded_log_prob(model, x, y), seeded_log_prob(model, x, (y + 1) % 10))


# -- the ODE latent -----------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True])
def test_decode_inverts_encode(conditional: bool) -> None:
    """Up to the solver's error, which a tight tolerance keeps far below half a bin."""
    model = make_model(conditional=conditional, sample_rtol=1e-5, sample_atol=1e-5)
    x, y = images(16)
    y = y if conditional else None
    z = model.encode(x, y)
    assert z.shape == (16, *SHAPE) and torch.isfinite(z).all()
    assert torch.equal(z, model.encode(x, y))  # deterministic
    assert (z - model._bin_centres(x)).abs().mean() > 0.1  # a latent, not the image itself
    assert torch.equal(model.decode(z, y), x)


def test_encode_without_labels_uses_the_unconditional_velocity() -> None:
    model = make_model(conditional=True)
    assert not model.encodes_with_labels
    x, y = images(6)
    null = torch.full((6,), CLASSES)
    z = model.encode(x)
    assert torch.equal(z, model.encode(x, null))
    assert not torch.equal(z, model.encode(x, y))
    strict = make_model(conditional=True, p_uncond=0.0)
    assert strict.encodes_with_labels
    with pytest.raises(ValueError, match="class-conditional"):
        strict.encode(x)


# -- Lightning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_lightning_checkpoint_round_trip_and_ema(fit_and_reload, conditional: bool) -> None:
    model = make_model(randomize=False, conditional=conditional).train()
    x, y = images(32)
    trainer, loaded = fit_and_reload(model, x, y)
    assert torch.isfinite(trainer.callback_metrics[v.TRAIN_LOSS])
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
    assert torch.equal(model.encode(x[:4], labels), loaded.encode(x[:4], labels))
