"""Sample quality and sampling cost of every family and training seed, read against the baselines.

Reads what the default pipeline measured (metrics/<family>/seed<k>.json, metrics/baselines.json
and each family's MLflow runs), so the numbers are exactly those of `uv run dvc repro`; `--repro`
runs the pipeline first, `--seed k` (repeatable) reads only those training seeds.

    uv run python benchmarks/generation.py            # table from the last dvc repro
    uv run python benchmarks/generation.py --repro    # run dvc repro, then the table

One row per family and seed: FID and KID with their intervals, each one's ratio to the held-out
real row's (real images no model trained on, at the models' set size) and whether the two are
tied (the intervals overlap); the copycat row (training images redrawn) shows what a memoriser
scores, and the exact-copy column tells it apart. A KID ratio is n/a when the held-out real KID
is not above zero (unbiased MMD^2 of close sets can be). With `evaluate.split: val` there is no
held-out real row and the ratios are to the copycat's. Targets: FID within 3x the held-out real
row for every family (every seed), the best family (mean over seeds) within 1.5x; conditional
accuracy >= 0.90 for every class-conditional family. Exit code 0 whatever the numbers: a
measurement, not a test.
"""

from __future__ import annotations

import math
import statistics
import sys

from common import (
    Metrics,
    baseline_metrics,
    cell,
    family_metrics,
    num,
    read_last_repro,
    train_seconds,
)
from genlab.evaluation import vocabulary as v
from genlab.evaluation.baselines import COPYCAT, HELDOUT

WITHIN = 3.0  # every family: FID at most this many times the held-out real row's
BEST_WITHIN = 1.5  # the best family's FID
COND_ACC = 0.90


def ratio(metrics: Metrics, yardstick: Metrics, key: str) -> float:
    """metrics[key] / yardstick[key]; nan when the yardstick's value is not above zero."""
    base = v.estimate(yardstick, key).value
    value = v.estimate(metrics, key).value
    return value / base if base > 0 else math.nan


def tied(metrics: Metrics, yardstick: Metrics, key: str, confidence: float) -> str:
    """ "yes" when the two intervals overlap, "no" when not, "n/a" when either has none."""
    mine = v.estimate(metrics, key, confidence=confidence)
    theirs = v.estimate(yardstick, key, confidence=confidence)
    if not (mine.has_interval and theirs.has_interval):
        return "n/a"
    return "yes" if mine.overlaps(theirs) else "no"


def main(argv: list[str] | None = None) -> int:
    params, seeds, protocol = read_last_repro(__doc__, argv)
    confidence = protocol.confidence
    rows = baseline_metrics(protocol)
    name = HELDOUT if HELDOUT in rows else COPYCAT
    if name == COPYCAT:
        print("no held-out real row (evaluate.split is val): ratios are to the copycat row")
    yardstick = rows[name]
    interval = f"[{confidence:.0%}]"
    times = "×real" if name == HELDOUT else "×copy"
    header = (
        f"{'row':<10} {'seed':>4} {'FID ' + interval:>24} {times:>6} {'tied':>4} "
        f"{'KID ' + interval:>26} {times:>6} {'tied':>4} {'prec':>6} {'recall':>6} "
        f"{'copies':>6} {'cond':>6} {'samp/s':>7} {'NFE':>5} {'train s':>8}"
    )
    print(
        f"{protocol.sample_seeds} sets of {protocol.num_samples} samples against the "
        f"{protocol.reference_split} split, protocol {protocol.id}"
    )
    print(header)
    print("-" * len(header))

    def against(m: Metrics, key: str, digits: int, width: int) -> str:
        """The value [interval], its ratio to the yardstick's, and whether they are tied."""
        shown = cell(m, key, digits, confidence=confidence)
        return f"{shown:>{width}} {num(ratio(m, yardstick, key), '.2f'):>6} " + (
            f"{tied(m, yardstick, key, confidence):>4}"
        )

    def line(label: str, seed: str, m: Metrics, tail: str = "") -> None:
        print(
            f"{label:<10} {seed:>4} {against(m, v.FID, 3, 24)} {against(m, v.KID, 4, 26)} "
            f"{num(m.get(v.PRECISION, math.nan)):>6} {num(m.get(v.RECALL, math.nan)):>6} "
            f"{num(m.get(v.EXACT_COPIES, math.nan)):>6}{tail}"
        )

    fid_ratios: dict[str, list[float]] = {}
    tied_fid, family_rows = 0, 0
    conditional_ok, conditional_n = 0, 0
    for family in params.families:
        conditional = bool(params.family(family).model_kwargs().get("conditional"))
        accuracies = []
        for seed in seeds:
            m = family_metrics(family, seed, protocol)
            fid_ratios.setdefault(family, []).append(ratio(m, yardstick, v.FID))
            family_rows += 1
            tied_fid += tied(m, yardstick, v.FID, confidence) == "yes"
            cond = m.get(v.COND_ACC, math.nan)
            accuracies.append(cond)
            line(
                family,
                str(seed),
                m,
                f" {num(cond):>6} {num(m.get(v.SAMPLES_PER_S, math.nan), '.0f'):>7} "
                f"{num(m.get(v.NFE_PER_SAMPLE, math.nan), '.0f'):>5} "
                f"{num(train_seconds(family, seed), '.0f'):>8}",
            )
        if conditional:
            conditional_n += 1
            conditional_ok += all(a >= COND_ACC for a in accuracies)
    for baseline in (COPYCAT, HELDOUT):
        if baseline in rows:
            line(baseline, "", rows[baseline])

    worst = {f: max(r) for f, r in fid_ratios.items()}
    mean = {f: statistics.mean(r) for f, r in fid_ratios.items()}
    within = sum(w <= WITHIN for w in worst.values())
    best = min(mean, key=mean.get)
    print(
        f"generation (seeds {', '.join(map(str, seeds))}): {within}/{len(worst)} families within "
        f"{WITHIN:g}x the {name} FID on every seed; best {best} at {mean[best]:.2f}x (mean over "
        f"seeds; target {BEST_WITHIN:g}x); {tied_fid}/{family_rows} rows tied with it on FID; "
        f"conditional accuracy >= {COND_ACC:g}: {conditional_ok}/{conditional_n}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
