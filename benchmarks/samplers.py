"""FID against network evaluations per sample (NFE) for the two ODE-sampled families: diffusion's
DDIM (S = 10, 25, 50, 100) and DDPM (all T steps), flow matching's Euler, Heun and dopri5.

Samples each trained model of the last `uv run dvc repro` (models/<family>/seed<k>/model.ckpt)
under the evaluate stage's protocol (the same sample sets, labels, cached reference features
and intervals), changing only the sampler, so every row is comparable with
metrics/<family>/seed<k>.json. A family with no trained model is skipped (flow matching trains
only when it is in `families`: `uv run dvc exp run -S 'families=[..., flow_matching]'`).

    uv run python benchmarks/samplers.py            # the full protocol (DDPM takes minutes on CPU)
    uv run python benchmarks/samplers.py --quick    # 2 sets of 200 samples, 20 bootstrap draws,
                                                    # fewer settings: wider intervals
    uv run python benchmarks/samplers.py --plot fid_nfe.png   # the curve as a figure too
    uv run python benchmarks/samplers.py --no-ddpm  # without DDPM's T steps (minutes on CPU)

Targets: DDIM with 50 steps within 10% of DDPM's FID, at least 15x faster (issue 4); flow matching
at <= 20 NFE not worse than DDIM-50, within the intervals (issue 20).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import cell
from genlab import paths
from genlab.config import load_params
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluate import generate
from genlab.evaluation.protocol import load_reference, measurement
from genlab.evaluation.rows import Row, generation_metrics, row_features
from genlab.models import MODELS
from genlab.training import MODEL_FILE

FAMILIES = ("diffusion", "flow_matching")
# (sampler, steps) per family, full and --quick; steps None: the adaptive solver.
SETTINGS = {
    "diffusion": {
        "full": [("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddim", 100), ("ddpm", None)],
        "quick": [("ddim", 10), ("ddim", 50), ("ddpm", None)],
    },
    "flow_matching": {
        "full": [
            ("euler", 5),
            ("euler", 10),
            ("euler", 20),
            ("heun", 3),
            ("heun", 5),
            ("heun", 10),
            ("heun", 20),
            ("dopri5", None),
        ],
        "quick": [("euler", 10), ("heun", 5), ("heun", 10), ("dopri5", None)],
    },
}
NFE_BUDGET = 20  # issue 20: flow matching at this many evaluations per sample or fewer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 200 samples, fewer settings")
    parser.add_argument("--seed", type=int, help="training seed (default: the first of seeds)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--plot", type=Path, help="write FID against NFE to this PNG")
    parser.add_argument("--no-ddpm", action="store_true", help="leave out DDPM (T steps)")
    args = parser.parse_args(argv)

    params = load_params()
    seed = params.seeds[0] if args.seed is None else args.seed
    evaluate = params.evaluate
    meta = read_meta(paths.PREPARED)
    if args.quick:  # at most the validation split's size (protocol.set_size)
        n = min(200, int(meta.splits["val"]["n"]))
        quick = {"num_samples": n, "sample_seeds": 2, "bootstrap": 20}
        evaluate = evaluate.model_copy(update=quick)
    extractor, protocol = measurement(evaluate, paths.EVALUATOR, meta)
    # The cached features do not depend on the set size or count: the stage's file serves.
    reference = load_reference(paths.REFERENCE, protocol)
    reference_y = load_split(paths.PREPARED, protocol.reference_split, meta).y
    device = params.trainer.eval_device

    def measure(model, sampler: str, steps: int | None) -> dict[str, float]:
        generated = generate(
            model, protocol, batch_size=evaluate.batch_size, sampler=sampler, steps=steps
        )
        row = Row(generated.sets, generated.labels)
        features = row_features(row, extractor, batch_size=evaluate.batch_size, device=device)
        metrics = generation_metrics(
            row,
            features,
            reference=reference,
            reference_y=reference_y,
            protocol=protocol,
            num_classes=model.num_classes,
            extractor=extractor,
            evaluator_path=paths.EVALUATOR,
            batch_size=evaluate.batch_size,
            device=device,
        )
        per_sample = generated.seconds / (protocol.num_samples * protocol.sample_seeds)
        nfe = model.sampling_nfe(sampler=sampler, steps=steps)  # dopri5: measured just now
        return metrics | {"nfe": nfe, "seconds": per_sample}

    interval = f"[{protocol.confidence:.0%}]"
    header = f"{'sampler':<8} {'steps':>6} {'NFE':>6} {'FID ' + interval:>22} "
    header += f"{'KID ' + interval:>26} {'cond ' + interval:>20} {'s/sample':>9}"
    curves: dict[str, list[tuple[str, int | None, dict[str, float]]]] = {}
    for family in args.families:
        checkpoint = paths.family_model_dir(family, seed) / MODEL_FILE
        if not checkpoint.is_file():
            print(f"{family}: no trained model for seed {seed} ({checkpoint}), skipped")
            continue
        cls = MODELS[family]
        model = cls.load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
        hp = model.hparams
        print(
            f"\n{family} (seed {seed}): {protocol.sample_seeds} sets of {protocol.num_samples} "
            f"samples, {'conditional' if model.conditional else 'unconditional'}, guidance "
            f"{hp.guidance_scale}, on {device}"
        )
        print(header)
        print("-" * len(header))
        curves[family] = []
        for sampler, steps in SETTINGS[family]["quick" if args.quick else "full"]:
            if sampler == "ddpm":
                if args.no_ddpm:
                    continue
                steps = hp.timesteps
            m = measure(model, sampler, steps)
            curves[family].append((sampler, steps, m))
            print(
                f"{sampler:<8} {steps or '-':>6} {m['nfe']:>6.0f} {cell(m, v.FID):>22} "
                f"{cell(m, v.KID, 4):>26} {cell(m, v.COND_ACC):>20} {m['seconds']:>9.5f}"
            )
    if not curves:
        sys.exit("no trained diffusion or flow_matching model: run `dvc repro` first")
    print()
    summarise(curves)
    if args.plot:
        plot(curves, args.plot, protocol.confidence)
        print(f"figure: {args.plot}")
    return 0


def summarise(curves: dict[str, list[tuple[str, int | None, dict[str, float]]]]) -> None:
    """The targets' lines: DDIM-50 against DDPM; flow matching's best setting within NFE_BUDGET
    against DDIM-50, tied where the FID intervals overlap."""
    found = {
        (family, sampler, steps): m for family, rows in curves.items() for sampler, steps, m in rows
    }
    ddim = found.get(("diffusion", "ddim", 50))
    ddpm = next((m for (f, s, _), m in found.items() if f == "diffusion" and s == "ddpm"), None)
    if ddim is not None and ddpm is not None:
        a, b = v.estimate(ddim, v.FID), v.estimate(ddpm, v.FID)
        print(
            f"diffusion: DDIM-50 FID {a.value:.3f} vs DDPM {b.value:.3f} "
            f"({a.value / b.value - 1:+.1%}, intervals {'tied' if a.overlaps(b) else 'apart'}; "
            f"target within 10%), {ddpm['seconds'] / ddim['seconds']:.1f}x faster (target 15x)"
        )
    cheap = [
        (v.estimate(m, v.FID), sampler, steps, m["nfe"])
        for (family, sampler, steps), m in found.items()
        if family == "flow_matching" and m["nfe"] <= NFE_BUDGET
    ]
    if cheap and ddim is not None:
        fid, sampler, steps, nfe = min(cheap, key=lambda c: c[0].value)
        reference = v.estimate(ddim, v.FID)
        verdict = (
            "tied"
            if fid.overlaps(reference)
            else ("better" if fid.value < reference.value else "worse")
        )
        print(
            f"flow matching at <= {NFE_BUDGET} NFE: best {sampler}-{steps} ({nfe:.0f} NFE) FID "
            f"{fid.value:.3f} [{fid.low:.3f}, {fid.high:.3f}] vs diffusion DDIM-50 "
            f"{reference.value:.3f} [{reference.low:.3f}, {reference.high:.3f}]: {verdict} "
            "(target: not worse)"
        )


def plot(curves, path: Path, confidence: float) -> None:
    """FID with its interval against NFE (log axis), one line per family and sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family, rows in curves.items():
        for sampler in dict.fromkeys(s for s, _, _ in rows):
            points = [m for s, _, m in rows if s == sampler]
            x = [m["nfe"] for m in points]
            fids = [v.estimate(m, v.FID) for m in points]
            y = [f.value for f in fids]
            err = [[f.value - f.low for f in fids], [f.high - f.value for f in fids]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{family} {sampler}")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"FID ({confidence:.0%} interval)")
    ax.axvline(NFE_BUDGET, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
