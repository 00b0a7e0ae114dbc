"""Framework overhead: genlab's Lightning training path against a minimal hand-written loop.

The same family (default params.yaml settings), the same prepared data and the same batches per
epoch, trained in one process and interleaved epoch by epoch: each Lightning training epoch runs
next to one epoch of the hand loop, the hand epoch first on even epochs and after Lightning's last
batch (before its validation) on odd ones, so the two sides of a pair see the same machine state
(a shared machine drifts by 10-30% within seconds) and neither always follows the other.
Lightning runs through `train_family`, exactly what `genlab train` runs: its callbacks (per-step
seeds, the finite-loss check, sample grids, checkpoints), MLflow logging into a temporary SQLite
store, the datamodule. The hand loop is what a notebook would do: a random permutation per epoch,
index the preloaded tensors, the family's `training_step`, backward, optimiser (and scheduler)
step, the family's per-batch hook (an EMA). It trains its own copy of the model.

Throughput is images per second over an epoch's training, from the epoch's start (drawing its
order included) to its last batch's end: validation and checkpoint writing after it are outside
it on both sides. The first epoch of every run is warm-up and not counted. The ratio is the median
over all counted epochs of each pair's Lightning/hand-loop ratio.

    uv run python benchmarks/overhead.py                      # vae, 3 runs of 6 epochs
    uv run python benchmarks/overhead.py --family diffusion   # any family with one optimiser
    uv run python benchmarks/overhead.py --quick              # 1 run of 4 epochs
    # a GPU: a CIFAR-10-sized diffusion U-Net (random 3x32x32 images in the folder format, 256
    # levels), bf16-mixed, channels_last, compiled, with its model-FLOPs utilisation
    uv run python benchmarks/overhead.py --family diffusion --accelerator gpu --cifar \
        --set models.diffusion.channels=128 --channels-last --compile

Both sides get the same settings: the precision (autocast in the loop), channels_last, compiled
networks, the data preloaded on the device. FLOPs per image are counted once by torch's
FlopCounterMode on one forward and backward pass; model-FLOPs utilisation divides the achieved
FLOP/s by the GPU's dense peak for the precision (known GPUs, or --peak-tflops).

Target (issue 8): Lightning at least 0.9x the hand-written loop's throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from common import set_key
from genlab.config import Params, parse_params
from genlab.data.datamodule import epoch_permutation
from genlab.data.prepared import load_split, prepare
from genlab.models import MODELS
from genlab.training import build_model, for_speed, train_family, without_nvml_cuda_check

TARGET = 0.9
# Dense tensor-core peak, TFLOP/s, for bf16/fp16 (SXM parts; from the vendors' datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class TrainBatchTimer(L.Callback):
    """Seconds and images of each epoch's training (the epoch's start, which draws the epoch's
    order, to its last batch's end: validation and checkpoints after it are not counted)."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, int]] = []
        self._start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._images += len(batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            synchronize(pl_module.device)
            self.epochs.append((time.perf_counter() - self._start, self._images))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(epochs: list[tuple[float, int]]) -> float:
    """Images per second over every epoch but the first."""
    kept = epochs[1:] or epochs
    return sum(n for _, n in kept) / sum(s for s, _ in kept)


def bench_params(family: str, epochs: int, store: Path, args: argparse.Namespace) -> Params:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["families"] = [family]
    raw["models"][family]["max_epochs"] = epochs
    raw["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "overhead"}
    trainer = raw["trainer"]
    trainer["accelerator"] = args.accelerator
    default = "bf16-mixed" if args.accelerator == "gpu" else "32-true"
    trainer["precision"] = args.precision or default
    if args.channels_last is not None:
        trainer["channels_last"] = args.channels_last
    trainer["compile"] = args.compile
    trainer["curve_samples"] = 0  # the training loop alone: no sample sets along it
    if args.cifar:
        folder = str(store.parent / "cifar-sized")
        raw["dataset"] = {"name": "folder", "path": folder, "image_size": 32}
    for dotted in args.set:
        set_key(raw, dotted)
    return parse_params(raw, "params.yaml (benchmark copy)")


def write_cifar_sized(folder: Path, images: int) -> None:
    """Random 32x32 RGB PNGs in 10 class folders: CIFAR-10's shape and levels (throughput does
    not depend on what the pixels show)."""
    rng = np.random.default_rng(0)
    for i in range(images):
        (folder / f"class_{i % 10}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class_{i % 10}" / f"{i:05d}.png")


def interleaved_run(params: Params, family: str, prepared: Path, work: Path) -> Interleaved:
    """One `train_family` run with a fresh hand loop interleaved epoch by epoch."""
    pairs = Interleaved(HandLoop(params, family, prepared))
    train_family(
        params,
        family,
        seed=params.seeds[0],
        prepared_dir=prepared,
        out_dir=work / "out",
        checkpoint_root=work / "checkpoints",
        callbacks=[pairs],
    )
    return pairs


class HandLoop:
    """A minimal PyTorch loop over the same model, data, optimiser and trainer settings."""

    def __init__(self, params: Params, family: str, prepared: Path) -> None:
        tp = params.trainer
        self.device = tp.eval_device
        torch.manual_seed(params.seeds[0])
        model = for_speed(build_model(params, family, prepared).to(self.device), tp)
        self.model = model.train()
        config = model.configure_optimizers()
        self.optimiser = config["optimizer"] if isinstance(config, dict) else config
        self.schedule = (
            config.get("lr_scheduler", {}).get("scheduler") if isinstance(config, dict) else None
        )
        split = load_split(prepared, "train")
        self.x, self.y = split.x.to(self.device), split.y.to(self.device)
        self.batch_size = params.family(family).batch_size
        self.seed = params.seeds[0]
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(tp.precision)
        self.autocast = (
            torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(enabled=tp.precision == "16-mixed")

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], b: int) -> None:
        with self.autocast:
            loss = self.model.training_step(batch, b)
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimiser)
        self.scaler.update()
        if self.schedule is not None:
            self.schedule.step()
        self.model.on_train_batch_end(loss, batch, b)

    def epoch(self, epoch: int) -> tuple[float, int]:
        """Train one epoch: (seconds, images)."""
        n = len(self.x)
        # A notebook's loop has no Lightning imported, nor the NVML check it sets, which costs
        # every optimiser step (`without_nvml_cuda_check`; the fit runs without it too).
        with warnings.catch_warnings(), torch.enable_grad(), without_nvml_cuda_check():
            # training_step's self.log() has no Trainer to log to here: a warning, then a no-op.
            warnings.simplefilter("ignore")
            synchronize(self.device)
            start = time.perf_counter()
            order = epoch_permutation(n, self.seed, epoch).to(self.device)
            for b, i in enumerate(range(0, n, self.batch_size)):
                self.step(self.batch(order[i : i + self.batch_size]), b)
            synchronize(self.device)
        return time.perf_counter() - start, n

    def flops_per_image(self) -> float:
        """Forward and backward FLOPs of one training step, per image (torch's counter)."""
        index = torch.arange(min(self.batch_size, len(self.x)), device=self.device)
        with warnings.catch_warnings(), FlopCounterMode(display=False) as counter:
            warnings.simplefilter("ignore")
            with self.autocast:
                loss = self.model.training_step(self.batch(index), 0)
            loss.backward()
        self.optimiser.zero_grad(set_to_none=True)
        return counter.get_total_flops() / len(index)


