"""The evaluate stage's library: every question a family can answer, measured under one protocol."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genlab.compute import CurveSet, sampling_flops
from genlab.config import EvaluateParams, PredictionParams, RepresentationParams
from genlab.data.datamodule import derived_seed
from genlab.data.datasets import Split
from genlab.data.prepared import load_split, read_meta
from genlab.distributed import ONE_PROCESS, Shard
from genlab.evaluation import vocabulary as v
from genlab.evaluation.features import Extractor, Features, extract_features
from genlab.evaluation.grids import image_grid
from genlab.evaluation.intervals import mean_and_se, wilson
from genlab.evaluation.likelihood import likelihood_metrics, subset
from genlab.evaluation.ood import calibrate, ood_metrics, ood_sets
from genlab.evaluation.predict import (
    accuracy,
    detection_shortlist,
    log_prior,
    score_images,
    scorer,
    shortlisted,
)
from genlab.evaluation.protocol import Protocol, Reference, load_reference, measurement
from genlab.evaluation.representation import represent
from genlab.evaluation.rows import Row, generation_metrics, memorisation_row, row_features
from genlab.evaluation.sample_metrics import frechet_distance
from genlab.models import GenerativeModule
from genlab.models.base import bits_per_dim
from genlab.progress import steps


@dataclass(frozen=True)
class Generated:
    sets: list[torch.Tensor]  # S x (N, C, H, W) uint8 levels
    labels: torch.Tensor | None  # (N,) requested classes for a conditional model
    seconds: float


@dataclass
class Phases:
    """Wall seconds of the evaluate stage's phases (what `benchmarks/evaluation.py` prints and
    the metrics record as ``time/<phase>_s``): where an evaluation spends its time."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str, device: torch.device | str = "cpu") -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)  # the phase's kernels, not just their launch
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {v.phase_seconds(name): s for name, s in self.seconds.items()}


def evaluation_labels(model: GenerativeModule, n: int) -> torch.Tensor | None:
    """Balanced classes (0, 1, ..., K-1, 0, 1, ...) for a conditional model, else None."""
    return torch.arange(n) % model.num_classes if model.conditional else None


