"""Held-out likelihood in nats per image and bits per dimension of the discrete data."""

from __future__ import annotations

from typing import NamedTuple

import torch

from genlab.data.datasets import Split
from genlab.models.base import GenerativeModule, bits_per_dim, bpd_key, nll_key


class HeldOutNLL(NamedTuple):
    nats: float  # mean negative log-likelihood (or its bound) per image
    bpd: float  # the same in bits per dimension
    n: int  # images scored


@torch.no_grad()
def heldout_nll(
    model: GenerativeModule, split: Split, *, batch_size: int, seed: int, samples: int = 1
) -> HeldOutNLL:
    """Sum -log p(x | y) over the split, then divide by its size (never a mean of batch means).

    Bounds that use Monte Carlo (the VAE's ELBO/IWAE, a flow's dequantization) take `samples`
    draws per image from the global generator, seeded here with `seed` and restored afterwards,
    so the number is reproducible and the caller's random state is untouched.
    """
    if model.likelihood == "none":
        raise ValueError(f"{type(model).__name__} has no likelihood to evaluate")
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(split), batch_size):
            x = split.x[i : i + batch_size].to(model.device)
            y = model.labels_for(split.y[i : i + batch_size]) if model.conditional else None
            total += -model.log_prob(x, y, samples=samples).double().sum().cpu()
    nats = (total / len(split)).item()
    return HeldOutNLL(nats=nats, bpd=float(bits_per_dim(nats, model.dims)), n=len(split))


def likelihood_metrics(model: GenerativeModule, splits: dict[str, Split], **kw) -> dict[str, float]:
    """Held-out NLL and bits/dim for each split given, with the family's `eval_samples`.

    A Monte Carlo bound evaluated with more than one sample also reports its single-sample value
    (`<split>/nll_bound_k1_nats`: the ELBO for a VAE, the plain dequantization bound for a flow),
    the number the validation curve during training shows.
    """
    out: dict[str, float] = {}
    for name, split in splits.items():
        result = heldout_nll(model, split, samples=model.eval_samples, **kw)
        out[nll_key(name, model.likelihood)] = result.nats
        out[bpd_key(name, model.likelihood)] = result.bpd
        if model.likelihood == "lower_bound" and model.eval_samples > 1:
            out[f"{name}/nll_bound_k1_nats"] = heldout_nll(model, split, samples=1, **kw).nats
    return out
