"""Sample metrics through torch-fidelity, from features extracted once per image set.

torch-fidelity (the reference implementation of FID, KID, precision/recall and the Inception
Score) looks feature extractors up by name in its registry. Two feature spaces are offered
(`evaluate.feature_extractor`): the genlab evaluator, registered here as "genlab-evaluator"
(its penultimate activations for FID/KID/precision-recall, its logits for the Inception-style
score), and torch-fidelity's own Inception-v3, "inception-v3-compat" (see `inception.py`).
Nothing is registered at import time.

Features are extracted with torch-fidelity's own functions, the ones `calculate_metrics` runs,
and turned into metrics by its own features -> metric functions, so the numbers are those of one
`calculate_metrics` call; but the features of a set are computed once and reused: the real
data's once per protocol by the `reference` stage (cached as a DVC output, keyed by the
protocol's hash), the generated samples' once for every metric of the evaluate stage.

The `Protocol` is everything a number depends on besides the samples; it is written next to
every FID so that numbers measured differently are never compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from genlab.config import EvaluateParams, config_hash
from genlab.data.prepared import Meta, load_split, read_meta
from genlab.errors import DataError, GenlabError
from genlab.evaluation import inception
from genlab.evaluation.evaluator import load_classifier
from genlab.io import save_torch_atomic

EXTRACTOR_NAME = "genlab-evaluator"

_DEFAULT_LAYER = {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"}


class EvaluatorFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """The genlab evaluator as a torch-fidelity feature extractor.

    torch-fidelity builds it as `cls(name, features_list, **all_calculate_metrics_kwargs)`, moves
    it to the GPU when `cuda=True`, and feeds it the batches of the input Dataset unchanged:
    here uint8 (B, C, H, W) integer levels, which the classifier scales itself.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,  # the rest of calculate_metrics' arguments, unused here
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor {name!r} needs feature_extractor_weights_path "
                "(the evaluator file written by `dvc repro evaluator`)"
            )
        self.classifier = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return _DEFAULT_LAYER[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features, logits = self.classifier(x)  # (B, feature_dim), (B, num_classes)
        out = {"features": features, "logits": logits}
        # In the order torch-fidelity asked for (it builds the list from a set: any order).
        return tuple(out[name] for name in self.features_list)


def register_extractor() -> None:
    """Register the extractor with torch-fidelity; calling it again does nothing."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, EvaluatorFeatureExtractor)


@dataclass(frozen=True)
class SampleMetrics:
    fid: float
    kid_mean: float  # unbiased MMD^2 estimate: may be slightly negative for close sets
    kid_std: float
    precision: float  # fraction of generated images inside the real manifold
    recall: float  # fraction of real images inside the generated manifold
    f_score: float
    isc_mean: float  # Inception(-style) score, from the extractor's logits
    isc_std: float

    def as_dict(self, prefix: str = "eval") -> dict[str, float]:
        return {f"{prefix}/{key}": float(value) for key, value in asdict(self).items()}


class _Images(Dataset):
    """A tensor of images as the Dataset torch-fidelity wants: item i is image i (a tensor)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


def _check_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected uint8 images (N, C, H, W), got {what}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 images, got {x.shape[0]}")


# ---------------------------------------------------------------- feature extractors


@dataclass(frozen=True)
class Extractor:
    """A torch-fidelity feature extractor as the protocol uses it: which one, with which
    (verified) weights, which of its layers, and the images it accepts."""

    name: str  # torch-fidelity's registry name
    weights: Path  # its weights file, handed to torch-fidelity (which then never downloads)
    weights_sha256: str
    feature_layer: str  # FID, KID, precision/recall and per-class FID
    isc_layer: str  # the Inception(-style) score
    levels: int  # the images' integer levels 0..levels-1
    channels: int
    input: str  # how images are turned into what it takes (recorded in the protocol)
    resize: str  # what it resizes them to (recorded in the protocol)

    @property
    def logits_are_classes(self) -> bool:
        """Whether `isc_layer` holds the dataset's class logits (conditional accuracy)."""
        return self.name == EXTRACTOR_NAME

    def prepare(self, name: str, x: Tensor) -> Tensor:
        """Check images x (uint8 (N, C, H, W) levels) and convert them to the extractor's input."""
        _check_images(name, x)
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name}: images have {x.shape[1]} channels but the {self.name} extractor was set "
                f"up for {self.channels}"
            )
        top = int(x.max())
        if top >= self.levels:
            raise ValueError(f"{name}: pixel value {top} outside the levels 0..{self.levels - 1}")
        if self.name == inception.EXTRACTOR_NAME:
            return inception.to_inception_input(x, self.levels)
        return x


