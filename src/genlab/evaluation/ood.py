"""Out-of-distribution sets and the statistics that tell them from the data.

The sets are built from the held-out split itself (`evaluate.split`: test, or val when tuning;
near: the same strokes, rearranged or inverted) and from elsewhere (far: uniform noise, patches of
natural photographs), each as large as the held-out split, deterministically from a seed:

- ``noise``: every pixel uniform over the L levels;
- ``inverted``: L - 1 - x, the intensity negative;
- ``hflip`` / ``vflip`` / ``rot90``: mirrored left-right, upside down, rotated a quarter turn;
- ``natural``: square crops of scikit-learn's two sample photographs (shipped with it, no
  download), area-downsampled to the data's size and quantised to its levels, grey when the data
  has one channel, RGB when it has three.

Every set keeps the data's shape (C, H, W) and levels: 8x8 digits at 17 levels as well as 28x28
MNIST or 64x64 RGB at 256 levels.

Two statistics score an image (higher = more in-distribution): the likelihood log p(x) itself,
and the typicality -|log p(x) - mean log p(x) on held-out data|, the per-image form of the test of
Nalisnick et al. 2019 ("Detecting out-of-distribution inputs to deep generative models using
typicality"): deep likelihoods can rank simpler out-of-distribution images above the data, and an
image far *above* the data's typical log-likelihood is as suspicious as one far below.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

from genlab.config import OodSet
from genlab.evaluation import vocabulary as v
from genlab.evaluation.intervals import auroc_estimate, delong, rate
from genlab.evaluation.vocabulary import Estimate

Statistic = Literal["likelihood", "typicality"]


def natural_patches(
    n: int, shape: tuple[int, int, int], levels: int, generator: torch.Generator
) -> torch.Tensor:
    """n crops of scikit-learn's sample photographs as uint8 (n, C, H, W) levels.

    Crop sides are drawn uniformly between H and 8H pixels (capped by the photograph), so the set
    spans fine texture to whole objects; each crop is area-averaged down to (H, W)."""
    from sklearn.datasets import load_sample_images

    c, h, w = shape
    if c not in (1, 3):
        raise ValueError(f"natural: photographs make grey or RGB images, not {c} channels")
    photos = [torch.tensor(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    smallest = min(min(photo.shape[1:]) for photo in photos)
    if max(h, w) > smallest:
        raise ValueError(f"natural: images of at most {smallest} pixels a side, got {h}x{w}")
    out = torch.empty(n, c, h, w)  # in [0, 1]
    for i in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]  # (3, H0, W0)
        top_side = min(8 * max(h, w), photo.shape[1], photo.shape[2])
        side = int(torch.randint(max(h, w), top_side + 1, (1,), generator=generator))
        r = int(torch.randint(photo.shape[1] - side + 1, (1,), generator=generator))
        q = int(torch.randint(photo.shape[2] - side + 1, (1,), generator=generator))
        crop = photo[:, r : r + side, q : q + side]
        if c == 1:  # ITU-R BT.601 luma
            crop = (torch.tensor([0.299, 0.587, 0.114])[:, None, None] * crop).sum(0, keepdim=True)
        out[i] = F.interpolate(crop[None], size=(h, w), mode="area")[0]
    return (out * (levels - 1)).round().clamp(0, levels - 1).to(torch.uint8)


def ood_set(name: str, x: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """The out-of-distribution set `name` built from (or as large as) the images x, uint8
    (N, C, H, W) levels -> the same shape and dtype."""
    n, c, h, w = x.shape
    if name == "noise":
        return torch.randint(levels, x.shape, generator=generator, dtype=torch.uint8)
    if name == "inverted":
        return (levels - 1 - x.long()).to(torch.uint8)
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "rot90":
        if h != w:
            raise ValueError(f"rot90 needs square images, got {h}x{w}")
        return x.rot90(1, dims=(-2, -1)).contiguous()
    if name == "natural":
        return natural_patches(n, (c, h, w), levels, generator)
    raise ValueError(f"unknown out-of-distribution set {name!r}")


def ood_sets(names: list[str], x: torch.Tensor, levels: int, seed: int) -> dict[str, torch.Tensor]:
    """Every set in `names`, each from its own generator seeded by (seed, position in the
    list of all sets), so adding a set does not change the others."""
    all_names = get_args(OodSet)
    out = {}
    for name in names:
        generator = torch.Generator().manual_seed(seed * 1000 + all_names.index(name))
        out[name] = ood_set(name, x, levels, generator)
    return out


def statistic(log_px: torch.Tensor, reference_mean: float, kind: Statistic) -> torch.Tensor:
    """The in-distribution statistic of images with scores log_px (N,): higher = more typical."""
    if kind == "likelihood":
        return log_px
    return -(log_px - reference_mean).abs()


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Area under the ROC curve of telling `inside` (positives) from `outside` by the statistic:
    1 separates them perfectly, 0.5 is chance, below 0.5 ranks the outside set as more typical.
    Exact in float64 (rank-based, ties count one half)."""
    return delong(inside, outside)[0]


