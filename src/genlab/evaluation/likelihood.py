"""Held-out likelihood in nats per image and bits per dimension of the discrete data, with
standard errors, and the train - held-out gap that shows memorisation."""

from __future__ import annotations

from typing import NamedTuple

import torch

from genlab.data.datasets import Split
from genlab.evaluation import vocabulary as v
from genlab.evaluation.intervals import mean_and_se
from genlab.models.base import GenerativeModule, bits_per_dim
from genlab.progress import steps


class HeldOutNLL(NamedTuple):
    nats: float  # mean negative log-likelihood (or its bound) per image
    se: float  # its standard error over images (Monte Carlo noise included: see `per_image_nll`)
    bpd: float  # the mean in bits per dimension
    n: int  # images scored


@torch.no_grad()
def per_image_nll(
    model: GenerativeModule,
    split: Split,
    *,
    batch_size: int,
    seed: int,
    samples: int = 1,
    ode: bool = False,
) -> torch.Tensor:
    """-log p(x | y) (or its bound) of every image of the split, float64 (N,) on the CPU; with
    `ode`, the bound of the family's probability-flow ODE (`ode_log_prob`) instead.

    Bounds that use Monte Carlo (the VAE's ELBO/IWAE, a flow's dequantization, diffusion's
    timesteps) take `samples` draws per image from the global generator, seeded here with `seed`
    and restored afterwards: the numbers are reproducible, the caller's random state untouched,
    and every image has its own draws, so the spread between images holds the Monte Carlo noise.
    """
    if model.likelihood == "none":
        raise ValueError(f"{type(model).__name__} has no likelihood to evaluate")
    model.eval()
    log_prob = model.ode_log_prob if ode else model.log_prob
    what = f"{'ODE ' if ode else ''}likelihood ({samples} draws)"
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in steps(range(0, len(split), batch_size), what):
            x = split.x[i : i + batch_size].to(model.device)
            y = model.labels_for(split.y[i : i + batch_size]) if model.conditional else None
            out.append(-log_prob(x, y, samples=samples).double().cpu())
    return torch.cat(out)


def heldout_nll(
    model: GenerativeModule, split: Split, *, batch_size: int, seed: int, samples: int = 1
) -> HeldOutNLL:
    """Sum -log p(x | y) over the split, then divide by its size (never a mean of batch means),
    with the standard error over images."""
    nats = per_image_nll(model, split, batch_size=batch_size, seed=seed, samples=samples)
    return summary(nats, model.dims)


def summary(nats: torch.Tensor, dims: int) -> HeldOutNLL:
    """Per-image NLLs (N,) -> their mean, its standard error over images and bits/dim."""
    mean, error = mean_and_se(nats)
    return HeldOutNLL(nats=mean, se=error, bpd=float(bits_per_dim(mean, dims)), n=len(nats))


def subset(split: Split, n: int | None, seed: int) -> Split:
    """n images of the split drawn without replacement (seeded); the whole split, in its order,
    when n is None or not smaller."""
    return split if n is None or n >= len(split) else train_subset(split, n, seed)


def train_subset(train: Split, n: int, seed: int) -> Split:
    """n training images drawn without replacement (seeded): the training side of the gap,
    as many images as the held-out side, scored by the same estimator."""
    n = min(n, len(train))
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(x=train.x[index], y=train.y[index])


def likelihood_metrics(
    model: GenerativeModule,
    heldout: Split,
    *,
    split: str,
    train: Split | None = None,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Held-out NLL and bits/dim with their standard errors, with the family's `eval_samples`.

    An importance-weighted bound evaluated with more than one draw also reports its single-draw
    value (`<split>/nll_bound_k1_nats`: the ELBO for a VAE, the plain dequantization bound for a
    flow), a looser bound. A bound whose draws are terms of one fixed bound (diffusion) does
    not: one term per image estimates the same bound, only more noisily, which the standard
    error already says. With `train`, the gap: held-out NLL minus the NLL of as many training
    images (`memo/nll_gap_nats`, > 0 when the model prefers its training images).

    A family with an ODE likelihood (`ode_images` > 0: diffusion's probability-flow ODE) adds
    that bound on the first `ode_images` of the images (one draw each: every image is an ODE
    solve), under its own name, with its difference from the family's own bound on the same
    images (paired, so its standard error is that of the difference)."""
    kw = {"batch_size": batch_size, "seed": seed}
    nats = per_image_nll(model, heldout, samples=model.eval_samples, **kw)
    result = summary(nats, model.dims)
    nll, bpd = v.nll_key(split, model.likelihood), v.bpd_key(split, model.likelihood)
    out = _nll_metrics(result, model.dims, nll, bpd)
    draws_tighten = model.likelihood == "lower_bound" and model.monte_carlo == "importance"
    if draws_tighten and model.eval_samples > 1:
        single = heldout_nll(model, heldout, samples=1, **kw)
        out[v.single_draw_key(split)] = single.nats
        out[v.se(v.single_draw_key(split))] = single.se
    n_ode = min(model.ode_images, len(heldout))
    if n_ode:
        first = Split(x=heldout.x[:n_ode], y=heldout.y[:n_ode])
        ode = per_image_nll(model, first, ode=True, **kw)
        out |= _nll_metrics(summary(ode, model.dims), model.dims, *v.ode_keys(split))
        difference, error = mean_and_se(ode - nats[:n_ode])
        out |= {v.ode_difference_key(split): difference}
        out |= {v.se(v.ode_difference_key(split)): error, v.ODE_IMAGES: float(n_ode)}
    if train is not None:
        seen_split = train_subset(train, len(heldout), seed)
        seen = heldout_nll(model, seen_split, samples=model.eval_samples, **kw)
        out[v.NLL_GAP] = result.nats - seen.nats
        out[v.se(v.NLL_GAP)] = (result.se**2 + seen.se**2) ** 0.5
    return out


def _nll_metrics(result: HeldOutNLL, dims: int, nll: str, bpd: str) -> dict[str, float]:
    """A HeldOutNLL as metrics under the names `nll` and `bpd`, each with its standard error."""
    return {
        nll: result.nats,
        v.se(nll): result.se,
        bpd: result.bpd,
        v.se(bpd): float(bits_per_dim(result.se, dims)),
    }
