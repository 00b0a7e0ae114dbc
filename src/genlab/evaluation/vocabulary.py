"""Every metric name genlab writes, defined once (STYLE.md rule 10).

The evaluate stage and the baselines stage write these names into `metrics/...json` and the
MLflow runs; the report, the benchmarks and the tests read them from here, never as string
literals. Names are `<split or kind>/<metric>`:

- ``eval/...``: sample metrics of generated images against the reference split (FID, KID,
  precision/recall, density/coverage, the Inception-style score, conditional accuracy, cost);
- ``memo/...``: memorisation and novelty statistics against the training split;
- ``<split>/...``: likelihood and prediction on a held-out split (``test`` in the final
  evaluation, ``val`` when tuning with ``evaluate.split: val``);
- ``ood/...``: out-of-distribution detection; ``time/...``: wall seconds of a phase.

An estimate with uncertainty adds ``<name>_ci_low`` / ``<name>_ci_high`` (a 95% interval, or
``evaluate.confidence``) or ``<name>_se`` (a standard error); `estimate` reads either back.

This module imports nothing heavy: the report and the benchmarks use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Literal, NamedTuple

Likelihood = Literal["exact", "lower_bound", "none"]
Better = Literal["lower", "higher"]
# What a bound's Monte Carlo `samples` are: "importance" draws whose weights average to an
# unbiased estimate of p(x) (IWAE, importance-weighted dequantization: more draws give a tighter
# bound, and log sum_y p(y) p_hat(x | y) stays a bound in expectation), or "terms" of one fixed
# bound (diffusion's timesteps: more draws only shrink the variance, and a log-sum-exp over
# classes of noisy per-class estimates is biased low: an estimate, not a bound).
MonteCarlo = Literal["importance", "terms"]

# The key of a metrics file that holds the protocol it was measured under (not a metric).
PROTOCOL = "protocol"

# ---------------------------------------------------------------- sample metrics (eval/)

FID = "eval/fid"
KID = "eval/kid_mean"  # unbiased MMD^2: may be slightly negative for close sets
KID_STD = "eval/kid_std"  # torch-fidelity's spread over KID subsets (not an uncertainty)
PRECISION = "eval/precision"
RECALL = "eval/recall"
F_SCORE = "eval/f_score"
DENSITY = "eval/density"  # Naeem et al. 2020
COVERAGE = "eval/coverage"
ISC = "eval/isc_mean"
ISC_STD = "eval/isc_std"  # torch-fidelity's spread over IS splits (not an uncertainty)
COND_ACC = "eval/cond_acc"
CLASS_FID_MEAN = "eval/class_fid_mean"
SAMPLES_PER_S = "eval/samples_per_s"
NFE_PER_SAMPLE = "eval/nfe_per_sample"
SAMPLE_SETS = "eval/sample_sets"  # how many independent sample sets the metrics average
# Held-out images the per-image passes scored (likelihood, classification, OOD detection): the
# n behind their standard errors, all of the split unless evaluate.scored_images bounds it.
SCORED_IMAGES = "eval/scored_images"


def class_fid(k: int) -> str:
    return f"eval/class_fid_{k}"


def class_fid_index(key: str) -> int | None:
    """k of ``eval/class_fid_<k>``, None for any other name."""
    prefix = "eval/class_fid_"
    tail = key.removeprefix(prefix)
    return int(tail) if key.startswith(prefix) and tail.isdigit() else None


# The sample metrics every row of the generation table has, with their direction.
SAMPLE_METRICS: dict[str, Better] = {
    FID: "lower",
    KID: "lower",
    PRECISION: "higher",
    RECALL: "higher",
    DENSITY: "higher",
    COVERAGE: "higher",
    ISC: "higher",
}

# ---------------------------------------------------------------- memorisation (memo/)

EXACT_COPIES = "memo/exact_copy_rate"  # samples identical to a training image
NN_MEMORISED_PIXELS = "memo/nn_memorised_pixels"  # d(NN1)/d(NN2) < 1/3 to train, pixels
NN_MEMORISED_FEATURES = "memo/nn_memorised_features"  # the same in the evaluator's features
AUTHENTICITY = "memo/authenticity"  # Alaa et al. 2022: share of samples not closer than data
C_T = "memo/c_t"  # Meehan et al. 2020: << 0 copying, ~ 0 fine, >> 0 underfitting
NLL_GAP = "memo/nll_gap_nats"  # held-out NLL minus training NLL (same estimator)

MEMORISATION: dict[str, Better] = {
    EXACT_COPIES: "lower",
    NN_MEMORISED_PIXELS: "lower",
    NN_MEMORISED_FEATURES: "lower",
    AUTHENTICITY: "higher",
    C_T: "higher",
}

# ---------------------------------------------------------------- likelihood (<split>/)


def nll_key(
    split: str, likelihood: Likelihood, *, marginal: bool = False, estimate: bool = False
) -> str:
    """Held-out negative log-likelihood, nats per image. A bound says so in its name;
    `marginal` marks -log sum_y p(x | y) p(y) of a conditional family, and `estimate` a
    marginal that is only an estimate (log-sum-exp over noisy per-class bound estimates is
    biased low, so it is not a guaranteed bound)."""
    name = "marginal_nll" if marginal else "nll"
    if likelihood == "exact":
        return f"{split}/{name}_nats"
    return f"{split}/{name}_{'estimate' if estimate else 'bound'}_nats"


def bpd_key(
    split: str, likelihood: Likelihood, *, marginal: bool = False, estimate: bool = False
) -> str:
    name = "marginal_bpd" if marginal else "bpd"
    if likelihood == "exact":
        return f"{split}/{name}"
    return f"{split}/{name}_{'estimate' if estimate else 'bound'}"


def marginal_is_estimate(likelihood: Likelihood, monte_carlo: MonteCarlo) -> bool:
    """Whether a conditional family's marginal -log sum_y p(x|y) p(y) is only an estimate: a
    bound whose draws are terms of one bound (biased low after the log-sum-exp)."""
    return likelihood == "lower_bound" and monte_carlo == "terms"


def marginal_nll_key(split: str, likelihood: Likelihood, monte_carlo: MonteCarlo) -> str:
    """The marginal NLL of a conditional family, named a bound, an estimate or exact."""
    estimate = marginal_is_estimate(likelihood, monte_carlo)
    return nll_key(split, likelihood, marginal=True, estimate=estimate)


def single_draw_key(split: str) -> str:
    """The importance-weighted bound with one draw (the ELBO of a VAE, the plain dequantization
    bound of a flow): a looser bound than the headline, reported where more draws tighten it."""
    return f"{split}/nll_bound_k1_nats"


def ode_nll_key(split: str) -> str:
    """The bound of a family's probability-flow ODE (`GenerativeModule.ode_log_prob`, diffusion:
    another model than its chain, on the same network), nats per image, on the first
    `ode_images` scored images: reported next to the family's own bound, never in its place."""
    return f"{split}/ode_nll_bound_nats"


