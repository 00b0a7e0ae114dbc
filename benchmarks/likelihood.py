"""Held-out likelihood of the explicit-density families against targets and public references.

Reads what the default pipeline measured (metrics/<family>/seed<k>.json and each family's MLflow
runs), so the numbers are exactly those of `uv run dvc repro`; `--repro` runs the pipeline first,
`--seed k` (repeatable) reads only those training seeds.

    uv run python benchmarks/likelihood.py            # table from the last dvc repro
    uv run python benchmarks/likelihood.py --repro    # run dvc repro, then the table

Prints one row per family and seed (held-out nats/image with its standard error and interval,
bits/dim, the one-draw bound where more draws tighten it, the held-out - train gap, target,
public reference, train time) and a summary line. The split is the evaluation's
(`evaluate.split`: test, or val when tuning). Exit code 0 whatever the numbers: this is a
measurement, not a test.
"""

from __future__ import annotations

import math
import sys

from common import cell, family_metrics, num, read_last_repro, train_seconds
from genlab import paths
from genlab.data.prepared import read_meta
from genlab.evaluation import vocabulary as v
from genlab.models import MODELS

# Targets from issues 3 and 4 (test split, nats/image; diffusion's is what a full-covariance
# Gaussian mixture scores) and the public reference on the same split (Tomczak, *Deep Generative
# Modeling*, intro_dgm notebooks; validation figures).
TARGETS = {"pixelcnn": 80.0, "flow": 105.0, "vae": 95.0, "diffusion": 125.0}
REFERENCES = {"pixelcnn": 88.7, "flow": 124.0, "vae": 100.5}


def main(argv: list[str] | None = None) -> int:
    params, seeds, protocol = read_last_repro(__doc__, argv)
    split, confidence = protocol.reference_split, protocol.confidence
    meta = read_meta(paths.PREPARED)
    uniform = meta.dims * math.log(meta.levels)
    header = (
        f"{'family':<10} {'seed':>4} {'kind':<12} {f'{split} nats ± se':>17} "
        f"{f'[{confidence:.0%}]':>17} {'bits/dim':>9} {'1 draw':>7} {'gap ± se':>13} "
        f"{'target':>7} {'reference':>9} {'train s':>8}"
    )
    print(header)
    print("-" * len(header))
    met, rows = 0, 0
    for family in params.families:
        kind = MODELS[family].likelihood
        if kind == "none":
            continue
        key = v.nll_key(split, kind)
        target = TARGETS.get(family, math.nan)
        for seed in seeds:
            m = family_metrics(family, seed, protocol)
            nats, se = m[key], m.get(v.se(key), math.nan)
            e = v.estimate(m, key, confidence=confidence)
            rows += 1
            met += nats <= target
            mark = "≤" if kind == "lower_bound" else " "
            gap_nats, gap_se = m.get(v.NLL_GAP, math.nan), m.get(v.se(v.NLL_GAP), math.nan)
            gap = f"{gap_nats:.2f} ± {gap_se:.2f}" if math.isfinite(gap_nats) else "n/a"
            print(
                f"{family:<10} {seed:>4} {kind:<12} {mark}{nats:>8.2f} ± {se:<6.2f} "
                f"{f'[{e.low:.2f}, {e.high:.2f}]':>17} {m[v.bpd_key(split, kind)]:>9.3f} "
                f"{num(m.get(v.single_draw_key(split), math.nan), '.2f'):>7} {gap:>13} "
                f"{num(target, '.1f'):>7} {num(REFERENCES.get(family, math.nan), '.1f'):>9} "
                f"{num(train_seconds(family, seed), '.0f'):>8}"
            )
            marginal = v.marginal_nll_key(split, kind, MODELS[family].monte_carlo)
            if marginal in m:
                print(f"{'':<10} {'':>4} {'marginal':<12}  {cell(m, marginal, 2):>26}")
    bits = math.log2(meta.levels)
    print(f"{'uniform':<10} {'':>4} {'exact':<12}  {uniform:>8.2f} {'':>26} {bits:>9.3f}")
    print(
        f"likelihood (seeds {', '.join(map(str, seeds))}, {split} split): {met}/{rows} rows at "
        f"or under their family's target (nats/image)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
