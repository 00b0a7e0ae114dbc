"""The contract every family implements (DESIGN.md, "One contract for all families").

A family is a `GenerativeModule` subclass in its own file that provides:

- ``sample(n, y=None, generator=None) -> uint8 (n, C, H, W)`` in the dataset's integer levels;
- ``log_prob(x, y=None, *, samples=1) -> (n,)`` nats per image of the *discrete* data, when
  ``likelihood`` is ``"exact"`` or ``"lower_bound"``. A bound that uses Monte Carlo draws takes
  ``samples`` of them, importance-weighted (IWAE-k for the VAE, importance-weighted dequantization
  for a flow): the bound tightens as ``samples`` grows. A family whose draws are instead terms of
  one fixed bound (diffusion's timesteps) says so with ``monte_carlo = "terms"``: more draws only
  shrink the variance, and evaluation names what follows from it (no looser "k1" bound, the
  conditional marginal an estimate rather than a bound). Exact families ignore it. Validation during
  training uses ``samples=1``; held-out evaluation uses ``eval_samples`` (an hparam, default 1);
- ``ode_log_prob(x, y=None, *, samples=1) -> (n,)`` when ``ode_likelihood``: a second lower bound
  on log P(x) of the discrete data (an unbiased estimate of one), of another model the family
  defines: the continuous-time flow of its probability-flow ODE (diffusion; Song et al. 2021,
  sec. 4.3). Its ``samples`` are dequantization draws averaged (for diffusion, draws of x_1 from
  the forward process's first step, read by the chain's decoder), "terms" of one bound in the
  sense of ``monte_carlo``. A family whose ``log_prob`` already is an ODE bound (flow matching)
  leaves it off;
- ``prediction_log_prob(x, y=None, *, samples=1)`` and ``prediction_samples(requested)``: the
  estimate of ``log_prob``'s number that OOD detection and Bayes classification score with, and
  its draws; ``log_prob`` with the protocol's draws unless a family's draws are costly solves;
- ``encode(x, y=None) -> latent (B, ...)`` and its inverse ``decode(z, y=None) -> uint8 images``
  when ``has_latent``;
- ``energy(x, y=None) -> (B,)`` when ``has_energy`` (lower = more likely; with y=None the energy
  of x alone, E(x) = -log sum_y exp(-E(x, y)) for a conditional model);
- ``nfe_per_sample``: network evaluations one ``sample`` call spends per image with the family's
  current sampling settings (a guided diffusion step counts two, a Langevin step one gradient of
  the energy), the cost the evaluate stage reports next to samples per second.

Stages, evaluation and tracking speak only this contract. The base class holds what every family
shares for real: the data geometry, the held-out likelihood metric (summed, then divided), and
noise drawn from an explicit generator on any device.

Each family's ``configure_optimizers`` builds its Adam/AdamW with ``fused=True``: torch's one-kernel
update, on CPU too, where the default is a Python loop over the parameters (AdamW step of the
digits' diffusion U-Net on 2 cores: 0.69 ms fused, 3.26 ms default; PixelCNN 0.71 vs 3.01 ms).
"""

from __future__ import annotations

import math
from typing import ClassVar

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MeanMetric, Metric

from genlab.evaluation.vocabulary import Likelihood, MonteCarlo, bpd_key, nll_key

# The evaluation loops that batch images x Monte Carlo draws (IWAE samples, bound terms) size one
# network pass for a CPU, whose caches should hold its activations (~8 MB: on the 2-core machine
# a 4x larger pass ran 2.3x slower for diffusion's bound and 4-5x slower for the VAE's IWAE); an
# accelerator gets this many times more work per pass.
ACCELERATOR_CHUNK_SCALE = 4