def ode_bpd_key(split: str) -> str:
    return f"{split}/ode_bpd_bound"


def ode_keys(split: str) -> tuple[str, str]:
    """The ODE bound's names in nats and in bits/dim."""
    return ode_nll_key(split), ode_bpd_key(split)


def ode_difference_key(split: str) -> str:
    """The ODE's bound minus the family's own on the same images (paired, nats per image):
    below 0 where the ODE's model assigns the images more probability."""
    return f"{split}/ode_nll_minus_nll_nats"


# Held-out images the ODE bound was scored on (each a solve: fewer than SCORED_IMAGES).
ODE_IMAGES = "eval/ode_images"

# ---------------------------------------------------------------- prediction (<split>/, ood/)


def class_acc(split: str) -> str:
    """Accuracy of classification by Bayes' rule (or the evaluator's, in the real-data row)."""
    return f"{split}/class_acc"


def probe_acc(split: str) -> str:
    """Linear-probe accuracy on frozen latents (raw pixels in the real-data row)."""
    return f"{split}/probe_acc"


def evaluator_acc(split: str) -> str:
    """The evaluator classifier's own accuracy (metrics/evaluator.json)."""
    return f"{split}/accuracy"


def auroc(ood_set: str, *, typicality: bool = False) -> str:
    return f"ood/auroc_{'typicality_' if typicality else ''}{ood_set}"


def detected(ood_set: str) -> str:
    return f"ood/detected_{ood_set}"


OOD_FPR = "ood/fpr"  # share of the held-out split that the calibrated threshold rejects
OOD_THRESHOLD = "ood/threshold"

# ---------------------------------------------------------------- cost and training

TRAIN_LOSS = "train/loss"
TRAIN_WALL_S = "train/wall_s"
# Training compute (genlab.compute): FLOPs of all optimiser steps of all processes, and the steps
# (a GAN's batch, its critic and generator steps together, counts once).
TRAIN_FLOPS = "train/flops"
TRAIN_STEPS = "train/steps"
# Drawing one image: FLOPs (counted on one batch of `sample`) next to eval/nfe_per_sample.
SAMPLE_FLOPS = "eval/sample_flops"
NUM_PARAMS = "model/num_params"
# The training's cost, as the train stage measured it (models/<family>/seed<k>/train.json),
# copied into the family's metrics by the evaluate stage.
TRAINING_COST = (TRAIN_WALL_S, TRAIN_FLOPS, TRAIN_STEPS, NUM_PARAMS)
# ... and, under this key of train.json, the validation metric at every validation against the
# steps and FLOPs spent so far: [{"steps": .., "flops": .., "val/nll_nats": ..}, ...].
CURVE = "curve"
# A point's FID of the training's `trainer.curve_samples` images drawn there, against the
# validation split (the evaluate stage adds it to the curve): biased upwards at that n, so it is
# compared along the curve and between families at the same n, not with eval/fid.
CURVE_FID = "val/fid_curve"


def phase_seconds(phase: str) -> str:
    return f"time/{phase}_s"


# ---------------------------------------------------------------- uncertainty


def ci_low(key: str) -> str:
    return f"{key}_ci_low"


def ci_high(key: str) -> str:
    return f"{key}_ci_high"


def se(key: str) -> str:
    return f"{key}_se"


def is_uncertainty(key: str) -> bool:
    """Whether `key` is the interval or standard error of another metric."""
    return key.endswith(("_ci_low", "_ci_high", "_se"))


class Estimate(NamedTuple):
    value: float
    low: float  # nan when the metrics hold no uncertainty for it
    high: float

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def overlaps(self, other: Estimate) -> bool:
        """Whether the two intervals share a point (an estimate without one overlaps nothing)."""
        if not (self.has_interval and other.has_interval):
            return False
        return self.low <= other.high and other.low <= self.high


def z_value(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (1.96 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def estimate(metrics: Mapping[str, float], key: str, *, confidence: float = 0.95) -> Estimate:
    """`key`'s value with its interval: the written one, or value +- z * standard error; nan
    where the metrics lack the value (or any uncertainty)."""
    value = _finite(metrics.get(key))
    low, high = _finite(metrics.get(ci_low(key))), _finite(metrics.get(ci_high(key)))
    if not (math.isfinite(low) and math.isfinite(high)):
        error = _finite(metrics.get(se(key)))
        half = z_value(confidence) * error
        low, high = value - half, value + half
    return Estimate(value, low, high)


def _finite(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value) if math.isfinite(value) else math.nan
