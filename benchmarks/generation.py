"""Sample quality and sampling cost of every family, read against the baseline rows.

Reads what the default pipeline measured (metrics/<family>/seed<k>.json, metrics/baselines.json
and each family's MLflow run), so the numbers are exactly those of `uv run dvc repro`; `--repro`
runs the pipeline first, `--seed k` reads another training seed.

    uv run python benchmarks/generation.py            # table from the last dvc repro
    uv run python benchmarks/generation.py --repro    # run dvc repro, then the table

Every FID and KID with its 95% interval, the FID's ratio to the held-out real row's (real images
no model trained on, at the models' set size) and whether the two are tied (intervals overlap);
the copycat row (training images redrawn) shows what a memoriser scores. Targets: FID within 3x
the held-out real row for every family, the best within 1.5x; conditional accuracy >= 0.90 for
every class-conditional family. Exit code 0 whatever the numbers: a measurement, not a test.
"""

from __future__ import annotations

import math
import sys

from common import baseline_metrics, cell, family_metrics, read_last_repro, train_seconds
from genlab.config import load_params
from genlab.evaluation import vocabulary as v

WITHIN = 3.0  # every family: FID at most this many times the held-out real row's
BEST_WITHIN = 1.5  # the best family's FID
COND_ACC = 0.90


def main(argv: list[str] | None = None) -> int:
    seed = read_last_repro(__doc__, argv)
    params = load_params()
    seed = params.seeds[0] if seed is None else seed
    rows = baseline_metrics()
    heldout = rows.get("heldout")
    if heldout is None:
        print("no held-out real row (evaluate.split is val): ratios are against the copycat")
    yardstick = heldout or rows["copycat"]
    fid0 = v.estimate(yardstick, v.FID)
    header = (
        f"{'row':<14} {'FID [95%]':>22} {'×real':>6} {'tied':>5} {'KID [95%]':>26} "
        f"{'prec':>6} {'recall':>6} {'cond':>6} {'samp/s':>7} {'NFE':>5} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    within, conditional_ok, conditional_n, ratios = 0, 0, 0, {}
    for family in params.families:
        m = family_metrics(family, seed)
        fid = v.estimate(m, v.FID)
        ratios[family] = fid.value / fid0.value
        within += ratios[family] <= WITHIN
        cond = m.get(v.COND_ACC, math.nan)
        if params.family(family).model_kwargs().get("conditional"):
            conditional_n += 1
            conditional_ok += cond >= COND_ACC
        print(
            f"{family:<14} {cell(m, v.FID):>22} {ratios[family]:>6.2f} "
            f"{'yes' if fid.overlaps(fid0) else 'no':>5} {cell(m, v.KID, 4):>26} "
            f"{m[v.PRECISION]:>6.3f} {m[v.RECALL]:>6.3f} {cond:>6.3f} "
            f"{m[v.SAMPLES_PER_S]:>7.0f} {m.get(v.NFE_PER_SAMPLE, math.nan):>5.0f} "
            f"{train_seconds(family, seed):>8.0f}"
        )
    for name in ("copycat", "heldout"):
        if name in rows:
            m = rows[name]
            ratio = v.estimate(m, v.FID).value / fid0.value
            print(
                f"{name:<14} {cell(m, v.FID):>22} {ratio:>6.2f} {'':>5} {cell(m, v.KID, 4):>26} "
                f"{m[v.PRECISION]:>6.3f} {m[v.RECALL]:>6.3f}"
            )
    best = min(ratios, key=ratios.get)
    print(
        f"generation (seed {seed}): {within}/{len(ratios)} families within {WITHIN:g}x the "
        f"held-out real FID; best {best} at {ratios[best]:.2f}x (target {BEST_WITHIN:g}x); "
        f"conditional accuracy >= {COND_ACC:g}: {conditional_ok}/{conditional_n}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
