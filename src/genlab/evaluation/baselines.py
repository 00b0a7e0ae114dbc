"""Baseline rows that make the families' numbers mean something, under the same protocol.

- **copycat**: training images redrawn with replacement, `sample_seeds` sets of `num_samples`:
  what a model that memorised its training set scores. On small data its FID sits at or below
  the real data's; the memorisation statistics must flag it (exact copies ~1, authenticity ~0,
  C_T strongly negative).
- **held-out real**: real images no model trained on (the validation split; the test split is
  the reference) at the models' set size, compared with the reference split: the number a
  perfect generator of new images would score. A family below it on FID is either better than
  real data (it is not) or closer to the training images than new data are.
- **real data**: the same memorisation statistics for the test split against the training
  split (how often real held-out images are near-copies of training images: the digits have
  duplicates), the evaluator's accuracy on the reference split (classification by a
  discriminative model) and a linear probe on raw pixels (representation).

Each row is one call of `rows.generation_metrics`/`rows.memorisation_row`, the functions that
measure every family, on cached features where the images are real.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genlab.config import RepresentationParams
from genlab.data.datamodule import derived_seed
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluator import classifier_predictions
from genlab.evaluation.features import Extractor
from genlab.evaluation.intervals import rate
from genlab.evaluation.likelihood import subset
from genlab.evaluation.memorisation import memorisation
from genlab.evaluation.protocol import Protocol, Reference
from genlab.evaluation.representation import linear_probe, probe_metrics
from genlab.evaluation.rows import Row, generation_metrics, memorisation_row

COPYCAT, HELDOUT, REAL = "copycat", "heldout", "real"
# Stream of the copycat's draws, apart from the families' sample seeds (seed, set, batch).
COPYCAT_STREAM = 7


def _with(key: str, estimate: v.Estimate) -> dict[str, float]:
    return {key: estimate.value, v.ci_low(key): estimate.low, v.ci_high(key): estimate.high}


def baseline_metrics(
    prepared_dir: str | Path,
    *,
    reference: Reference,
    protocol: Protocol,
    extractor: Extractor,
    evaluator_path: str | Path,
    representation: RepresentationParams,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """{"copycat": ..., "heldout": ..., "real": ...}: each row's metrics with intervals (no
    held-out row when the protocol has no held-out split)."""
    meta = read_meta(prepared_dir)
    train = load_split(prepared_dir, "train", meta)
    ref_split = load_split(prepared_dir, protocol.reference_split, meta)
    n, sets = protocol.num_samples, protocol.sample_seeds
    common = {"reference": reference, "protocol": protocol}
    sample_kw = common | {
        "reference_y": ref_split.y,
        "num_classes": meta.num_classes,
        "extractor": extractor,
        "evaluator_path": evaluator_path,
        "batch_size": batch_size,
        "device": device,
    }

    def measured(row: Row) -> dict[str, float]:
        features = row.features or []
        out = generation_metrics(row, features, **sample_kw)
        return out | memorisation_row(row, features, train=train.x, **common)

    rows: dict[str, dict[str, float]] = {}
    draws = [
        torch.randint(
            len(train),
            (n,),
            generator=torch.Generator().manual_seed(derived_seed(protocol.seed, COPYCAT_STREAM, s)),
        )
        for s in range(sets)
    ]
    rows[COPYCAT] = measured(
        Row([train.x[i] for i in draws], features=[reference.train.take(i) for i in draws])
    )
    if reference.heldout is not None:
        heldout = load_split(prepared_dir, protocol.heldout_split, meta)
        first = torch.arange(n)  # the set size is at most the split's (protocol.set_size)
        rows[HELDOUT] = measured(Row([heldout.x[first]], features=[reference.heldout.take(first)]))

    real: dict[str, float] = {}
    if protocol.reference_split == "test":
        # The test split as "samples" against train: how close real new images come.
        verdicts = memorisation(
            ref_split.x,
            reference.reference.features.double(),
            train=train.x,
            train_features=reference.train.features.double(),
            train_nn=reference.train_nn,
            cells=reference.cells,
        )
        for key, flags in (
            (v.EXACT_COPIES, verdicts.copies),
            (v.NN_MEMORISED_PIXELS, verdicts.memorised_pixels),
            (v.NN_MEMORISED_FEATURES, verdicts.memorised_features),
            (v.AUTHENTICITY, verdicts.authentic),
        ):
            real |= _with(key, rate(flags, confidence=protocol.confidence))
    split, m = protocol.reference_split, len(ref_split)
    predicted = classifier_predictions(
        evaluator_path, ref_split.x, batch_size=batch_size, device=device
    )
    real |= _with(
        v.class_acc(split), rate(predicted.cpu() == ref_split.y, confidence=protocol.confidence)
    )
    probed = subset(train, representation.probe_images, protocol.seed)  # as the families'
    pixels = linear_probe(
        probed.x.flatten(1).float(),
        probed.y,
        ref_split.x.flatten(1).float(),
        ref_split.y,
        c=representation.probe_c,
    )
    real |= probe_metrics(pixels, m, split, protocol.confidence)
    rows[REAL] = real
    return rows
