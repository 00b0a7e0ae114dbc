"""How cost grows with image size: per family, training and sampling images/s, training FLOPs
per image and peak memory at 8, 16, 28, 32 and 64 px, 1 and 3 channels, and the fitted exponent
of cost against pixels (seconds per image ∝ pixels^b), so that a run on other data can be
predicted from these.

Each (family, size, channels) runs in a forked child (benchmarks/families.py's `in_child`): a
folder of random images at that size goes through `prepare` (the real loader), then a short
training through `train_family` (what `genlab train` runs: 2 epochs of ~10 batches, the second
timed) and one `sample` call. The families' settings are params.yaml's, or a profile's over them.

    uv run python benchmarks/scaling.py                          # every family, size, channels
    uv run python benchmarks/scaling.py --families vae gan --sizes 16 32 --channels 1
    uv run python benchmarks/scaling.py --profile mnist          # the mnist profile's networks
    # a variant of it: a .yaml of params keys over the profile (later profiles win)
    uv run python benchmarks/scaling.py --profile mnist --profile narrow.yaml --sizes 28

FLOPs per image are torch's count (genlab.compute); the exponent is a least-squares slope of
log seconds per image against log pixels (C·H·W) over the sizes measured.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil  # a dependency of dvc's

from common import profiled
from families import in_child
from genlab.config import DatasetParams, Params, parse_params
from genlab.errors import ConfigError
from genlab.evaluation import vocabulary as v
from overhead import TrainBatchTimer, throughput

ROOT = Path(__file__).resolve().parents[1]
SIZES = (8, 16, 28, 32, 64)
CHANNELS = (1, 3)
IMAGES_PER_CLASS = 40  # 10 classes: 320 train / 40 val / 40 test after the split
BATCH = 32


def bench_params(raw: dict, store: Path) -> Params:
    """The params mapping `raw` (params.yaml with its profiles) set up for a short timed run."""
    for section in raw["models"].values():
        section |= {"max_epochs": 2, "batch_size": BATCH, "max_steps": None}
    raw["trainer"] |= {"accelerator": "cpu", "sample_every_n_epochs": 10**6, "budget_flops": None}
    raw["trainer"] |= {"precision": "32-true", "compile": False, "channels_last": False}
    raw["trainer"]["curve_samples"] = 0  # training alone: no sample sets along it
    raw["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "scaling"}
    raw["tracking"]["system_metrics_every_s"] = None
    return parse_params(raw, "params.yaml (scaling copy)")


def write_images(folder: Path) -> Path:
    """10 classes of random 64x64 RGB PNGs (prepare resizes and converts them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(10):
        (folder / f"c{k}").mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{k}" / f"{i}.png")
    return folder


def prepared(images: Path, size: int, channels: int, out: Path) -> Path:
    from genlab.data.prepared import prepare

    prepare(DatasetParams(name="folder", path=str(images), image_size=size, channels=channels), out)
    return out


def measure(params: Params, family: str, data: Path, work: Path, n: int) -> dict[str, float]:
    """One (family, size, channels) cell, in the child."""
    import torch

    from genlab.compute import sampling_flops
    from genlab.models import MODELS
    from genlab.paths import TRAIN_COST_FILE
    from genlab.training import train_family

    resident = psutil.Process().memory_info().rss
    timer = TrainBatchTimer()
    result = train_family(
        params,
        family,
        seed=0,
        prepared_dir=data,
        out_dir=work / "model",
        checkpoint_root=work / "checkpoints",
        callbacks=[timer],
    )
    cost = json.loads((work / "model" / TRAIN_COST_FILE).read_text())
    model = (
        MODELS[family]
        .load_from_checkpoint(result.checkpoint, map_location="cpu", weights_only=True)
        .eval()
    )
    y = torch.arange(n) % model.num_classes if model.conditional else None
    start = time.perf_counter()
    with torch.no_grad():
        model.sample(n, y, generator=torch.Generator().manual_seed(0))
    sample_s = time.perf_counter() - start
    return {
        "train_img_s": throughput(timer.epochs),
        "train_flops_img": cost[v.TRAIN_FLOPS] / (cost[v.TRAIN_STEPS] * BATCH),
        "sample_img_s": n / sample_s,
        "sample_flops_img": sampling_flops(model, batch_size=n),
        "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident) / 2**20,
    }


def exponent(pixels: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log seconds per image against log pixels."""
    if len(pixels) < 2:
        return math.nan
    return float(np.polyfit(np.log(pixels), np.log(seconds), 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", help="default: params.yaml's families")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--channels", nargs="+", type=int, default=list(CHANNELS))
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        help="a profile over params.yaml: <name> of profiles/ or a .yaml path (repeatable)",
    )
    parser.add_argument("--samples", type=int, default=16, help="images in the sampling batch")
    args = parser.parse_args(argv)
    try:
        raw = profiled(ROOT, args.profile)
    except ConfigError as exc:  # ProfileError too; a profile that is not valid YAML
        parser.error(str(exc))

    with tempfile.TemporaryDirectory(prefix="genlab-scaling-") as tmp:
        work = Path(tmp)
        params = bench_params(raw, work / "mlflow.db")
        families = args.families or params.families
        images = in_child(write_images, work / "images")
        header = (
            f"{'family':<14}{'C x H x W':>12}{'train img/s':>13}{'train FLOP/img':>16}"
            f"{'sample img/s':>14}{'sample FLOP/img':>17}{'peak MiB':>10}"
        )
        print(f"settings: {' + '.join(['params.yaml', *args.profile])}; CPU")
        print(header)
        print("-" * len(header))
        rows: dict[str, list[tuple[int, dict[str, float]]]] = {f: [] for f in families}
        for channels in args.channels:
            for size in args.sizes:
                data = in_child(prepared, images, size, channels, work / f"data-{channels}-{size}")
                if isinstance(data, str):
                    print(f"{channels}x{size}x{size}: prepare failed: {data}")
                    continue
                for family in families:
                    cell = work / f"{family}-{channels}-{size}"
                    row = in_child(measure, params, family, data, cell, args.samples)
                    shape = f"{channels}x{size}x{size}"
                    if isinstance(row, str):
                        print(f"{family:<14}{shape:>12}  failed: {row}")
                        continue
                    rows[family].append((channels * size * size, row))
                    print(
                        f"{family:<14}{shape:>12}{row['train_img_s']:>13.1f}"
                        f"{row['train_flops_img']:>16.3g}{row['sample_img_s']:>14.2f}"
                        f"{row['sample_flops_img']:>17.3g}{row['peak_mib']:>10.0f}",
                        flush=True,
                    )
    print()
    print(f"{'family':<14}{'b (train s/img)':>17}{'b (sample s/img)':>18}   cost ∝ pixels^b")
    for family, measured in rows.items():
        pixels = [p for p, _ in measured]
        train = exponent(pixels, [1 / r["train_img_s"] for _, r in measured])
        sample = exponent(pixels, [1 / r["sample_img_s"] for _, r in measured])
        print(f"{family:<14}{train:>17.2f}{sample:>18.2f}")
    return 0 if any(rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
