"""Where the evaluate stage and the baselines stage spend their time, phase by phase.

The evaluate stage's phases, per family: sampling, feature extraction, the sample metrics with
their bootstrap intervals, memorisation, and the likelihood, prediction (OOD, classification) and
representation parts; then the baselines stage's rows.

Runs the evaluate stage's own function (`evaluate_model`) on the models of the last
`uv run dvc repro` (models/<family>/seed<k>/model.ckpt), one process, with the evaluate,
prediction and representation params of params.yaml and the cached real-data features of
data/reference. "other" is what the stage does outside the measured phases (loading the splits,
grids).

    uv run python benchmarks/evaluation.py                   # the stage's protocol
    uv run python benchmarks/evaluation.py --quick           # 2 sets of 200 samples, 20
                                                             # bootstrap draws, 2 bound terms,
                                                             # 1 OOD set, held-out bounds with
                                                             # at most 10 draws, reference
                                                             # computed here
    uv run python benchmarks/evaluation.py --family diffusion --seed 1

One training seed is timed (the first of `seeds` unless --seed): the cost does not depend on it.
The last line times the baselines stage's work (`baseline_metrics`: the copycat's and held-out
real images' sample metrics and memorisation, the real-data row) under the same protocol.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from genlab import paths
from genlab.config import load_params
from genlab.data.prepared import read_meta
from genlab.evaluation import vocabulary as v
from genlab.evaluation.baselines import baseline_metrics
from genlab.evaluation.evaluate import evaluate_model
from genlab.evaluation.protocol import (
    compute_reference,
    load_reference,
    measurement,
    save_reference,
)
from genlab.models import MODELS
from genlab.training import MODEL_FILE

# The evaluate stage's phases (evaluation/evaluate.py): "metrics" are the sample metrics with
# their bootstrap intervals, "memorisation" the copying statistics; "likelihood" includes the
# held-out - train gap.
# --quick: what EvaluateParams allows at the least of sets (sample_seeds >= 2) and of the
# bootstrap (>= 10); 200 samples a set, or the validation split's size if smaller (the held-out
# real row is one set of validation images: `protocol.set_size`).
QUICK = {"num_samples": 200, "sample_seeds": 2, "bootstrap": 20, "kid_subset_size": 100}
PHASES = (
    "sampling",
    "features",
    "metrics",
    "memorisation",
    "likelihood",
    "prediction",
    "representation",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(MODELS), help="repeatable")
    parser.add_argument("--quick", action="store_true", help="a reduced protocol")
    parser.add_argument("--seed", type=int, help="training seed (default: the first of seeds)")
    args = parser.parse_args(argv)

    params = load_params()
    families = args.family or params.families
    protocol, prediction = params.evaluate, params.prediction
    device = params.trainer.eval_device
    seed = params.seeds[0] if args.seed is None else args.seed
    missing = [f for f in families if not (paths.family_model_dir(f, seed) / MODEL_FILE).is_file()]
    if missing:
        sys.exit(f"no trained model for {', '.join(missing)}: run `uv run dvc repro` first")
    meta = read_meta(paths.PREPARED)
    if args.quick:
        n = min(QUICK["num_samples"], int(meta.splits["val"]["n"]))
        protocol = protocol.model_copy(update=QUICK | {"num_samples": n})
        quick = {"bound_samples": 2, "classification_samples": None, "ood_sets": ["noise"]}
        prediction = prediction.model_copy(update=quick)
    extractor, measured = measurement(protocol, paths.EVALUATOR, meta)
    with tempfile.TemporaryDirectory(prefix="genlab-evaluation-") as tmp:
        reference_dir = paths.REFERENCE
        if args.quick:  # computed here: no need for the `reference` stage's file
            reference = compute_reference(
                paths.PREPARED, extractor, measured, batch_size=protocol.batch_size, device=device
            )
            reference_dir = Path(tmp)
            save_reference(reference, reference_dir, measured)
        print(
            f"seed {seed}: {measured.sample_seeds} sets of {measured.num_samples} samples, "
            f"{measured.bootstrap} bootstrap draws, {prediction.bound_samples} bound terms "
            f"({prediction.classifying_samples} in Bayes' rule), "
            f"OOD sets {', '.join(prediction.ood_sets)}, seconds on {device}"
        )
        header = f"{'family':<10}" + "".join(f"{p:>15}" for p in (*PHASES, "other", "total"))
        print(header)
        print("-" * len(header))
        totals = dict.fromkeys((*PHASES, "other", "total"), 0.0)
        for family in families:
            checkpoint = paths.family_model_dir(family, seed) / MODEL_FILE
            model = MODELS[family].load_from_checkpoint(
                checkpoint, map_location=device, weights_only=True
            )
            if args.quick:  # the held-out bound's draws (IWAE k, dequantization, diffusion terms)
                model.hparams["eval_samples"] = min(model.eval_samples, 10)
            start = time.perf_counter()
            result = evaluate_model(
                model,
                prepared_dir=paths.PREPARED,
                evaluator_path=paths.EVALUATOR,
                reference_dir=reference_dir,
                protocol=protocol,
                prediction=prediction,
                representation=params.representation,
                channels_last=params.trainer.channels_last,
            )
            row = {p: result.metrics.get(v.phase_seconds(p), 0.0) for p in PHASES}
            row["total"] = time.perf_counter() - start
            row["other"] = row["total"] - sum(row[p] for p in PHASES)
            for key, value in row.items():
                totals[key] += value
            print(f"{family:<10}" + "".join(f"{row[c]:>15.1f}" for c in totals))
        print(f"{'all':<10}" + "".join(f"{totals[c]:>15.1f}" for c in totals))
        # The baselines stage's work: the copycat and held-out real rows through the same
        # sample metrics and memorisation statistics, and the real-data row.
        reference = load_reference(reference_dir, measured)
        start = time.perf_counter()
        rows = baseline_metrics(
            paths.PREPARED,
            reference=reference,
            protocol=measured,
            extractor=extractor,
            evaluator_path=paths.EVALUATOR,
            representation=params.representation,
            batch_size=protocol.batch_size,
            device=device,
        )
        baselines_s = time.perf_counter() - start
        print(f"{'baselines':<10}{baselines_s:>15.1f}  (the baselines stage: {', '.join(rows)})")
    top = max(PHASES, key=totals.get)
    print(
        f"evaluation: {totals['total']:.0f} s for {len(families)} families; sampling "
        f"{totals['sampling']:.0f} s, feature extraction {totals['features']:.1f} s, sample "
        f"metrics with intervals {totals['metrics']:.1f} s, memorisation "
        f"{totals['memorisation']:.1f} s; largest phase {top} "
        f"({totals[top] / totals['total']:.0%}); baselines stage {baselines_s:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