def make_extractor(
    params: EvaluateParams, evaluator_path: str | Path, *, levels: int, channels: int
) -> Extractor:
    """The extractor `params.feature_extractor` names, for images of `levels` levels and
    `channels` channels; its weights checked first (missing file, wrong sha256, an evaluator
    trained on other images: one clear error)."""
    if params.feature_extractor == "inception":
        name = inception.EXTRACTOR_NAME
        inception.check_channels(channels)
        weights = inception.resolve_weights(params.inception_weights, params.inception_sha256)
        sha256 = params.inception_sha256  # verified by resolve_weights
        described, resize = inception.describe_input(levels, channels), inception.RESIZE
    else:
        name, weights = EXTRACTOR_NAME, Path(evaluator_path)
        config = load_classifier(weights).config  # a missing or foreign file fails here
        if channels != config["in_channels"] or levels != config["levels"]:
            raise ValueError(
                f"the evaluator {weights} was trained on {config['in_channels']}-channel images "
                f"of {config['levels']} levels, not {channels}-channel images of {levels}; "
                f"re-run `dvc repro evaluator`"
            )
        sha256 = inception.file_sha256(weights)
        described, resize = f"levels 0..{levels - 1} as is", "none"
    register_extractor()
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    return Extractor(
        name=name,
        weights=weights,
        weights_sha256=sha256,
        feature_layer=cls.get_default_feature_layer_for_metric("fid"),
        isc_layer=cls.get_default_feature_layer_for_metric("isc"),
        levels=levels,
        channels=channels,
        input=described,
        resize=resize,
    )


@dataclass(frozen=True)
class Features:
    """One extractor's view of a set of images."""

    features: Tensor  # (N, D) float32: the feature layer (FID, KID, precision/recall)
    logits: Tensor  # (N, K) float32: the score layer (Inception(-style) score)

    def __len__(self) -> int:
        return self.features.shape[0]

    def as_dict(self) -> dict[str, Tensor]:
        return {"features": self.features, "logits": self.logits}


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[bool]:
    """torch-fidelity moves work with a bare `.cuda()`: pick the GPU by making it current."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield True
    else:
        yield False


def extract_features(
    x: Tensor,
    extractor: Extractor,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    name: str = "images",
) -> Features:
    """The extractor's features of images x (uint8 (N, C, H, W) levels), computed by the
    torch-fidelity functions `calculate_metrics` runs (so the same numbers), float32 on the CPU."""
    x = extractor.prepare(name, x)
    register_extractor()
    layers = [extractor.feature_layer, extractor.isc_layer]
    with _on(torch.device(device)) as cuda:
        module = create_feature_extractor(
            extractor.name,
            layers,
            cuda=cuda,
            feature_extractor_weights_path=str(extractor.weights),
            verbose=False,
        )
        # The images are already in memory: no DataLoader worker processes (save_cpu_ram).
        out = get_featuresdict_from_dataset(
            _Images(x.cpu()), module, batch_size, cuda, save_cpu_ram=True, verbose=False
        )
    return Features(features=out[extractor.feature_layer], logits=out[extractor.isc_layer])


# ---------------------------------------------------------------- features -> metrics


def metrics_from_features(
    generated: Features, reference: Features, protocol: EvaluateParams
) -> SampleMetrics:
    """FID, KID, precision/recall and the Inception(-style) score of `generated` against
    `reference`, by torch-fidelity's features -> metric functions with the arguments
    `calculate_metrics` would pass them. KID subsets and ISC splits shrink to the set sizes when
    those are smaller than the protocol's."""
    n, m = len(generated), len(reference)
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 images on each side, got {n} and {m}")
    if generated.features.shape[1] != reference.features.shape[1]:
        raise ValueError(
            f"generated features are {generated.features.shape[1]}-d but reference features are "
            f"{reference.features.shape[1]}-d: they come from different extractors"
        )
    kwargs = {
        "kid_subset_size": min(protocol.kid_subset_size, n, m),
        "kid_subsets": protocol.kid_subsets,
        "prc_neighborhood": protocol.prc_neighborhood,
        "isc_splits": min(protocol.isc_splits, n),
        "rng_seed": protocol.seed,
        # Precision/recall in row blocks: the same result with less memory.
        "save_cpu_ram": True,
        "verbose": False,
    }
    one, two = generated.as_dict(), reference.as_dict()
    isc = isc_featuresdict_to_metric(one, "logits", **kwargs)
    stats = [fid_features_to_statistics(d["features"]) for d in (one, two)]
    fid = fid_statistics_to_metric(*stats, verbose=False)
    kid = kid_featuresdict_to_metric(one, two, "features", **kwargs)
    prc = prc_featuresdict_to_metric(one, two, "features", **kwargs)
    return SampleMetrics(
        fid=fid[torch_fidelity.KEY_METRIC_FID],
        kid_mean=kid[torch_fidelity.KEY_METRIC_KID_MEAN],
        kid_std=kid[torch_fidelity.KEY_METRIC_KID_STD],
        precision=prc[torch_fidelity.KEY_METRIC_PRECISION],
        recall=prc[torch_fidelity.KEY_METRIC_RECALL],
        f_score=prc[torch_fidelity.KEY_METRIC_F_SCORE],
        isc_mean=isc[torch_fidelity.KEY_METRIC_ISC_MEAN],
        isc_std=isc[torch_fidelity.KEY_METRIC_ISC_STD],
    )


