"""Issue 5's targets: out-of-distribution detection, generative classification, linear probe.

Reads what the default pipeline measured (metrics/<family>/seed<k>.json and the real-data row of
metrics/baselines.json), so the numbers are exactly those of `uv run dvc repro`; `--repro` runs the
pipeline first, `--seed k` reads another training seed.

    uv run python benchmarks/questions.py            # table from the last dvc repro
    uv run python benchmarks/questions.py --repro    # run dvc repro, then the table

Prints one row per family (AUROC against noise and inverted digits with the likelihood and the
typicality statistic, the worst OOD set, generative classification and linear-probe accuracy) and
a summary line against the targets. Exit code 0 whatever the numbers: a measurement, not a test.
"""

from __future__ import annotations

import math
import sys

from common import baseline_metrics, family_metrics, read_last_repro
from genlab.config import load_params
from genlab.evaluation import vocabulary as v
from genlab.models import MODELS

AUROC_TARGET = 0.95  # likelihood families, against uniform noise and inverted digits
CLASSIFY_TARGET = (
    0.95  # the best conditional likelihood family (a class-conditional Gaussian: ~0.96)
)
PROBE_TARGET = 0.90  # the best latent


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    seed = read_last_repro(__doc__, argv)
    params = load_params()
    seed = params.seeds[0] if seed is None else seed
    real = baseline_metrics()["real"]
    split = "test" if v.class_acc("test") in real else "val"
    class_acc, probe_acc = v.class_acc(split), v.probe_acc(split)

    header = f"{'family':<10} {'noise':>6} {'invert':>6} {'noise':>6} {'invert':>6} "
    header += f"{'worst set':<16} {'class acc':>9} {'probe':>6}"
    print(f"{'':<10} {'AUROC log p(x)':^13} {'AUROC typical':^13}")
    print(header)
    print("-" * len(header))
    auroc_ok, auroc_rows = 0, 0
    best_class, best_probe = -math.inf, -math.inf
    for family in params.families:
        m = family_metrics(family, seed)
        cls = MODELS[family]
        aurocs = {s: m[v.auroc(s)] for s in params.prediction.ood_sets if v.auroc(s) in m}
        worst = min(aurocs, key=aurocs.get) if aurocs else None
        if cls.likelihood != "none":
            auroc_rows += 1
            near_far = [m.get(v.auroc(s), math.nan) for s in ("noise", "inverted")]
            auroc_ok += min(near_far) >= AUROC_TARGET
            if class_acc in m:
                best_class = max(best_class, m[class_acc])
        best_probe = max(best_probe, m.get(probe_acc, -math.inf))
        cells = [
            fmt(m.get(v.auroc(name, typicality=typical)))
            for typical in (False, True)
            for name in ("noise", "inverted")
        ]
        print(
            f"{family:<10} " + " ".join(f"{c:>6}" for c in cells) + " "
            f"{(f'{worst} {aurocs[worst]:.3f}' if worst else 'n/a'):<16} "
            f"{fmt(m.get(class_acc)):>9} {fmt(m.get(probe_acc)):>6}"
        )
    print(
        f"{'evaluator':<10} {'':>6} {'':>6} {'':>6} {'':>6} {'(discriminative)':<16} "
        f"{fmt(real.get(class_acc)):>9}"
    )
    pixels = fmt(real.get(probe_acc))
    print(f"{'pixels':<10} {'':>6} {'':>6} {'':>6} {'':>6} {'':<16} {'':>9} {pixels:>6}")
    print(
        f"questions (seed {seed}): AUROC >= {AUROC_TARGET} on noise and inverted for "
        f"{auroc_ok}/{auroc_rows} likelihood families; best generative classifier "
        f"{fmt(best_class)} (target {CLASSIFY_TARGET}); best probe {fmt(best_probe)} "
        f"(target {PROBE_TARGET})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
