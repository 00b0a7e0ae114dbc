"""Re-check on the validation split the defaults that were first chosen on test numbers.

Each choice is measured as a user tuning genlab would: every variant trained with the default
params otherwise (training seed 0), then evaluated with `evaluate.split: val`, so the test split
is never read. The numbers come with their intervals; where the intervals overlap the choice is
a tie, and the default stays unless a variant wins outright.

- `vae.latent_dim` 32 / 48 / 64: validation IWAE bound (nats) and linear-probe accuracy;
- `ebm.noise` 0.01 / 0.05 (training Langevin noise): validation FID, recall and conditional
  accuracy (as every EBM and GAN choice);
- `ebm.step_size` 1 / 30 / 100 (the Langevin step; the profiles of larger images need a longer
  one: a short run from noise must cross more pixels);
- `gan.beta1` 0.0 / 0.5;
- cost trims: `ebm.langevin_steps` 15 / 20, `ebm.max_epochs` 15 / 20, `gan.max_epochs` 60 / 90,
  with each variant's training time;
- the diffusion decoder's variance, beta-tilde_t against beta_t, on the trained default model:
  the validation bound (no training: the variance only enters the bound);
- `evaluator.augment_*` on / off: the evaluator's validation accuracy over 4 seeds.

    uv run python benchmarks/defaults.py                  # everything (about 30 min on 2 cores)
    uv run python benchmarks/defaults.py --only gan.beta1 # one choice
    # a profile's choice, on its data: the EBM's Langevin step on real MNIST (the four idx
    # files), over the mnist profile with two of its keys set
    uv run python benchmarks/defaults.py --profile mnist --mnist ../shared/data/mnist \
        --set models.ebm.noise=0.3 --set models.ebm.max_steps=100 --only ebm.step_size
    # other values than the listed ones, for the one choice
    uv run python benchmarks/defaults.py --only ebm.noise --values 0.05,0.3
    # any variants of one family, each a set of keys (here: a narrower U-Net trained longer
    # against the profile's), evaluated with fewer sample sets and scored images
    uv run python benchmarks/defaults.py --profile mnist --mnist ../shared/data/mnist \
        --set evaluate.sample_seeds=2 --set evaluate.scored_images=300 \
        --set representation.probe_images=300 \
        --variant "" --variant "models.diffusion.channels=16 models.diffusion.max_epochs=5"

Exit code 0 whatever the numbers: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from common import cell, profiled, set_key
from genlab.config import Params, TrainerParams, parse_params
from genlab.data.prepared import load_split, prepare, read_meta
from genlab.errors import ConfigError
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluate import evaluate_model
from genlab.evaluation.evaluator import train_evaluator
from genlab.evaluation.intervals import mean_and_se
from genlab.evaluation.likelihood import per_image_nll
from genlab.evaluation.protocol import compute_reference, measurement, save_reference
from genlab.models import MODELS
from genlab.training import train_family
from mnist import copy_mnist

# What a choice of a sampling family is judged by; conditional accuracy too, as the defaults
# train class-conditional models ("n/a" for an unconditional one).
SAMPLES = [v.FID, v.RECALL, v.COND_ACC]
CHOICES: dict[str, tuple[str, str, list[object], list[str]]] = {
    "vae.latent_dim": ("vae", "latent_dim", [32, 48, 64], ["nll", v.probe_acc("val")]),
    "ebm.noise": ("ebm", "noise", [0.01, 0.05], SAMPLES),
    "ebm.step_size": ("ebm", "step_size", [1.0, 30.0, 100.0], SAMPLES),
    "gan.beta1": ("gan", "beta1", [0.0, 0.5], SAMPLES),
    # Cost trims for the default run's 10 minutes: less training where validation ties.
    "ebm.langevin_steps": ("ebm", "langevin_steps", [15, 20], SAMPLES),
    "ebm.max_epochs": ("ebm", "max_epochs", [15, 20], SAMPLES),
    "gan.max_epochs": ("gan", "max_epochs", [60, 90], SAMPLES),
}
OTHERS = ("diffusion.variance", "evaluator.augment")


def tuning_params(
    raw: dict,
    store: Path,
    sets: Sequence[str] = (),
    mnist_root: Path | None = None,
) -> Params:
    """The params mapping `raw` (params.yaml with its profiles), each `--set` over it, evaluated
    on validation, logging into a throwaway MLflow store; `mnist_root`: where the MNIST files
    were copied."""
    for dotted in sets:
        set_key(raw, dotted)
    if mnist_root is not None:
        raw["dataset"]["root"] = str(mnist_root)
    raw["evaluate"]["split"] = "val"
    raw["prediction"]["ood_sets"] = ["noise"]  # not what is compared here: keep it cheap
    raw["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "defaults"}
    return parse_params(raw, "params.yaml (tuning copy)")


def with_value(params: Params, family: str, key: str, value: object) -> Params:
    raw = params.model_dump()
    raw["models"].setdefault(family, {})[key] = value
    return parse_params(raw)


def setup(work: Path, params: Params) -> tuple[Path, Path, Path]:
    """Prepared data, the evaluator and the validation reference features under `work`."""
    prepared, evaluator, reference = work / "prepared", work / "evaluator.pt", work / "reference"
    prepare(params.dataset, prepared)
    train_evaluator(prepared, evaluator, params=params.evaluator, trainer=params.trainer, seed=0)
    extractor, protocol = measurement(params.evaluate, evaluator, read_meta(prepared))
    features = compute_reference(
        prepared, extractor, protocol, batch_size=params.evaluate.batch_size
    )
    save_reference(features, reference, protocol)
    return prepared, evaluator, reference


def evaluate_variant(
    params: Params, family: str, name: str, work: Path, dirs: tuple[Path, Path, Path]
) -> dict[str, float]:
    prepared, evaluator, reference = dirs
    out = work / name
    result = train_family(
        params,
        family,
        seed=0,
        prepared_dir=prepared,
        out_dir=out / "model",
        checkpoint_root=out / "checkpoints",
    )
    model = MODELS[family].load_from_checkpoint(result.checkpoint, weights_only=True)
    evaluation = evaluate_model(
        model,
        prepared_dir=prepared,
        evaluator_path=evaluator,
        reference_dir=reference,
        protocol=params.evaluate,
        prediction=params.prediction,
        representation=params.representation,
        channels_last=params.trainer.channels_last,
    )
    return evaluation.metrics | {v.TRAIN_WALL_S: result.wall_s}


def choice(
    name: str,
    params: Params,
    work: Path,
    dirs: tuple[Path, Path, Path],
    values: list[object] | None = None,
) -> None:
    family, key, listed, shown = CHOICES[name]
    values = listed if values is None else values
    default = params.family(family).model_dump()[key]
    print(f"\n{name} (default {default}), validation split:")
    for value in values:
        metrics = evaluate_variant(
            with_value(params, family, key, value), family, f"{family}-{key}-{value}", work, dirs
        )
        mark = "*" if value == default else " "
        trained = f"   trained in {metrics[v.TRAIN_WALL_S]:.1f} s"
        print(
            f"  {mark} {key} = {value!s:<6} " + cells(metrics, family, shown) + trained, flush=True
        )


def variant_params(specs: Sequence[str], params: Params) -> tuple[str, list[Params]]:
    """The family and the params of each `--variant` spec (space-separated KEY=VALUE over
    `params`; "" for `params` as they are), every one checked before any training: keys of one
    family's models section only (`params.families`' first if no spec names one)."""
    keys = [key.partition("=")[0] for spec in specs for key in spec.split()]
    families = {key.split(".")[1] for key in keys if key.count(".") >= 2}
    if len(families) > 1 or any(not key.startswith("models.") for key in keys):
        raise ValueError(f"keys of one family's models section only (got {list(specs)})")
    family = families.pop() if families else params.families[0]
    raw = params.model_dump()
    chosen = []
    for spec in specs:
        changed = copy.deepcopy(raw)
        for dotted in spec.split():
            set_key(changed, dotted)
        chosen.append(parse_params(changed, repr(spec)))
    return family, chosen


def variants(
    family: str,
    specs: Sequence[str],
    chosen: Sequence[Params],
    work: Path,
    dirs: tuple[Path, Path, Path],
) -> None:
    """Each variant trained and evaluated on validation, with its training time."""
    shown = ["nll"] * (MODELS[family].likelihood != "none") + SAMPLES
    print(f"\n{family} variants, validation split:")
    for i, (spec, params) in enumerate(zip(specs, chosen, strict=True)):
        metrics = evaluate_variant(params, family, f"{family}-variant-{i}", work, dirs)
        trained = f"trained in {metrics[v.TRAIN_WALL_S]:.1f} s"
        print(
            f"  {spec or '(as set)'}:\n    {cells(metrics, family, shown)}   {trained}", flush=True
        )


def cells(metrics: dict[str, float], family: str, shown: Sequence[str]) -> str:
    """The `shown` metrics with their intervals ("nll": the family's validation likelihood)."""
    out = []
    for metric in shown:
        metric = v.nll_key("val", MODELS[family].likelihood) if metric == "nll" else metric
        out.append(f"{metric} {cell(metrics, metric)}")
    return "   ".join(out)


def diffusion_variance(params: Params, work: Path, dirs: tuple[Path, Path, Path]) -> None:
    """The validation bound of one trained diffusion model with sigma_t^2 = beta-tilde_t (the
    default) and with sigma_t^2 = beta_t: only the bound's decoder variance changes."""
    prepared = dirs[0]
    out = work / "diffusion"
    result = train_family(
        params,
        "diffusion",
        seed=0,
        prepared_dir=prepared,
        out_dir=out / "model",
        checkpoint_root=out / "checkpoints",
    )
    model = MODELS["diffusion"].load_from_checkpoint(result.checkpoint, weights_only=True)
    val = load_split(prepared, "val")
    kw = {"batch_size": params.evaluate.batch_size, "seed": 0, "samples": model.eval_samples}
    print("\ndiffusion decoder variance, validation bound (nats/image, ± se):")
    tilde = model.model_logvar.clone()
    betas = model.betas.double().clone()
    betas[0] = 1.0  # unused (t = 0 is the data), as in the default
    for label, logvar in (("beta-tilde_t", tilde), ("beta_t", betas.log().float())):
        model.model_logvar = logvar
        nats, se = mean_and_se(per_image_nll(model, val, **kw))
        mark = "*" if label == "beta-tilde_t" else " "
        print(f"  {mark} sigma_t^2 = {label:<13} {nats:.2f} ± {se:.2f}", flush=True)


def evaluator_augment(params: Params, work: Path, prepared: Path) -> None:
    """Validation accuracy of the evaluator with and without its training augmentation."""
    print("\nevaluator augmentation, validation accuracy over seeds 0-3:")
    off = {"augment_degrees": 0.0, "augment_scale": 0.0, "augment_shift": 0.0}
    for label, change in (("on (default)", {}), ("off", off)):
        accuracies = []
        for seed in range(4):
            settings = params.evaluator.model_copy(update=change)
            result = train_evaluator(
                prepared,
                work / f"evaluator-{label[:3]}-{seed}.pt",
                params=settings,
                trainer=TrainerParams(),
                seed=seed,
            )
            accuracies.append(result.val_accuracy)
        mean = float(np.mean(accuracies))
        sd = float(np.std(accuracies, ddof=1))
        print(f"  augmentation {label:<13} {mean:.4f} ± {sd:.4f} (sd over seeds) {accuracies}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[*CHOICES, *OTHERS], action="append")
    parser.add_argument("--profile", action="append", default=[], help="<name> or a .yaml path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mnist", type=Path, help="a folder with the four MNIST idx files")
    parser.add_argument("--values", help="comma-separated values for the one --only choice")
    parser.add_argument(
        "--variant",
        action="append",
        metavar='"KEY=VALUE ..."',
        help="a variant of one family's settings to compare (repeatable; replaces the choices)",
    )
    args = parser.parse_args(argv)
    wanted = args.only or [*CHOICES, *OTHERS]
    values = None
    if args.variant and args.only:
        parser.error("--variant compares its own settings: give it without --only")
    if args.values is not None:
        if len(wanted) != 1 or wanted[0] not in CHOICES:
            parser.error("--values needs exactly one --only naming a choice")
        values = [yaml.safe_load(value) for value in args.values.split(",")]
    try:
        raw = profiled(Path(), args.profile)
    except ConfigError as exc:  # ProfileError too; a profile that is not valid YAML
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="genlab-defaults-") as tmp:
        work = Path(tmp)
        root = copy_mnist(args.mnist, work) if args.mnist is not None else None
        params = tuning_params(raw, work / "mlflow.db", args.set, root)
        if root is not None and params.dataset.name != "mnist":
            parser.error(
                f"--mnist needs a dataset that reads them (--profile mnist), not "
                f"{params.dataset.name}"
            )
        if args.variant:
            try:
                family, chosen = variant_params(args.variant, params)
            except (ValueError, KeyError) as exc:  # ConfigError is a ValueError
                parser.error(f"--variant: {exc}")
            wanted = []
        dirs = setup(work, params)
        if args.variant:
            variants(family, args.variant, chosen, work, dirs)
        for name in wanted:
            if name in CHOICES:
                choice(name, params, work, dirs, values)
            elif name == "diffusion.variance":
                diffusion_variance(params, work, dirs)
            else:
                evaluator_augment(params, work, dirs[0])
    print("\ndefaults: * marks the current default; intervals that overlap are ties")
    return 0


if __name__ == "__main__":
    sys.exit(main())
