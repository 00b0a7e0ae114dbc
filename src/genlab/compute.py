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

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from genlab.errors import DataError
from genlab.evaluation.vocabulary import TRAIN_FLOPS, TRAIN_STEPS
from genlab.io import save_torch_atomic


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


def class_cycle(model: Any, n: int) -> torch.Tensor | None:
    """Labels for n samples of a conditional model: the classes in turn (a grid num_classes
    wide then has a row per class); None for an unconditional one."""
    return torch.arange(n) % model.num_classes if model.conditional else None


@torch.no_grad()
def count_sample_flops(model: Any, n: int, *, seed: int = 0) -> float:
    """FLOPs of one `model.sample(n)` call."""
    y = class_cycle(model, n)
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


# ---------------------------------------------------------------- sample quality against compute

# The shares of the training at which CurveSamples draws a set (and once more where it ends): a
# doubling grid, so that a log-FLOPs axis gets evenly spaced points, and few of them (each costs
# `trainer.curve_samples` samples: a PixelCNN at 28 px draws about 45 images/s on 2 cores).
CURVE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
MAX_CURVE_SETS = 64  # what a curve-samples file may hold: more than any training draws
MAX_CURVE_SAMPLES = 4096  # images per set (trainer.curve_samples' bound)


@torch.no_grad()
def draw(model: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples in eval mode from a seeded generator (the labels cycle through the classes for
    a conditional model), the model put back into the mode it was in; uint8 levels on the CPU
    and the labels."""
    y = class_cycle(model, n)
    was_training = model.training
    model.eval()
    try:
        x = model.sample(n, y, generator=torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    return x.cpu(), y


class CurveSamples(Callback):
    """Draws `n` images, with the same seed each time, after the optimiser step that takes the
    training past each share of `CURVE_FRACTIONS` and where it ends, each with the steps and
    FLOPs spent so far (from `budget`): the evaluate stage scores each set by a cheap FID
    against the validation split, sample quality along the compute curve for every family,
    those without a likelihood too.

    A share is of the training's batches (`max_epochs` of them), or of the step or FLOP budget
    where that ends the training sooner: a few long epochs (a 28 px profile trains one to four)
    still get every share. Drawn on rank 0 from the training weights of that moment (a family's
    `sample` uses its EMA weights where it keeps them); the sets go into the checkpoints, so a
    resumed fit keeps those drawn before its checkpoint.
    """

    def __init__(self, n: int, seed: int, budget: ComputeBudget, max_epochs: int) -> None:
        self.n = n
        self.seed = seed
        self.budget = budget
        self.max_epochs = max_epochs
        self.sets: list[dict[str, Any]] = []  # {"steps", "flops", "images", "labels"}
        self.passed = 0  # how many of CURVE_FRACTIONS have been drawn at

    def fraction(self, batches_per_epoch: float) -> float:
        """The share of the training done, by the first of its bounds to end it."""
        budget = self.budget
        shares = [budget.steps / (batches_per_epoch * self.max_epochs)]
        if budget.max_steps is not None:
            shares.append(budget.steps / budget.max_steps)
        if budget.max_flops is not None:
            shares.append(budget.flops / budget.max_flops)
        return max(shares)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # After ComputeBudget's hook (it comes first in the callbacks): this step is counted.
        share = self.fraction(trainer.num_training_batches)
        crossed = sum(f <= share for f in CURVE_FRACTIONS)
        if crossed > self.passed:
            self.passed = crossed
            self._draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stopped early (or resumed past its end): the last point is where the training ended.
        self._draw(trainer, pl_module)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.n == 0 or (self.sets and self.sets[-1]["steps"] == self.budget.steps):
            return
        if trainer.is_global_zero:
            images, labels = draw(pl_module, self.n, self.seed)
            point = {"steps": self.budget.steps, "flops": self.budget.flops}
            self.sets.append(point | {"images": images, "labels": labels})

    def state_dict(self) -> dict[str, Any]:
        # Tensors and plain values only: checkpoints load with weights_only=True.
        return {"sets": [dict(s) for s in self.sets], "passed": self.passed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sets = [dict(s) for s in state_dict["sets"]]
        self.passed = int(state_dict["passed"])

    def save(self, path: str | Path) -> None:
        """The sets as one file (`load_curve_sets` reads it back)."""
        save_torch_atomic({"sets": self.sets}, path)


@dataclass(frozen=True)
class CurveSet:
    steps: int
    flops: float
    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor | None  # int64 (n,), conditional models


def load_curve_sets(path: str | Path, shape: Sequence[int], levels: int) -> list[CurveSet]:
    """The sets of a curve-samples file, checked against the data's image shape and levels: a
    file from outside may hold anything, so its size is bounded before it is read and every
    set is checked before it is used. [] where there is no file (a model trained before genlab
    drew them, or with `trainer.curve_samples: 0`)."""
    path = Path(path)
    if not path.is_file():
        return []
    pixels = math.prod(shape)
    most = MAX_CURVE_SETS * MAX_CURVE_SAMPLES * (pixels + 8) + 2**20  # images, labels, framing
    if path.stat().st_size > most:
        raise DataError(f"{path}: {path.stat().st_size} bytes, more than {most}; re-run training")
    try:
        sets = torch.load(path, map_location="cpu", weights_only=True)["sets"]
        out = [
            CurveSet(int(s["steps"]), float(s["flops"]), s["images"], s.get("labels")) for s in sets
        ]
    except (
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
        RuntimeError,
        pickle.UnpicklingError,
    ) as e:
        raise DataError(f"{path}: not a curve-samples file ({e}); re-run training") from None
    for s in out:
        x, y = s.images, s.labels
        if not (
            isinstance(x, torch.Tensor)
            and x.dtype == torch.uint8
            and x.ndim == 4
            and tuple(x.shape[1:]) == tuple(shape)
            and 2 <= len(x) <= MAX_CURVE_SAMPLES
            and int(x.max()) < levels
            and (y is None or (isinstance(y, torch.Tensor) and y.shape == (len(x),)))
        ):
            raise DataError(
                f"{path}: a set that is not {tuple(shape)} images of {levels} levels; "
                "re-run training"
            )
    if len(out) > MAX_CURVE_SETS:
        raise DataError(f"{path}: {len(out)} sets, more than {MAX_CURVE_SETS}; re-run training")
    return out
