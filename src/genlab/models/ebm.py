"""Energy-based model trained by contrastive divergence with short-run Langevin dynamics.

Du & Mordatch, *Implicit Generation and Generalization in Energy-Based Models* (NeurIPS 2019,
"IGEBM") and Grathwohl et al., *Your Classifier is Secretly an Energy Based Model* (ICLR 2020,
"JEM"). A convolutional network f maps an image to K logits and defines the unnormalised density
p(x, y) ∝ exp(-E(x, y)) with (JEM eq. 5-6)::

    E(x, y) = -f(x)[y],      E(x) = -log Σ_y exp f(x)[y],      p(y | x) = softmax(f(x))[y].

The unconditional model is the same network with one output, E(x) = -f(x). Training lowers the
energy of data x+ and raises it on samples x- of the model (contrastive divergence, IGEBM eq. 2),
with IGEBM's energy-magnitude regulariser (sec. 3.3)::

    loss = mean E(x+) - mean E(x-) + energy_reg · mean(E(x+)² + E(x-)²).

x- comes from `langevin` run for `langevin_steps` steps from a replay buffer of past samples, a
fraction `reinit_prob` of chains restarting from uniform noise (IGEBM sec. 3.1, JEM Algorithm 1).

Short-run default. `sample` starts from uniform noise, so the defaults train with the very sampler
that evaluation uses: `reinit_prob = 1`, every training chain a fresh `langevin_steps`-step run
from noise, and `sample_steps` about the same (Nijkamp et al., *Learning Non-Convergent
Non-Persistent Short-Run MCMC Toward Energy-Based Model*, NeurIPS 2019). On the digits, JEM's
persistent setting (`reinit_prob = 0.05`) learned an energy whose good samples lie at the end of
long buffer chains: 60-150 steps from noise scored FID 7.5-10.6, against 2.8 for short-run
training at the same cost. The replay buffer is kept (written every batch, read for
`reinit_prob < 1` and by `sample(from_buffer=True)`).

Image size. A short run from uniform noise must cross a distance that grows with the pixels,
while the energy regulariser keeps energies, and so gradients, of order one: the step must grow
with the image. Step 1 suits the 8x8 digits; on 28x28 MNIST it left the samples as noise, and
the mnist profile takes step 100 with training noise 0.3 (validation FID 10.9 in the MNIST
evaluator's features, conditional accuracy 0.59, where step 1 scored 125 and 0.10 on test).
There the short run also holds for about 100 steps only: at 200 the gap between the energies
of samples and data ran away and the samples were noise again.

Noise. Training chains use `noise = 0.05` with JEM's step 1 (0.01 scored FID 1.90 / KID 0.022
against 1.80 / 0.016 on the digits, 0.1 worse still); `sample` runs the same chain without noise
(`sample_noise = 0`): the diversity comes from the uniform starts, and the last steps' noise only
speckles the image (0.05 at sampling: FID 1.99, KID 0.024).

Stability. EBM training diverges when the energy of data falls and that of samples rises without
bound (Langevin then no longer reaches the data): watch `train/energy_pos` and
`train/energy_neg`. The squared-energy term is the guard: on the digits `energy_reg = 0.01`
diverged for one of two seeds (E(x+) -8, E(x-) +17, FID 25), 0.03 and 0.1 trained on every seed
tried. Gradients are clipped to norm `grad_clip`.

Conditional form. JEM trains log p(y | x) by cross-entropy plus log p(x) by CD on E(x). Here the
CD term is on E(x, y) with the replay buffer's labels, which trains log p(x, y) directly, the
density `sample(y=...)` draws from; cross-entropy on real (x, y), weighted by `ce_weight`, keeps
p(y | x) a good classifier (the evaluator's conditional accuracy needs the classes apart).

Data: integer levels are mapped to [-1, 1] and dequantised with uniform noise inside each level's
bin (then clamped to [-1, 1]), so the energy cannot exploit the discreteness that Langevin samples,
which live in the continuum, never reach. Samples go back to the nearest level.

Layout: Langevin dynamics, the replay buffer, the energy network, the Lightning system.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as with_spectral_norm
from torchmetrics import MeanMetric

from genlab.models.base import GenerativeModule

# `divergence`: E(x-) - E(x+) above ENERGY_GAP_LIMIT for ENERGY_GAP_STEPS steps in a row means
# training has diverged (a transient gap early in training, seen on tiny runs, is not).
ENERGY_GAP_LIMIT = 5.0
ENERGY_GAP_STEPS = 200


def langevin(
    energy_fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: float,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """Unadjusted Langevin dynamics (Welling & Teh 2011; IGEBM eq. 1), `steps` times::

        x <- x - step_size · ∇_x E(x) + noise · ξ,      ξ ~ N(0, I),

    then clipped to `clamp` if given. With noise = sqrt(2 · step_size) the chain targets
    p(x) ∝ exp(-E(x)) as step_size -> 0; EBM training (JEM: step 1, noise 0.01) uses far less
    noise, which makes the sampler a noisy gradient descent that the model learns to match.
    `energy_fn` maps (B, ...) -> (B,). Runs with gradients on even under `torch.no_grad()` (but
    never under `inference_mode`); returns a detached tensor shaped like x0. Noise is drawn on
    the generator's device, so a seeded CPU generator gives the same chain on any device.
    """
    x = x0.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy_fn(x).sum(), x)
            if generator is None:
                xi = torch.randn_like(x)
            else:
                xi = torch.randn(x.shape, generator=generator, device=generator.device)
                xi = xi.to(x.device)
            x = (x - step_size * grad + noise * xi).detach()
            if clamp is not None:
                x = x.clamp_(*clamp)
    return x


class Draw(NamedTuple):
    index: torch.Tensor  # (B,) buffer slots the chains came from
    x: torch.Tensor  # (B, C, H, W) chain starts in [-1, 1]
    y: torch.Tensor  # (B,) their labels (random classes for fresh starts)
    fresh: torch.Tensor  # (B,) bool, True where the start is fresh uniform noise


class ReplayBuffer(nn.Module):
    """A fixed-size store of past Langevin samples and their labels (IGEBM sec. 3.1).

    Held as registered buffers, so the store is part of the state_dict and of every checkpoint
    (plain tensors: loads with `weights_only=True`). It starts as uniform noise with uniform
    labels. Memory: capacity · C·H·W floats, kept in the checkpoint as well.
    """

    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("x", torch.rand(capacity, *image_shape) * 2 - 1)
        self.register_buffer("y", torch.randint(0, num_classes, (capacity,)))

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    def draw(self, n: int, reinit_prob: float, generator: torch.Generator | None = None) -> Draw:
        """n random slots; each start is fresh uniform noise with probability `reinit_prob`,
        else the stored sample (and label). Reads only: `write` puts the chains back."""
        device = self.x.device if generator is None else generator.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=device).to(self.x.device)

        index = torch.randint(0, self.capacity, (n,), generator=generator, device=device)
        index = index.to(self.x.device)
        fresh = rand(n) < reinit_prob  # (B,)
        noise = rand(n, *self.x.shape[1:]) * 2 - 1  # (B, C, H, W)
        labels = (rand(n) * self.num_classes).long().clamp_(max=self.num_classes - 1)
        x = torch.where(fresh[:, None, None, None], noise, self.x[index])
        y = torch.where(fresh, labels, self.y[index])
        return Draw(index, x, y, fresh)

    @torch.no_grad()
    def write(self, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Store chains back in the slots they were drawn from; the size never changes."""
        self.x[index] = x.detach().to(self.x.dtype)
        self.y[index] = y


