"""Sample-quality metrics through torch-fidelity, in the evaluator classifier's feature space.

The evaluator (a classifier trained on the dataset) is registered with torch-fidelity as a feature
extractor: its penultimate features feed FID, KID and precision/recall, its logits the
Inception-style score. All metrics come from one `calculate_metrics` call, so each input's
features are extracted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from genlab.config import EvaluateParams
from genlab.evaluation.evaluator import load_classifier

EXTRACTOR_NAME = "genlab-evaluator"


class EvaluatorFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity view of the evaluator: uint8 level images -> ("features", "logits")."""

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)
        path = kwargs.get("feature_extractor_weights_path")
        if path is None:
            raise ValueError(f"{EXTRACTOR_NAME} needs feature_extractor_weights_path")
        self.classifier = load_classifier(path)
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> None:
        return None

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features, logits = self.classifier(x)
        named = {"features": features, "logits": logits}
        return tuple(named[name] for name in self.features_list)


def register_extractor() -> None:
    """Make EXTRACTOR_NAME known to torch-fidelity (idempotent; nothing happens at import)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, EvaluatorFeatureExtractor)


class _Images(Dataset):
    """The image-only Dataset torch-fidelity reads: one uint8 (C, H, W) tensor per item."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


@dataclass(frozen=True)
class SampleMetrics:
    fid: float
    kid_mean: float
    kid_std: float
    precision: float
    recall: float
    f_score: float
    isc_mean: float
    isc_std: float

    def as_dict(self, prefix: str = "eval") -> dict[str, float]:
        return {f"{prefix}/{name}": float(value) for name, value in vars(self).items()}


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a uint8 tensor (N, C, H, W) of levels, got {got}")
    if x.shape[0] < 2:
        raise ValueError(f"{what} needs at least 2 images for FID/KID, got {x.shape[0]}")


def sample_metrics(
    generated: Tensor,
    reference: Tensor,
    evaluator_path: str | Path,
    *,
    protocol: EvaluateParams,
    device: torch.device | str = "cpu",
) -> SampleMetrics:
    """FID, KID, precision/recall of `generated` against `reference`; IS of `generated`."""
    _check_images(generated, "generated images")
    _check_images(reference, "reference images")
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"generated images {tuple(generated.shape[1:])} and reference images "
            f"{tuple(reference.shape[1:])} differ in shape"
        )
    register_extractor()
    n, m = generated.shape[0], reference.shape[0]
    out = torch_fidelity.calculate_metrics(
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
        cuda=torch.device(device).type == "cuda",
        cache=False,
        verbose=False,
        rng_seed=protocol.seed,
    )
    return SampleMetrics(
        fid=out[torch_fidelity.KEY_METRIC_FID],
        kid_mean=out[torch_fidelity.KEY_METRIC_KID_MEAN],
        kid_std=out[torch_fidelity.KEY_METRIC_KID_STD],
        precision=out[torch_fidelity.KEY_METRIC_PRECISION],
        recall=out[torch_fidelity.KEY_METRIC_RECALL],
        f_score=out[torch_fidelity.KEY_METRIC_F_SCORE],
        isc_mean=out[torch_fidelity.KEY_METRIC_ISC_MEAN],
        isc_std=out[torch_fidelity.KEY_METRIC_ISC_STD],
    )


@torch.no_grad()
def classifier_accuracy(
    evaluator_path: str | Path,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Fraction of images the evaluator classifies as `y` (correct count / total)."""
    classifier = load_classifier(evaluator_path, map_location=device)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        _, logits = classifier(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    return correct / x.shape[0]