def calibrate_threshold(reference: torch.Tensor, fpr: float) -> float:
    """The statistic's value below which an image is called out-of-distribution: the
    floor(fpr * n)-th smallest of the n in-distribution `reference` values (the validation split),
    so at most a fraction `fpr` of them is rejected, exactly fpr when fpr * n is whole and the
    values are distinct."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    finite = reference[torch.isfinite(reference)].double()
    if finite.numel() == 0:
        raise ValueError("no finite reference scores to calibrate a threshold on")
    ordered = finite.sort().values
    return float(ordered[min(int(fpr * len(ordered)), len(ordered) - 1)])


class Calibration(NamedTuple):
    kind: Statistic  # the statistic the verdict thresholds
    fpr: float  # fraction of the in-distribution reference the threshold rejects
    reference_mean: float  # mean log p(x) (or -E(x)) of the reference (validation) images
    threshold: float  # in-distribution iff statistic >= threshold


def calibrate(reference_log_px: torch.Tensor, kind: Statistic, fpr: float) -> Calibration:
    """The typical score and the verdict's threshold from in-distribution scores (N,)."""
    mean = mean_finite(reference_log_px)
    threshold = calibrate_threshold(statistic(reference_log_px, mean, kind), fpr)
    return Calibration(kind=kind, fpr=fpr, reference_mean=mean, threshold=threshold)


def _with_interval(key: str, result: Estimate) -> dict[str, float]:
    return {key: result.value, v.ci_low(key): result.low, v.ci_high(key): result.high}


def ood_metrics(
    heldout: torch.Tensor,
    sets: dict[str, torch.Tensor],
    calibration: Calibration,
    *,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Per set, the AUROC of the likelihood and of the typicality (DeLong intervals), and the
    fraction of the set the calibrated threshold flags (Wilson interval); plus the
    false-positive rate it reaches on the held-out split and the threshold. Inputs are log p(x)
    scores (N,)."""
    reference_mean, threshold, kind = (
        calibration.reference_mean,
        calibration.threshold,
        calibration.kind,
    )
    s_heldout = statistic(heldout, reference_mean, kind)
    out = _with_interval(v.OOD_FPR, rate(s_heldout < threshold, confidence=confidence))
    out[v.OOD_THRESHOLD] = threshold
    for name, log_px in sets.items():
        out |= _with_interval(v.auroc(name), auroc_estimate(heldout, log_px, confidence=confidence))
        typical = auroc_estimate(
            statistic(heldout, reference_mean, "typicality"),
            statistic(log_px, reference_mean, "typicality"),
            confidence=confidence,
        )
        out |= _with_interval(v.auroc(name, typicality=True), typical)
        s = statistic(log_px, reference_mean, kind)
        out |= _with_interval(v.detected(name), rate(s < threshold, confidence=confidence))
    return out


def mean_finite(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.double().mean()) if finite.numel() else math.nan
