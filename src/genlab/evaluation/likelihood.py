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
def heldout_nll(model: GenerativeModule, split: Split, *, batch_size: int, seed: int) -> HeldOutNLL:
    """Sum -log p(x | y) over the split, then divide by its size (never a mean of batch means).

    Bounds that use Monte Carlo (the VAE's ELBO) draw their noise from a generator seeded with
    `seed`, so the number is reproducible.
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
            total += -model.log_prob(x, y).double().sum().cpu()
    nats = (total / len(split)).item()
    return HeldOutNLL(nats=nats, bpd=float(bits_per_dim(nats, model.dims)), n=len(split))


def likelihood_metrics(model: GenerativeModule, splits: dict[str, Split], **kw) -> dict[str, float]:
    """{"val/nll_nats": ..., "test/bpd": ...} (bound-named for bounds) for each split given."""
    out: dict[str, float] = {}
    for name, split in splits.items():
        result = heldout_nll(model, split, **kw)
        out[nll_key(name, model.likelihood)] = result.nats
        out[bpd_key(name, model.likelihood)] = result.bpd
    return out