def sample_metrics(
    generated: Tensor,
    reference: Tensor,
    evaluator_path: str | Path,
    *,
    protocol: EvaluateParams,
    device: torch.device | str = "cpu",
) -> SampleMetrics:
    """FID, KID, precision/recall and Inception(-style) score of `generated` against `reference`
    (uint8 (N, C, H, W) integer levels) in the evaluator's feature space, each set's features
    extracted once. The pipeline uses the cached reference instead (`load_reference`)."""
    _check_images("generated", generated)
    _check_images("reference", reference)
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"generated images are {tuple(generated.shape[1:])} but reference images are "
            f"{tuple(reference.shape[1:])}; both sets must have the same (C, H, W)"
        )
    config = load_classifier(evaluator_path).config
    extractor = make_extractor(
        protocol.model_copy(update={"feature_extractor": "evaluator"}),
        evaluator_path,
        levels=config["levels"],
        channels=config["in_channels"],
    )
    kw = {"batch_size": protocol.batch_size, "device": device}
    return metrics_from_features(
        extract_features(generated, extractor, name="generated", **kw),
        extract_features(reference, extractor, name="reference", **kw),
        protocol,
    )


# ---------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Protocol:
    """Everything a sample metric depends on besides the samples. Written next to every FID
    (metrics/<family>.json, the family's MLflow run, reports/real_data.json) with its hash `id`,
    so that the report refuses to put numbers measured differently side by side."""

    extractor: str  # torch-fidelity's name of the feature extractor
    weights_sha256: str  # of its weights file (the evaluator file, or the Inception weights)
    feature_layer: str  # FID, KID, precision/recall
    isc_layer: str  # Inception(-style) score
    input: str  # how images are given to it
    resize: str  # how it resizes them
    data_sha256: str  # the prepared dataset (meta.json)
    reference_split: str  # what the samples are compared with
    floor_split: str  # the real-data floor's stand-in for samples (its first num_samples images)
    num_samples: int
    kid_subset_size: int  # at most; smaller when a set is smaller
    kid_subsets: int
    prc_neighborhood: int
    isc_splits: int  # at most; fewer when there are fewer samples
    seed: int  # KID subsets, IS shuffling

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
        "floor_split",
        "num_samples",
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
            reference_split="test",
            floor_split="train",
            num_samples=params.num_samples,
            kid_subset_size=params.kid_subset_size,
            kid_subsets=params.kid_subsets,
            prc_neighborhood=params.prc_neighborhood,
            isc_splits=params.isc_splits,
            seed=params.seed,
        )

    def _fields(self) -> dict[str, str | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def id(self) -> str:
        """16 hex digits of the sha256 of every field."""
        return config_hash(self._fields())

    def features_key(self) -> dict[str, str | int]:
        return {key: getattr(self, key) for key in self.FEATURE_KEYS}

    @property
    def features_id(self) -> str:
        """The hash the real-data features are cached under."""
        return config_hash(self.features_key())

    def as_dict(self) -> dict[str, str | int]:
        """What goes next to the metrics: the fields and the `id`. Strings and integers only:
        `dvc metrics show/diff` list them (strings without a numeric change) and MLflow takes
        them as tags."""
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
    "metrics/gan.json") to the protocol dict found there (None where there is none)."""
    want = expected.as_dict()
    for source, found in recorded.items():
        if found == want:
            continue
        if not isinstance(found, dict):
            raise GenlabError(
                f"{source} records no evaluation protocol (written before protocols were "
                f"recorded?); re-run `dvc repro` so every family is evaluated under protocol "
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
            f"never compared: re-run `dvc repro` (evaluate@<family>) under the current params"
        )


# ---------------------------------------------------------------- the real data's features


@dataclass(frozen=True)
class Reference:
    """The real data's features under one protocol, computed once by the `reference` stage."""

    key: dict[str, str | int]  # Protocol.features_key() of the protocol they were computed under
    test: Features  # the reference split, what samples are compared with
    floor: Features  # the first num_samples images of the floor split (the real-data floor)


