"""Sample quality and sampling cost of every family against issue 4's targets.

Reads what the default pipeline measured (metrics/<family>.json, reports/real_data.json and each
family's MLflow run), so the numbers are exactly those of `uv run dvc repro`; `--repro` runs the
pipeline first.

    uv run python benchmarks/generation.py            # table from the last dvc repro
    uv run python benchmarks/generation.py --repro    # run dvc repro, then the table

Targets (evaluator features, against the test split): FID and KID within 3x the real-data floor
for every family, the best family within 1.5x; conditional accuracy >= 0.90 for every
class-conditional family. Exit code 0 whatever the numbers: a measurement, not a test.
"""

from __future__ import annotations

import json
import math
import sys

from common import family_metrics, read_last_repro, train_seconds
from genlab import paths
from genlab.config import load_params

WITHIN = 3.0  # every family: FID and KID at most this many times the real-data floor
BEST_WITHIN = 1.5  # the best family's FID
COND_ACC = 0.90


def main(argv: list[str] | None = None) -> int:
    read_last_repro(__doc__, argv)

    params = load_params()
    floor = json.loads(paths.REAL_DATA_METRICS.read_text())
    fid0 = floor["eval/fid"]
    # KID is unbiased: the real floor's mean is ~0 and may be negative, so "3x the floor" is
    # measured against the floor's scale, its mean or (when that is below the noise) the
    # spread of its subset estimates, whichever is larger.
    kid0 = max(floor["eval/kid_mean"], floor["eval/kid_std"])
    header = (
        f"{'family':<10} {'FID':>7} {'×floor':>7} {'KID':>8} {'×floor':>7} {'prec':>6} "
        f"{'recall':>6} {'cond':>6} {'samp/s':>8} {'NFE':>5} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    within, conditional_ok, conditional_n, ratios = 0, 0, 0, {}
    for family in params.families:
        m = family_metrics(family)
        fid, kid = m["eval/fid"], m["eval/kid_mean"]
        ratios[family] = fid / fid0
        within += fid <= WITHIN * fid0 and kid <= WITHIN * kid0
        cond = m.get("eval/cond_acc", math.nan)
        if params.family(family).model_kwargs().get("conditional"):
            conditional_n += 1
            conditional_ok += cond >= COND_ACC
        print(
            f"{family:<10} {fid:>7.2f} {fid / fid0:>7.2f} {kid:>8.4f} {kid / kid0:>7.2f} "
            f"{m['eval/precision']:>6.3f} {m['eval/recall']:>6.3f} {cond:>6.3f} "
            f"{m['eval/samples_per_s']:>8.0f} {m.get('eval/nfe_per_sample', math.nan):>5.0f} "
            f"{train_seconds(family):>8.0f}"
        )
    print(
        f"{'real data':<10} {fid0:>7.2f} {1:>7.2f} {floor['eval/kid_mean']:>8.4f} {'':>7} "
        f"{floor['eval/precision']:>6.3f} {floor['eval/recall']:>6.3f}"
    )
    best = min(ratios, key=ratios.get)
    print(
        f"generation: {within}/{len(ratios)} families within {WITHIN:g}x the floor on FID and KID; "
        f"best {best} at {ratios[best]:.2f}x (target {BEST_WITHIN:g}x); "
        f"conditional accuracy >= {COND_ACC:g}: {conditional_ok}/{conditional_n}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