@torch.no_grad()
def generate(
    model: GenerativeModule,
    protocol: Protocol,
    *,
    batch_size: int,
    shard: Shard = ONE_PROCESS,
    **sampler: object,
) -> Generated | None:
    """`protocol.sample_seeds` independent sets of `protocol.num_samples` samples each.

    The S sets are consecutive stretches of one stream of S x N samples drawn in full batches of
    `batch_size` (a set's last batch does not stop short: PixelCNN and diffusion pay per batch,
    whatever its size), batch b from a generator seeded by (protocol.seed, b), so the samples
    are the same however many processes share the batches (`shard`). Samples are independent
    draws, so the sets are independent sets. A conditional set asks for the balanced classes
    (0, 1, ..., K-1, 0, ...), the same in every set. Rank 0 gets them all, in order; other ranks
    None. `sampler` settings (e.g. a diffusion model's ``sampler="ddpm"``) go to every `sample`
    call."""
    model.eval()
    n, sets = protocol.num_samples, protocol.sample_seeds
    labels = evaluation_labels(model, n)
    stream = None if labels is None else labels.repeat(sets)  # (S * N,)
    total = n * sets
    mine = {}
    start = time.perf_counter()
    for b in steps(shard.batches(-(-total // batch_size)), "sampling", quiet=not shard.is_zero):
        i = b * batch_size
        size = min(batch_size, total - i)
        y = None if stream is None else stream[i : i + size]
        generator = torch.Generator().manual_seed(derived_seed(protocol.seed, b))
        mine[b] = model.sample(size, y, generator=generator, **sampler).cpu()
    batches = shard.gather(mine)
    seconds = time.perf_counter() - start
    if batches is None:
        return None
    samples = torch.cat(batches)  # (S * N, C, H, W)
    sets = list(samples.split(n))
    return Generated(sets, labels, seconds)


def prediction_metrics(
    model: GenerativeModule,
    splits: dict[str, Split],
    *,
    heldout: str,
    params: PredictionParams,
    protocol: EvaluateParams,
) -> dict[str, float]:
    """Out-of-distribution detection and, for a conditional family, classification by Bayes'
    rule, on the held-out split `heldout`; the validation split sets the typical log p(x) and
    the threshold (tuning on `val` measures on the same images the threshold was set on).

    Detection scores log p(x) (`predict.score_images`): the marginal of the joint scores (with
    `predict.detection_shortlist`), or, for a family that `scores_without_labels`, its
    unlabelled score (the same number, one pass), on the validation, held-out and
    out-of-distribution images alike.

    Metrics: ``ood/auroc_<set>``, ``ood/auroc_typicality_<set>``, ``ood/detected_<set>``,
    ``ood/fpr``, ``ood/threshold``; conditional families add ``<split>/class_acc`` and, with a
    likelihood, the marginal -log sum_y p(x | y) p(y) and its bits/dim (from
    `params.classifying_samples` draws for a bound, detection's from `params.bound_samples`; an
    *estimate*, not a bound, where the draws are terms of one bound), each with its interval.
    """
    kw = {
        "log_prior": log_prior(splits["train"].y, model.num_classes),
        "samples": params.bound_samples,
        "shortlist": params.shortlist,
        "batch_size": protocol.batch_size,
        "seed": protocol.seed,
    }
    confidence = protocol.confidence

    detect = kw | {"shortlist": detection_shortlist(params.shortlist), "joint": False}
    classify = kw | {"samples": params.classifying_samples}

    def density(x: torch.Tensor, what: str) -> torch.Tensor:
        # Detection needs log p(x) alone: one score per image where the family scores
        # without labels.
        return score_images(model, x, what=what, **detect).log_px

    # Classification and the marginal need the joint scores of every class; a family that
    # needs its labels to score marginalises those for detection too (no second pass) where
    # both take the same draws: with detection's own shortlist of one where it shortlists
    # differently.
    labelled = None
    if model.conditional:
        labelled = score_images(model, splits[heldout].x, what=f"classifying {heldout}", **classify)

    def effective(shortlist: int | None, samples: int) -> int | None:
        draws = model.prediction_samples(samples)
        return shortlist if shortlisted(model, draws, shortlist) else None

    held = None
    draws = (model.prediction_samples(s) for s in (classify["samples"], detect["samples"]))
    same_draws = model.likelihood == "exact" or len(set(draws)) == 1
    if labelled is not None and not model.scores_without_labels and same_draws:
        classified = effective(classify["shortlist"], classify["samples"])
        if classified == effective(detect["shortlist"], detect["samples"]):
            held = labelled.log_px
        elif detect["shortlist"] == 1:
            held = labelled.log_px_top1
    if held is None:
        held = density(splits[heldout].x, f"scoring {heldout}")
    val = held if heldout == "val" else density(splits["val"].x, "scoring val")
    sets = ood_sets(params.ood_sets, splits[heldout].x, model.levels, protocol.seed)
    outside = {name: density(x, f"scoring OOD {name}") for name, x in sets.items()}
    calibration = calibrate(val, params.statistic, params.fpr)
    out = ood_metrics(held, outside, calibration, confidence=confidence)
    if labelled is not None and labelled.joint is not None:
        labels = splits[heldout].y
        n = len(labels)
        result = wilson(round(accuracy(labelled.joint, labels) * n), n, confidence=confidence)
        key = v.class_acc(heldout)
        out |= {key: result.value, v.ci_low(key): result.low, v.ci_high(key): result.high}
        if model.likelihood != "none":
            names = {"marginal": True}
            names["estimate"] = v.marginal_is_estimate(model.likelihood, model.monte_carlo)
            nats, error = mean_and_se(-labelled.log_px)
            nll = v.nll_key(heldout, model.likelihood, **names)
            bpd = v.bpd_key(heldout, model.likelihood, **names)
            out |= {nll: nats, v.se(nll): error}
            out |= {bpd: float(bits_per_dim(nats, model.dims))}
            out |= {v.se(bpd): float(bits_per_dim(error, model.dims))}
    return out


def class_grid(
    samples: torch.Tensor, labels: torch.Tensor, levels: int, per_class: int = 10
) -> np.ndarray:
    """One row per class: the first `per_class` samples generated for each class, as an
    (H, W, 3) uint8 grid (fewer columns when a class has fewer samples)."""
    rows = [samples[labels == k][:per_class] for k in range(int(labels.max()) + 1)]
    per_class = min(len(r) for r in rows)
    return image_grid(torch.cat([r[:per_class] for r in rows]), levels, nrow=per_class)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    grids: dict[str, np.ndarray]  # (H, W, 3) uint8: samples, classes, interpolation, traversal
    protocol: Protocol  # what the sample metrics were measured under
    # The training's sample sets scored: [{"steps", "flops", v.CURVE_FID}], in training order.
    curve: list[dict[str, float]] = field(default_factory=list)


def validation_features(reference: Reference, protocol: Protocol) -> Features:
    """The validation split's features: the reference itself when tuning (split `val`), else
    the held-out real row's (`val` beside `test`)."""
    if protocol.reference_split == "val":
        return reference.reference
    assert reference.heldout is not None and protocol.heldout_split == "val"
    return reference.heldout


def curve_fids(
    sets: Sequence[CurveSet],
    extractor: Extractor,
    validation: Features,
    *,
    batch_size: int,
    device: torch.device | str,
) -> list[dict[str, float]]:
    """The FID of each of the training's sample sets (`genlab.compute.CurveSamples`) against the
    validation split, in the protocol's features, at the steps and FLOPs it was drawn at. Not
    against the test split: the curve is read while choosing budgets and settings."""
    out = []
    for s in steps(sets, "curve FID", unit="sets"):
        drawn = extract_features(
            s.images, extractor, batch_size=batch_size, device=device, name="curve samples"
        )
        fid = frechet_distance(drawn.features, validation.features)
        out.append({"steps": float(s.steps), "flops": s.flops, v.CURVE_FID: fid})
    return out


def _check_samples(model: GenerativeModule, samples: torch.Tensor, shape: tuple, levels: int):
    if samples.dtype != torch.uint8 or tuple(samples.shape[1:]) != shape:
        raise ValueError(
            f"{type(model).__name__}.sample returned {samples.dtype} {tuple(samples.shape)}; "
            f"expected uint8 (N, {', '.join(map(str, shape))})"
        )
    if int(samples.max()) >= levels:
        raise ValueError(f"{type(model).__name__}.sample returned levels above {levels - 1}")


def for_inference(model: GenerativeModule, *, channels_last: bool) -> GenerativeModule:
    """`model` in eval mode with its convolutions in the channels_last layout on a CPU, and on an
    accelerator where `channels_last` (`trainer.channels_last`) asks.

    On a CPU (oneDNN) channels_last is the faster layout for inference, measured with the
    digits' default models on 2 cores (2026-12-07, seconds of one call, contiguous ->
    channels_last): the diffusion bound of 350 images x 20 terms 1.71 -> 1.29, PixelCNN
    sampling 200 images 0.88 -> 0.71, the flow and VAE bounds 0.49 -> 0.43 and 0.77 -> 0.68.
    The numbers agree with the contiguous layout's up to float rounding (the convolutions sum in
    another order). Training follows `trainer.channels_last` alone (true by default; on a CPU
    3-epoch fits gained EBM 12%, diffusion 4%, PixelCNN, flow and GAN 3%, VAE nothing), since
    a change of layout starts its numbers on another trajectory."""
    if channels_last or model.device.type == "cpu":
        model = model.convolutions_channels_last()
    return model.eval()


def evaluate_model(
    model: GenerativeModule,
    *,
    prepared_dir: str | Path,
    evaluator_path: str | Path,
    reference_dir: str | Path,
    protocol: EvaluateParams,
    prediction: PredictionParams,
    representation: RepresentationParams,
    shard: Shard = ONE_PROCESS,
    curve_sets: Sequence[CurveSet] = (),
    channels_last: bool,
) -> Evaluation | None:
    """Every question the family can answer: generation (sample metrics and memorisation over
    `sample_seeds` sample sets, a sample grid), likelihood (held-out nats and the gap to the
    training images), prediction (OOD detection, classification by Bayes' rule), representation
    (linear probe, latent grids) and conditional generation (conditional accuracy, per-class
    FID, a grid with one row per class); every number with its interval or standard error.

    Everything held-out is measured on `protocol.split` (`test`; `val` when tuning, and then the
    test split is not read). The real data's features come from `reference_dir` (the `reference`
    stage), checked against the protocol before any sampling. Sampling, the costly part, is split
    over the processes of `shard`; rank 0 gathers the samples, extracts their features once and
    computes every metric (other ranks: None). The seconds of each phase are metrics too.
    `curve_sets`, the training's sample sets, get their FID against validation (`curve`).
    The model runs as `for_inference` puts it (`channels_last`: `trainer.channels_last`)."""
    model = for_inference(model, channels_last=channels_last)
    meta = read_meta(prepared_dir)
    extractor, measured_under = measurement(protocol, evaluator_path, meta)
    reference = load_reference(reference_dir, measured_under)
    generated = generate(model, measured_under, batch_size=protocol.batch_size, shard=shard)
    if generated is None:
        return None
    heldout = measured_under.reference_split
    names = ("train", "val", heldout)
    splits = {name: load_split(prepared_dir, name, meta) for name in dict.fromkeys(names)}
    for samples in generated.sets:
        _check_samples(model, samples, meta.shape, meta.levels)

    phases = Phases({"sampling": generated.seconds})
    device = model.device
    row = Row(generated.sets, generated.labels)
    with phases("features", device):
        features = row_features(row, extractor, batch_size=protocol.batch_size, device=device)
    with phases("metrics"):
        metrics = generation_metrics(
            row,
            features,
            reference=reference,
            reference_y=splits[heldout].y,
            protocol=measured_under,
            num_classes=model.num_classes,
            extractor=extractor,
            evaluator_path=evaluator_path,
            batch_size=protocol.batch_size,
            device=device,
        )
    with phases("memorisation"):
        metrics |= memorisation_row(
            row, features, reference=reference, train=splits["train"].x, protocol=measured_under
        )
    total = measured_under.num_samples * measured_under.sample_seeds
    metrics[v.SAMPLES_PER_S] = total / generated.seconds
    metrics[v.NFE_PER_SAMPLE] = model.nfe_per_sample
    with phases("sample_flops", device):  # three images more, under torch's FLOP counter
        metrics[v.SAMPLE_FLOPS] = sampling_flops(model, batch_size=protocol.batch_size)
    first = generated.sets[0]
    n_grid = min(64, len(first))
    nrow = model.num_classes if model.conditional else 8
    grids = {"samples": image_grid(first[:n_grid], meta.levels, nrow=nrow)}
    if generated.labels is not None:
        grids["classes"] = class_grid(first, generated.labels, meta.levels)

    # The per-image passes score at most `scored_images` of each split (a seeded draw).
    n_scored, seed = protocol.scored_images, protocol.seed
    scored = splits | {name: subset(splits[name], n_scored, seed) for name in ("val", heldout)}
    if model.likelihood != "none" or scorer(model) is not None:
        metrics[v.SCORED_IMAGES] = float(len(scored[heldout]))
    if model.likelihood != "none":
        # The held-out split, and as many training images for the gap; the validation curve
        # is already in the run, measured during training.
        with phases("likelihood", device):
            metrics |= likelihood_metrics(
                model,
                scored[heldout],
                split=heldout,
                train=splits["train"],
                batch_size=protocol.batch_size,
                seed=protocol.seed,
            )
    if scorer(model) is not None:
        with phases("prediction", device):
            metrics |= prediction_metrics(
                model,
                scored,
                heldout=heldout,
                params=prediction,
                protocol=protocol,
            )
    if model.has_latent:
        with phases("representation", device):
            rep = represent(
                model,
                subset(splits["train"], representation.probe_images, protocol.seed),
                scored[heldout],
                representation,
                levels=meta.levels,
                batch_size=protocol.batch_size,
                split=heldout,
                confidence=protocol.confidence,
            )
        metrics |= rep.metrics
        grids["interpolation"] = rep.interpolation
        if rep.traversal is not None:
            grids["traversal"] = rep.traversal
    curve = []
    if curve_sets:
        with phases("curve", device):
            validation = validation_features(reference, measured_under)
            curve = curve_fids(
                curve_sets, extractor, validation, batch_size=protocol.batch_size, device=device
            )
    metrics |= phases.metrics()
    return Evaluation(
        metrics={k: float(x) for k, x in sorted(metrics.items())},
        grids=grids,
        protocol=measured_under,
        curve=curve,
    )