def bits_per_dim(nats_per_image: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """bits/dim = nats / (C·H·W · ln 2)."""
    return nats_per_image / (dims * math.log(2))


class GenerativeModule(L.LightningModule):
    likelihood: ClassVar[Likelihood] = "none"
    monte_carlo: ClassVar[MonteCarlo] = "importance"  # what `samples` are, for a bound
    has_latent: ClassVar[bool] = False
    has_energy: ClassVar[bool] = False
    # Whether the family also offers `ode_log_prob`, the bound of its probability-flow ODE.
    ode_likelihood: ClassVar[bool] = False
    # Whether a training step leaves some parameters without a gradient in a backward pass (a
    # GAN's alternating updates): DDP must then look for unused parameters, which costs a graph
    # traversal per step, so only such families ask for it.
    ddp_find_unused_parameters: ClassVar[bool] = False
    # Default `max_epochs` and `batch_size` of the family's params section.
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 50, "batch_size": 64}

    def __init__(self, *, image_shape: tuple[int, int, int], levels: int, num_classes: int) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.levels = levels
        self.num_classes = num_classes
        # MeanMetric keeps a DDP-synced sum and count: the epoch value is sum(nll) / n images,
        # never an average of per-batch averages.
        self.val_nll = MeanMetric()

    @property
    def dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    @property
    def eval_samples(self) -> int:
        """Monte Carlo samples per image for held-out evaluation of a bound (1 for exact models)."""
        return int(self.hparams.get("eval_samples", 1))

    @property
    def nfe_per_sample(self) -> float:
        """Network evaluations per sampled image (one decoder or generator pass by default)."""
        return 1.0

    @property
    def ode_images(self) -> int:
        """Held-out images the evaluation scores `ode_log_prob` on (the family's `ode_images`;
        0 without an ODE likelihood)."""
        return int(self.hparams.get("ode_images", 0)) if self.ode_likelihood else 0

    def prediction_samples(self, requested: int) -> int:
        """Monte Carlo draws per image with which prediction (OOD detection, Bayes
        classification, `genlab score`) scores a bound: the protocol's `requested`
        (`prediction.bound_samples`). A family whose every draw is an ODE solve has its own
        number in its params section (flow matching's `prediction_samples`)."""
        return requested

    def prediction_log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1
    ) -> torch.Tensor:
        """log p(x | y) (or its bound) as prediction scores images with it: `log_prob`. A
        family whose every draw is an ODE solve may estimate the same bound with a looser
        solver (flow matching's `prediction_rtol`), named in its params section."""
        return self.log_prob(x, y, samples=samples)

    @property
    def conditional(self) -> bool:
        return bool(self.hparams.get("conditional", False))

    @property
    def encodes_with_labels(self) -> bool:
        """Whether `encode`/`decode` need the labels. A conditional model's latent is then the
        part of the image its label does not explain; a family that also learned p(x) (label
        dropout) encodes without them."""
        return self.conditional

    @property
    def scores_without_labels(self) -> bool:
        """Whether `log_prob(x)` / `energy(x)` score an image without labels as its marginal:
        an unconditional model, or an energy model (E(x) marginalises the label). (A diffusion
        model trained with label dropout has an unconditional mode too, but it is a different
        model: on the digits its bound told flipped digits from the data worse, AUROC 0.83
        against 0.88 for hflip, than the marginal of the class-conditional bounds.)"""
        return not self.conditional or self.has_energy

    def divergence(self) -> str | None:
        """Why training has diverged in a way a finite loss does not show (a GAN whose
        discriminator wins outright, an EBM whose energies run away), else None. Called by the
        trainer's finite check every few steps, where a host sync is paid anyway; the default
        trusts the loss."""
        return None

    def log_train(self, values: dict[str, torch.Tensor]) -> None:
        """Log a training step's values, on the steps Lightning sends to the loggers (every
        `trainer.log_every_n_steps`) only.

        Lightning's `self.log` costs about a millisecond per value on a CPU on every call (it
        moves its result collection to the value's device and crosses a torch.compile boundary),
        and a step value logged between two logging steps is dropped unseen (on_step only, and
        genlab shows no progress bar): on the small models here that was up to a third of the
        step (benchmarks/overhead.py). Which steps log is Lightning's own rule, read from its
        logger connector (no public accessor in Lightning 2.6; without it, every step logs).
        `trainer.callback_metrics` so hold the values of the last logging step."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not getattr(connector, "should_update_logs", True):
            return
        self.log_dict(values)

    def convolutions_channels_last(self) -> GenerativeModule:
        """This model, in place, with the weights of its convolutions (averaged copies and
        spectral-norm parametrisations included) in the channels_last memory format, which their
        activations then follow. Other 4-D tensors keep their layout: an EBM's replay store of
        images is state, not a network, and `Module.to(memory_format=...)` would give a
        1-channel store channels_last strides over the same memory, onto which DDP's buffer
        broadcast then copies the store itself ("some elements of the input tensor and the
        written-to tensor refer to a single memory location")."""
        for module in self.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                module.to(memory_format=torch.channels_last)
        return self

    def networks(self) -> list[torch.nn.Module]:
        """The trained networks (direct children with parameters): what `trainer.compile`
        compiles. Metrics and averaged copies (an EMA, only used to sample) are left out."""
        return [
            m
            for m in self.children()
            if not isinstance(m, Metric | AveragedModel) and any(True for _ in m.parameters())
        ]

    def labels_for(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the model conditions on: `y` for a conditional model, else None."""
        if not self.conditional:
            return None
        if y is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: pass labels y")
        return y.to(self.device)

    def pass_size(self, cpu_size: int) -> int:
        """Work per network pass of an evaluation loop: `cpu_size` on a CPU,
        ACCELERATOR_CHUNK_SCALE times it on an accelerator."""
        return cpu_size if self.device.type == "cpu" else cpu_size * ACCELERATOR_CHUNK_SCALE

    # Noise is drawn on the generator's device and then moved, so a CPU generator gives the
    # same samples whatever device the model is on.
    def randn(self, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.randn(*shape, generator=generator, device=device).to(self.device)

    def rand(self, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        return torch.rand(*shape, generator=generator, device=device).to(self.device)

    def sample_categorical(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw from softmax(logits) over dim 1 by the Gumbel-max trick; (B, L, ...) -> (B, ...)."""
        u = self.rand(*logits.shape, generator=generator).clamp_(1e-20, 1.0)
        return (logits - torch.log(-torch.log(u))).argmax(dim=1)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.likelihood == "none":
            return
        x, y = batch
        self.val_nll.update(-self.log_prob(x, self.labels_for(y)))

    def on_validation_epoch_end(self) -> None:
        if self.likelihood == "none" or self.val_nll.update_count == 0:
            return
        nll = self.val_nll.compute()  # synced: the same value on every rank
        # sync_dist averages identical values (exact), and tells Lightning they are global.
        self.log(nll_key("val", self.likelihood), nll, prog_bar=True, sync_dist=True)
        self.log(bpd_key("val", self.likelihood), bits_per_dim(nll, self.dims), sync_dist=True)
        self.val_nll.reset()
