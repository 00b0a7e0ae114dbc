"""Deep convolutional GAN with a projection discriminator and an EMA generator.

Goodfellow et al., *Generative Adversarial Nets* (2014): a generator G(z, y) and a discriminator
D(x, y) play a two-player game; no likelihood is defined, only samples. The networks follow DCGAN
(Radford, Metz & Chintala, ICLR 2016): the generator projects z to a small feature map, doubles its
resolution with BatchNorm + ReLU conv blocks and ends in tanh; the discriminator halves the
resolution with strided convolutions and LeakyReLU(0.2), without BatchNorm (it would break the
gradient penalties and is redundant with spectral normalisation). Depths come from the image size
(`feature_sizes`): the side is halved while the half is >= 4, exactly while it is even and rounded
up once it is odd and above 8 (8 -> 4, 28 -> 7, 32 -> 4, 64 -> 4, 62 -> 31 -> 16 -> 8 -> 4), so
the first feature map stays small for any size: 2 x 31 would otherwise start at 31 x 31.

Conditional form: the generator concatenates a learned class embedding to z; the discriminator is
the projection discriminator of Miyato & Koyama (*cGANs with Projection Discriminator*, ICLR 2018,
eq. 3): D(x, y) = psi(h(x)) + <embed(y), h(x)>.

Objectives (logits d = D(x, y)):

- ``hinge`` (Lim & Ye 2017; Miyato et al. 2018, eq. 15-16):
  L_D = E[relu(1 - d_real)] + E[relu(1 + d_fake)],  L_G = -E[d_fake];
- ``ns``, the non-saturating loss of Goodfellow et al. (2014, section 3):
  L_D = E[softplus(-d_real)] + E[softplus(d_fake)],  L_G = E[softplus(-d_fake)].

Penalties on D: ``r1`` (Mescheder, Geiger & Nowozin 2018, eq. 9): gp_weight / 2 * E||grad_x D(x)||^2
on real data; ``wgan-gp`` (Gulrajani et al. 2017, eq. 3): gp_weight * E(||grad D(x_hat)|| - 1)^2 on
random interpolates of real and fake. ``spectral_norm`` (Miyato et al. 2018) wraps every D layer.
Sampling uses an exponential moving average of the generator's weights (Yazici et al. 2019).
"""

from __future__ import annotations

import itertools
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as sn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genlab.models.base import GenerativeModule

# `divergence`: a discriminator loss below D_WIN_LOSS (every real and fake on the right side of
# the margin) for D_WIN_STEPS generator steps in a row means G no longer gets a useful gradient.
D_WIN_LOSS = 0.1
D_WIN_STEPS = 500


def feature_sizes(size: int) -> list[int]:
    """Sides of the feature maps from the image (a side `size`) down to the first map of the
    generator: halved while the half is >= 4; an odd side is halved (rounded up) only above 8,
    where a smaller map is worth an uneven 2x resampling. [8, 4] for 8, [28, 14, 7] for 28."""
    sizes = [size]
    while sizes[-1] // 2 >= 4 and (sizes[-1] % 2 == 0 or sizes[-1] > 8):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def widths(channels: int, scales: int) -> list[int]:
    """Feature widths from the base resolution up to the image: doubling per halving, capped at
    8x, as in DCGAN; widths[-1] == channels at full resolution."""
    return [channels * min(2 ** (scales - i), 8) for i in range(scales + 1)]


