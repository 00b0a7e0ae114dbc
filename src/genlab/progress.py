"""Progress of long work: a bar on a terminal, one plain line at most every EVERY_S in a log.

On a terminal genlab shows stock bars: Lightning's (TQDM) for a training, tqdm's for the
evaluation's loops (`steps`). Under DVC, in CI or in a log file a bar is unreadable (carriage
returns, one redraw per step), so a plain line is written instead, at most every EVERY_S seconds:

    train vae (seed 0): epoch 3/50, batch 120/800 (15%), train/loss 1.234, 1520 img/s,
        elapsed 0:01:10, ETA 0:06:37
    evaluate diffusion (seed 0): sampling 12/40 batches (30%), elapsed 0:01:02, ETA 0:02:25

(one line each). Written here because Lightning's and tqdm's bars redraw in place and have no
periodic plain-line mode; the numbers come from the Trainer (`num_training_batches`,
`callback_metrics`) or the loop's own count.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, TextIO, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from genlab.compute import batch_size_of

EVERY_S = 30.0  # at most one line this often
T = TypeVar("T")
# What the current command is doing ("evaluate vae (seed 0)"): the start of every loop's line.
_SCOPE: ContextVar[str] = ContextVar("genlab_progress_scope", default="")


def wants_bar(stream: TextIO | None = None) -> bool:
    """True when progress is shown as a bar: the stream (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def fit_progress(what: str, *, max_steps: int | None = None) -> tuple[bool, list[Callback]]:
    """How a Lightning fit shows its progress: (`enable_progress_bar`, callbacks). On a
    terminal Lightning's own bar; elsewhere (DVC, CI, a log) a `ProgressLine` naming `what`."""
    bar = wants_bar()
    return bar, [] if bar else [ProgressLine(what, max_steps=max_steps)]


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def _timing(done: float, total: float, first: float, elapsed: float) -> str:
    """'elapsed 0:01:10, ETA 0:06:37' for `done` of `total` units, `done - first` of them in
    `elapsed` seconds (a resumed fit starts at `first`)."""
    rate = (done - first) / elapsed if elapsed > 0 else math.nan
    eta = (total - done) / rate if rate and math.isfinite(total) else math.nan
    eta = 0.0 if done >= total else eta
    return f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}"


def _share(done: float, total: float, unit: str = "") -> str:
    """'120/800 batches (15%)', or '120/? batches' when the total is unknown."""
    unit = f" {unit}" if unit else ""
    if not math.isfinite(total) or total <= 0:
        return f"{done:.0f}/?{unit}"
    return f"{done:.0f}/{total:.0f}{unit} ({100 * done / total:.0f}%)"


@contextmanager
def scope(what: str) -> Iterator[None]:
    """Start every loop's progress line inside the block with `what` (e.g. the stage's
    'evaluate vae (seed 0)'), so a log says whose sampling is at 30%."""
    token = _SCOPE.set(what)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def steps(
    iterable: Iterable[T],
    what: str,
    *,
    total: int | None = None,
    unit: str = "batches",
    quiet: bool = False,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """`iterable`, showing how far it got: tqdm's bar on a terminal; elsewhere a line at most
    every EVERY_S (the first after EVERY_S: a loop shorter than that writes nothing) and, when
    it wrote one, a closing line. `quiet` (a DDP rank other than 0) shows nothing."""
    total = len(iterable) if total is None and isinstance(iterable, Sized) else total
    label = f"{_SCOPE.get()}: {what}" if _SCOPE.get() else what
    if quiet:
        yield from iterable
        return
    stream = sys.stderr if stream is None else stream
    if wants_bar(stream):
        from tqdm.auto import tqdm  # Lightning's own bar library

        yield from tqdm(iterable, desc=label, total=total, unit=unit, leave=False, file=stream)
        return
    end = math.inf if total is None else float(total)
    start = last = time.monotonic()
    done, wrote = 0, False
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= EVERY_S:
            last, wrote = now, True
            _line(stream, label, done, end, unit, now - start)
    if wrote:  # say it finished
        _line(stream, label, done, end, unit, time.monotonic() - start)


def _line(stream: TextIO, label: str, done: int, total: float, unit: str, elapsed: float) -> None:
    timing = _timing(done, total, 0, elapsed)
    print(f"{label} {_share(done, total, unit)}, {timing}", file=stream, flush=True)


class ProgressLine(Callback):
    """One plain progress line at most every EVERY_S (and one at the end), from global rank 0."""

    def __init__(
        self, what: str, stream: TextIO | None = None, *, max_steps: int | None = None
    ) -> None:
        self.what = what
        self.stream = stream
        self.max_steps = max_steps  # a step budget ends the fit before max_epochs
        self._start = self._last = 0.0
        self._images = 0
        self._first = 0  # the batch a (resumed) fit started at
        self._batch = 0  # batches done, counted over all epochs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._images = 0
        self._first = self._batch = trainer.current_epoch * trainer.num_training_batches

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        # Batches, not global_step: a GAN's global_step counts both optimisers' steps.
        self._batch = trainer.current_epoch * trainer.num_training_batches + i + 1
        self._images += batch_size_of(batch) * trainer.world_size
        if time.monotonic() - self._last >= EVERY_S:
            self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._start
        total = trainer.max_epochs * trainer.num_training_batches  # inf when unknown
        total = total if self.max_steps is None else min(total, self.max_steps)
        # The epoch of the last batch done (at the fit's end current_epoch is already past it).
        per_epoch = trainer.num_training_batches
        epoch = max(1, math.ceil(self._batch / per_epoch)) if math.isfinite(per_epoch) else "?"
        losses = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/loss") and getattr(v, "numel", lambda: 1)() == 1
        }
        loss_text = "".join(f", {k} {v:.4g}" for k, v in sorted(losses.items()))
        speed = self._images / elapsed if elapsed > 0 else math.nan
        line = (
            f"{self.what}: epoch {epoch}/{trainer.max_epochs}, "
            f"batch {_share(self._batch, total)}{loss_text}, {speed:.0f} img/s, "
            f"{_timing(self._batch, total, self._first, elapsed)}"
        )
        print(line, file=self.stream or sys.stderr, flush=True)
