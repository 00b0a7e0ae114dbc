"""Sample metrics through torch-fidelity, in the feature space of the genlab evaluator.

torch-fidelity (the reference implementation of FID, KID, precision/recall and the Inception
Score) looks feature extractors up by name in its registry; `register_extractor()` adds ours as
"genlab-evaluator". Its "features" (the classifier's penultimate activations) serve FID, KID and
precision/recall, its "logits" the Inception-style score. Nothing is registered at import time.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.config import EvaluateParams
from genlab.evaluation.evaluator import load_classifier

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
    isc_mean: float  # Inception-style score, from the evaluator's logits
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


def sample_metrics(
    generated: Tensor,
    reference: Tensor,
    evaluator_path: str | Path,
    *,
    protocol: EvaluateParams,
    device: torch.device | str = "cpu",
) -> SampleMetrics:
    """FID, KID, precision/recall and Inception-style score of `generated` against `reference`.

    generated: uint8 (N, C, H, W), reference: uint8 (M, C, H, W), integer levels. One
    torch-fidelity call, so each set's features are extracted once and shared by all metrics.
    KID subsets and ISC splits shrink to the set sizes when those are smaller than the protocol's.
    """
    _check_images("generated", generated)
    _check_images("reference", reference)
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"generated images are {tuple(generated.shape[1:])} but reference images are "
            f"{tuple(reference.shape[1:])}; both sets must have the same (C, H, W)"
        )
    # Load once up front: a missing or foreign file fails here with genlab's message, and the
    # levels and channels are checked before any feature is extracted.
    config = load_classifier(evaluator_path).config
    if generated.shape[1] != config["in_channels"]:
        raise ValueError(
            f"images have {generated.shape[1]} channels but the evaluator {evaluator_path} "
            f"was trained on {config['in_channels']}"
        )
    top = max(int(generated.max()), int(reference.max()))
    if top >= config["levels"]:
        raise ValueError(
            f"pixel value {top} outside the evaluator's levels 0..{config['levels'] - 1}"
        )

    register_extractor()
    n, m = generated.shape[0], reference.shape[0]
    device = torch.device(device)
    cuda = device.type == "cuda"
    # torch-fidelity moves the extractor with a bare `.cuda()`: pick the GPU by making it current.
    where = torch.cuda.device(device) if cuda else contextlib.nullcontext()
    with where:
        raw = torch_fidelity.calculate_metrics(
            input1=_Images(generated.cpu()),
            input2=_Images(reference.cpu()),
            fid=True,
            kid=True,
            prc=True,
            isc=True,
            feature_extractor=EXTRACTOR_NAME,
            feature_extractor_weights_path=str(evaluator_path),
            kid_subset_size=min(protocol.kid_subset_size, n, m),
            kid_subsets=protocol.kid_subsets,
            prc_neighborhood=protocol.prc_neighborhood,
            isc_splits=min(protocol.isc_splits, n),
            batch_size=protocol.batch_size,
            cuda=cuda,
            cache=False,
            verbose=False,
            rng_seed=protocol.seed,
            # The images are already in memory: no DataLoader worker processes (torch-fidelity
            # starts up to 4 otherwise). Precision/recall is then computed in row blocks, with
            # the same result.
            save_cpu_ram=True,
        )
    return SampleMetrics(
        fid=raw[torch_fidelity.KEY_METRIC_FID],
        kid_mean=raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        kid_std=raw[torch_fidelity.KEY_METRIC_KID_STD],
        precision=raw[torch_fidelity.KEY_METRIC_PRECISION],
        recall=raw[torch_fidelity.KEY_METRIC_RECALL],
        f_score=raw[torch_fidelity.KEY_METRIC_F_SCORE],
        isc_mean=raw[torch_fidelity.KEY_METRIC_ISC_MEAN],
        isc_std=raw[torch_fidelity.KEY_METRIC_ISC_STD],
    )


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
