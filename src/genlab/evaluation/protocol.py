"""The evaluation protocol, and the real data's features it measures against.

The `Protocol` is everything a sample metric depends on besides the samples: the feature
extractor and its weights, the data, the splits, the sample-set size and count, the bootstrap,
the interval's confidence and the metrics' settings. It is written next to every number
(`protocol` in the metrics files, `eval.protocol.*` tags in MLflow) with its hash, and the
report refuses to put numbers measured under different protocols side by side.

Which split plays which part:

- the *reference* split (`evaluate.split`: `test` for the final evaluation, `val` for tuning) is
  what samples are compared with and where held-out likelihoods are measured;
- the *held-out real* split is the one set of real images no model trained on that is not the
  reference: `val` when the reference is `test`; none when tuning on `val`, since the test split
  is then not read at all;
- the *training* split is what memorisation is measured against.

The real data's features under a protocol are computed once by the `reference` stage and cached
as a DVC output (`data/reference/<features id>.pt`): every evaluate@<family> stage and the
baselines stage load them instead of extracting them again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from genlab.config import EvaluateParams, config_hash
from genlab.data.prepared import Meta, load_split, read_meta
from genlab.errors import DataError, GenlabError
from genlab.evaluation import memorisation, sizes
from genlab.evaluation.features import Extractor, Features, extract_features, make_extractor
from genlab.evaluation.sample_metrics import ReferenceDraws, protocol_draws
from genlab.evaluation.sizes import NO_SPLIT, heldout_split
from genlab.io import save_torch_atomic


def set_size(params: EvaluateParams, meta: Meta) -> int:
    """Images per sample set (`genlab.evaluation.sizes.set_size` for the prepared splits)."""
    return sizes.set_size(params, {name: info["n"] for name, info in meta.splits.items()})


@dataclass(frozen=True)
class Protocol:
    """Everything a sample metric depends on besides the samples (see the module docstring)."""

    extractor: str  # torch-fidelity's name of the feature extractor
    weights_sha256: str  # of its weights file (the evaluator file, or the Inception weights)
    feature_layer: str  # FID, KID, precision/recall, density/coverage, memorisation
    isc_layer: str  # Inception(-style) score
    input: str  # how images are given to it
    resize: str  # how it resizes them
    data_sha256: str  # the prepared dataset (meta.json)
    reference_split: str  # what the samples are compared with
    heldout_split: str  # the held-out real images ("none": no such row)
    num_samples: int  # images per sample set
    sample_seeds: int  # sample sets per family
    bootstrap: int  # draws of the reference images
    confidence: float  # of every interval
    kid_subset_size: int  # at most; smaller when a set is smaller
    kid_subsets: int
    prc_neighborhood: int  # k of precision/recall and density/coverage
    isc_splits: int  # at most; fewer when there are fewer samples
    copying_cells: int  # C_T's k-means cells of the training features
    copying_tau: float  # C_T's least share of a set's samples in a counted cell
    seed: int  # sample sets, bootstrap draws, KID subsets, IS shuffling, C_T's cells

    # What the cached real-data features depend on (the rest only enters the metrics).
    FEATURE_KEYS = (
        "extractor",
        "weights_sha256",
        "feature_layer",
        "isc_layer",
        "input",
        "resize",
        "data_sha256",
        "reference_split",
        "heldout_split",
        "copying_cells",
        "bootstrap",  # the reference's bootstrap draws (sample_metrics.ReferenceDraws)
        "prc_neighborhood",
        "seed",
    )

    @classmethod
    def of(cls, params: EvaluateParams, extractor: Extractor, meta: Meta) -> Protocol:
        return cls(
            extractor=extractor.name,
            weights_sha256=extractor.weights_sha256,
            feature_layer=extractor.feature_layer,
            isc_layer=extractor.isc_layer,
            input=extractor.input,
            resize=extractor.resize,
            data_sha256=meta.data_sha256,
            reference_split=params.split,
            heldout_split=heldout_split(params.split),
            num_samples=set_size(params, meta),
            sample_seeds=params.sample_seeds,
            bootstrap=params.bootstrap,
            confidence=params.confidence,
            kid_subset_size=params.kid_subset_size,
            kid_subsets=params.kid_subsets,
            prc_neighborhood=params.prc_neighborhood,
            isc_splits=params.isc_splits,
            copying_cells=params.copying_cells,
            copying_tau=params.copying_tau,
            seed=params.seed,
        )

    def _fields(self) -> dict[str, str | int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def id(self) -> str:
        """16 hex digits of the sha256 of every field."""
        return config_hash(self._fields())

    def features_key(self) -> dict[str, str | int | float]:
        return {key: getattr(self, key) for key in self.FEATURE_KEYS}

    @property
    def features_id(self) -> str:
        """The hash the real-data features are cached under."""
        return config_hash(self.features_key())

    @property
    def has_heldout(self) -> bool:
        return self.heldout_split != NO_SPLIT

    def as_dict(self) -> dict[str, str | int | float]:
        """What goes next to the metrics: the fields and the `id`. Strings and numbers only:
        `dvc metrics show/diff` list them and MLflow takes them as tags."""
        return {"id": self.id, **self._fields()}


class Measurement(NamedTuple):
    extractor: Extractor
    protocol: Protocol


def measurement(params: EvaluateParams, evaluator_path: str | Path, meta: Meta) -> Measurement:
    """The extractor and the protocol that `params` give for the prepared data of `meta`."""
    extractor = make_extractor(params, evaluator_path, levels=meta.levels, channels=meta.shape[0])
    return Measurement(extractor, Protocol.of(params, extractor, meta))


def check_protocols(recorded: dict[str, object], expected: Protocol) -> None:
    """Refuse numbers measured under another protocol: `recorded` maps a source (e.g.
    "metrics/gan/seed0.json") to the protocol dict found there (None where there is none)."""
    want = expected.as_dict()
    for source, found in recorded.items():
        if found == want:
            continue
        if not isinstance(found, dict):
            raise GenlabError(
                f"{source} records no evaluation protocol (written before protocols were "
                f"recorded?); re-run `dvc repro` so every row is evaluated under protocol "
                f"{expected.id}"
            )
        differ = [
            f"{key} {found.get(key)!r} (want {want.get(key)!r})"
            for key in want
            if key != "id" and found.get(key) != want.get(key)
        ]
        raise GenlabError(
            f"{source} was measured under protocol {found.get('id')}, not {expected.id}: "
            f"{'; '.join(differ) or 'different fields'}; numbers of different protocols are "
            f"never compared: re-run `dvc repro` under the current params"
        )


# ---------------------------------------------------------------- the real data's features


@dataclass(frozen=True)
class Reference:
    """The real data under one protocol, computed once by the `reference` stage."""

    key: dict[str, str | int | float]  # Protocol.features_key() it was computed under
    reference: Features  # the reference split, what samples are compared with
    train: Features  # the training split, what memorisation is measured against
    heldout: Features | None  # the held-out real images (None: no held-out split)
    centroids: Tensor  # (k, D) float64: C_T's cells, k-means of the training features
    train_nn: Tensor  # (M,) float64: each training row's distance to its nearest other one
    reference_dist: Tensor  # (n,) float64: reference rows' distance to their cell's training
    reference_cells: Tensor  # (n,) int64: their cells
    draws: ReferenceDraws  # the bootstrap draws of the reference rows, for every row's intervals

    @property
    def cells(self) -> memorisation.Cells:
        return memorisation.Cells(self.centroids)


def reference_file(folder: str | Path, protocol: Protocol) -> Path:
    return Path(folder) / f"{protocol.features_id}.pt"


def copying_geometry(
    train: Tensor, reference: Tensor, *, k: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """C_T's cells fitted on the training features, each training row's nearest-neighbour
    distance, and the reference rows' cells and distances to their cell's training rows."""
    train, reference = train.double(), reference.double()
    cells = memorisation.fit_cells(train, k=k, seed=seed)
    train_cells = memorisation.assign_cells(cells, train)
    reference_cells = memorisation.assign_cells(cells, reference)
    reference_dist = memorisation.cell_distances(reference, reference_cells, train, train_cells)
    return cells.centroids, memorisation.train_nn_distance(train), reference_dist, reference_cells


def compute_reference(
    prepared_dir: str | Path,
    extractor: Extractor,
    protocol: Protocol,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Reference:
    """Extract the features of the reference, training and held-out splits, and fit C_T's
    cells. Reads no split the protocol does not name (tuning on `val` never reads `test`)."""
    meta = read_meta(prepared_dir)
    kw = {"batch_size": batch_size, "device": device}

    def features(split: str) -> Features:
        return extract_features(
            load_split(prepared_dir, split, meta).x, extractor, name=split, **kw
        )

    reference, train = features(protocol.reference_split), features("train")
    heldout = features(protocol.heldout_split) if protocol.has_heldout else None
    centroids, train_nn, reference_dist, reference_cells = copying_geometry(
        train.features, reference.features, k=protocol.copying_cells, seed=protocol.seed
    )
    return Reference(
        key=protocol.features_key(),
        reference=reference,
        train=train,
        heldout=heldout,
        centroids=centroids,
        train_nn=train_nn,
        reference_dist=reference_dist,
        reference_cells=reference_cells,
        draws=protocol_draws(reference, protocol),
    )


def save_reference(reference: Reference, folder: str | Path, protocol: Protocol) -> Path:
    """Write `folder`/<features id>.pt (atomically), the folder's only file: DVC's cache, not
    the folder, keeps the features of other protocols."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = reference_file(folder, protocol)
    blob = {
        "key": reference.key,
        "reference": reference.reference.as_dict(),
        "train": reference.train.as_dict(),
        "heldout": None if reference.heldout is None else reference.heldout.as_dict(),
        "centroids": reference.centroids,
        "train_nn": reference.train_nn,
        "reference_dist": reference.reference_dist,
        "reference_cells": reference.reference_cells,
        "draws": reference.draws.as_dict(),
    }
    save_torch_atomic(blob, path)
    for other in folder.glob("*.pt"):
        if other != path:
            other.unlink()
    return path


