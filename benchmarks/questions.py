"""Issue 5's targets: out-of-distribution detection, generative classification, linear probe.

Reads what the default pipeline measured (metrics/<family>/seed<k>.json and the real-data row of
metrics/baselines.json), so the numbers are exactly those of `uv run dvc repro`; `--repro` runs the
pipeline first, `--seed k` (repeatable) reads only those training seeds.

    uv run python benchmarks/questions.py            # table from the last dvc repro
    uv run python benchmarks/questions.py --repro    # run dvc repro, then the table

Prints one row per family and seed (AUROC against noise and inverted digits with the likelihood
statistic and its interval, and with the typicality statistic; the worst OOD set; generative
classification and linear-probe accuracy with their intervals), the real-data row (the
evaluator's accuracy, a probe on raw pixels) and a summary line against the targets. Everything
is on the evaluation's split (`evaluate.split`). Exit code 0 whatever the numbers: a measurement,
not a test.
"""

from __future__ import annotations

import math
import sys

from common import baseline_metrics, cell, family_metrics, read_last_repro
from genlab.evaluation import vocabulary as v
from genlab.evaluation.baselines import REAL
from genlab.models import MODELS

AUROC_TARGET = 0.95  # likelihood families, against uniform noise and inverted digits
# The best conditional likelihood family (a class-conditional Gaussian: ~0.96).
CLASSIFY_TARGET = 0.95
PROBE_TARGET = 0.90  # the best latent
NEAR_FAR = ("noise", "inverted")  # the OOD sets of the AUROC target


def main(argv: list[str] | None = None) -> int:
    params, seeds, protocol = read_last_repro(__doc__, argv)
    split, confidence = protocol.reference_split, protocol.confidence
    real = baseline_metrics(protocol)[REAL]
    class_acc, probe_acc = v.class_acc(split), v.probe_acc(split)

    def c(m: dict[str, float], key: str) -> str:
        return cell(m, key, confidence=confidence)

    def fmt(x: float) -> str:
        return f"{x:.3f}" if math.isfinite(x) else "n/a"

    w = 20  # "0.998 [0.995, 1.000]"
    header = (
        f"{'family':<10} {'seed':>4} {'AUROC noise':>{w}} {'AUROC inverted':>{w}} "
        f"{'typ. noise':>10} {'typ. inv.':>10} {'worst set':<16} "
        f"{f'{split} class acc':>{w}} {f'{split} probe':>{w}}"
    )
    print(f"AUROC with log p(x) and with typicality; intervals {confidence:.0%}")
    print(header)
    print("-" * len(header))
    auroc_ok, auroc_rows = 0, 0
    best_class, best_probe = -math.inf, -math.inf
    for family in params.families:
        cls = MODELS[family]
        for seed in seeds:
            m = family_metrics(family, seed, protocol)
            aurocs = {s: m[v.auroc(s)] for s in params.prediction.ood_sets if v.auroc(s) in m}
            worst = min(aurocs, key=aurocs.get) if aurocs else None
            if cls.likelihood != "none":
                auroc_rows += 1
                auroc_ok += min(m.get(v.auroc(s), math.nan) for s in NEAR_FAR) >= AUROC_TARGET
                best_class = max(best_class, m.get(class_acc, -math.inf))
            best_probe = max(best_probe, m.get(probe_acc, -math.inf))
            typical = [fmt(m.get(v.auroc(s, typicality=True), math.nan)) for s in NEAR_FAR]
            print(
                f"{family:<10} {seed:>4} "
                + " ".join(f"{c(m, v.auroc(s)):>{w}}" for s in NEAR_FAR)
                + " "
                + " ".join(f"{t:>10}" for t in typical)
                + f" {(f'{worst} {aurocs[worst]:.3f}' if worst else 'n/a'):<16} "
                f"{c(m, class_acc):>{w}} {c(m, probe_acc):>{w}}"
            )
    blank = f"{'':>{w}} {'':>{w}} {'':>10} {'':>10}"
    print(f"{'evaluator':<10} {'':>4} {blank} {'(discriminative)':<16} {c(real, class_acc):>{w}}")
    print(f"{'pixels':<10} {'':>4} {blank} {'':<16} {'':>{w}} {c(real, probe_acc):>{w}}")
    print(
        f"questions (seeds {', '.join(map(str, seeds))}): AUROC >= {AUROC_TARGET} on noise and "
        f"inverted for {auroc_ok}/{auroc_rows} likelihood-family rows; best generative "
        f"classifier {fmt(best_class)} (target {CLASSIFY_TARGET}); best probe {fmt(best_probe)} "
        f"(target {PROBE_TARGET})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
