"""Variational autoencoder with an exact discrete decoder over the L levels of each pixel.

Kingma & Welling, *Auto-Encoding Variational Bayes* (2014). The decoder is a categorical
distribution over the L integer levels of every pixel and channel (``output: categorical``, L
outputs each) or PixelCNN++'s discretized mixture of K logistics (``output: logistic``, 3K outputs
each; nn/discretized.py), so the ELBO (eq. 3) is a lower bound on log P(x) of the *discrete*
image, comparable with every other family's likelihood.
Conditional form (Sohn et al. 2015): the label, one-hot, enters both encoder and decoder.

Networks: convolutional by default, an encoder that halves the image with stride-2 convolutions
down to a 4x4 map (depth from the image size) before an MLP head, and a decoder that mirrors it
with upsampling; the translation-equivariant networks give both a tighter bound and a latent that
a linear probe reads the class from better than MLPs on the pixels. MLPs remain an option.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import nn

from genlab.models.base import GenerativeModule
from genlab.nn import discretized
from genlab.nn.discretized import Output


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LeakyReLU(0.2), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


Architecture = Literal["mlp", "conv"]

# Stride-2 convolutions halve the image until its side is at most this (8x8 -> 4x4, 64 -> 4).
CONV_MIN_SIZE = 4


def conv_sizes(size: int) -> list[int]:
    """Sides of the feature maps of the convolutional encoder, input first: [8, 4] for 8."""
    sizes = [size]
    while sizes[-1] > CONV_MIN_SIZE:
        sizes.append((sizes[-1] + 1) // 2)  # a 3x3 stride-2 convolution with padding 1
    return sizes


class MLPEncoder(nn.Module):
    """q(z | x, y) = N(mu, diag(exp(logvar))) from the flattened image."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        cond_dim: int,
        hidden_dim: int,
        num_layers: int,
        latent_dim: int,
        dropout: float,
    ):
        super().__init__()
        in_dim = math.prod(image_shape)
        self.net = mlp([in_dim + cond_dim] + [hidden_dim] * num_layers + [2 * latent_dim], dropout)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.flatten(1)  # (B, D)
        h = h if c is None else torch.cat([h, c], dim=1)  # (B, D + K)
        mu, logvar = self.net(h).chunk(2, dim=1)  # (B, Z) each
        return mu, logvar