class EnergyNet(nn.Module):
    """A small all-convolutional network, (B, C, H, W) -> (B, out_dim) logits f(x).

    SiLU (Swish) activations as in IGEBM: smooth, so ∇_x E is continuous for Langevin. No
    normalisation layers: batch statistics would couple the energies of data and samples.
    Depth follows the image: one stride-2 stage (width doubling, capped at 4x) per halving of
    the side until it is at most 4, then a linear read-out of the flattened final map.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        width: int,
        out_dim: int,
        spectral_norm: bool,
    ) -> None:
        super().__init__()
        channels, size, _ = image_shape

        def conv(a: int, b: int, stride: int = 1) -> nn.Module:
            layer = nn.Conv2d(a, b, 3, stride=stride, padding=1)
            return with_spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = [conv(channels, width), nn.SiLU()]
        ch = width
        while size > 4:
            out = min(2 * ch, 4 * width)
            layers += [conv(ch, ch), nn.SiLU(), conv(ch, out, stride=2), nn.SiLU()]
            ch, size = out, (size + 1) // 2
        layers += [conv(ch, ch), nn.SiLU(), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        head = nn.Linear(ch * size * size, out_dim)
        self.head = with_spectral_norm(head) if spectral_norm else head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, out_dim)


class Objective(NamedTuple):
    loss: torch.Tensor  # scalar
    energy_pos: torch.Tensor  # (B,) E(x+) (or E(x+, y+))
    energy_neg: torch.Tensor  # (B,) E(x-) (or E(x-, y-))
    ce: torch.Tensor | None  # scalar cross-entropy of p(y | x+), conditional model only


class EBM(GenerativeModule):
    likelihood = "none"
    has_latent = False
    has_energy = True
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 15, "batch_size": 64}

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int,
        width: Annotated[int, Ge(1)] = 48,  # channels of the first conv; doubles per stage
        spectral_norm: bool = False,  # spectral normalisation of every layer
        conditional: bool = True,  # JEM: K logits, E(x, y) = -f(x)[y]; else one output
        langevin_steps: Annotated[int, Ge(1)] = 20,  # Langevin steps per training batch
        sample_steps: Annotated[int, Ge(1)] = 20,  # Langevin steps from noise in `sample`
        step_size: Annotated[float, Gt(0)] = 1.0,  # gradient step of Langevin (JEM: 1)
        noise: Annotated[float, Ge(0)] = 0.05,  # training Langevin noise std (JEM: 0.01)
        sample_noise: Annotated[float, Ge(0)] = 0.0,  # Langevin noise std in `sample`
        buffer_size: Annotated[int, Ge(1)] = 2000,  # replay buffer capacity
        reinit_prob: Annotated[float, Ge(0), Le(1)] = 1.0,  # fresh-noise chain starts
        energy_reg: Annotated[float, Ge(0)] = 0.03,  # weight of E(x+)² + E(x-)² (IGEBM)
        ce_weight: Annotated[float, Ge(0)] = 1.0,  # weight of cross-entropy on p(y | x)
        dequantize: bool = True,  # uniform noise inside each level's bin on real data
        grad_clip: Annotated[float, Ge(0)] = 1.0,  # max gradient norm (0: no clipping)
        lr: Annotated[float, Gt(0)] = 2e-3,  # peak Adam learning rate, cosine decay to 0
        beta1: Annotated[float, Ge(0), Lt(1)] = 0.0,  # Adam beta1 (IGEBM uses 0)
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        # Since the last divergence check (not saved): sum of E(x-) - E(x+) over steps, steps.
        self.register_buffer("gap_streak", torch.zeros((), dtype=torch.long), persistent=False)
        self.val_energy, self.val_acc = MeanMetric(), MeanMetric()
        self.save_hyperparameters(logger=False)  # genlab logs the resolved config itself
        out_dim = num_classes if conditional else 1
        self.net = EnergyNet(self.image_shape, width, out_dim, spectral_norm)
        self.buffer = ReplayBuffer(buffer_size, self.image_shape, num_classes)

    # -- inputs and outputs ---------------------------------------------------------------------
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels (B, C, H, W) -> floats in [-1, 1]."""
        return x.float() / (self.levels - 1) * 2 - 1

    def _dequantize(self, v: torch.Tensor) -> torch.Tensor:
        """Uniform noise over each level's bin (width 2 / (L - 1) in [-1, 1])."""
        half_bin = 1.0 / (self.levels - 1)
        return (v + (torch.rand_like(v) * 2 - 1) * half_bin).clamp_(-1.0, 1.0)

    def _quantize(self, v: torch.Tensor) -> torch.Tensor:
        """Floats in [-1, 1] -> nearest uint8 level."""
        levels = torch.round((v + 1) / 2 * (self.levels - 1))
        return levels.clamp_(0, self.levels - 1).to(torch.uint8)

    # -- energy ---------------------------------------------------------------------------------
    def continuous_energy(self, v: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E(v, y) of continuous images v in [-1, 1], (B, C, H, W) -> (B,) (JEM eq. 5-6)."""
        f = self.net(v)  # (B, K) or (B, 1)
        if not self.conditional:
            return -f[:, 0]
        if y is None:
            return -torch.logsumexp(f, dim=1)
        return -f.gather(1, y[:, None])[:, 0]

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Energy of integer images (B, C, H, W) -> (B,); lower = more in-distribution.

        For a conditional model E(x, y) with labels, else E(x) = -logsumexp_y f(x)[y]; an
        unconditional model ignores y. Usable as an out-of-distribution score.
        """
        x = x.to(self.device)
        y = y.to(self.device) if (y is not None and self.conditional) else None
        return self.continuous_energy(self._scale(x), y)

    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        """p(y | x) = softmax(f(x)) of integer images, (B, C, H, W) -> (B, K) (JEM eq. 4)."""
        if not self.conditional:
            raise ValueError("class_probs needs a conditional EBM (conditional=True)")
        return self.net(self._scale(x.to(self.device))).softmax(dim=1)

    # -- sampling -------------------------------------------------------------------------------
    def _langevin(
        self,
        x0: torch.Tensor,
        y: torch.Tensor | None,
        steps: int,
        noise: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return langevin(
            lambda v: self.continuous_energy(v, y),
            x0,
            steps=steps,
            step_size=self.hparams.step_size,
            noise=noise,
            generator=generator,
        )

    @property
    def nfe_per_sample(self) -> float:
        # One energy gradient per Langevin step; a gradient costs about a forward plus a
        # backward pass of the network.
        return float(self.hparams.sample_steps)

    def sample(
        self,
        n: int,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        steps: int | None = None,
        from_buffer: bool = False,
    ) -> torch.Tensor:
        """`steps` (default `sample_steps`) Langevin steps from uniform noise, or from random
        replay-buffer entries with `from_buffer` (then E(x, y) with the requested labels). The
        buffer is only read; all randomness comes from `generator`. Returns uint8 levels."""
        y = self.labels_for(y)
        steps = self.hparams.sample_steps if steps is None else steps
        if from_buffer:
            x0 = self.buffer.draw(n, 0.0, generator).x
        else:
            x0 = self.rand(n, *self.image_shape, generator=generator) * 2 - 1
        v = self._langevin(x0, y, steps, self.hparams.sample_noise, generator)
        return self._quantize(v)  # (n, C, H, W)

    # -- objective ------------------------------------------------------------------------------
    def objective(self, x: torch.Tensor, y: torch.Tensor | None) -> Objective:
        """Contrastive divergence with the replay buffer (JEM Algorithm 1), one batch.

        Draws chain starts from the buffer, runs `langevin_steps`, writes the chains back.
        """
        hp = self.hparams
        v_pos = self._scale(x)
        if hp.dequantize:
            v_pos = self._dequantize(v_pos)
        draw = self.buffer.draw(x.shape[0], hp.reinit_prob)
        y_neg = draw.y if self.conditional else None
        v_neg = self._langevin(draw.x, y_neg, hp.langevin_steps, hp.noise)
        self.buffer.write(draw.index, v_neg, draw.y)

        f = self.net(torch.cat([v_pos, v_neg]))  # (2B, K) or (2B, 1)
        f_pos, f_neg = f.chunk(2)
        ce = None
        if self.conditional:
            e_pos = -f_pos.gather(1, y[:, None])[:, 0]  # (B,)
            e_neg = -f_neg.gather(1, y_neg[:, None])[:, 0]
            ce = F.cross_entropy(f_pos, y)
        else:
            e_pos, e_neg = -f_pos[:, 0], -f_neg[:, 0]
        loss = e_pos.mean() - e_neg.mean()
        loss = loss + hp.energy_reg * (e_pos.pow(2) + e_neg.pow(2)).mean()
        if ce is not None:
            loss = loss + hp.ce_weight * ce
        return Objective(loss, e_pos.detach(), e_neg.detach(), ce)

    # -- system ---------------------------------------------------------------------------------
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        terms = self.objective(x, self.labels_for(y))
        # Energies of data and samples drifting apart without bound is how EBM training
        # diverges: both are logged so it shows in the curves.
        logged = {"train/loss": terms.loss, "train/energy_pos": terms.energy_pos.mean()}
        logged["train/energy_neg"] = terms.energy_neg.mean()
        if terms.ce is not None:
            logged["train/ce"] = terms.ce
        self.log_train(logged)
        gap = (terms.energy_neg.mean() - terms.energy_pos.mean()).detach()
        self.gap_streak = torch.where(gap > ENERGY_GAP_LIMIT, self.gap_streak + 1, 0)
        return terms.loss

    def divergence(self) -> str | None:
        """The energies of data and chain samples drifting apart (see Stability above): on a
        healthy run E(x-) - E(x+) stays within +-1 (the default digits run: at most 0.13), on
        the diverged one it reached 25 and stayed there while the loss stayed finite."""
        streak = int(self.gap_streak)
        if streak >= ENERGY_GAP_STEPS:
            return (
                f"the energy gap E(x-) - E(x+) stayed above {ENERGY_GAP_LIMIT:g} for {streak} "
                "steps: Langevin no longer reaches the data. Raise energy_reg or lower lr or "
                "step_size"
            )
        return None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # MeanMetric objects: Lightning syncs their sums and counts across ranks at the epoch
        # end, so the value is sum over every validation image / count under DDP too.
        self.val_energy.update(self.energy(x))
        self.log("val/energy", self.val_energy)
        if self.conditional:
            self.val_acc.update((self.class_probs(x).argmax(dim=1) == y).float())
            self.log("val/acc", self.val_acc)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, self.hparams.grad_clip, "norm")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimiser = torch.optim.Adam(
            self.net.parameters(),
            lr=self.hparams.lr,
            betas=(self.hparams.beta1, 0.999),
            fused=True,
        )
        # Cosine decay to 0 over the whole run, stepped per batch: the energy keeps moving while
        # the learning rate is high, and the model kept is the last one.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(1, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
