"""Representation: what the latent space of a family that encodes has learned without labels.

For every family with ``has_latent`` (``encode`` and its inverse ``decode``):

- a linear probe: multinomial logistic regression on the frozen latents of the train split,
  accuracy on the test split (the standard protocol of self-supervised representation learning,
  e.g. Chen et al. 2020, "A simple framework for contrastive learning"); the same probe on
  raw pixels is the baseline a latent has to beat;
- an interpolation grid: test image a to test image b along the great circle between their
  latents (slerp; White 2016, "Sampling generative networks"), each point decoded;
- a traversal grid, only where the latent compresses the image (the VAE): one latent coordinate
  of a test image swept over +-2.5 standard deviations, the others held fixed.

A family whose `encode` needs the label (`encodes_with_labels`: a conditional VAE or flow) encodes
and decodes with the image's true label: its latent is the part of the image the label does not
explain (style, for digits), so its probe measures how much class information is left in it. A
conditional diffusion model trained with label dropout encodes without labels, through its
unconditional prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from genlab.config import RepresentationParams
from genlab.data.datasets import Split
from genlab.evaluation import vocabulary as v
from genlab.evaluation.grids import image_grid
from genlab.evaluation.intervals import wilson
from genlab.models.base import GenerativeModule
from genlab.progress import steps

# Iterations of the probe's L-BFGS; standardised features of a few hundred dims converge well
# within this.
PROBE_MAX_ITER = 5000
# Sines below this count as parallel latents, which slerp interpolates linearly.
PARALLEL_EPS = 1e-6
# A traversal sweeps a coordinate over mean +- TRAVERSAL_RANGE standard deviations.
TRAVERSAL_RANGE = 2.5


class Representation(NamedTuple):
    metrics: dict[str, float]  # {"<split>/probe_acc": ..., and its interval}
    interpolation: np.ndarray  # (H', W', 3) uint8 grid, a row per pair
    traversal: np.ndarray | None  # (H', W', 3) uint8 grid, a row per latent unit; None: no
    # compressed latent (the latent is as large as the image)


def _check_latent(model: GenerativeModule) -> None:
    if not model.has_latent:
        raise ValueError(
            f"{type(model).__name__} has no latent space (has_latent is False): "
            "representation metrics need a family with encode/decode"
        )


@torch.no_grad()
def _encode(
    model: GenerativeModule, x: torch.Tensor, y: torch.Tensor | None, *, batch_size: int
) -> torch.Tensor:
    """Latents in the family's own shape (N, ...) on the CPU, as `decode` takes them back."""
    _check_latent(model)
    model.eval()
    out = []
    for start in steps(range(0, x.shape[0], batch_size), "encoding"):
        # Labels only for a model whose encode needs them (encodes_with_labels).
        yb = y[start : start + batch_size] if model.encodes_with_labels and y is not None else None
        out.append(model.encode(x[start : start + batch_size], yb).cpu())
    return torch.cat(out)


@torch.no_grad()
def _decode(
    model: GenerativeModule, z: torch.Tensor, y: torch.Tensor | None, *, batch_size: int
) -> torch.Tensor:
    """Latents (n, ...) -> uint8 images (n, C, H, W) on the CPU."""
    model.eval()
    out = []
    for start in range(0, z.shape[0], batch_size):
        yb = y[start : start + batch_size] if model.encodes_with_labels else None
        out.append(model.decode(z[start : start + batch_size].to(model.device), yb).cpu())
    return torch.cat(out)


def latents(
    model: GenerativeModule,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    batch_size: int,
) -> torch.Tensor:
    """Frozen latents of images x (uint8 (N, C, H, W)) as features, float32 (N, D) on the CPU.

    A model that encodes with labels (encodes_with_labels) gets y; any other one ignores
    them. Raises ValueError for a family without a latent space."""
    return _encode(model, x, y, batch_size=batch_size).flatten(1).float()  # (N, D)


def linear_probe(
    train_z: torch.Tensor,
    train_y: torch.Tensor,
    test_z: torch.Tensor,
    test_y: torch.Tensor,
    *,
    c: float,
) -> float:
    """Test accuracy of a logistic-regression probe fit on frozen train features (N, D).

    Features are standardised on the train split, then an L2-regularised multinomial logistic
    regression (inverse strength `c`) is fit by L-BFGS, a deterministic solver. Any float
    features work: latents, or raw pixels flattened to (N, C*H*W) for the baseline."""
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=PROBE_MAX_ITER, random_state=0)
    )
    probe.fit(_features(train_z), train_y.cpu().numpy())
    return float(probe.score(_features(test_z), test_y.cpu().numpy()))


