"""What each family costs: training and sampling throughput, NFE, parameters, peak memory.

Training and sampling images per second, network evaluations per sample, parameters and peak
memory, with the default params.yaml settings.

Each family runs in a forked child of this process (imports done once, nothing of torch run
before the fork, so each child starts from the same state): a short training through
`train_family` (what `genlab train` runs, into a temporary MLflow store), then `sample` of one
evaluation batch. Training throughput covers the training of every epoch but the first
(warm-up), from the epoch's start to its last batch's end (validation after it is not counted);
peak memory is the child's peak resident set above its size at the fork on CPU,
torch's peak allocation on a GPU.

    uv run python benchmarks/families.py            # 3 epochs, a 250-image sampling batch
    uv run python benchmarks/families.py --quick    # 1 epoch, 50 samples: under a minute
    uv run python benchmarks/families.py --accelerator gpu   # on a GPU machine
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil  # a dependency of dvc's
import torch
import yaml

from genlab.config import Params, parse_params
from genlab.data.prepared import prepare
from genlab.training import train_family
from overhead import TrainBatchTimer, throughput

COLUMNS = ("train img/s", "sample img/s", "NFE/sample", "params", "peak MiB")


def bench_params(epochs: int, accelerator: str, store: Path) -> Params:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for section in raw["models"].values():
        section["max_epochs"] = epochs
    raw["trainer"]["accelerator"] = accelerator
    raw["trainer"]["sample_every_n_epochs"] = 10**6  # the final grid only
    raw["trainer"]["curve_samples"] = 0  # training alone: no sample sets along it
    raw["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "families"}
    return parse_params(raw, "params.yaml (benchmark copy)")


def measure(params: Params, family: str, prepared: Path, work: Path, n: int) -> dict[str, float]:
    """One family's row (run in the child)."""
    device = params.trainer.eval_device
    resident = psutil.Process().memory_info().rss  # at the fork: the parent's pages
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = TrainBatchTimer()
    result = train_family(
        params,
        family,
        seed=params.seeds[0],
        prepared_dir=prepared,
        out_dir=work / family,
        checkpoint_root=work / "checkpoints" / family,
        callbacks=[timer],
    )
    from genlab.models import MODELS

    model = MODELS[family].load_from_checkpoint(result.checkpoint, map_location=device).eval()
    y = torch.arange(n) % model.num_classes if model.conditional else None
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        model.sample(n, y, generator=generator).cpu()
    sample_s = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident  # Linux: KiB
    return {
        "train img/s": throughput(timer.epochs),
        "sample img/s": n / sample_s,
        "NFE/sample": model.nfe_per_sample,
        "params": sum(p.numel() for p in model.parameters()),
        "peak bytes": peak,
    }


def child(conn, fn, *args) -> None:
    try:
        conn.send(fn(*args))
    except BaseException as exc:  # reported by the parent, which goes on
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def in_child(fn, *args) -> object:
    """fn(*args) in a forked child: its result, or the error text. The parent never runs a
    torch operation itself: a fork after one would inherit a dead OpenMP thread pool and hang."""
    context = mp.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(send, fn, *args))
    process.start()
    send.close()
    try:
        return receive.recv()
    except EOFError:
        return f"the child exited with {process.exitcode} without a result"
    finally:
        process.join()


def prepared_data(params: Params, prepared: Path) -> str:
    meta = prepare(params.dataset, prepared)
    return f"{meta.dataset} {'x'.join(map(str, meta.shape))}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (first: warm-up)")
    parser.add_argument("--samples", type=int, default=250, help="images in the sampling batch")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--quick", action="store_true", help="1 epoch, 50 samples")
    args = parser.parse_args(argv)
    epochs, n = (1, 50) if args.quick else (args.epochs, args.samples)

    with tempfile.TemporaryDirectory(prefix="genlab-families-") as tmp:
        work = Path(tmp)
        params = bench_params(epochs, args.accelerator, work / "mlflow.db")
        prepared = work / "prepared"
        data = in_child(prepared_data, params, prepared)
        print(f"{data}, {epochs} epoch(s), {n} samples, {args.accelerator}")
        header = f"{'family':<10}" + "".join(f"{c:>14}" for c in COLUMNS)
        print(header)
        print("-" * len(header))
        rows = {}
        for family in params.families:
            row = in_child(measure, params, family, prepared, work, n)
            if isinstance(row, str):
                print(f"{family:<10} failed: {row}")
                continue
            rows[family] = row
            values = [row[c] for c in COLUMNS[:4]] + [row["peak bytes"] / 2**20]
            print(
                f"{family:<10}{values[0]:>14.0f}{values[1]:>14.1f}{values[2]:>14.0f}"
                f"{values[3]:>14,.0f}{values[4]:>14.0f}"
            )
    if not rows:
        print("families: no family measured")
        return 1
    slowest = min(rows, key=lambda f: rows[f]["sample img/s"])
    fastest = max(rows, key=lambda f: rows[f]["train img/s"])
    print(
        f"families: {len(rows)}/{len(params.families)} measured; training fastest {fastest} "
        f"({rows[fastest]['train img/s']:.0f} img/s), sampling slowest {slowest} "
        f"({rows[slowest]['sample img/s']:.1f} img/s, {rows[slowest]['NFE/sample']:.0f} NFE)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
