"""The evaluate stage's library: sample with fixed seeds, measure, and return named results."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genlab.config import EvaluateParams
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation.fidelity import classifier_accuracy, sample_metrics
from genlab.evaluation.grids import image_grid
from genlab.evaluation.likelihood import likelihood_metrics
from genlab.models import GenerativeModule


@dataclass(frozen=True)
class Generated:
    samples: torch.Tensor  # (N, C, H, W) uint8 levels
    labels: torch.Tensor | None  # (N,) requested classes for a conditional model
    seconds: float


def evaluation_labels(model: GenerativeModule, n: int) -> torch.Tensor | None:
    """Balanced classes (0, 1, ..., K-1, 0, 1, ...) for a conditional model, else None."""
    return torch.arange(n) % model.num_classes if model.conditional else None


@torch.no_grad()
def generate(model: GenerativeModule, protocol: EvaluateParams, **sampler: object) -> Generated:
    """`protocol.num_samples` samples in batches from one generator seeded by `protocol.seed`;
    `sampler` settings (e.g. a diffusion model's ``sampler="ddpm"``) go to every `sample` call."""
    model.eval()
    generator = torch.Generator().manual_seed(protocol.seed)
    labels = evaluation_labels(model, protocol.num_samples)
    batches = []
    start = time.perf_counter()
    for i in range(0, protocol.num_samples, protocol.batch_size):
        n = min(protocol.batch_size, protocol.num_samples - i)
        y = None if labels is None else labels[i : i + n]
        batches.append(model.sample(n, y, generator=generator, **sampler).cpu())
    seconds = time.perf_counter() - start
    return Generated(torch.cat(batches), labels, seconds)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    grid: np.ndarray  # (H, W, 3) uint8 sample grid


def evaluate_model(
    model: GenerativeModule,
    *,
    prepared_dir: str | Path,
    evaluator_path: str | Path,
    protocol: EvaluateParams,
) -> Evaluation:
    meta = read_meta(prepared_dir)
    test = load_split(prepared_dir, "test", meta)
    generated = generate(model, protocol)
    samples = generated.samples
    if samples.dtype != torch.uint8 or tuple(samples.shape[1:]) != meta.shape:
        raise ValueError(
            f"{type(model).__name__}.sample returned {samples.dtype} {tuple(samples.shape)}; "
            f"expected uint8 (N, {', '.join(map(str, meta.shape))})"
        )
    if int(samples.max()) >= meta.levels:
        raise ValueError(f"{type(model).__name__}.sample returned levels above {meta.levels - 1}")

    device = model.device
    metrics = sample_metrics(
        samples, test.x, evaluator_path, protocol=protocol, device=device
    ).as_dict()
    metrics["eval/samples_per_s"] = protocol.num_samples / generated.seconds
    metrics["eval/nfe_per_sample"] = model.nfe_per_sample
    if generated.labels is not None:
        metrics["eval/cond_acc"] = classifier_accuracy(
            evaluator_path, samples, generated.labels, device=device
        )
    if model.likelihood != "none":
        # Test only: the validation curve is already in the run, measured during training.
        splits = {"test": test}
        metrics |= likelihood_metrics(
            model, splits, batch_size=protocol.batch_size, seed=protocol.seed
        )

    n_grid = min(64, protocol.num_samples)
    nrow = model.num_classes if model.conditional else 8
    grid = image_grid(samples[:n_grid], meta.levels, nrow=nrow)
    return Evaluation(metrics={k: float(v) for k, v in sorted(metrics.items())}, grid=grid)
