"""Processes for the stages that are not a Lightning fit (evaluation): launched by Lightning
Fabric the same way the Trainer launches training (its own subprocesses for `devices > 1`,
or the ranks of `torchrun` / SLURM), with work split into seeded batches that do not depend on
how many processes share them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

from genlab.config import TrainerParams


@dataclass(frozen=True)
class Shard:
    """This process's share of batch-indexed work: batches rank, rank + world_size, ..."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def batches(self, n: int) -> range:
        return range(self.rank, n, self.world_size)

    def gather(self, mine: dict[int, torch.Tensor]) -> list[torch.Tensor] | None:
        """Every process's {batch index: tensor}, in batch order on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [mine[b] for b in sorted(mine)]
        everyone: list[dict[int, torch.Tensor]] | None = [{}] * self.world_size
        dist.gather_object(
            {b: t.cpu() for b, t in mine.items()}, everyone if self.is_zero else None, dst=0
        )
        if not self.is_zero:
            return None
        merged = {b: t for part in everyone for b, t in part.items()}
        return [merged[b] for b in sorted(merged)]


ONE_PROCESS = Shard()


def launch(tp: TrainerParams) -> tuple[Shard, torch.device]:
    """Start (or join) the processes `tp` asks for; this process's shard and device."""
    fabric = Fabric(
        accelerator=tp.accelerator,
        devices=tp.devices,
        num_nodes=tp.num_nodes,
        strategy="ddp" if tp.multi_process else "auto",
    )
    fabric.launch()
    return Shard(fabric.global_rank, fabric.world_size), fabric.device
