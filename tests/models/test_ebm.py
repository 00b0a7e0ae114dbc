"""The EBM: Langevin dynamics, the replay buffer, JEM's p(y | x), sampling and checkpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from genlab.models.ebm import EBM, ReplayBuffer, langevin

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
TINY = {"width": 4, "langevin_steps": 2, "sample_steps": 3, "buffer_size": 32}


def make_ebm(**overrides) -> EBM:
    torch.manual_seed(0)
    return EBM(image_shape=SHAPE, levels=LEVELS, num_classes=CLASSES, **(TINY | overrides))


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, LEVELS, (n, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


# -- Langevin dynamics ------------------------------------------------------------------------
MU = torch.tensor([1.0, -0.5])
SIGMA = torch.tensor([[1.0, 0.5], [0.5, 0.8]])


def quadratic_energy(x: torch.Tensor) -> torch.Tensor:
    """E(x) = ½ (x - μ)ᵀ Σ⁻¹ (x - μ), whose Gibbs density is N(μ, Σ); (B, 2) -> (B,)."""
    d = x - MU
    return 0.5 * (d @ torch.linalg.inv(SIGMA) * d).sum(1)


def test_langevin_without_noise_descends_a_quadratic_energy() -> None:
    x = torch.full((16, 2), 3.0)
    energies = [quadratic_energy(x)]
    for _ in range(5):
        x = langevin(quadratic_energy, x, steps=1, step_size=0.1, noise=0.0, clamp=None)
        energies.append(quadratic_energy(x))
    for before, after in itertools.pairwise(energies):
        assert (after < before).all()


def test_langevin_converges_to_the_gaussian_of_a_quadratic_energy() -> None:
    """With noise = sqrt(2 · step_size) the chains' law tends to N(μ, Σ) (up to an O(step)
    discretisation bias, ~0.5% here); mean and covariance within statistical tolerance."""
    n, step = 4000, 0.01
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 2), 3.0)
    start = quadratic_energy(x0).mean()
    x = langevin(
        quadratic_energy, x0, steps=1500, step_size=step, noise=math.sqrt(2 * step),
        generator=g, clamp=None,
    )  # fmt: skip
    assert quadratic_energy(x).mean() < start
    # Standard errors: sqrt(Σ_ii / n) for the mean, about Σ_ii · sqrt(2 / n) for covariances.
    se_mean = (SIGMA.diagonal() / n).sqrt()
    assert ((x.mean(0) - MU).abs() < 5 * se_mean).all(), x.mean(0)
    torch.testing.assert_close(torch.cov(x.T), SIGMA, atol=5 * 1.0 * math.sqrt(2 / n), rtol=0)
    # The energy of N(μ, Σ) in 2-D averages to d/2 = 1.
    assert abs(quadratic_energy(x).mean().item() - 1.0) < 0.1


def test_langevin_is_seeded_clamped_and_works_under_no_grad() -> None:
    x0 = torch.zeros(8, 2)
    with torch.no_grad():
        a = langevin(quadratic_energy, x0, steps=20, step_size=0.5, noise=1.0,
                     generator=torch.Generator().manual_seed(1))  # fmt: skip
    b = langevin(quadratic_energy, x0, steps=20, step_size=0.5, noise=1.0,
                 generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(a, b)
    assert not a.requires_grad
    assert a.min() >= -1 and a.max() <= 1  # default clamp to the image range
    assert a.abs().max() == 1  # noise 1 hits the boundary: the clamp did act


# -- replay buffer ----------------------------------------------------------------------------
def test_replay_buffer_keeps_its_size_and_mixes_fresh_starts_at_the_configured_rate() -> None:
    torch.manual_seed(0)
    buffer = ReplayBuffer(100, SHAPE, CLASSES)
    buffer.x.fill_(0.5)  # stored samples are recognisable: fresh noise is never all 0.5
    buffer.y.fill_(3)
    g = torch.Generator().manual_seed(0)
    draws = 20_000
    d = buffer.draw(draws, 0.3, g)
    stored = (d.x == 0.5).flatten(1).all(1)
    assert torch.equal(stored, ~d.fresh)
    assert (d.y[~d.fresh] == 3).all()
    assert d.x.min() >= -1 and d.x.max() <= 1
    rate = d.fresh.float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / draws), rate
    # Fresh starts get uniform labels: every class shows up.
    assert set(d.y[d.fresh].tolist()) == set(range(CLASSES))

    d = buffer.draw(16, 0.3, g)
    new = torch.full_like(d.x, -0.25)
    buffer.write(d.index, new, d.y)
    assert buffer.x.shape == (100, *SHAPE) and buffer.y.shape == (100,)
    assert (buffer.x[d.index] == -0.25).all()
    assert (buffer.x == -0.25).flatten(1).all(1).sum() == d.index.unique().numel()
    assert not buffer.draw(50, 0.0, g).fresh.any()
    assert buffer.draw(50, 1.0, g).fresh.all()


def test_training_objective_updates_the_buffer_in_place() -> None:
    model = make_ebm(buffer_size=8, reinit_prob=0.5)
    before = model.buffer.x.clone()
    x, y = images(8)
    terms = model.objective(x, y)
    assert model.buffer.x.shape == before.shape
    assert not torch.equal(model.buffer.x, before)
    assert terms.energy_pos.shape == terms.energy_neg.shape == (8,)
    assert torch.isfinite(terms.loss) and terms.ce is not None
    terms.loss.backward()
    for name, p in model.net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# -- energy and p(y | x) ----------------------------------------------------------------------
def test_conditional_class_probs_are_a_distribution_consistent_with_the_energy() -> None:
    """JEM eq. 4-6: p(y | x) = softmax f(x), E(x) = -logsumexp f(x), E(x, y) = -f(x)[y]."""
    model = make_ebm().eval()
    x, _ = images(12)
    with torch.no_grad():
        probs = model.class_probs(x)  # (B, K)
        e_x = model.energy(x)  # (B,)
        e_xy = torch.stack(
            [model.energy(x, torch.full((12,), k)) for k in range(CLASSES)], dim=1
        )  # (B, K)
    assert probs.shape == (12, CLASSES)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(12))
    torch.testing.assert_close(e_x, -torch.logsumexp(-e_xy, dim=1))
    # p(y | x) = exp(-E(x, y)) / exp(-E(x)).
    torch.testing.assert_close(probs, torch.exp(e_x[:, None] - e_xy))
    assert probs.shape == (12, CLASSES)


def test_energy_shape_and_unconditional_model_ignores_labels() -> None:
    model = make_ebm(conditional=False).eval()
    x, y = images(6)
    e = model.energy(x)
    assert e.shape == (6,) and torch.isfinite(e).all()
    torch.testing.assert_close(model.energy(x, y), e)
    with pytest.raises(ValueError, match="conditional"):
        model.class_probs(x)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 64)])
def test_energy_network_follows_the_image_shape(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = EBM(image_shape=shape, levels=256, num_classes=3, **TINY).eval()
    x = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    assert model.energy(x).shape == (2,)
    assert torch.isfinite(model.energy(x, torch.tensor([0, 2]))).all()
    s = model.sample(2, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, *shape) and s.dtype == torch.uint8


# -- sampling ---------------------------------------------------------------------------------
def test_sample_is_seeded_and_leaves_buffer_and_global_rng_alone() -> None:
    model = make_ebm(conditional=False, sample_noise=0.1).eval()  # noisy chains: generator
    buffer = model.buffer.x.clone()
    rng = torch.get_rng_state()
    with torch.no_grad():  # as evaluate.py calls it
        s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (5, *SHAPE)
    assert int(s.max()) <= LEVELS - 1
    assert torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(1)))
    b = model.sample(5, generator=torch.Generator().manual_seed(0), from_buffer=True, steps=1)
    assert torch.equal(
        b, model.sample(5, generator=torch.Generator().manual_seed(0), from_buffer=True, steps=1)
    )
    assert torch.equal(model.buffer.x, buffer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.nfe_per_sample == TINY["sample_steps"]


def test_conditional_samples_need_labels_and_depend_on_them() -> None:
    model = make_ebm(sample_steps=10).eval()
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(4)
    y = torch.arange(8) % CLASSES
    s = model.sample(8, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, model.sample(8, y, generator=torch.Generator().manual_seed(0)))
    other = model.sample(8, (y + 1) % CLASSES, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(s, other)


# -- Lightning --------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_lightning_checkpoint_round_trip(fit_and_reload, conditional: bool) -> None:
    model = make_ebm(conditional=conditional)
    initial_buffer = model.buffer.x.clone()
    x, y = images(16)
    trainer, loaded = fit_and_reload(model, x, y)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/energy_pos", "train/energy_neg", "val/energy"):
        assert torch.isfinite(metrics[key]), key
    assert ("val/acc" in metrics) is conditional
    assert ("train/ce" in metrics) is conditional

    assert loaded.conditional is conditional
    # Training wrote Langevin chains into the buffer, and the checkpoint carries them.
    assert not torch.equal(model.buffer.x, initial_buffer)
    assert torch.equal(loaded.buffer.x, model.buffer.x)
    assert torch.equal(loaded.buffer.y, model.buffer.y)
    assert torch.equal(model.energy(x, y), loaded.energy(x, y))
