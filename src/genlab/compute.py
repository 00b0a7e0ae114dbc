"""What a family costs: training FLOPs and steps, the budget a training stops at, sampling FLOPs.

FLOPs are counted by torch's own counter (`torch.utils.flop_counter.FlopCounterMode`): the
matrix multiplications and convolutions of the forward and backward passes, 2 FLOPs per
multiply-add, as model-FLOPs are usually stated (elementwise work is not counted). A training
step is one batch: the forward pass, the backward pass and the optimiser step (a GAN's batch holds
its critic and generator steps; an EBM's its Langevin chain), on every process of a DDP fit.

Counting every step under the counter costs Python dispatch on every operation, so each batch
*size* is counted once, on the first batch of that size, and every later batch of that size is
charged the same: the families' work per batch does not depend on the data (fixed-length
Langevin chains and samplers, no data-dependent control flow).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from genlab.evaluation.vocabulary import TRAIN_FLOPS, TRAIN_STEPS


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker, which attributes FLOPs to modules through
    autograd hooks that make `torch.autograd.grad` with respect to a leaf tensor fail ("A leaf
    node was passed to _will_engine_execute_node", pytorch/pytorch#131753, open): the EBM's
    Langevin chain in every training step does exactly that. genlab needs the total only, which
    the counter keeps under "Global". Not a speed gain: without it the EBM cannot be counted
    (tests/test_compute.py counts every family through this)."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, totals only (see `_GlobalOnly`)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def batch_size_of(batch: Any) -> int:
    """The number of images in a training batch ((x, y) or x)."""
    x = batch[0] if isinstance(batch, list | tuple) else batch
    return int(x.shape[0])


class ComputeBudget(Callback):
    """Counts the training's FLOPs and steps and stops it at its budget.

    `max_steps` (optimiser steps, a GAN's batch counting once) and `max_flops` (training FLOPs of
    all processes together) are upper bounds next to the Trainer's `max_epochs`; None: no bound.
    The fit stops after the step that reaches a bound (so within one step of it): validation
    and the epoch's checkpoints still run for the part-epoch, as for early stopping. The counts
    live in the checkpoint, so a resumed fit goes on counting where it stopped.

    With `monitor` (a validation metric, e.g. `val/nll_nats`), every epoch's end adds a point
    (steps, FLOPs, the epoch's validation value) to `curve`: quality against training compute,
    from the validation the training runs anyway.
    """

    def __init__(
        self,
        *,
        max_steps: int | None = None,
        max_flops: float | None = None,
        monitor: str | None = None,
    ) -> None:
        self.max_steps = max_steps
        self.max_flops = max_flops
        self.monitor = monitor
        self.steps = 0
        self.flops = 0.0  # all processes together
        self.per_batch: dict[int, float] = {}  # batch size -> FLOPs of one process's step
        self.curve: list[dict[str, float]] = []  # {steps, flops, <monitor>} per validation
        self._counter: FlopCounterMode | None = None

    @property
    def reached(self) -> bool:
        """True once a budget is used up."""
        return (self.max_steps is not None and self.steps >= self.max_steps) or (
            self.max_flops is not None and self.flops >= self.max_flops
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reached:  # resumed after the budget was used up: not one step more
            trainer.should_stop = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_size_of(batch) not in self.per_batch:
            self._counter = flop_counter()
            self._counter.__enter__()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        size = batch_size_of(batch)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.per_batch[size] = float(self._counter.get_total_flops())
            self._counter = None
        self.steps += 1
        self.flops += self.per_batch[size] * trainer.world_size
        if self.reached:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once an epoch (also one cut short by the budget), after its validation, at the step
        # its validation numbers go in at: the MLflow curves then give quality against compute.
        # (Read here, not in on_validation_end: there, reading callback_metrics refreshes them
        # from the validation results, over what other callbacks may have set.)
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        point = {"steps": float(self.steps), "flops": self.flops}
        if value is not None and (not self.curve or self.curve[-1]["steps"] != self.steps):
            self.curve.append(point | {self.monitor: float(value)})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics(), step=trainer.global_step)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._counter is not None:  # a step that failed inside the counted window
            self._counter.__exit__(None, None, None)
            self._counter = None

    def metrics(self) -> dict[str, float]:
        return {TRAIN_FLOPS: self.flops, TRAIN_STEPS: float(self.steps)}

    def state_dict(self) -> dict[str, Any]:
        # Plain values only: checkpoints load with weights_only=True.
        return {
            "steps": self.steps,
            "flops": self.flops,
            "per_batch": dict(self.per_batch),
            "curve": [dict(point) for point in self.curve],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.flops = float(state_dict["flops"])
        self.per_batch = {int(k): float(v) for k, v in state_dict["per_batch"].items()}
        self.curve = [
            {str(k): float(v) for k, v in point.items()} for point in state_dict.get("curve", [])
        ]


@torch.no_grad()
def count_sample_flops(model: Any, n: int, *, seed: int = 0) -> float:
    """FLOPs of one `model.sample(n)` call."""
    y = torch.arange(n) % model.num_classes if model.conditional else None
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    with flop_counter() as counter:
        model.sample(n, y, generator=generator)
    return float(counter.get_total_flops())


def sampling_flops(model: Any, batch_size: int) -> float:
    """FLOPs per image of drawing images `batch_size` at a time, from two small counts.

    A `sample` call costs a fixed part per call (a flow inverts its 1x1 convolutions' weights
    once per call) plus a part per image, so its FLOPs are affine in the batch: counted at 1 and
    2 images, the per-image part is the difference and the fixed part what is left of the first;
    at `batch_size` an image costs the per-image part and its share of the fixed one. (Counting
    a whole batch would cost a PixelCNN on MNIST 784 passes of it under the counter.)"""
    one, two = count_sample_flops(model, 1), count_sample_flops(model, 2)
    per_image = two - one
    return per_image + (one - per_image) / batch_size
