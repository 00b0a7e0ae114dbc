"""Issue 5's targets: out-of-distribution detection, generative classification, linear probe.

Reads what the default pipeline measured (metrics/<family>.json, metrics/evaluator.json and
reports/real_data.json), so the numbers are exactly those of `uv run dvc repro`; `--repro` runs the
pipeline first.

    uv run python benchmarks/questions.py            # table from the last dvc repro
    uv run python benchmarks/questions.py --repro    # run dvc repro, then the table

Prints one row per family (AUROC against noise and inverted digits with the likelihood and the
typicality statistic, the worst OOD set, generative classification and linear-probe accuracy) and
a summary line against the targets. Exit code 0 whatever the numbers: a measurement, not a test.
"""

from __future__ import annotations

import json
import math
import sys

from common import family_metrics, read_last_repro
from genlab import paths
from genlab.config import load_params
from genlab.models import MODELS

AUROC_TARGET = 0.95  # likelihood families, against uniform noise and inverted digits
CLASSIFY_TARGET = (
    0.95  # the best conditional likelihood family (a class-conditional Gaussian: ~0.96)
)
PROBE_TARGET = 0.90  # the best latent


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    read_last_repro(__doc__, argv)
    params = load_params()
    evaluator = json.loads(paths.EVALUATOR_METRICS.read_text())
    real = json.loads(paths.REAL_DATA_METRICS.read_text())

    header = f"{'family':<10} {'noise':>6} {'invert':>6} {'noise':>6} {'invert':>6} "
    header += f"{'worst set':<16} {'class acc':>9} {'probe':>6}"
    print(f"{'':<10} {'AUROC log p(x)':^13} {'AUROC typical':^13}")
    print(header)
    print("-" * len(header))
    auroc_ok, auroc_rows = 0, 0
    best_class, best_probe = -math.inf, -math.inf
    for family in params.families:
        m = family_metrics(family)
        cls = MODELS[family]
        aurocs = {
            k.removeprefix("ood/auroc_"): v
            for k, v in m.items()
            if k.startswith("ood/auroc_") and "typicality" not in k
        }
        worst = min(aurocs, key=aurocs.get) if aurocs else None
        if cls.likelihood != "none":
            auroc_rows += 1
            auroc_ok += min(m["ood/auroc_noise"], m["ood/auroc_inverted"]) >= AUROC_TARGET
            if "test/class_acc" in m:
                best_class = max(best_class, m["test/class_acc"])
        best_probe = max(best_probe, m.get("test/probe_acc", -math.inf))
        cells = [
            fmt(m.get(f"ood/auroc_{kind}{name}"))
            for kind in ("", "typicality_")
            for name in ("noise", "inverted")
        ]
        print(
            f"{family:<10} " + " ".join(f"{c:>6}" for c in cells) + " "
            f"{(f'{worst} {aurocs[worst]:.3f}' if worst else 'n/a'):<16} "
            f"{fmt(m.get('test/class_acc')):>9} {fmt(m.get('test/probe_acc')):>6}"
        )
    print(
        f"{'evaluator':<10} {'':>6} {'':>6} {'':>6} {'':>6} {'(discriminative)':<16} "
        f"{fmt(evaluator.get('test/accuracy')):>9}"
    )
    pixels = fmt(real.get("test/probe_acc"))
    print(f"{'pixels':<10} {'':>6} {'':>6} {'':>6} {'':>6} {'':<16} {'':>9} {pixels:>6}")
    print(
        f"questions: AUROC >= {AUROC_TARGET} on noise and inverted for {auroc_ok}/{auroc_rows} "
        f"likelihood families; best generative classifier {fmt(best_class)} "
        f"(target {CLASSIFY_TARGET}); best probe {fmt(best_probe)} (target {PROBE_TARGET})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
