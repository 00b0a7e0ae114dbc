"""LightningDataModule over the prepared splits, held in memory as tensors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlab.data.prepared import load_split, read_meta


class PreparedDataModule(L.LightningDataModule):
    """Batches of (x uint8 (B, C, H, W), y int64 (B,)) from `data/prepared`.

    The splits are small enough to preload; the training order is shuffled by a generator seeded
    from `seed`, so runs are reproducible.
    """

    def __init__(self, prepared_dir: str | Path, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.meta = read_meta(self.prepared_dir)
        self._datasets: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for name in ("train", "val", "test"):
            if name not in self._datasets:
                split = load_split(self.prepared_dir, name, self.meta)
                self._datasets[name] = TensorDataset(split.x, split.y)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self._datasets[name], batch_size=self.batch_size, shuffle=shuffle, generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
