"""Denoising diffusion (DDPM / DDIM) with classifier-free guidance and a bound on discrete log P(x).

Ho, Jain & Abbeel, *Denoising Diffusion Probabilistic Models* (NeurIPS 2020): a fixed forward
process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (their eq. 4) is reversed by a network
that predicts the noise eps, trained with L_simple = E ||eps - eps_theta(x_t, t)||^2 (eq. 14).
Noise schedules: `linear` (Ho et al. sec. 4) or `cosine` (Nichol & Dhariwal, *Improved DDPM*,
ICML 2021, eq. 17). Samplers, picked at sampling time: DDPM ancestral sampling over all T steps
(Ho et al. Algorithm 2) and DDIM over S evenly spaced steps with stochasticity eta (Song, Meng &
Ermon, *Denoising Diffusion Implicit Models*, ICLR 2021, eq. 12 and 16). Class-conditional form
with classifier-free guidance (Ho & Salimans 2022): labels are dropped to a "null" class with
probability `p_uncond` while training, and sampling mixes the two predictions,
eps = eps_uncond + w (eps_cond - eps_uncond).

Likelihood: the variational bound of Ho et al. eq. 5 on log P(x_0) of the *discrete* image, with
a discretized Gaussian decoder over the L levels (their sec. 3.3) for L_0. A second one,
`ode_log_prob`, is the bound of another model the same network defines: the probability-flow ODE
of the continuous-time VP process (Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole,
*Score-Based Generative Modeling through Stochastic Differential Equations*, ICLR 2021, eq. 13,
sec. 4.3 and appendix D.2) as a continuous normalizing flow under uniform dequantization
(models/ode.py). The network weights used for sampling, both bounds and DDIM inversion are an
exponential moving average (EMA) of the trained ones.

Layout: schedule, bound math, the Lightning system (objective, samplers, contract, the VLB, the
probability-flow ODE likelihood, training). The network is the U-Net of genlab/nn/unet.py, which
flow matching shares.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genlab.errors import ConfigError
from genlab.models.base import GenerativeModule
from genlab.models.ode import (
    Divergence,
    Solver,
    Velocity,
    integrate_with_divergence,
    standard_normal_log_prob,
)
from genlab.nn.unet import UNet

Schedule = Literal["linear", "cosine"]
Sampler = Literal["ddpm", "ddim"]

# Images x bound terms evaluated in one network pass by `Diffusion.log_prob` on a CPU (bounds
# memory; `pass_size` scales it for an accelerator), for images of BOUND_CHUNK_PIXELS pixels (the
# digits' 8x8); larger images get proportionally fewer. Measured on 2 CPU cores (2026-12-03):
# 8200 terms/s in passes of 1024, 3500 in passes of 4096 (the previous size), 6700 of 256.
BOUND_CHUNK = 1024
BOUND_CHUNK_PIXELS = 8 * 8

# The probability-flow ODE likelihood (`Diffusion.ode_log_prob`), measured on the validation
# digits with the default 60-epoch model, 2 CPU cores (2026-12-05; Hutchinson trace, one draw):
# - its solver: dopri5 at 1e-4, within 0.01 nats on average (0.15 at most) of 1e-5 for ~380
#   evaluations, 110-140 ms an image; 1e-3 was 1.7 nats optimistic on average, 1e-2 0.4 pessimistic;
# - its trace: Hutchinson's (an exact one costs 64 backward passes per evaluation at 8x8).
# - where the ODE hands over to N(0, I) (`ode_horizon`), solved from step 1 (2026-12-06, 48 images,
#   the same draws): at T 6.0 nats above the chain's bound, at 0.999 T 2.7, 0.99 T 1.1, 0.95 T 0.4,
#   0.9 T 0.3, 0.85 T 0.5, 0.8 T 1.0 (+- 1.0): the cosine schedule's last steps (beta_T clipped at
#   0.999: a rate of 6.9 per step) make the flow stiff where the network was least trained, and
#   below ~0.85 T the marginal is no longer close to N(0, I).
ODE_SOLVER = Solver("dopri5", rtol=1e-4, atol=1e-4)


# -- schedule -----------------------------------------------------------------------------------
def make_betas(schedule: Schedule, timesteps: int, first_std: float) -> torch.Tensor:
    """beta_1..beta_T, float64 (T,).

    linear: Ho et al. sec. 4, beta from 1e-4 to 0.02 at T = 1000, rescaled by 1000 / T so other
    T keep the same total noise (as Nichol & Dhariwal's code does).
    cosine: Nichol & Dhariwal eq. 17, abar = f(tau) / f(0), f(tau) = cos((tau + s) / (1 + s)
    pi/2)^2, s = 0.008, beta_t = 1 - abar_t / abar_{t-1} clipped at 0.999. They chose s "such
    that sqrt(beta_1) was slightly smaller than the pixel bin size" of 8-bit data (sec. 3.2).
    The same rule for any number of levels: tau runs evenly from tau_1 to 1, tau_1 solved so that
    the noise of q(x_1 | x_0) has std `first_std` (with 17 levels N&D's tau_1 = 1/T starts at 5%
    of a bin, and the bound is then spent on noise levels that cannot move a pixel off its bin;
    Kingma et al., *Variational Diffusion Models* 2021, learn this endpoint for the same reason).
    For 8-bit data and first_std = 0.82 bins this is N&D's schedule.
    """
    if schedule == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    s = 0.008
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    # f(tau_1) / f(0) = 1 - first_std^2
    tau_1 = math.acos(math.sqrt((1 - first_std**2) * f0)) * 2 / math.pi * (1 + s) - s
    tau = torch.linspace(tau_1, 1, timesteps, dtype=torch.float64)
    abar = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2 / f0
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return (1 - abar / abar_prev).clamp(max=0.999)


# -- bound math ---------------------------------------------------------------------------------
def gaussian_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, nats."""
    return 0.5 * (
        logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1
    )


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) - exp(b)) for a >= b, stable; -inf where both are -inf."""
    diff = torch.where(torch.isinf(a) & (a < 0), torch.full_like(a, -math.inf), b - a)
    return a + torch.log(-torch.expm1(diff.clamp(max=0)))


def discretized_gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, levels: int
) -> torch.Tensor:
    """log P(x) of levels k = 0..L-1 at x = 2k / (L - 1) - 1 under N(mean, exp(log_scale)^2)
    integrated over the bin [x - 1/(L-1), x + 1/(L-1)], the outermost bins extended to -inf and
    +inf (Ho et al. sec. 3.3, eq. 13). Elementwise, nats; the L probabilities sum to 1.

    Differences of the normal CDF are taken in the tail that keeps them accurate:
    Phi(b) - Phi(a) = Phi(-a) - Phi(-b), whichever side of the mean the bin lies on.
    """
    half = 1.0 / (levels - 1)
    inv = torch.exp(-log_scale)
    lo = (x - half - mean) * inv
    hi = (x + half - mean) * inv
    lo = torch.where(x < -1 + half, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(x > 1 - half, torch.full_like(hi, math.inf), hi)
    upper_tail = lo > 0  # the whole bin above the mean: use the survival function
    a = torch.where(upper_tail, torch.special.log_ndtr(-lo), torch.special.log_ndtr(hi))
    b = torch.where(upper_tail, torch.special.log_ndtr(-hi), torch.special.log_ndtr(lo))
    return _log_sub_exp(a, b)


# -- system -------------------------------------------------------------------------------------
class Diffusion(GenerativeModule):
    """DDPM trained with L_simple, sampled by DDPM or DDIM, scored by the bound of Ho et al. eq. 5.

    The network weights used for sampling, the bound and encode are the EMA copy (`self.ema`);
    `self.net` is what the optimizer trains. `sample_from` runs a sampler from a given x_T;
    `encode` / `decode` are DDIM inversion and its forward run.
    """

    likelihood = "lower_bound"
    monte_carlo = "terms"  # `samples` are timesteps of one bound, not importance draws
    ode_likelihood = True  # `ode_log_prob`: the probability-flow ODE's bound
    has_latent = True
    training_defaults: ClassVar[dict[str, int]] = {"max_epochs": 60, "batch_size": 64}

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int,
        channels: Annotated[int, Ge(1)] = 32,  # base width of the U-Net
        blocks_per_level: Annotated[int, Ge(1)] = 1,  # residual blocks per resolution and path
        dropout: Annotated[float, Ge(0), Lt(1)] = 0.0,  # dropout inside residual blocks
        timesteps: Annotated[int, Ge(2)] = 1000,  # T, steps of the forward process
        schedule: Schedule = "cosine",  # beta schedule: cosine (Nichol & Dhariwal) | linear (Ho)
        first_noise: Annotated[float, Gt(0), Lt(1)] = 0.5,  # cosine: std of x_1 - x_0, in bins
        conditional: bool = True,  # model p(x | y) instead of p(x)
        p_uncond: Annotated[float, Ge(0), Le(1)] = 0.1,  # label dropout for guidance (conditional)
        sampler: Sampler = "ddim",  # default sampler: ddim (sample_steps steps) | ddpm (T steps)
        sample_steps: Annotated[int, Ge(1)] = 50,  # DDIM steps S, also for encode / decode
        latent_time: Annotated[float, Gt(0), Le(1)] = 0.8,  # encode inverts up to t = this * T
        eta: Annotated[float, Ge(0)] = 1.0,  # DDIM stochasticity (0: deterministic, 1: DDPM-like)
        guidance_scale: Annotated[float, Ge(0)] = 1.0,  # w: 0 unconditional, 1 conditional
        ema_decay: Annotated[float, Ge(0), Lt(1)] = 0.999,  # EMA of the weights (after warmup)
        val_samples: Annotated[int, Ge(1)] = 2,  # bound terms per image in validation
        eval_samples: Annotated[int, Ge(1)] = 50,  # bound terms per image for the test bound
        ode_images: Annotated[int, Ge(0)] = 64,  # held-out images of the ODE bound (0: none)
        ode_horizon: Annotated[float, Gt(0), Le(1)] = 0.9,  # the ODE's N(0, I) at this * T
        lr: Annotated[float, Gt(0)] = 2e-3,  # AdamW learning rate
        weight_decay: Annotated[float, Ge(0)] = 0.0,  # AdamW decoupled weight decay
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        if ode_horizon * timesteps <= 1:
            raise ConfigError(
                f"diffusion: ode_horizon {ode_horizon} x timesteps {timesteps} is not past step 1, "
                "where the ODE likelihood starts: raise ode_horizon"
            )
        self.save_hyperparameters(logger=False)  # genlab logs the resolved config itself
        c, h, _ = self.image_shape
        self.net = UNet(
            c,
            h,
            channels,
            blocks_per_level,
            num_classes + 1 if conditional else 0,
            timesteps,
            dropout,
        )
        # The EMA copy is a submodule, so it is saved in the checkpoint; never trained directly.
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        self.ema.requires_grad_(False)

        # Schedule buffers indexed by t = 0..T (t = 0 is the data: abar_0 = 1, beta_0 = 0).
        # Derived from hparams, so not persisted in checkpoints.
        betas = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                make_betas(schedule, timesteps, first_noise * 2 / (levels - 1)),
            ]
        )
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_var = betas * (1 - abar_prev) / (1 - abar).clamp(min=1e-20)  # beta-tilde, eq. 7
        buffers = {
            "betas": betas,
            "abar": abar,
            "sqrt_abar": abar.sqrt(),
            "sqrt_1m_abar": (1 - abar).sqrt(),
            # posterior mean mu-tilde = coef_x0 x_0 + coef_xt x_t (Ho et al. eq. 7)
            "coef_x0": abar_prev.sqrt() * betas / (1 - abar).clamp(min=1e-20),
            "coef_xt": (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar).clamp(min=1e-20),
            "posterior_logvar": posterior_var.clamp(min=1e-20).log(),
            "model_logvar": self._model_logvar(betas, posterior_var).log(),
            # The probability-flow ODE's continuous schedule (`ode_schedule`): log abar_t at
            # t = 0..T and the rate beta(tau) = -log(1 - beta_t) on each interval (t - 1, t].
            "log_abar": torch.cumsum(torch.log1p(-betas), dim=0),
            "ode_beta": -torch.log1p(-betas),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _model_logvar(betas: torch.Tensor, posterior_var: torch.Tensor) -> torch.Tensor:
        """sigma_t^2 of p(x_{t-1} | x_t): beta-tilde_t (Ho et al. sec. 3.2), which gives the
        tighter bound here (validation digits, benchmarks/defaults.py: 87.30 nats against 87.56
        with sigma_t^2 = beta_t, the same trained network and draws); at t = 1, where
        beta-tilde_1 = 0, beta_1 (the decoder's variance)."""
        var = posterior_var.clone()
        var[1] = betas[1]
        var[0] = 1.0  # unused (t = 0 is the data)
        return var

    # -- helpers --------------------------------------------------------------------------------
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels (B, C, H, W) -> floats in [-1, 1]."""
        return x.float() / (self.levels - 1) * 2 - 1

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Floats in [-1, 1] -> the nearest level, uint8 (B, C, H, W)."""
        k = torch.round((x + 1) / 2 * (self.levels - 1)).clamp(0, self.levels - 1)
        return k.to(torch.uint8)

    @staticmethod
    def _at(buffer: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Schedule values at integer times t (B,) shaped (B, 1, 1, 1) to broadcast over images."""
        return buffer[t][:, None, None, None]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. eq. 4)."""
        return self._at(self.sqrt_abar, t) * x0 + self._at(self.sqrt_1m_abar, t) * noise

    def _predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (xt - self._at(self.sqrt_1m_abar, t) * eps) / self._at(self.sqrt_abar, t)

    def _null_labels(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)

    # -- objective ------------------------------------------------------------------------------
    def loss_simple(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """L_simple (Ho et al. eq. 14), t ~ U{1..T}; labels dropped to the null class with
        probability p_uncond (classifier-free guidance training, Ho & Salimans Algorithm 1)."""
        b = x0.shape[0]
        t = torch.randint(1, self.hparams.timesteps + 1, (b,), device=self.device)
        noise = torch.randn_like(x0)
        if y is not None and self.hparams.p_uncond > 0:
            drop = torch.rand(b, device=self.device) < self.hparams.p_uncond
            y = torch.where(drop, self._null_labels(b), y)
        eps = self.net(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(eps, noise)

    # -- guided prediction -------------------------------------------------------------------------
    def guided_eps(
        self,
        net: nn.Module,
        xt: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """eps = eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans eq. 6, in their w + 1 = our
        w): w = 0 is the unconditional and w = 1 the conditional prediction, each one pass; any
        other w evaluates both in one batch of 2B. An unconditional model ignores y and w."""
        if y is None:
            return net(xt, t, None)
        null = self._null_labels(xt.shape[0])
        if guidance_scale == 0:
            return net(xt, t, null)
        if guidance_scale == 1:
            return net(xt, t, y)
        eps_c, eps_u = net(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def _passes(self, guidance_scale: float) -> int:
        return 2 if self.conditional and guidance_scale not in (0.0, 1.0) else 1

    def sampling_nfe(
        self,
        *,
        sampler: Sampler | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> float:
        """Network passes per image of `sample` with these settings (defaults: the hparams)."""
        hp = self.hparams
        sampler = sampler or hp.sampler
        steps = hp.sample_steps if steps is None else steps
        steps = hp.timesteps if sampler == "ddpm" else min(steps, hp.timesteps)
        w = hp.guidance_scale if guidance_scale is None else guidance_scale
        return float(steps * self._passes(w))

    @property
    def nfe_per_sample(self) -> float:
        return self.sampling_nfe()

    def ddim_timesteps(self, steps: int) -> list[int]:
        """S evenly spaced times T = tau_S > ... > tau_1 >= 1 (Song et al. sec. 4.2), descending."""
        steps = min(steps, self.hparams.timesteps)
        taus = torch.linspace(self.hparams.timesteps, 1, steps, dtype=torch.float64).round()
        return [int(t) for t in taus]

    # -- samplers -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_from(
        self,
        xt: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        clip: bool = True,
    ) -> torch.Tensor:
        """Run a sampler from the start x_T (B, C, H, W) with the EMA weights; returns x_0 as
        floats (B, C, H, W). DDIM with eta = 0 draws no noise at all, so it is a deterministic
        map of x_T. Settings default to the hparams; `clip` clips each predicted x_0 to [-1, 1]
        (off for `decode`, the exact reverse of the unclipped `encode`)."""
        hp = self.hparams
        sampler = sampler or hp.sampler
        w = hp.guidance_scale if guidance_scale is None else guidance_scale
        y = self.labels_for(y)
        net = self.ema.module
        x = xt.to(self.device)
        b = x.shape[0]
        if sampler == "ddpm":
            # Ancestral sampling (Ho et al. Algorithm 2) with x_0 clipped to the data range.
            for t in range(hp.timesteps, 0, -1):
                tt = torch.full((b,), t, dtype=torch.long, device=self.device)
                eps = self.guided_eps(net, x, tt, y, w)
                x0 = self._predict_x0(x, tt, eps)
                x0 = x0.clamp(-1, 1) if clip else x0
                mean = self._at(self.coef_x0, tt) * x0 + self._at(self.coef_xt, tt) * x
                if t > 1:
                    z = self.randn(*x.shape, generator=generator)
                    x = mean + (0.5 * self._at(self.model_logvar, tt)).exp() * z
                else:
                    x = mean
            return x
        eta = hp.eta if eta is None else eta
        taus = self.ddim_timesteps(hp.sample_steps if steps is None else steps)
        for t, s in zip(taus, [*taus[1:], 0], strict=True):
            x = self._ddim_step(net, x, t, s, y, w, eta, generator, clip)
        return x

    def _ddim_step(
        self,
        net: nn.Module,
        x: torch.Tensor,
        t: int,
        s: int,
        y: torch.Tensor | None,
        w: float,
        eta: float,
        generator: torch.Generator | None,
        clip: bool,
    ) -> torch.Tensor:
        """x_t -> x_s, s < t (Song et al. eq. 12; sigma from eq. 16 scaled by eta). With `clip`,
        x_0 is clipped to the data range and eps recomputed from it, as in Nichol & Dhariwal's
        code."""
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=self.device)
        a_t, a_s = self.abar[t], self.abar[s]
        eps = self.guided_eps(net, x, tt, y, w)
        x0 = self._predict_x0(x, tt, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and s > 0:
            x = x + sigma * self.randn(*x.shape, generator=generator)
        return x

    # -- contract -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """n images as uint8 levels (n, C, H, W) from x_T ~ N(0, I) with the chosen sampler
        (defaults: the hparams `sampler`, `sample_steps`, `eta`, `guidance_scale`)."""
        y = self.labels_for(y)
        xt = self.randn(n, *self.image_shape, generator=generator)
        x0 = self.sample_from(
            xt, y, generator, sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale
        )
        return self._quantize(x0)

    @property
    def encodes_with_labels(self) -> bool:
        # Trained with label dropout, the model is also an unconditional one (the null label).
        return self.conditional and self.hparams.p_uncond == 0

    def _latent_labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The labels encode/decode condition on: y, or the null label when y is None and the
        model learned the unconditional prediction too."""
        if y is None and self.conditional and not self.encodes_with_labels:
            return self._null_labels(n)
        return self.labels_for(y)

    def latent_timesteps(self) -> list[int]:
        """The DDIM times of `encode`, ascending: those of `sample_steps` up to latent_time * T.

        Inverting all the way to T fails with the cosine schedule: its abar_T (~2e-9 at T = 1000)
        makes decode's first step divide the prediction error by sqrt(abar_T) ~ 5e-5; measured on
        the digits, decode(encode(x)) then keeps 35% of the pixels, against 99.4% up to 0.8 T
        (abar = 0.09)."""
        t_max = max(1, round(self.hparams.latent_time * self.hparams.timesteps))
        taus = [t for t in self.ddim_timesteps(self.hparams.sample_steps) if t <= t_max]
        return taus[::-1] or [1]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM inversion (Song et al. sec. 4.3, eta = 0 run backwards): x_0 -> x_t latents
        (B, C, H, W) at t = `latent_time` * T over the DDIM times of `sample_steps`, with the EMA
        weights and the plain prediction for y (w = 1), or the unconditional one when y is None
        and the model was trained with label dropout. Each step x_s -> x_t, s < t, uses
        eps_theta(x_s, t) in place of the unknown eps_theta(x_t, t); `decode` runs the same
        steps forwards."""
        y = self._latent_labels(y, x.shape[0])
        net = self.ema.module
        x = self._scale(x.to(self.device))
        taus = self.latent_timesteps()
        for s, t in zip([0, *taus[:-1]], taus, strict=True):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=self.device)
            eps = self.guided_eps(net, x, tt, y, 1.0)
            a_s, a_t = self.abar[s], self.abar[t]
            x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
            x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return x

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta = 0, w = 1, no clipping) from latents z = x_t back to uint8
        images: the reverse of `encode`, with the same labels."""
        y = self._latent_labels(y, z.shape[0])
        net = self.ema.module
        x = z.to(self.device)
        taus = self.latent_timesteps()[::-1]  # descending
        for t, s in zip(taus, [*taus[1:], 0], strict=True):
            x = self._ddim_step(net, x, t, s, y, 1.0, 0.0, None, False)
        return self._quantize(x)

    # -- bound ----------------------------------------------------------------------------------
    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) (Ho et al. eq. 5), nats (B,); x0 in [-1, 1]."""
        t = torch.full((x0.shape[0],), self.hparams.timesteps, device=x0.device, dtype=torch.long)
        mean = self._at(self.sqrt_abar, t) * x0
        logvar = torch.log(1 - self._at(self.abar, t)).expand_as(x0)
        return (
            gaussian_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)
        )

    def bound_terms(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        t: torch.Tensor,
        noise: torch.Tensor,
        net: nn.Module | None = None,
    ) -> torch.Tensor:
        """Terms of the bound at times t, nats (N,), for images x (N, C, H, W) uint8 with x_t
        drawn from q(x_t | x_0) with `noise` (N, C, H, W) (Ho et al. eq. 5):

            t >= 2:  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) >= 0,
            t == 1:  L_0 = -log p(x_0 | x_1), a discretized Gaussian over the L levels,

        with p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), mu_theta the posterior mean at the
        predicted (clipped) x_0. Conditional models use the plain conditional prediction.
        """
        net = self.ema.module if net is None else net
        x0 = self._scale(x)
        xt = self.q_sample(x0, t, noise)
        eps = self.guided_eps(net, xt, t, y, 1.0)
        x0_hat = self._predict_x0(xt, t, eps).clamp(-1, 1)
        mean = self._at(self.coef_x0, t) * x0_hat + self._at(self.coef_xt, t) * xt
        logvar = self._at(self.model_logvar, t).expand_as(x0)
        true_mean = self._at(self.coef_x0, t) * x0 + self._at(self.coef_xt, t) * xt
        kl = gaussian_kl(true_mean, self._at(self.posterior_logvar, t).expand_as(x0), mean, logvar)
        decoder_nll = -discretized_gaussian_log_prob(x0, mean, 0.5 * logvar, self.levels)
        first = (t == 1)[:, None, None, None]
        return torch.where(first, decoder_nll, kl).flatten(1).sum(1)

    def stratified_times(self, n: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Times for the sum over t = 2..T: `samples` strata of (nearly) equal size, one t drawn
        uniformly in each, weighted by the stratum size so the weighted sum is unbiased. Returns
        (t (n, K), weight (K,)); with samples >= T - 1 every t once, weight 1 (exact in t)."""
        T = self.hparams.timesteps
        k = min(samples, T - 1)
        edges = [2 + (i * (T - 1)) // k for i in range(k + 1)]  # stratum i: [edges[i], edges[i+1])
        start = torch.tensor(edges[:-1], dtype=torch.float64)
        size = torch.tensor([b - a for a, b in itertools.pairwise(edges)])
        if k == T - 1:
            t = start.long().expand(n, k)
        else:
            u = torch.rand(n, k, dtype=torch.float64)
            t = (start + (u * size).floor()).long()  # (n, K)
        return t.to(self.device), size.float().to(self.device)

    @torch.no_grad()
    def log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1
    ) -> torch.Tensor:
        """A lower bound on log P(x | y) of the discrete data, nats per image (B,) (Ho et al.
        eq. 5): -(L_0 + L_T + sum_{t=2..T} L_{t-1}).

        L_T is analytic and L_0 is one network pass; the middle sum is estimated from `samples`
        terms per image at times stratified over {2..T} (each weighted by its stratum's size):
        unbiased, and exact in t for samples >= T - 1, when every t is used once. Here the
        contract's `samples` sets how many bound terms are evaluated, not importance samples:
        the expectation stays the same bound, its variance shrinks. Each term draws one x_t from
        q(x_t | x_0); noise comes from the global CPU generator, so a seeded caller gets the same
        number on any device. Uses the EMA weights.
        """
        x, y = x.to(self.device), self.labels_for(y)
        b = x.shape[0]
        t_mid, weight = self.stratified_times(b, samples)  # (B, K), (K,)
        t = torch.cat([torch.ones(b, 1, dtype=torch.long, device=self.device), t_mid], dim=1)
        k1 = t.shape[1]  # K + 1 terms per image: L_0 and the K middle ones
        noise = torch.randn(b, k1, *self.image_shape).to(self.device)  # (B, K+1, C, H, W)
        xs = x[:, None].expand(-1, k1, *x.shape[1:]).flatten(0, 1)  # (B*(K+1), C, H, W)
        ys = None if y is None else y[:, None].expand(-1, k1).flatten()
        t, noise = t.flatten(), noise.flatten(0, 1)
        _, h, w = self.image_shape
        chunk = max(1, self.pass_size(BOUND_CHUNK) * BOUND_CHUNK_PIXELS // (h * w))
        terms = []
        for i in range(0, len(t), chunk):
            j = slice(i, i + chunk)
            terms.append(self.bound_terms(xs[j], None if ys is None else ys[j], t[j], noise[j]))
        terms = torch.cat(terms).view(b, k1)  # (B, K+1)
        weight = torch.cat([torch.ones(1, device=self.device), weight])
        return -(self.prior_term(self._scale(x)) + (terms * weight).sum(1))

    # -- probability-flow ODE likelihood --------------------------------------------------------
    def ode_schedule(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(abar(tau), beta(tau)) at continuous times tau in [0, T] (in steps), each shaped like
        tau: log abar interpolated linearly between the integer steps, so abar(t) = abar_t at
        every integer t and the VP rate beta(tau) = -d log abar / d tau is constant on each
        interval (t - 1, t]: -log(1 - beta_t), the continuous process whose marginals at the
        integer times are the discrete chain's (Song et al. 2021, sec. 3.4 and appendix B, with
        this interpolation instead of their linear beta(t))."""
        k = tau.ceil().long().clamp(1, self.hparams.timesteps)  # the interval (k - 1, k]
        beta = self.ode_beta[k]
        log_abar = self.log_abar[k - 1] - (tau - (k - 1)) * beta
        return log_abar.exp(), beta

    def ode_velocity(self, y: torch.Tensor | None) -> Velocity:
        """The probability-flow ODE of the VP process (Song et al. 2021, eq. 13; the DDIM ODE,
        Song, Meng & Ermon eq. 14), with the score -eps_theta / sqrt(1 - abar):

            dx/dtau = -1/2 beta(tau) (x - eps_theta(x, tau) / sqrt(1 - abar(tau))),

        with the EMA weights and the plain prediction for y (w = 1). The network, trained at the
        integer steps 1..T, is fed the fractional tau as is: its sinusoidal time embedding is
        smooth in t, so between two steps it sees a time between theirs (the likelihood solves
        from step 1, the chain's first, where its decoder takes over)."""
        net = self.ema.module

        def v(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            abar, beta = self.ode_schedule(tau)
            abar, beta = abar[:, None, None, None], beta[:, None, None, None]  # (B, 1, 1, 1)
            eps = self.guided_eps(net, x, tau, y, 1.0)
            return -0.5 * beta * (x - eps / (1 - abar).sqrt())

        return v

    @property
    def ode_t_max(self) -> float:
        """Where the ODE's model starts from N(0, I): `ode_horizon` x T, in steps."""
        return float(self.hparams.ode_horizon * self.hparams.timesteps)

    def ode_log_density(
        self,
        s: torch.Tensor,
        y: torch.Tensor | None,
        *,
        t_min: float = 1.0,
        solver: Solver = ODE_SOLVER,
        divergence: Divergence = "hutchinson",
    ) -> torch.Tensor:
        """log p_{t_min}(s | y) (N,) of the ODE's model at s (N, C, H, W): solved from tau =
        t_min to `ode_t_max`, log N(x; 0, I) there + ∫ tr(dv/dx) dtau (models/ode.py), in chunks
        of BOUND_CHUNK / 4 images, the trace Hutchinson's (Rademacher) or exact."""
        _, h, w = self.image_shape
        chunk = max(1, self.pass_size(BOUND_CHUNK // 4) * BOUND_CHUNK_PIXELS // (h * w))
        out = []
        for i in range(0, s.shape[0], chunk):
            yi = None if y is None else y[i : i + chunk]
            sol = integrate_with_divergence(
                self.ode_velocity(yi), s[i : i + chunk], t_min, self.ode_t_max, solver, divergence
            )
            out.append(standard_normal_log_prob(sol.x) + sol.delta_log_p)
        return torch.cat(out)

    @torch.no_grad()
    def ode_log_prob(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        samples: int = 1,
        solver: Solver = ODE_SOLVER,
        divergence: Divergence = "hutchinson",
    ) -> torch.Tensor:
        """A lower bound on log P(x | y) of the discrete image, nats per image (B,), estimated
        (unbiased), under the model whose x_1 comes from the probability-flow ODE (Song et al.
        2021, sec. 4.3: N(0, I) at `ode_t_max`, 0.9 T by default, carried back to step 1 by
        `ode_log_density`; the chain's last, stiffest steps are left out, see the measurements
        above ODE_SOLVER) and
        whose image comes from x_1 through the chain's own decoder p(x_0 | x_1) (L_0, a
        discretized Gaussian over the levels):

            log P(x_0) >= E_{q(x_1 | x_0)} [log p(x_0 | x_1) + log p_ode(x_1) - log q(x_1 | x_0)],

        the forward process's first step as the dequantizer and the chain's decoder as the
        likelihood of the levels (as Kingma et al. 2021's VDM do with q(z_0 | x) and p(x | z_0)).
        It is the chain's bound with its middle, sum_{t>=2} L_{t-1} + L_T, replaced by the ODE's
        log-density of x_1 (no variational gap over x_{2..T}): the same network, another model
        for x_1, so a tighter or looser number than `log_prob` depending on how well the ODE's
        marginal matches the chain's. Solved from T, this bound and uniform dequantization of
        the level bins alike scored 6-7 nats worse than the chain on the validation digits;
        leaving out the last steps (`ode_horizon`) is what closed that gap.

        `samples` draws of x_1 (and of Hutchinson's probe, fixed along each solve), averaged:
        an unbiased estimate of the one-draw bound, not importance-weighted (see
        FlowMatching.log_prob). Uses the EMA weights and the plain prediction for y (w = 1);
        draws and probes come from the global CPU generator."""
        x, y = x.to(self.device), self.labels_for(y)
        b = x.shape[0]
        xs = x.repeat(samples, 1, 1, 1)  # draw-major
        ys = None if y is None else y.repeat(samples)
        noise = torch.randn(xs.shape).to(self.device)
        one = torch.ones(len(xs), dtype=torch.long, device=self.device)
        x1 = self.q_sample(self._scale(xs), one, noise)
        decoder = -self.bound_terms(xs, ys, one, noise)  # log p(x_0 | x_1)
        # log q(x_1 | x_0): x_1 = sqrt(abar_1) x_0 + sqrt(1 - abar_1) noise, a scaled N(0, I)
        log_q = standard_normal_log_prob(noise) - self.dims * torch.log(self.sqrt_1m_abar[1])
        log_p1 = self.ode_log_density(x1, ys, t_min=1.0, solver=solver, divergence=divergence)
        return (decoder + log_p1 - log_q).view(samples, b).mean(0)

    # -- system ---------------------------------------------------------------------------------
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = self.loss_simple(self._scale(x), self.labels_for(y))
        self.log_train({"train/loss": loss})
        return loss

    def _ema_decay(self, step: int) -> float:
        """min(ema_decay, (1 + n) / (10 + n)) after n optimizer steps. Training here is ~10^3
        steps, too short for a fixed 0.999 to forget the random initial weights (0.999^1000 =
        0.37); the warmup averages over roughly the last tenth of training instead."""
        return min(self.hparams.ema_decay, (1 + step) / (10 + step))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.multi_avg_fn = get_ema_multi_avg_fn(self._ema_decay(self.global_step))
        self.ema.update_parameters(self.net)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The bound with `val_samples` terms per image, noise and times from an RNG seeded by
        the batch index, so every epoch is scored on the same draws (common random numbers)."""
        x, y = batch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            nll = -self.log_prob(x, self.labels_for(y), samples=self.hparams.val_samples)
        self.val_nll.update(nll)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.net.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            fused=True,
        )