def reference_file(folder: str | Path, protocol: Protocol) -> Path:
    return Path(folder) / f"{protocol.features_id}.pt"


def compute_reference(
    prepared_dir: str | Path,
    extractor: Extractor,
    protocol: Protocol,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> Reference:
    """Extract the features of the reference split and of the floor's images."""
    meta = read_meta(prepared_dir)
    test = load_split(prepared_dir, protocol.reference_split, meta).x
    floor = load_split(prepared_dir, protocol.floor_split, meta).x[: protocol.num_samples]
    kw = {"batch_size": batch_size, "device": device}
    return Reference(
        key=protocol.features_key(),
        test=extract_features(test, extractor, name=protocol.reference_split, **kw),
        floor=extract_features(floor, extractor, name=protocol.floor_split, **kw),
    )


def save_reference(reference: Reference, folder: str | Path, protocol: Protocol) -> Path:
    """Write `folder`/<features id>.pt (atomically), the folder's only file: DVC's cache, not
    the folder, keeps the features of other protocols."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = reference_file(folder, protocol)
    blob = {
        "key": reference.key,
        "test": reference.test.as_dict(),
        "floor": reference.floor.as_dict(),
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
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("key") != protocol.features_key():
        raise DataError(f"{path} was computed under another protocol; run `dvc repro reference`")
    return Reference(
        key=blob["key"],
        test=Features(**blob["test"]),
        floor=Features(**blob["floor"]),
    )


def floor_metrics(reference: Reference, protocol: EvaluateParams) -> SampleMetrics:
    """The real-data floor: the floor split's images standing in for samples."""
    return metrics_from_features(reference.floor, reference.test, protocol)


# ---------------------------------------------------------------- the evaluator as a classifier


@torch.no_grad()
def evaluator_outputs(
    evaluator_path: str | Path,
    x: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The evaluator's features (N, feature_dim) and logits (N, num_classes) of images x
    (uint8 (N, C, H, W)), float64 on the CPU."""
    _check_images("x", x)
    classifier = load_classifier(evaluator_path, map_location=device)
    features, logits = [], []
    for xb in x.split(batch_size):
        f, lg = classifier(xb.to(device))
        features.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(features), torch.cat(logits)


def classifier_accuracy(
    evaluator_path: str | Path,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of images x (uint8 (N, C, H, W)) that the evaluator classifies as y (int64 (N,)).

    For class-conditional samples this is the conditional accuracy (`eval/cond_acc`).
    """
    _check_images("x", x)
    if y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(
            f"y: expected int64 labels ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
        )
    _, logits = evaluator_outputs(evaluator_path, x, batch_size=batch_size, device=device)
    return float((logits.argmax(dim=1) == y.cpu()).double().mean())


def class_fid(
    generated: Tensor, generated_y: Tensor, reference: Tensor, reference_y: Tensor, classes: int
) -> dict[int, float]:
    """FID between the generated and the reference features of each class (torch-fidelity's
    statistics and Frechet distance), {class: fid}; a class with fewer than two images on either
    side is left out. Features (N, D) float64; labels int64 (N,).

    Per-class sets are small (here ~100 generated against ~45 test images of a class), and FID is
    biased upwards at small N: compare per-class FIDs across families, not with the overall FID.
    """
    out = {}
    for k in range(classes):
        a, b = generated[generated_y == k], reference[reference_y == k]
        if len(a) < 2 or len(b) < 2:
            continue
        stats = [fid_features_to_statistics(f.cpu()) for f in (a, b)]
        out[k] = float(
            fid_statistics_to_metric(*stats, verbose=False)[torch_fidelity.KEY_METRIC_FID]
        )
    return out
