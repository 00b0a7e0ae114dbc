"""The prepared-data format every stage after `prepare` reads: split files plus `meta.json`.

    data/prepared/
      train.pt  val.pt  test.pt   {"x": uint8 (N, C, H, W), "y": int64 (N,)}
      meta.json                   dataset, levels, shape, classes, n and sha256 of each split

The sha256 is of the tensors' contents (shape, dtype and bytes), not of the file, so it does not
depend on how torch serialises.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from genlab.data.datasets import Split, load_dataset
from genlab.errors import DataError
from genlab.io import atomic_folder, fsync_file, write_text_atomic

if TYPE_CHECKING:
    from genlab.config import DatasetParams

SPLITS = ("train", "val", "test")


def split_sha256(split: Split) -> str:
    h = hashlib.sha256()
    for t in (split.x, split.y):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Meta:
    dataset: str
    levels: int
    shape: tuple[int, int, int]  # (C, H, W)
    class_names: list[str]
    splits: dict[str, dict]  # name -> {"n": int, "sha256": str}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dims(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def data_sha256(self) -> str:
        """One hash for the whole prepared dataset (what MLflow runs are tagged with)."""
        joined = "".join(self.splits[s]["sha256"] for s in SPLITS)
        return hashlib.sha256(joined.encode()).hexdigest()

    def profile(self) -> dict:
        """What an MLflow dataset input shows of the data: split sizes, shape, levels, classes."""
        return {
            "num_rows": {name: split["n"] for name, split in self.splits.items()},
            "shape": list(self.shape),
            "levels": self.levels,
            "num_classes": self.num_classes,
        }

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "levels": self.levels,
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "splits": self.splits,
            "data_sha256": self.data_sha256,
        }


def prepare(
    params: DatasetParams,
    out_dir: str | Path,
    check: Callable[[dict[str, int]], None] | None = None,
) -> Meta:
    """Load the dataset `params` names and write its splits and meta.json to `out_dir`, atomically.

    The dataset is loaded (or fails: missing files, a failed download, ...) before anything is
    written. Everything is written into a sibling temporary folder first and moved into place at
    the end, so a failure leaves either the previous folder or nothing, never a half-written one.
    `check`, if given, sees the split sizes before anything is written and may raise.
    """
    dataset = params.name
    raw = load_dataset(params)
    for name, s in raw.splits.items():
        if len(s) == 0:
            raise DataError(f"{dataset}: the {name} split is empty")
    if check is not None:  # e.g. the evaluation's needs (genlab.evaluation.sizes), before writing
        check({name: len(s) for name, s in raw.splits.items()})
    shapes = {tuple(s.x.shape[1:]) for s in raw.splits.values()}
    if len(shapes) != 1:
        raise ValueError(f"{dataset}: splits have different image shapes {sorted(shapes)}")
    for name, s in raw.splits.items():
        top = int(s.x.max())
        if top >= raw.levels:
            raise ValueError(f"{dataset}/{name}: pixel value {top} outside 0..{raw.levels - 1}")
    meta = Meta(
        dataset=dataset,
        levels=raw.levels,
        shape=shapes.pop(),
        class_names=raw.class_names,
        splits={
            n: {"n": len(raw.splits[n]), "sha256": split_sha256(raw.splits[n])} for n in SPLITS
        },
    )
    with atomic_folder(out_dir) as tmp:
        for name in SPLITS:
            split = raw.splits[name]
            # To the path, not a file object: torch names the archive's root folder after it,
            # so the bytes (and DVC's hash of the folder) stay those of earlier versions.
            torch.save({"x": split.x, "y": split.y}, tmp / f"{name}.pt")
            fsync_file(tmp / f"{name}.pt")
        write_text_atomic(tmp / "meta.json", json.dumps(meta.to_json(), indent=2) + "\n")
    return meta


def read_meta(prepared_dir: str | Path) -> Meta:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro prepare` (or `genlab prepare`) first")
    raw = json.loads(path.read_text())
    return Meta(
        dataset=raw["dataset"],
        levels=raw["levels"],
        shape=tuple(raw["shape"]),
        class_names=raw["class_names"],
        splits=raw["splits"],
    )


def load_split(prepared_dir: str | Path, name: str, meta: Meta | None = None) -> Split:
    """Load one split and check it against meta.json (hash, shape, levels)."""
    meta = meta or read_meta(prepared_dir)
    blob = torch.load(Path(prepared_dir) / f"{name}.pt", weights_only=True)
    split = Split(blob["x"], blob["y"])
    if split_sha256(split) != meta.splits[name]["sha256"]:
        raise DataError(
            f"{prepared_dir}/{name}.pt does not match meta.json; re-run `dvc repro prepare`"
        )
    return split
