"""DDPM (all T steps) against DDIM (S = 10, 25, 50, 100): FID and seconds per sample.

Samples the trained diffusion model of the last `uv run dvc repro` (models/diffusion/model.ckpt)
under the evaluate stage's protocol (same seed, same sample count, same labels, same features),
changing only the sampler, so every row is comparable with metrics/diffusion.json.

    uv run python benchmarks/samplers.py            # the full protocol (DDPM takes minutes on CPU)
    uv run python benchmarks/samplers.py --quick    # 200 samples: under a minute, noisier FID

Target (issue 4): DDIM with 50 steps within 10% of DDPM's FID, at least 15x faster.
"""

from __future__ import annotations

import argparse
import sys

from genlab import paths
from genlab.config import load_params
from genlab.data.prepared import load_split
from genlab.evaluation.evaluate import generate
from genlab.evaluation.fidelity import classifier_accuracy, sample_metrics
from genlab.models import MODELS
from genlab.training import MODEL_FILE

FAMILY = "diffusion"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 samples, DDIM 10/50 and DDPM")
    args = parser.parse_args(argv)

    params = load_params()
    protocol = params.evaluate
    if args.quick:
        protocol = protocol.model_copy(update={"num_samples": 200, "kid_subset_size": 100})
    model = MODELS[FAMILY].load_from_checkpoint(
        paths.family_model_dir(FAMILY) / MODEL_FILE, map_location="cpu", weights_only=True
    )
    test = load_split(paths.PREPARED, "test")
    timesteps = model.hparams.timesteps
    settings = [("ddim", s) for s in ((10, 50) if args.quick else (10, 25, 50, 100))]
    settings.append(("ddpm", timesteps))

    header = f"{'sampler':<8} {'steps':>6} {'NFE':>6} {'FID':>7} {'KID':>8} {'cond':>6} "
    header += f"{'s/sample':>9}"
    print(f"{FAMILY}: {protocol.num_samples} samples, guidance {model.hparams.guidance_scale}")
    print(header)
    print("-" * len(header))
    results = {}
    for sampler, steps in settings:
        generated = generate(model, protocol, sampler=sampler, steps=steps)
        metrics = sample_metrics(generated.samples, test.x, paths.EVALUATOR, protocol=protocol)
        cond = (
            classifier_accuracy(paths.EVALUATOR, generated.samples, generated.labels)
            if generated.labels is not None
            else float("nan")
        )
        per_sample = generated.seconds / protocol.num_samples
        nfe = model.sampling_nfe(sampler=sampler, steps=steps)
        results[(sampler, steps)] = (metrics.fid, per_sample)
        print(
            f"{sampler:<8} {steps:>6} {nfe:>6.0f} {metrics.fid:>7.3f} {metrics.kid_mean:>8.4f} "
            f"{cond:>6.3f} {per_sample:>9.5f}"
        )
    fid_ddim, t_ddim = results[("ddim", 50)]
    fid_ddpm, t_ddpm = results[("ddpm", timesteps)]
    print(
        f"samplers: DDIM-50 FID {fid_ddim:.3f} vs DDPM-{timesteps} {fid_ddpm:.3f} "
        f"({fid_ddim / fid_ddpm - 1:+.1%}, target within 10%), {t_ddpm / t_ddim:.1f}x faster "
        f"(target 15x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
