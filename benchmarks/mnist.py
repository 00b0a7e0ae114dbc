"""The `mnist` profile end to end on the real MNIST files: every family's training, evaluation and
the report, timed, and the table of what they scored against the issue 19 targets.

Copies the project into a temporary git repository (as benchmarks/pipeline.py does), applies
profiles/mnist.yaml, copies the four official idx files from `--data` (default
../shared/data/mnist, see its README) into the copy's data/raw/MNIST/raw/, runs `dvc repro` and
prints, per family: test bits/dim (± standard error; `≤` for a bound), FID with its 95% interval
next to the held-out real row's, conditional accuracy, training seconds and FLOPs.

    uv run python benchmarks/mnist.py            # about 90 minutes on 2 CPU cores (the target)
    uv run python benchmarks/mnist.py --keep     # leave the copy (reports/summary.md, mlflow.db)
    uv run python benchmarks/mnist.py --table /tmp/genlab-mnist-xxxx   # a kept copy's table
    uv run python benchmarks/mnist.py --families pixelcnn vae   # after changing only those two

Targets (2 CPU cores): the whole profile in <= 90 minutes; every likelihood family <= 1.35
bits/dim on test, the best <= 1.05; the best FID at most 3x the held-out real row's; conditional
accuracy >= 0.95 for every conditional family; the memorisation checks clean (no family flagged).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from genlab import paths
from genlab.evaluation import vocabulary as v
from genlab.evaluation.baselines import HELDOUT
from genlab.evaluation.report import Row, copying
from genlab.paths import PROFILES
from pipeline import ROOT, make_copy, timed_repro

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
TARGET_S = 90 * 60
BPD_EACH, BPD_BEST, FID_RATIO, COND_ACC = 1.35, 1.05, 3.0, 0.95


def copy_mnist(source: Path, copy: Path) -> Path:
    """The four idx files from `source` into `copy`, where the mnist profile's dataset reads
    them (root data/raw, torchvision's MNIST/raw below it); returns that root."""
    raw = copy / "data" / "raw" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if not (source / name).is_file():
            sys.exit(f"mnist: {source / name} not found; pass --data with the four idx files")
        shutil.copyfile(source / name, raw / name)
    return copy / "data" / "raw"


def bits(metrics: dict[str, float]) -> tuple[str, float, float] | None:
    """(key, bits/dim, its standard error) of the family's headline test likelihood."""
    for key in (v.bpd_key("test", "exact"), v.bpd_key("test", "lower_bound")):
        if key in metrics:
            return key, metrics[key], metrics.get(v.se(key), math.nan)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument(
        "--table", type=Path, help="print the table of a kept copy's results; run nothing"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        metavar="FAMILY",
        help="train and evaluate only these (the 90-minute check then does not apply)",
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        params = yaml.safe_load((args.table / "params.yaml").read_text())
        return table(args.table, params, None)

    copy = Path(tempfile.mkdtemp(prefix="genlab-mnist-"))
    try:
        params = make_copy(copy, False, args.families, ROOT / PROFILES / "mnist.yaml")
        copy_mnist(args.data, copy)
        print(f"dvc repro in {copy} (profile mnist, families {' '.join(params['families'])}):")
        total, stages = timed_repro(copy, [])
        for name, seconds in stages:
            print(f"  {name:<28}{seconds:8.1f} s")
        print(f"  {'dvc repro':<28}{total:8.1f} s")
        return table(copy, params, None if args.families else total)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


def table(copy: Path, params: dict, total: float | None) -> int:
    """The families' table and the targets, from the copy's metrics (`total`: the repro's
    seconds; None: not timed here)."""
    families = params["families"]
    metrics = {f: json.loads((copy / paths.family_metrics(f, 0)).read_text()) for f in families}
    baselines = json.loads((copy / paths.BASELINE_METRICS).read_text())
    heldout = baselines.get(HELDOUT, {}).get(v.FID, math.nan)
    header = (
        f"{'family':<10}{'test bits/dim':>18}{'FID [95% CI]':>26}{'cond acc':>10}"
        f"{'train s':>9}{'train FLOPs':>13}"
    )
    print(header)
    print("-" * len(header))
    bpds, conds = {}, {}
    for f, m in metrics.items():
        b = bits(m)
        bpd = "—" if b is None else f"{'≤ ' if 'bound' in b[0] else ''}{b[1]:.3f} ± {b[2]:.3f}"
        if b is not None:
            bpds[f] = b[1]
        fid = f"{m[v.FID]:.2f} [{m[v.ci_low(v.FID)]:.2f}, {m[v.ci_high(v.FID)]:.2f}]"
        cond = m.get(v.COND_ACC)
        if cond is not None:
            conds[f] = cond
        print(
            f"{f:<10}{bpd:>18}{fid:>26}{'—' if cond is None else f'{cond:.3f}':>10}"
            f"{m.get(v.TRAIN_WALL_S, math.nan):>9.0f}{m.get(v.TRAIN_FLOPS, math.nan):>13.3g}"
        )
    print(f"{'held-out real':<10}{'':>18}{heldout:>26.2f}")
    best_fid = min(m[v.FID] for m in metrics.values())
    confidence = params["evaluate"]["confidence"]
    split = params["evaluate"]["split"]
    yardstick = Row(HELDOUT, {0: baselines[HELDOUT]}, confidence, split)
    flagged = [
        f
        for f, m in metrics.items()
        if copying(Row(f, {0: m}, confidence, split), yardstick).copies
    ]
    checks = (
        {} if total is None else {f"whole profile {total:.0f} s <= {TARGET_S} s": total <= TARGET_S}
    )
    checks |= {
        f"every likelihood family <= {BPD_EACH} bits/dim": all(
            x <= BPD_EACH for x in bpds.values()
        ),
        f"best <= {BPD_BEST} bits/dim": bool(bpds) and min(bpds.values()) <= BPD_BEST,
        f"best FID <= {FID_RATIO}x held-out real": best_fid <= FID_RATIO * heldout,
        f"conditional accuracy >= {COND_ACC}": all(x >= COND_ACC for x in conds.values()),
        "memorisation checks clean": not flagged,
    }
    for text, ok in checks.items():
        print(f"mnist: {'met' if ok else 'NOT met'}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
