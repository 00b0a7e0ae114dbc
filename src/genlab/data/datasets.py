"""Datasets genlab can prepare, as integer images with `levels` values per channel.

Each loader returns the three splits in memory; `prepare.py` writes them to disk. Images are
uint8 tensors (N, C, H, W) holding levels 0..L-1; labels are int64 (N,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8, values in 0..levels-1
    y: torch.Tensor  # (N,) int64 class index

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]:
            raise ValueError(f"labels must be int64 (N,), got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class RawDataset:
    splits: dict[str, Split]  # "train", "val", "test"
    levels: int
    class_names: list[str]


def load_digits() -> RawDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 17 grey levels, 10 classes).

    Split as the reference code of Tomczak's *Deep Generative Modeling* does (first 1000 train,
    next 350 validation, last 447 test), so likelihoods compare with its published numbers.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    bounds = {"train": (0, 1000), "val": (1000, 1350), "test": (1350, 1797)}
    splits = {name: Split(x[a:b].clone(), y[a:b].clone()) for name, (a, b) in bounds.items()}
    return RawDataset(splits=splits, levels=17, class_names=[str(d) for d in range(10)])


DATASETS: dict[str, Callable[[], RawDataset]] = {
    "digits": load_digits,
}
