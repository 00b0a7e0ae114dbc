"""DDPM (all T steps) against DDIM (S = 10, 25, 50, 100): FID with intervals, seconds/sample.

Samples the trained diffusion model of the last `uv run dvc repro`
(models/diffusion/seed<k>/model.ckpt) under the evaluate stage's protocol (the same sample sets,
labels, cached reference features and intervals), changing only the sampler, so every row is
comparable with metrics/diffusion/seed<k>.json.

    uv run python benchmarks/samplers.py            # the full protocol (DDPM takes minutes on CPU)
    uv run python benchmarks/samplers.py --quick    # 2 sets of 200 samples, 20 bootstrap draws:
                                                    # wider intervals

Target (issue 4): DDIM with 50 steps within 10% of DDPM's FID, at least 15x faster.
"""

from __future__ import annotations

import argparse
import sys

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

FAMILY = "diffusion"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 200 samples, DDIM 10/50 and DDPM")
    parser.add_argument("--seed", type=int, help="training seed (default: the first of seeds)")
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
    device = params.trainer.eval_device
    checkpoint = paths.family_model_dir(FAMILY, seed) / MODEL_FILE
    if not checkpoint.is_file():
        sys.exit(f"no trained {FAMILY} model for seed {seed} ({checkpoint}): run `dvc repro`")
    model = MODELS[FAMILY].load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
    reference_y = load_split(paths.PREPARED, protocol.reference_split, meta).y
    timesteps = model.hparams.timesteps
    settings = [("ddim", s) for s in ((10, 50) if args.quick else (10, 25, 50, 100))]
    settings.append(("ddpm", timesteps))

    interval = f"[{protocol.confidence:.0%}]"
    header = f"{'sampler':<8} {'steps':>6} {'NFE':>6} {'FID ' + interval:>22} "
    header += f"{'KID ' + interval:>26} {'cond ' + interval:>20} "
    header += f"{'s/sample':>9}"
    print(
        f"{FAMILY} (seed {seed}): {protocol.sample_seeds} sets of {protocol.num_samples} "
        f"samples, guidance {model.hparams.guidance_scale}, on {device}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for sampler, steps in settings:
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
        nfe = model.sampling_nfe(sampler=sampler, steps=steps)
        results[(sampler, steps)] = (v.estimate(metrics, v.FID), per_sample)
        print(
            f"{sampler:<8} {steps:>6} {nfe:>6.0f} {cell(metrics, v.FID):>22} "
            f"{cell(metrics, v.KID, 4):>26} {cell(metrics, v.COND_ACC):>20} "
            f"{per_sample:>9.5f}"
        )
    fid_ddim, t_ddim = results[("ddim", 50)]
    fid_ddpm, t_ddpm = results[("ddpm", timesteps)]
    tied = "tied" if fid_ddim.overlaps(fid_ddpm) else "apart"
    print(
        f"samplers: DDIM-50 FID {fid_ddim.value:.3f} vs DDPM-{timesteps} {fid_ddpm.value:.3f} "
        f"({fid_ddim.value / fid_ddpm.value - 1:+.1%}, intervals {tied}; target within 10%), "
        f"{t_ddpm / t_ddim:.1f}x faster (target 15x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
