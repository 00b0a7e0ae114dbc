"""The GAN on tiny random integer images: both players train, EMA of G only, clipping under manual
optimisation, every loss and penalty, sampling, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from genlab.models.gan import GAN, Discriminator, Generator

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
TINY = {"latent_dim": 4, "channels": 4}


def make_gan(**overrides) -> GAN:
    torch.manual_seed(0)
    return GAN(image_shape=SHAPE, levels=LEVELS, num_classes=CLASSES, **(TINY | overrides))


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, LEVELS, (n, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


class GradNorms(L.Callback):
    """Records, for each optimiser step, which network it updates and its gradient norm as the
    optimiser sees it (`on_before_optimizer_step` runs inside the step, after any clipping)."""

    def __init__(self, model: GAN) -> None:
        self.owner = {id(p): "G" for p in model.generator.parameters()}
        self.owner |= {id(p): "D" for p in model.discriminator.parameters()}
        self.norms: list[tuple[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        (net,) = {self.owner[id(p)] for p in params}
        grads = [p.grad.flatten() for p in params if p.grad is not None]
        self.norms.append((net, float(torch.cat(grads).norm())))


def fit(model: GAN, n: int = 16, batches_per_epoch: int = 2) -> GradNorms:
    x, y = images(n)
    callback = GradNorms(model)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
        log_every_n_steps=1,  # training values reach callback_metrics on logging steps only
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=n // batches_per_epoch))
    # global_step counts generator updates only: one per batch, whatever n_critic is.
    assert trainer.global_step == batches_per_epoch
    for key in ("train/loss", "train/loss_g", "train/loss_d", "train/d_real", "train/d_fake"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    return callback


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_a_training_step_updates_both_networks(conditional: bool) -> None:
    # The non-saturating loss: under the hinge loss psi's bias has an exactly zero gradient while
    # every real and fake logit is inside the margin (the terms -1/B and +1/B cancel).
    model = make_gan(conditional=conditional, n_critic=2, loss="ns")
    g_before = dict(model.generator.named_parameters())
    g_before = {k: v.detach().clone() for k, v in g_before.items()}
    d_before = {k: v.detach().clone() for k, v in model.discriminator.named_parameters()}
    steps = fit(model).norms
    # Per batch: n_critic D steps, then one G step.
    assert [net for net, _ in steps] == ["D", "D", "G"] * 2
    for name, p in model.generator.named_parameters():
        assert not torch.equal(p, g_before[name]), name
    for name, p in model.discriminator.named_parameters():
        assert not torch.equal(p, d_before[name]), name


def test_ema_averages_the_generator_only() -> None:
    model = make_gan(ema_decay=0.9)
    g_params = dict(model.generator.named_parameters())
    ema_params = dict(model.ema.module.named_parameters())
    # One-to-one with the generator's parameters (names and shapes), distinct tensors, and no
    # tensor of the discriminator.
    assert ema_params.keys() == g_params.keys()
    for name, p in ema_params.items():
        assert p.shape == g_params[name].shape and p is not g_params[name], name
    d_ids = {id(p) for p in model.discriminator.parameters()}
    assert not d_ids & {id(p) for p in model.ema.parameters()}
    assert isinstance(model.ema.module, Generator)
    assert not any(isinstance(m, Discriminator) for m in model.ema.modules())
    # The only averaged model is the generator's: D has no averaged copy.
    averaged = [m for m in model.modules() if isinstance(m, AveragedModel)]
    assert averaged == [model.ema]
    # The optimisers train the raw networks, never the EMA.
    assert not any(p.requires_grad for p in model.ema.parameters())

    fit(model)
    assert int(model.ema.n_averaged) == 2  # updated after each of the 2 G steps
    for name, p in model.ema.module.named_parameters():
        assert not torch.equal(p, g_params[name]), name
    # BatchNorm statistics are averaged too (use_buffers=True).
    ema_buffers = dict(model.ema.module.named_buffers())
    for name, b in model.generator.named_buffers():
        if b.is_floating_point():
            assert not torch.equal(ema_buffers[name], b), name


def test_gradient_clipping_under_manual_optimisation() -> None:
    clip = 1e-3
    unclipped = fit(make_gan(n_critic=1)).norms
    clipped = fit(make_gan(n_critic=1, grad_clip=clip)).norms
    for net in ("G", "D"):
        assert max(n for who, n in unclipped if who == net) > 10 * clip, net
        assert all(n <= clip * (1 + 1e-4) for who, n in clipped if who == net), net


@pytest.mark.parametrize("penalty", ["none", "r1", "wgan-gp"])
@pytest.mark.parametrize("loss", ["hinge", "ns"])
def test_every_loss_and_penalty_trains_with_finite_losses(loss: str, penalty: str) -> None:
    model = make_gan(loss=loss, gradient_penalty=penalty, gp_weight=10.0)
    d_before = snapshot(model.discriminator)
    fit(model)
    assert any(not torch.equal(v, d_before[k]) for k, v in model.discriminator.state_dict().items())
    if penalty != "none":
        # The penalty's double backward reaches every weight of D (not the biases: with
        # piecewise-linear activations grad_x D does not depend on them).
        x, y = images(8)
        model.discriminator.zero_grad(set_to_none=True)
        model.gradient_penalty(model._dequantize(x), model._fake(8, y), y).backward()
        weights = [(k, p) for k, p in model.discriminator.named_parameters() if "weight" in k]
        assert weights
        for name, p in weights:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere, so both penalties are known exactly."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("penalty", ["r1", "wgan-gp"])
def test_gradient_penalties_match_their_definitions(penalty: str) -> None:
    """R1 = gamma/2 E||grad D(x)||^2 (Mescheder et al. 2018, eq. 9); WGAN-GP =
    lambda E(||grad D(x_hat)|| - 1)^2 (Gulrajani et al. 2017, eq. 3). With D(x) = <w, x>:
    gamma/2 ||w||^2 and lambda (||w|| - 1)^2."""
    model = make_gan(conditional=False, gradient_penalty=penalty, gp_weight=3.0)
    w = torch.randn(SHAPE)
    model.discriminator = LinearCritic(w)
    real, fake = torch.randn(5, *SHAPE), torch.randn(5, *SHAPE)
    expected = 1.5 * w.norm() ** 2 if penalty == "r1" else 3.0 * (w.norm() - 1) ** 2
    torch.testing.assert_close(model.gradient_penalty(real, fake, None), expected)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_spectral_norm_bounds_every_discriminator_layer(spectral_norm: bool) -> None:
    model = make_gan(spectral_norm=spectral_norm, channels=8)
    fit(model)
    kinds = torch.nn.Conv2d | torch.nn.Linear | torch.nn.Embedding  # the projection's embedding too
    layers = [m for m in model.discriminator.modules() if isinstance(m, kinds)]
    assert layers
    for layer in layers:
        assert torch.nn.utils.parametrize.is_parametrized(layer, "weight") is spectral_norm
    if spectral_norm:
        # After power iteration, sigma(W / sigma) ~ 1 for every layer (Miyato et al. 2018, eq. 8).
        model.discriminator.eval()
        for layer in layers:
            sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
            assert sigma <= 1.05, sigma


def test_dequantised_reals_fill_each_level_bin_and_samples_round_back() -> None:
    model = make_gan()
    x = torch.arange(LEVELS, dtype=torch.uint8).repeat(200).view(-1, 1, 1, 1)  # every level
    real = model._dequantize(x)
    centre = x.float() / (LEVELS - 1) * 2 - 1
    half = 1 / (LEVELS - 1)
    assert ((real - centre).abs() <= half).all()
    assert (real - centre).std() > half / 2  # spread over the bin, not a point
    assert torch.equal(model._quantize(real), x)  # the nearest level is the original one
    # The generator's range covers exactly the union of the bins.
    assert torch.equal(model._quantize(torch.tensor([-1 - half, 1 + half])), torch.tensor([0, 16]))


def test_conditional_sampling_is_seeded_and_depends_on_the_label() -> None:
    model = make_gan(conditional=True, ema_decay=0.0)  # EMA == G after the step
    fit(model)
    model.eval()
    y = torch.arange(8) % CLASSES
    s = model.sample(8, y, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (8, *SHAPE)
    assert int(s.max()) <= LEVELS - 1
    assert torch.equal(s, model.sample(8, y, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(s, model.sample(8, y, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(s, model.sample(8, (y + 1) % CLASSES, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(4)
    assert model.nfe_per_sample == 1.0


def test_sampling_in_train_mode_uses_the_ema_in_eval_mode() -> None:
    """The sample-grid callback may call sample() mid-training: results must not depend on the
    module's mode, nor change any BatchNorm statistics."""
    model = make_gan(conditional=False)
    before = snapshot(model)
    s_train = model.train().sample(6, generator=torch.Generator().manual_seed(0))
    s_eval = model.eval().sample(6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s_train, s_eval)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_lightning_checkpoint_round_trip(fit_and_reload, conditional: bool) -> None:
    model = make_gan(conditional=conditional)
    x, y = images(16)
    _, loaded = fit_and_reload(model, x, y)
    assert loaded.conditional is conditional
    assert any(key.startswith("ema.") for key in loaded.state_dict())


@pytest.mark.parametrize("side", [8, 28, 32])
def test_depth_follows_the_image_size(side: int) -> None:
    model = GAN(image_shape=(3, side, side), levels=256, num_classes=CLASSES, **TINY).eval()
    y = torch.arange(2)
    s = model.sample(2, y, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 3, side, side) and s.dtype == torch.uint8
    x = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    assert model.discriminator(model._dequantize(x), y).shape == (2,)
