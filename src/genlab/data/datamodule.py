"""LightningDataModule over the prepared splits, held in memory as tensors.

The splits are small enough to preload (uint8 levels), on the training device itself, so a batch
is one tensor index instead of a `DataLoader` collating single samples and copying them over.
The loaders are built for exact resume and for DDP:

- the training order of epoch e is a permutation drawn from a generator seeded by (seed, e),
  so it depends on nothing that happened before epoch e (a resumed run sees the same order);
- the loader is *stateful* (`state_dict` / `load_state_dict`): Lightning stores how many batches
  of the current epoch were consumed in every checkpoint and skips them on resume, so a
  checkpoint written mid-epoch (on SIGTERM) resumes exactly where it stopped;
- under DDP each rank takes its own shard. Training pads the permutation to a multiple of the
  world size, as `DistributedSampler` does, so every rank runs the same number of steps;
  validation and test shards are disjoint and unpadded, so a synced metric counts every image once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from genlab.data.prepared import load_split, read_meta

Batch = tuple[torch.Tensor, torch.Tensor]


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that mixes `keys` (numpy's SeedSequence hash), for torch.manual_seed."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: a permutation of range(n) seeded by (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))


class TensorBatches:
    """Batches of one split for one rank; iterating it again starts the next epoch.

    `set_epoch` is called by Lightning at the start of every training epoch (it looks for it on
    `loader.sampler`, which is this object), and the iteration state is what Lightning saves in
    checkpoints and restores for a mid-epoch resume.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._consumed = 0  # batches of the current epoch already yielded
        # From a checkpoint: (epoch, batches of it already trained). Skipped only if the next
        # iteration is that epoch: a checkpoint from an epoch's end resumes with the next one.
        self._resume: tuple[int, int] | None = None

    # Lightning looks for `set_epoch` on `loader.sampler` (`_set_sampler_epoch`) and inspects
    # `batch_sampler` next to it; this object is its own sampler and batches by itself.
    batch_sampler = None

    @property
    def sampler(self) -> TensorBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's indices into the split for the current epoch, in order."""
        n = self.x.shape[0]
        if not self.shuffle:
            # Disjoint contiguous shards, no padding: every image is seen exactly once overall.
            per_rank = math.ceil(n / self.world_size)
            return torch.arange(self.rank * per_rank, min(n, (self.rank + 1) * per_rank))
        order = epoch_permutation(n, self.seed, self.epoch)
        total = math.ceil(n / self.world_size) * self.world_size
        order = torch.cat([order, order[: total - n]])  # pad as DistributedSampler does
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        return math.ceil(len(self.indices()) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        indices = self.indices()
        resume, self._resume = self._resume, None
        start = resume[1] if resume is not None and resume[0] == self.epoch else 0
        self._consumed = start
        indices = indices.to(self.x.device)
        for b in range(start, math.ceil(len(indices) / self.batch_size)):
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size]
            self._consumed = b + 1
            yield self.x[batch], self.y[batch]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["consumed"]))


class PreparedDataModule(L.LightningDataModule):
    """Batches of (x uint8 (B, C, H, W), y int64 (B,)) from `data/prepared`.

    `batch_size` is per process: under DDP the global batch is batch_size x world size.
    """

    def __init__(self, prepared_dir: str | Path, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.meta = read_meta(self.prepared_dir)
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._train: TensorBatches | None = None
        self._train_state: dict[str, Any] | None = None  # from a checkpoint, for the next loader

    def setup(self, stage: str | None = None) -> None:
        # Training and validation only: the test split is read by the final evaluation alone
        # (`test_dataloader` loads it on demand; nothing in genlab's fit asks for it).
        for name in ("train", "val"):
            self._load(name)

    def _load(self, name: str) -> None:
        if name not in self._splits:
            split = load_split(self.prepared_dir, name, self.meta)
            self._splits[name] = (split.x, split.y)

    def _shard(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _device(self) -> torch.device:
        """Where the batches are used: the trainer's device (a GPU's data is copied there once,
        not batch by batch), the CPU without a trainer."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, name: str, shuffle: bool) -> TensorBatches:
        self._load(name)
        rank, world_size = self._shard()
        device = self._device()
        x, y = self._splits[name]
        if x.device != device:
            x, y = x.to(device), y.to(device)
            self._splits[name] = (x, y)
        return TensorBatches(
            x, y, self.batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world_size
        )

    def train_dataloader(self) -> TensorBatches:
        self._train = self._loader("train", shuffle=True)
        if self._train_state is not None:
            self._train.load_state_dict(self._train_state)
            self._train_state = None
        return self._train

    # The training position is also saved as datamodule state. Lightning restores a stateful
    # loader itself only if the loader is built after the loop state is loaded; a family whose
    # `configure_optimizers` reads `trainer.estimated_stepping_batches` (a per-step schedule)
    # builds it earlier, and Lightning 2.6 then silently restarts the epoch from its first batch.
    def state_dict(self) -> dict[str, Any]:
        return {"train": self._train.state_dict()} if self._train is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_state = state.get("train")
        if self._train is not None and self._train_state is not None:
            self._train.load_state_dict(self._train_state)
            self._train_state = None

    def val_dataloader(self) -> TensorBatches:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._loader("test", shuffle=False)
