"""The evaluate stage's library: every question a family can answer, measured under one protocol."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genlab.config import EvaluateParams, PredictionParams, RepresentationParams
from genlab.data.datamodule import derived_seed
from genlab.data.datasets import Split
from genlab.data.prepared import load_split, read_meta
from genlab.distributed import ONE_PROCESS, Shard
from genlab.evaluation.fidelity import (
    Extractor,
    Protocol,
    Reference,
    class_fid,
    evaluator_outputs,
    extract_features,
    load_reference,
    measurement,
    metrics_from_features,
)
from genlab.evaluation.grids import image_grid
from genlab.evaluation.likelihood import likelihood_metrics
from genlab.evaluation.ood import calibrate, ood_metrics, ood_sets
from genlab.evaluation.predict import accuracy, log_prior, score_images, scorer
from genlab.evaluation.representation import represent
from genlab.models import GenerativeModule
from genlab.models.base import bits_per_dim, bpd_key, nll_key


@dataclass(frozen=True)
class Generated:
    samples: torch.Tensor  # (N, C, H, W) uint8 levels
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
        return {f"time/{name}_s": s for name, s in self.seconds.items()}


def evaluation_labels(model: GenerativeModule, n: int) -> torch.Tensor | None:
    """Balanced classes (0, 1, ..., K-1, 0, 1, ...) for a conditional model, else None."""
    return torch.arange(n) % model.num_classes if model.conditional else None


@torch.no_grad()
def generate(
    model: GenerativeModule, protocol: EvaluateParams, shard: Shard = ONE_PROCESS, **sampler: object
) -> Generated | None:
    """`protocol.num_samples` samples in batches of `protocol.batch_size`, batch b drawn from a
    generator seeded by (protocol.seed, b): the samples are the same however many processes
    share the batches (`shard`). Rank 0 gets them all, in order; other ranks None. `sampler`
    settings (e.g. a diffusion model's ``sampler="ddpm"``) go to every `sample` call."""
    model.eval()
    labels = evaluation_labels(model, protocol.num_samples)
    num_batches = -(-protocol.num_samples // protocol.batch_size)
    mine = {}
    start = time.perf_counter()
    for b in shard.batches(num_batches):
        i = b * protocol.batch_size
        n = min(protocol.batch_size, protocol.num_samples - i)
        y = None if labels is None else labels[i : i + n]
        generator = torch.Generator().manual_seed(derived_seed(protocol.seed, b))
        mine[b] = model.sample(n, y, generator=generator, **sampler).cpu()
    batches = shard.gather(mine)
    seconds = time.perf_counter() - start
    return None if batches is None else Generated(torch.cat(batches), labels, seconds)


def prediction_metrics(
    model: GenerativeModule,
    splits: dict[str, Split],
    *,
    params: PredictionParams,
    protocol: EvaluateParams,
) -> dict[str, float]:
    """Out-of-distribution detection and, for a conditional family, classification by Bayes'
    rule, on the test split; the validation split sets the typical log p(x) and the threshold.

    Metrics: ``ood/auroc_<set>``, ``ood/auroc_typicality_<set>``, ``ood/detected_<set>``,
    ``ood/test_fpr``, ``ood/threshold``; conditional families add ``test/class_acc`` and, with a
    likelihood, the marginal ``test/marginal_nll(_bound)_nats`` = -log sum_y p(x | y) p(y) and
    its bits/dim (from `params.bound_samples` draws for a bound).
    """
    kw = {
        "log_prior": log_prior(splits["train"].y, model.num_classes),
        "samples": params.bound_samples,
        "shortlist": params.shortlist,
        "batch_size": protocol.batch_size,
        "seed": protocol.seed,
    }
    val = score_images(model, splits["val"].x, **kw)
    test = score_images(model, splits["test"].x, **kw)
    sets = ood_sets(params.ood_sets, splits["test"].x, model.levels, protocol.seed)
    outside = {name: score_images(model, x, **kw).log_px for name, x in sets.items()}
    out = ood_metrics(test.log_px, outside, calibrate(val.log_px, params.statistic, params.fpr))
    if test.joint is not None:
        out["test/class_acc"] = accuracy(test.joint, splits["test"].y)
        if model.likelihood != "none":
            nats = -float(test.log_px.mean())
            out[nll_key("test", model.likelihood, marginal=True)] = nats
            bpd = bits_per_dim(nats, model.dims)
            out[bpd_key("test", model.likelihood, marginal=True)] = float(bpd)
    return out


def class_grid(
    samples: torch.Tensor, labels: torch.Tensor, levels: int, per_class: int = 10
) -> np.ndarray:
    """One row per class: the first `per_class` samples generated for each class, as an
    (H, W, 3) uint8 grid (fewer columns when a class has fewer samples)."""
    rows = [samples[labels == k][:per_class] for k in range(int(labels.max()) + 1)]
    per_class = min(len(r) for r in rows)
    return image_grid(torch.cat([r[:per_class] for r in rows]), levels, nrow=per_class)


def generation_metrics(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    extractor: Extractor,
    reference: Reference,
    reference_y: torch.Tensor,
    evaluator_path: str | Path,
    protocol: EvaluateParams,
    num_classes: int,
    device: torch.device | str = "cpu",
    phases: Phases | None = None,
) -> dict[str, float]:
    """Every sample metric from one feature extraction of the samples, against the cached
    features of the real data: FID, KID, precision/recall, the Inception(-style) score and, for
    class-conditional samples (`labels`), the conditional accuracy and per-class FID.

    The conditional accuracy is the evaluator's: with the Inception extractor its logits are
    ImageNet's, so the evaluator then classifies the samples too (its logits only). `phases`
    receives the seconds of feature extraction and of the metrics."""
    phases = phases if phases is not None else Phases()
    with phases("features", device):
        generated = extract_features(
            samples, extractor, batch_size=protocol.batch_size, device=device, name="samples"
        )
        class_logits = None
        if labels is not None:
            if extractor.logits_are_classes:
                class_logits = generated.logits
            else:
                _, class_logits = evaluator_outputs(
                    evaluator_path, samples, batch_size=protocol.batch_size, device=device
                )
    with phases("metrics"):
        metrics = metrics_from_features(generated, reference.test, protocol).as_dict()
        if labels is not None:
            metrics["eval/cond_acc"] = accuracy(class_logits, labels)
            # float64 for the per-class statistics (small sets).
            per_class = class_fid(
                generated.features.double(),
                labels,
                reference.test.features.double(),
                reference_y,
                num_classes,
            )
            metrics |= {f"eval/class_fid_{k}": v for k, v in per_class.items()}
            metrics["eval/class_fid_mean"] = float(np.mean(list(per_class.values())))
    return metrics


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    grids: dict[str, np.ndarray]  # (H, W, 3) uint8: samples, classes, interpolation, traversal
    protocol: Protocol  # what the sample metrics were measured under


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
) -> Evaluation | None:
    """Every question the family can answer: generation (sample metrics, a sample grid),
    likelihood (held-out nats), prediction (OOD detection, classification by Bayes' rule),
    representation (linear probe, latent grids) and conditional generation (conditional accuracy,
    per-class FID, a grid with one row per class).

    The real data's features come from `reference_dir` (the `reference` stage), checked against
    the protocol before any sampling. Sampling, the costly part, is split over the processes of
    `shard`; rank 0 gathers the samples, extracts their features once and computes every metric
    (other ranks: None). The seconds of each phase are metrics too (``time/<phase>_s``)."""
    meta = read_meta(prepared_dir)
    extractor, measured_under = measurement(protocol, evaluator_path, meta)
    reference = load_reference(reference_dir, measured_under)
    generated = generate(model, protocol, shard)
    if generated is None:
        return None
    splits = {name: load_split(prepared_dir, name, meta) for name in ("train", "val", "test")}
    test = splits["test"]
    samples = generated.samples
    if samples.dtype != torch.uint8 or tuple(samples.shape[1:]) != meta.shape:
        raise ValueError(
            f"{type(model).__name__}.sample returned {samples.dtype} {tuple(samples.shape)}; "
            f"expected uint8 (N, {', '.join(map(str, meta.shape))})"
        )
    if int(samples.max()) >= meta.levels:
        raise ValueError(f"{type(model).__name__}.sample returned levels above {meta.levels - 1}")

    phases = Phases({"sampling": generated.seconds})
    metrics = generation_metrics(
        samples,
        generated.labels,
        extractor=extractor,
        reference=reference,
        reference_y=splits[measured_under.reference_split].y,
        evaluator_path=evaluator_path,
        protocol=protocol,
        num_classes=model.num_classes,
        device=model.device,
        phases=phases,
    )
    metrics["eval/samples_per_s"] = protocol.num_samples / generated.seconds
    metrics["eval/nfe_per_sample"] = model.nfe_per_sample
    n_grid = min(64, protocol.num_samples)
    nrow = model.num_classes if model.conditional else 8
    grids = {"samples": image_grid(samples[:n_grid], meta.levels, nrow=nrow)}
    if generated.labels is not None:
        grids["classes"] = class_grid(samples, generated.labels, meta.levels)

    if model.likelihood != "none":
        # Test only: the validation curve is already in the run, measured during training.
        with phases("likelihood", model.device):
            metrics |= likelihood_metrics(
                model, {"test": test}, batch_size=protocol.batch_size, seed=protocol.seed
            )
    if scorer(model) is not None:
        with phases("prediction", model.device):
            metrics |= prediction_metrics(model, splits, params=prediction, protocol=protocol)
    if model.has_latent:
        with phases("representation", model.device):
            rep = represent(
                model,
                splits["train"],
                test,
                representation,
                levels=meta.levels,
                batch_size=protocol.batch_size,
            )
        metrics |= rep.metrics
        grids["interpolation"] = rep.interpolation
        if rep.traversal is not None:
            grids["traversal"] = rep.traversal
    metrics |= phases.metrics()
    return Evaluation(
        metrics={k: float(v) for k, v in sorted(metrics.items())},
        grids=grids,
        protocol=measured_under,
    )