class Generator(nn.Module):
    """G(z, y) -> (B, C, H, W) in (-out_scale, out_scale)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        channels: int,
        num_classes: int,  # 0: unconditional
        out_scale: float,
    ) -> None:
        super().__init__()
        c, h, _ = image_shape
        sizes = feature_sizes(h)[::-1]  # from the first feature map up to the image
        self.res, scales = sizes[0], len(sizes) - 1
        self.ws = widths(channels, scales)
        self.out_scale = out_scale
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = latent_dim * (2 if num_classes else 1)
        self.project = nn.Linear(in_dim, self.ws[0] * self.res**2, bias=False)
        self.bn0 = nn.BatchNorm2d(self.ws[0])
        blocks: list[nn.Module] = []
        for (a, b), side in zip(itertools.pairwise(self.ws), sizes[1:], strict=True):
            # Up to the next side: twice this one, or one less where that side is odd (it was
            # halved rounding up).
            up = {"scale_factor": 2} if side % 2 == 0 else {"size": (side, side)}
            blocks += [
                nn.Upsample(**up, mode="nearest"),
                nn.Conv2d(a, b, 3, padding=1, bias=False),
                nn.BatchNorm2d(b),
                nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(self.ws[-1], c, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)  # (B, 2Z)
        h = self.project(z).view(-1, self.ws[0], self.res, self.res)  # (B, W0, r, r)
        h = self.blocks(F.relu(self.bn0(h)))  # (B, channels, H, W)
        return self.out_scale * torch.tanh(self.to_image(h))  # (B, C, H, W)


class Discriminator(nn.Module):
    """Projection discriminator D(x, y) = psi(h) + <embed(y), h> (Miyato & Koyama 2018, eq. 3);
    returns logits (B,)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: int,
        num_classes: int,  # 0: unconditional
        spectral_norm: bool,
    ) -> None:
        super().__init__()
        c, h, _ = image_shape
        sizes = feature_sizes(h)  # from the image down to the base resolution
        res, scales = sizes[-1], len(sizes) - 1
        ws = widths(channels, scales)[::-1]
        norm = sn if spectral_norm else (lambda m: m)
        # SNGAN's "standard CNN" (Miyato et al. 2018, table 3): a 3x3 conv at each resolution and
        # a stride-2 4x4 conv between resolutions; padding 2 on an odd side gives the rounded-up
        # half, the generator's size there.
        layers: list[nn.Module] = [norm(nn.Conv2d(c, ws[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for (a, b), side in zip(itertools.pairwise(ws), sizes[:-1], strict=True):
            pad = 1 if side % 2 == 0 else 2
            layers += [norm(nn.Conv2d(a, a, 4, stride=2, padding=pad)), nn.LeakyReLU(0.2)]
            layers += [norm(nn.Conv2d(a, b, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        feature_dim = ws[-1] * res**2
        self.psi = norm(nn.Linear(feature_dim, 1))
        self.embed = norm(nn.Embedding(num_classes, feature_dim)) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.features(x).flatten(1)  # (B, F)
        d = self.psi(h).squeeze(1)  # (B,)
        if self.embed is not None:
            d = d + (self.embed(y) * h).sum(1)  # the projection term <embed(y), h>
        return d


def discriminator_loss(
    d_real: torch.Tensor, d_fake: torch.Tensor, loss: Literal["hinge", "ns"]
) -> torch.Tensor:
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def generator_loss(d_fake: torch.Tensor, loss: Literal["hinge", "ns"]) -> torch.Tensor:
    if loss == "hinge":
        return -d_fake.mean()
    return F.softplus(-d_fake).mean()


def input_gradient_norm(
    discriminator: Discriminator, x: torch.Tensor, y: torch.Tensor | None
) -> torch.Tensor:
    """||grad_x D(x, y)|| per image (B,), with the graph kept so a penalty on it trains D."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(x, y).sum(), x, create_graph=True)
    return grad.flatten(1).norm(dim=1)


class GAN(GenerativeModule):
    likelihood = "none"
    has_latent = False
    ddp_find_unused_parameters = True  # D's backward leaves G without gradient, and G's D
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 60, "batch_size": 64}

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int,
        latent_dim: Annotated[int, Ge(1)] = 64,  # size of z ~ N(0, I)
        channels: Annotated[int, Ge(1)] = 48,  # conv width at full resolution (x2 per halving)
        conditional: bool = True,  # model p(x | y): class embedding in G, projection in D
        loss: Literal["hinge", "ns"] = "hinge",  # adversarial objective (hinge; non-saturating)
        gradient_penalty: Literal["none", "r1", "wgan-gp"] = "none",  # penalty on D's gradient
        gp_weight: Annotated[float, Ge(0)] = 1.0,  # gamma of R1, lambda of WGAN-GP
        spectral_norm: bool = True,  # spectral normalisation of every D layer
        n_critic: Annotated[int, Ge(1)] = 1,  # D steps per G step (same real batch, fresh noise)
        lr_g: Annotated[float, Gt(0)] = 8e-4,  # generator Adam learning rate
        lr_d: Annotated[float, Gt(0)] = 8e-4,  # discriminator Adam learning rate
        beta1: Annotated[float, Ge(0), Lt(1)] = 0.0,  # Adam beta1 of both optimisers
        beta2: Annotated[float, Ge(0), Lt(1)] = 0.9,  # Adam beta2 of both optimisers
        ema_decay: Annotated[float, Ge(0), Le(1)] = 0.99,  # EMA of G's weights used to sample
        grad_clip: Annotated[float, Ge(0)] = 0.0,  # max gradient norm of each network (0: off)
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        self.save_hyperparameters(logger=False)  # genlab logs the resolved config itself
        # Manual optimisation: two optimisers alternate. Trainer(gradient_clip_val=...) raises
        # here, so clipping is `grad_clip` via self.clip_gradients (DESIGN.md, known traps).
        self.automatic_optimization = False
        k = num_classes if conditional else 0
        # The generator covers the dequantised data range [-1 - 1/(L-1), 1 + 1/(L-1)], the
        # union of the level bins (see `_dequantize`), so the extreme levels are reachable.
        self.bin_half_width = 1.0 / (levels - 1)
        self.generator = Generator(
            self.image_shape, latent_dim, channels, k, 1.0 + self.bin_half_width
        )
        self.discriminator = Discriminator(self.image_shape, channels, k, spectral_norm)
        # EMA of the generator only. use_buffers=True averages BatchNorm's running statistics
        # with the same decay as the weights, so the averaged net is normalised by statistics
        # consistent with its averaged weights (no recomputation pass needed).
        self.ema = AveragedModel(
            self.generator, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
        )
        self.ema.requires_grad_(False)
        # Consecutive steps the discriminator has won outright (`divergence`; not saved).
        self.register_buffer("d_win_streak", torch.zeros((), dtype=torch.long), persistent=False)

    # -- network inputs and outputs ---------------------------------------------------------------
    def _dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels (B, C, H, W) -> [-1, 1] plus uniform noise over each level's bin.

        Level k sits at k / (L-1) * 2 - 1 with bin width 2 / (L-1); without the noise the reals
        take only L values and D could tell them from G's continuous output by discreteness.
        """
        centre = x.float() / (self.levels - 1) * 2 - 1
        return centre + (torch.rand_like(centre) * 2 - 1) * self.bin_half_width

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Generator output (B, C, H, W) -> the nearest level, clamped, uint8."""
        levels = torch.round((x + 1) / 2 * (self.levels - 1))
        return levels.clamp_(0, self.levels - 1).to(torch.uint8)

    def _fake(self, n: int, y: torch.Tensor | None) -> torch.Tensor:
        return self.generator(torch.randn(n, self.hparams.latent_dim, device=self.device), y)

    # -- objective --------------------------------------------------------------------------------
    def gradient_penalty(
        self, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        kind, weight = self.hparams.gradient_penalty, self.hparams.gp_weight
        if kind == "r1":
            return weight / 2 * input_gradient_norm(self.discriminator, real, y).pow(2).mean()
        t = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        x_hat = t * real + (1 - t) * fake.detach()
        return weight * (input_gradient_norm(self.discriminator, x_hat, y) - 1).pow(2).mean()

    # -- contract ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One pass of the EMA generator, in eval mode (BatchNorm uses its averaged statistics)."""
        y = self.labels_for(y)
        z = self.randn(n, self.hparams.latent_dim, generator=generator)
        self.ema.eval()  # the averaged copy is never trained, whatever mode the module is in
        return self._quantize(self.ema.module(z, y))  # (n, C, H, W)

    # -- system -----------------------------------------------------------------------------------
    def _step_uncounted(self, optimizer) -> None:
        """`optimizer.step()` through the strategy (precision plugin, hooks) without advancing
        `global_step`. Under manual optimisation Lightning counts every optimiser's steps, so
        `global_step` would be (n_critic + 1) x batches; the D steps are not counted, so
        `global_step` is the number of generator updates, one per batch like other families."""
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        x, y = batch
        y = self.labels_for(y)
        opt_g, opt_d = self.optimizers()
        clip = self.hparams.grad_clip
        loss_kind = self.hparams.loss

        # Discriminator: n_critic steps on the same real batch, fresh dequantisation noise and
        # fresh fakes each time. The last fakes keep their graph through G and are reused by the
        # generator step, as in the DCGAN reference code: one generator pass per D step.
        n_critic = self.hparams.n_critic
        for i in range(n_critic):
            real = self._dequantize(x)
            with torch.set_grad_enabled(i == n_critic - 1):
                fake = self._fake(x.shape[0], y)
            d_real = self.discriminator(real, y)
            d_fake = self.discriminator(fake.detach(), y)
            loss_d = discriminator_loss(d_real, d_fake, loss_kind)
            if self.hparams.gradient_penalty != "none":
                penalty = self.gradient_penalty(real, fake.detach(), y)
                loss_d = loss_d + penalty
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            if clip > 0:
                self.clip_gradients(opt_d, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            self._step_uncounted(opt_d)

        # Generator: one step (D frozen so its weights get no gradient), then the EMA follows.
        self.discriminator.requires_grad_(False)
        d_gen = self.discriminator(fake, y)  # the updated D on the last fakes
        loss_g = generator_loss(d_gen, loss_kind)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        if clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_g.step()
        self.discriminator.requires_grad_(True)
        self.ema.update_parameters(self.generator)

        logged = {"train/loss": loss_g, "train/loss_g": loss_g, "train/loss_d": loss_d.detach()}
        logged |= {"train/d_real": d_real.detach().mean(), "train/d_fake": d_fake.detach().mean()}
        if self.hparams.gradient_penalty != "none":
            logged["train/gp"] = penalty.detach()
        self.log_train(logged)
        won = loss_d.detach() < D_WIN_LOSS
        self.d_win_streak = torch.where(won, self.d_win_streak + 1, 0)
        return {"loss_g": loss_g.detach(), "loss_d": loss_d.detach()}  # for the finite check

    def divergence(self) -> str | None:
        """The discriminator winning outright: a healthy hinge run on the digits keeps its loss
        near 2 (1.72-2.25 on the default run); a collapsed generator lets it fall to 0."""
        streak = int(self.d_win_streak)
        if streak >= D_WIN_STEPS:
            return (
                f"the discriminator loss stayed below {D_WIN_LOSS} for {streak} steps (the "
                "generator gets no useful gradient); lower lr_d or add a gradient penalty"
            )
        return None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (self.hparams.beta1, self.hparams.beta2)
        return [
            torch.optim.Adam(
                self.generator.parameters(), lr=self.hparams.lr_g, betas=betas, fused=True
            ),
            torch.optim.Adam(
                self.discriminator.parameters(), lr=self.hparams.lr_d, betas=betas, fused=True
            ),
        ]