def load_reference(folder: str | Path, protocol: Protocol) -> Reference:
    """The cached features of `protocol`, or one clear error saying how to compute them."""
    path = reference_file(folder, protocol)
    if not path.is_file():
        held = sorted(p.stem for p in Path(folder).glob("*.pt"))
        what = f"it holds {', '.join(held)}" if held else "none are there"
        raise DataError(
            f"no cached real-data features for protocol {protocol.id} (file {path}; {what}); "
            f"run `dvc repro reference` (or `genlab reference`) with the same params first"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != protocol.features_key():
            raise DataError(
                f"{path} was computed under another protocol; run `dvc repro reference`"
            )
        heldout = blob["heldout"]
        reference = Features(**blob["reference"])
        draws = ReferenceDraws(**blob["draws"])
        draws.check(len(reference), protocol.bootstrap)
        return Reference(
            key=blob["key"],
            reference=reference,
            train=Features(**blob["train"]),
            heldout=None if heldout is None else Features(**heldout),
            centroids=blob["centroids"],
            train_nn=blob["train_nn"],
            reference_dist=blob["reference_dist"],
            reference_cells=blob["reference_cells"],
            draws=draws,
        )
    except DataError:
        raise
    except Exception as exc:  # a torn or foreign file: never half-trust it
        raise DataError(
            f"{path} is not a genlab reference file ({type(exc).__name__}); "
            f"run `dvc repro reference` to rebuild it"
        ) from None
