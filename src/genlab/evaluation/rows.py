"""One row of the comparison: S sets of images measured under the protocol.

A family's samples, the copycat's redrawn training images and the held-out real images are all
measured by `measure_row`, so every row of the report is the same computation on different
images: the sample metrics against the reference split (`sample_metrics.py`) and the
memorisation statistics against the training split (`memorisation.py`), each with its interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluator import classifier_predictions
from genlab.evaluation.features import Extractor, Features, extract_features
from genlab.evaluation.intervals import rate
from genlab.evaluation.memorisation import memorisation, memorisation_metrics
from genlab.evaluation.protocol import Protocol, Reference
from genlab.evaluation.sample_metrics import sample_metrics


@dataclass(frozen=True)
class Row:
    """The images of a row: S sets (each uint8 (N, C, H, W)), the classes a conditional model
    was asked for (the same (N,) for every set), and their features when already known."""

    sets: list[Tensor]
    labels: Tensor | None = None
    features: list[Features] | None = None


def row_features(
    row: Row, extractor: Extractor, *, batch_size: int, device: torch.device | str
) -> list[Features]:
    """Each set's features (extracted once; a row built from cached features keeps them)."""
    if row.features is not None:
        return row.features
    return [
        extract_features(x, extractor, batch_size=batch_size, device=device, name=f"set {i}")
        for i, x in enumerate(row.sets)
    ]


def generation_metrics(
    row: Row,
    features: list[Features],
    *,
    reference: Reference,
    reference_y: Tensor,
    protocol: Protocol,
    num_classes: int,
    extractor: Extractor,
    evaluator_path: str | Path,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Sample metrics of a row against the reference split, with intervals; for
    class-conditional sets also the conditional accuracy (the evaluator's verdict on every
    sample, pooled over the sets) and per-class FIDs."""
    labels = None if row.labels is None else [row.labels] * len(row.sets)
    out = sample_metrics(
        features,
        reference.reference,
        protocol,
        labels=labels,
        reference_labels=reference_y if labels is not None else None,
        num_classes=num_classes,
        draws=reference.draws,
    )
    if row.labels is not None:
        predicted = []
        for x, f in zip(row.sets, features, strict=True):
            if extractor.logits_are_classes:
                predicted.append(f.logits.argmax(dim=1))
            else:  # Inception's logits are ImageNet's: the evaluator classifies the samples
                predicted.append(
                    classifier_predictions(evaluator_path, x, batch_size=batch_size, device=device)
                )
        correct = torch.cat([p.cpu() == row.labels for p in predicted])
        result = rate(correct, confidence=protocol.confidence)
        out |= {v.COND_ACC: result.value}
        out |= {v.ci_low(v.COND_ACC): result.low, v.ci_high(v.COND_ACC): result.high}
    return out


def memorisation_row(
    row: Row, features: list[Features], *, reference: Reference, train: Tensor, protocol: Protocol
) -> dict[str, float]:
    """Memorisation statistics of a row against the training images `train` (uint8) and their
    cached features, with intervals."""
    per_set = [
        memorisation(
            x,
            f.features.double(),
            train=train,
            train_features=reference.train.features.double(),
            train_nn=reference.train_nn,
            cells=reference.cells,
        )
        for x, f in zip(row.sets, features, strict=True)
    ]
    return memorisation_metrics(
        per_set,
        reference_dist=reference.reference_dist,
        reference_cells=reference.reference_cells,
        cells=protocol.copying_cells,
        tau=protocol.copying_tau,
        bootstrap=protocol.bootstrap,
        confidence=protocol.confidence,
        seed=protocol.seed,
    )