class Interleaved(TrainBatchTimer):
    """Times Lightning's training epochs and runs one epoch of `hand` next to each: before it on
    even epochs, after its last batch on odd ones. `pairs`: ((s, images) Lightning, hand)."""

    def __init__(self, hand: HandLoop) -> None:
        super().__init__()
        self.hand = hand
        self.pairs: list[tuple[tuple[float, int], tuple[float, int]]] = []
        self._hand_epoch: tuple[float, int] = (0.0, 0)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch % 2 == 0:
            self._hand_epoch = self.hand.epoch(trainer.current_epoch)
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx + 1 == trainer.num_training_batches:
            if trainer.current_epoch % 2 == 1:
                self._hand_epoch = self.hand.epoch(trainer.current_epoch)
            self.pairs.append((self.epochs[-1], self._hand_epoch))


def peak_flops(args: argparse.Namespace, device: torch.device, precision: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda" or precision not in ("bf16-mixed", "16-mixed", "bf16-true"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for gpu, tf in PEAK_TFLOPS.items() if gpu in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="vae", choices=sorted(MODELS))
    parser.add_argument("--runs", type=int, default=3, help="train_family runs")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (first: warm-up)")
    parser.add_argument("--quick", action="store_true", help="1 run of 4 epochs")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--precision", help="default: bf16-mixed on a GPU, 32-true on the CPU")
    # Default: params.yaml's trainer.channels_last (true), as `genlab train` runs.
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cifar", action="store_true", help="random 3x32x32 images, 256 levels")
    parser.add_argument("--images", type=int, default=10000, help="with --cifar")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the MFU")
    args = parser.parse_args(argv)
    runs, epochs = (1, 4) if args.quick else (args.runs, max(args.epochs, 2))
    with tempfile.TemporaryDirectory(prefix="genlab-overhead-") as tmp:
        work = Path(tmp)
        params = bench_params(args.family, epochs, work / "mlflow.db", args)
        if args.cifar:
            write_cifar_sized(Path(params.dataset.path), args.images)
        prepared = work / "prepared"
        meta = prepare(params.dataset, prepared)
        if not build_model(params, args.family, prepared).automatic_optimization:
            sys.exit(f"{args.family} steps its own optimisers; pick a family with one optimiser")
        loop = HandLoop(params, args.family, prepared)
        flops = loop.flops_per_image()
        tp = params.trainer
        print(
            f"{args.family} on {meta.dataset} {'x'.join(map(str, meta.shape))} "
            f"({len(loop.x)} train images, batch {loop.batch_size}), {runs} runs of "
            f"{epochs} epochs on {loop.device} ({torch.get_num_threads()} threads), "
            f"{tp.precision}, channels_last {tp.channels_last}, compile {tp.compile}; "
            f"{sum(p.numel() for p in loop.model.parameters()):,} parameters, "
            f"{flops / 1e9:.3f} GFLOP per image per training step"
        )
        header = f"{'run':>3} {'lightning img/s':>16} {'hand loop img/s':>16} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        pairs = []  # (Lightning img/s, hand loop img/s) of each counted epoch
        for r in range(runs):
            run = interleaved_run(params, args.family, prepared, work / f"run{r}")
            counted = [(nl / sl, nh / sh) for (sl, nl), (sh, nh) in run.pairs[1:]]
            pairs += counted
            print(
                f"{r:>3} {statistics.median(a for a, _ in counted):>16.0f} "
                f"{statistics.median(b for _, b in counted):>16.0f} "
                f"{statistics.median(a / b for a, b in counted):>6.3f}"
            )
        device, precision = loop.device, tp.precision
    fast = statistics.median(a for a, _ in pairs)
    slow = statistics.median(b for _, b in pairs)
    ratios = [a / b for a, b in pairs]
    ratio, mean = statistics.median(ratios), statistics.mean(ratios)
    achieved = fast * flops
    peak = peak_flops(args, device, precision)
    mfu = f", MFU {achieved / peak:.1%}" if peak else ""
    print(
        f"overhead: {args.family} Lightning path {fast:.0f} img/s, hand loop {slow:.0f} img/s "
        f"(medians); {ratio:.2f}x, the median over {len(pairs)} epochs of each epoch's ratio "
        f"(mean {mean:.2f}x; target >= {TARGET}x); {achieved / 1e12:.3f} TFLOP/s{mfu}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