class ConvEncoder(nn.Module):
    """q(z | x, y) from a convolutional feature map: at every resolution a 3x3 convolution, then a
    stride-2 one that halves the side and doubles the channels, down to CONV_MIN_SIZE; then an MLP
    head on the flattened features (and the label) gives mu and logvar."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        cond_dim: int,
        channels: int,
        hidden_dim: int,
        num_layers: int,
        latent_dim: int,
        dropout: float,
    ):
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        sizes_h, sizes_w = conv_sizes(h), conv_sizes(w)
        for _ in range(max(len(sizes_h), len(sizes_w)) - 1):
            layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch *= 2
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.head = mlp(
            [flat + cond_dim] + [hidden_dim] * (num_layers - 1) + [2 * latent_dim], dropout
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)  # (B, C', H', W') -> (B, F)
        h = h if c is None else torch.cat([h, c], dim=1)  # (B, F + K)
        mu, logvar = self.head(h).chunk(2, dim=1)  # (B, Z) each
        return mu, logvar


class MLPDecoder(nn.Module):
    """p(x | z, y), independent over pixels and channels: `outputs` P numbers for each (L logits,
    or 3K mixture parameters); returns (B, P, C, H, W)."""

    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        hidden_dim: int,
        num_layers: int,
        image_shape: tuple[int, int, int],
        outputs: int,
        dropout: float,
    ):
        super().__init__()
        self.image_shape = image_shape
        self.outputs = outputs
        dims = math.prod(image_shape)
        self.net = mlp(
            [latent_dim + cond_dim] + [hidden_dim] * num_layers + [dims * outputs], dropout
        )

    def forward(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = z if c is None else torch.cat([z, c], dim=1)
        return self.net(h).view(-1, self.outputs, *self.image_shape)  # (B, P, C, H, W)


class ConvDecoder(nn.Module):
    """p(x | z, y) mirroring ConvEncoder: a linear map to the smallest feature map, then at
    every resolution a nearest-neighbour upsampling and two 3x3 convolutions that halve the
    channels; a final 3x3 convolution gives the P outputs of every pixel and channel,
    (B, P, C, H, W)."""

    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        channels: int,
        image_shape: tuple[int, int, int],
        outputs: int,
    ):
        super().__init__()
        self.image_shape = image_shape
        self.outputs = outputs
        c, h, w = image_shape
        sizes_h, sizes_w = conv_sizes(h), conv_sizes(w)
        n = max(len(sizes_h), len(sizes_w)) - 1
        sizes_h += [sizes_h[-1]] * (n + 1 - len(sizes_h))
        sizes_w += [sizes_w[-1]] * (n + 1 - len(sizes_w))
        ch = channels * 2**n
        self.top = (ch, sizes_h[-1], sizes_w[-1])
        self.stem = nn.Linear(latent_dim + cond_dim, math.prod(self.top))
        layers: list[nn.Module] = [nn.LeakyReLU(0.2)]
        for i in reversed(range(n)):
            layers += [nn.Upsample(size=(sizes_h[i], sizes_w[i]), mode="nearest")]
            layers += [nn.Conv2d(ch, ch // 2, 3, padding=1), nn.LeakyReLU(0.2)]
            layers += [nn.Conv2d(ch // 2, ch // 2, 3, padding=1), nn.LeakyReLU(0.2)]
            ch //= 2
        layers.append(nn.Conv2d(ch, outputs * c, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = z if c is None else torch.cat([z, c], dim=1)  # (B, Z + K)
        h = self.stem(h).view(-1, *self.top)  # (B, C', H', W')
        return self.net(h).view(-1, self.outputs, *self.image_shape)  # (B, P, C, H, W)


# Images x importance samples decoded at once by `VAE.iwae` on a CPU (bounds memory for large k;
# `pass_size` scales it for an accelerator), for images with IWAE_CHUNK_LOGITS decoder outputs each
# (the digits: 8x8 pixels x 17 levels); larger images, more channels or outputs get proportionally
# fewer, but never less than one sample of every image in the batch (a 3x64x64 image at 256
# levels; the caller's batch size rules then). Measured on 2 CPU cores (2026-12-03): 100k decodes/s
# in passes of 2048, 17-23k in passes of 16384 (the previous size), 82k of 512.
IWAE_CHUNK = 2048
IWAE_CHUNK_LOGITS = 8 * 8 * 17


class ELBO(NamedTuple):
    elbo: torch.Tensor  # (B,) nats, lower bound on log P(x | y)
    log_px_z: torch.Tensor  # (B,) reconstruction term E_q[log p(x | z)], one sample
    kl: torch.Tensor  # (B,) KL(q(z | x) || N(0, I)), analytic


class VAE(GenerativeModule):
    likelihood = "lower_bound"
    has_latent = True
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 150, "batch_size": 64}

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int,
        latent_dim: Annotated[int, Ge(1)] = 48,  # size of z
        encoder: Architecture = "conv",  # q(z | x): convolutions + an MLP head, or an MLP
        decoder: Architecture = "conv",  # p(x | z): upsampling convolutions, or an MLP
        channels: Annotated[int, Ge(1)] = 16,  # conv channels at full resolution (x2 per halving)
        hidden_dim: Annotated[int, Ge(1)] = 256,  # width of the MLPs (and the conv encoder's head)
        num_layers: Annotated[int, Ge(1)] = 2,  # hidden layers in each MLP (conv head: one less)
        dropout: Annotated[float, Ge(0), Lt(1)] = 0.1,  # dropout after each hidden MLP layer
        conditional: bool = False,  # model p(x | y) instead of p(x)
        # p(x | z)'s distribution over the L levels of each pixel: a free softmax (L outputs) or a
        # discretized mixture of `mixtures` logistics (3K outputs: for 256 levels the decoder's
        # last layer and every IWAE sample's score cost about 3K/L as much).
        output: Output = "categorical",
        mixtures: Annotated[int, Ge(1)] = 5,  # K logistics per pixel and channel (logistic only)
        eval_samples: Annotated[int, Ge(1)] = 1000,  # IWAE k for held-out evaluation (1: ELBO)
        lr: Annotated[float, Gt(0)] = 1e-3,  # Adam learning rate
        weight_decay: Annotated[float, Ge(0)] = 0.0,  # AdamW decoupled weight decay
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        self.save_hyperparameters(logger=False)  # genlab logs the resolved config itself
        cond_dim = num_classes if conditional else 0
        shape = self.image_shape
        outputs = levels if output == "categorical" else 3 * mixtures
        if encoder == "conv":
            self.encoder = ConvEncoder(
                shape, cond_dim, channels, hidden_dim, num_layers, latent_dim, dropout
            )
        else:
            self.encoder = MLPEncoder(shape, cond_dim, hidden_dim, num_layers, latent_dim, dropout)
        if decoder == "conv":
            self.decoder = ConvDecoder(latent_dim, cond_dim, channels, shape, outputs)
        else:
            self.decoder = MLPDecoder(
                latent_dim, cond_dim, hidden_dim, num_layers, shape, outputs, dropout
            )

    # -- network inputs -------------------------------------------------------------------------
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels (B, C, H, W) -> floats in [-1, 1], (B, C, H, W)."""
        return x.float() / (self.levels - 1) * 2 - 1

    def _onehot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else F.one_hot(y, self.num_classes).float()

    # -- the decoder's distribution ---------------------------------------------------------------
    def _log_px_z(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) of the levels x (B, C, H, W) from the decoder's (B, P, C, H, W), (B,)."""
        if self.hparams.output == "categorical":
            log_p = -F.cross_entropy(out, x.long(), reduction="none")
        else:
            log_p = discretized.observed_log_probs(out.transpose(1, 2), x, self.levels)
        return log_p.flatten(1).sum(1)

    # -- objective ------------------------------------------------------------------------------
    def elbo(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ELBO:
        c = self._onehot(y)
        mu, logvar = self.encoder(self._scale(x), c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        log_px_z = self._log_px_z(self.decoder(z, c), x)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return ELBO(elbo=log_px_z - kl, log_px_z=log_px_z, kl=kl)

    def iwae(self, x: torch.Tensor, y: torch.Tensor | None, k: int) -> torch.Tensor:
        """IWAE-k bound (Burda et al. 2016, eq. 8), (B,) nats:

            log P(x) >= E[log 1/k sum_i p(x | z_i) p(z_i) / q(z_i | x)],  z_i ~ q(z | x).

        It rises monotonically towards log P(x) as k grows (their Theorem 1). The k samples are
        processed in chunks so memory stays bounded for k in the thousands.
        """
        c = self._onehot(y)
        mu, logvar = self.encoder(self._scale(x), c)  # (B, Z)
        std = torch.exp(0.5 * logvar)
        prior = torch.distributions.Normal(0.0, 1.0)
        posterior = torch.distributions.Normal(mu, std)
        per_pass = self.pass_size(IWAE_CHUNK) * IWAE_CHUNK_LOGITS
        chunk = max(1, per_pass // (x.shape[0] * self.dims * self.decoder.outputs))
        log_w = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            z = posterior.rsample((n,))  # (n, B, Z)
            zc = z.flatten(0, 1)  # (n*B, Z)
            cc = None if c is None else c.repeat(n, 1)  # (n*B, K), sample-major like zc
            target = x.repeat(n, 1, 1, 1)  # (n*B, C, H, W)
            log_px_z = self._log_px_z(self.decoder(zc, cc), target)  # (n*B,)
            log_pz = prior.log_prob(z).sum(-1)  # (n, B)
            log_qz = posterior.log_prob(z).sum(-1)  # (n, B)
            log_w.append(log_px_z.view(n, -1) + log_pz - log_qz)
        return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)  # (B,)

    # -- contract -------------------------------------------------------------------------------
    def log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1
    ) -> torch.Tensor:
        """A lower bound on log P(x | y) of the discrete data, nats per image: the ELBO (analytic
        KL) for samples=1, the IWAE bound with k=samples otherwise."""
        x, y = x.to(self.device), self.labels_for(y)
        if samples == 1:
            return self.elbo(x, y).elbo
        return self.iwae(x, y, samples)

    @torch.no_grad()
    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = self.randn(n, self.hparams.latent_dim, generator=generator)
        out = self.decoder(z, self._onehot(self.labels_for(y)))  # (n, P, C, H, W)
        if self.hparams.output == "categorical":
            return self.sample_categorical(out, generator).to(torch.uint8)  # (n, C, H, W)
        uniform = lambda shape: self.rand(*shape, generator=generator)  # noqa: E731
        return discretized.sample(out.transpose(1, 2), self.levels, uniform).to(torch.uint8)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean E[z | x] (B, Z)."""
        mu, _ = self.encoder(self._scale(x.to(self.device)), self._onehot(self.labels_for(y)))
        return mu

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (n, Z) -> uint8 images (n, C, H, W): the mode of p(x | z, y), the most probable
        level of every pixel (deterministic, unlike `sample`, which draws from it)."""
        out = self.decoder(z.to(self.device, self.dtype), self._onehot(self.labels_for(y)))
        if self.hparams.output == "categorical":
            return out.argmax(dim=1).to(torch.uint8)  # (n, L, C, H, W) -> (n, C, H, W)
        return discretized.mode(out.transpose(1, 2), self.levels).to(torch.uint8)

    # -- system ---------------------------------------------------------------------------------
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        terms = self.elbo(x, self.labels_for(y))
        loss = -terms.elbo.mean()
        logged = {"train/loss": loss, "train/recon_nats": -terms.log_px_z.mean()}
        self.log_train(logged | {"train/kl_nats": terms.kl.mean()})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            fused=True,
        )
