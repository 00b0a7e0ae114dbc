"""Feature spaces of the sample metrics, through torch-fidelity.

torch-fidelity (the reference implementation of FID, KID, precision/recall and the Inception
Score) looks feature extractors up by name in its registry. Two feature spaces are offered
(`evaluate.feature_extractor`): the genlab evaluator, registered here as "genlab-evaluator"
(its penultimate activations for FID/KID/precision-recall, its logits for the Inception-style
score), and torch-fidelity's own Inception-v3, "inception-v3-compat" (see `inception.py`).
Nothing is registered at import time.

Features are extracted with torch-fidelity's own functions, the ones `calculate_metrics` runs, so
the numbers are those of one `calculate_metrics` call; but the features of a set are computed
once and reused: the real data's once per protocol by the `reference` stage, the generated
samples' once for every metric of the evaluate stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from genlab.config import EvaluateParams
from genlab.evaluation import inception
from genlab.evaluation.evaluator import check_images, load_classifier
from genlab.progress import wants_bar

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


class _Images(Dataset):
    """A tensor of images as the Dataset torch-fidelity wants: item i is image i (a tensor)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


@dataclass(frozen=True)
class Extractor:
    """A torch-fidelity feature extractor as the protocol uses it: which one, with which
    (verified) weights, which of its layers, and the images it accepts."""

    name: str  # torch-fidelity's registry name
    weights: Path  # its weights file, handed to torch-fidelity (which then never downloads)
    weights_sha256: str
    feature_layer: str  # FID, KID, precision/recall, density/coverage, memorisation
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
        check_images(name, x)
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

    def take(self, index: Tensor) -> Features:
        """The features of images `index` (int64 (n,), repeats allowed: a bootstrap draw)."""
        return Features(features=self.features[index], logits=self.logits[index])


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
        # verbose: torch-fidelity's own tqdm bar, on a terminal only (a bar in a log is noise).
        out = get_featuresdict_from_dataset(
            _Images(x.cpu()), module, batch_size, cuda, save_cpu_ram=True, verbose=wants_bar()
        )
    return Features(features=out[extractor.feature_layer], logits=out[extractor.isc_layer])