def _features(z: torch.Tensor) -> np.ndarray:
    return z.detach().cpu().flatten(1).double().numpy()  # (N, D)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (White 2016, "Sampling generative networks"):

        slerp(a, b; t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b,

    theta the angle between a and b (last dim, (..., D)). It follows the great circle, so with
    |a| = |b| every point has that norm, where a Gaussian latent's mass lies; a straight line
    would pass through the improbable region near the origin. Linear where a and b are (nearly)
    parallel or opposite, where the formula is 0 / 0. With t of shape (T,) the result is
    (T, ..., D); with a float, (..., D). t = 0 and t = 1 return a and b exactly."""
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    shape = t.shape
    t = t.reshape(*shape, *([1] * a.ndim))  # (T, 1, ..., 1) broadcasts against (..., D)
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1, keepdim=True) / (
        a64.norm(dim=-1, keepdim=True) * b64.norm(dim=-1, keepdim=True)
    ).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))  # (..., 1)
    sin = torch.sin(theta)
    linear = sin < PARALLEL_EPS
    safe = torch.where(linear, torch.ones_like(sin), sin)
    w_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / safe)
    w_b = torch.where(linear, t, torch.sin(t * theta) / safe)
    return (w_a * a64 + w_b * b64).to(a.dtype)


def interpolation_pairs(
    y: torch.Tensor, *, num_classes: int, pairs: int, same_class: bool
) -> list[tuple[int, int, int]]:
    """Deterministic (index a, index b, class of a) of up to `pairs` rows, from labels y (N,).

    Row i takes class k = i % K and rank r = i // K (the r-th pass over the classes):
    same_class (a model that encodes with labels, decoded with one label per row): the (2r)-th
    and (2r+1)-th images of class k; otherwise the r-th image of class k to the r-th of class
    k + 1 (with one class, its (2r)-th to (2r+1)-th). A row whose class has too few images is
    skipped."""
    members = [torch.nonzero(y.cpu() == k).flatten().tolist() for k in range(num_classes)]
    rows = []
    for i in range(pairs):
        k, r = i % num_classes, i // num_classes
        if same_class or num_classes == 1:
            ends = [(k, 2 * r), (k, 2 * r + 1)]
        else:
            ends = [(k, r), ((k + 1) % num_classes, r)]
        if all(rank < len(members[cls]) for cls, rank in ends):
            (ca, ra), (cb, rb) = ends
            rows.append((members[ca][ra], members[cb][rb], k))
    return rows


def _pair_rows(model: GenerativeModule, y: torch.Tensor, pairs: int) -> list[tuple[int, int, int]]:
    rows = interpolation_pairs(
        y, num_classes=model.num_classes, pairs=pairs, same_class=model.encodes_with_labels
    )
    if not rows:
        raise ValueError(
            f"no interpolation pair in {y.shape[0]} images: every class has too few; "
            "pass a larger split"
        )
    return rows


def _interpolation(
    model: GenerativeModule,
    za: torch.Tensor,
    zb: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    levels: int,
    batch_size: int,
) -> np.ndarray:
    """Grid of the slerps from latents za to zb (R, ...) in the family's shape, decoded with
    labels (R,) (ignored by a model that encodes without labels)."""
    r = za.shape[0]
    path = slerp(za.flatten(1), zb.flatten(1), torch.linspace(0, 1, steps))  # (S, R, D)
    path = path.transpose(0, 1).reshape(r * steps, *za.shape[1:])  # (R*S, ...), row-major
    x = _decode(model, path, labels.repeat_interleave(steps), batch_size=batch_size)
    return image_grid(x, levels, nrow=steps)


def interpolation_grid(
    model: GenerativeModule,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    pairs: int,
    steps: int,
    levels: int,
    batch_size: int = 256,
) -> np.ndarray:
    """Interpolations between test images in latent space, (H', W', 3) uint8.

    Up to `pairs` rows (see `interpolation_pairs`), each `steps` columns from image a to image b
    along the slerp between their latents; the end columns are decode(encode(a)) and
    decode(encode(b)). A model that encodes with labels interpolates within one class and
    decodes with it.
    x: uint8 (N, C, H, W) test images, y: (N,) their labels."""
    _check_latent(model)
    ia, ib, labels = (torch.tensor(col) for col in zip(*_pair_rows(model, y, pairs), strict=True))
    za = _encode(model, x[ia], y[ia], batch_size=batch_size)
    zb = _encode(model, x[ib], y[ib], batch_size=batch_size)
    return _interpolation(model, za, zb, labels, steps=steps, levels=levels, batch_size=batch_size)


def _traversal(
    model: GenerativeModule,
    z: torch.Tensor,
    y: torch.Tensor,
    *,
    dims: int,
    steps: int,
    levels: int,
    batch_size: int,
) -> np.ndarray | None:
    """Grid from test latents z (N, ...) and labels y (N,); None for an uncompressed latent."""
    z = z.flatten(1)  # (N, D)
    if z.shape[1] >= model.dims:
        return None
    std, mean = torch.std_mean(z, dim=0)  # (D,) each
    active = torch.argsort(std, descending=True, stable=True)[:dims]  # (R,) most-varying units
    s = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, steps)  # (S,)
    grid = z[0].repeat(len(active), steps, 1)  # (R, S, D): the first test image everywhere
    rows = torch.arange(len(active))
    grid[rows, :, active] = mean[active, None] + s * std[active, None]  # (R, S)
    labels = y[:1].repeat(len(active) * steps)
    x = _decode(model, grid.flatten(0, 1), labels, batch_size=batch_size)  # (R*S, C, H, W)
    return image_grid(x, levels, nrow=steps)


def traversal_grid(
    model: GenerativeModule,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dims: int,
    steps: int,
    levels: int,
    batch_size: int = 256,
) -> np.ndarray | None:
    """Latent traversal, (H', W', 3) uint8, or None where the latent does not compress the image.

    Rows: the `dims` latent coordinates of largest variance over the test latents (the active
    units; Burda et al. 2016). Columns: the first test image's latent with that
    coordinate set to mean + s * std, s from -2.5 to +2.5 in `steps` steps, decoded (with that
    image's label for a model that encodes with labels). A latent as large as the image (a
    flow's, DDIM's) has no such units, a single coordinate there is pixel-like, so it gets None."""
    _check_latent(model)
    first = _encode(model, x[:1], y[:1], batch_size=1)
    if first[0].numel() >= model.dims:
        return None  # decided from one image: do not encode the split for nothing
    z = _encode(model, x, y, batch_size=batch_size)
    return _traversal(model, z, y, dims=dims, steps=steps, levels=levels, batch_size=batch_size)


def represent(
    model: GenerativeModule,
    train: Split,
    test: Split,
    params: RepresentationParams,
    *,
    levels: int,
    batch_size: int,
    split: str = "test",
    confidence: float = 0.95,
) -> Representation:
    """Linear-probe accuracy of the frozen latents (fit on train, scored on the held-out split
    `test`, named `split`, with its Wilson interval) and the interpolation and traversal grids
    of the held-out split; each split is encoded once."""
    train_z = latents(model, train.x, train.y, batch_size=batch_size)  # (N_train, D)
    test_z = _encode(model, test.x, test.y, batch_size=batch_size)  # (N_test, ...)
    acc = linear_probe(train_z, train.y, test_z.flatten(1).float(), test.y, c=params.probe_c)
    rows = _pair_rows(model, test.y, params.interpolation_pairs)
    ia, ib, labels = (torch.tensor(col) for col in zip(*rows, strict=True))
    interpolation = _interpolation(
        model,
        test_z[ia],
        test_z[ib],
        labels,
        steps=params.interpolation_steps,
        levels=levels,
        batch_size=batch_size,
    )
    traversal = _traversal(
        model,
        test_z,
        test.y,
        dims=params.traversal_dims,
        steps=params.traversal_steps,
        levels=levels,
        batch_size=batch_size,
    )
    return Representation(
        probe_metrics(acc, len(test), split, confidence), interpolation, traversal
    )


def probe_metrics(accuracy: float, n: int, split: str, confidence: float) -> dict[str, float]:
    """A probe's accuracy on n held-out images as metrics, with its Wilson interval."""
    key = v.probe_acc(split)
    result = wilson(round(accuracy * n), n, confidence=confidence)
    return {key: result.value, v.ci_low(key): result.low, v.ci_high(key): result.high}
