"""`genlab`: the pipeline stages as commands (what dvc.yaml runs).

Each command imports what it needs when it runs, so that `genlab --help` imports no torch and
`genlab prepare` no Lightning (a stage's start-up is mostly imports: about 6 s on 2 cores for
torch, Lightning and MLflow together)."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from genlab.errors import GenlabError
from genlab.families import FAMILIES

# What `genlab score` reads and writes (its --help): here, so that the help needs no torch.
SCORE_DESCRIPTION = """\
INPUT is a folder of image files (png, jpg/jpeg, bmp, gif, tif/tiff, webp; read in name order;
hidden files are skipped, anything else is an error), one image file, or a `.npy` array of integer
LEVELS 0..L-1 shaped (N, C, H, W), (N, H, W) or (H, W) for 1-channel data, (C, H, W) for one
multi-channel image. Image files must have the data's size (no resizing) and hold 8-bit pixels
(16-bit grayscale too, taken to 8 bits as round(v * 255 / 65535), as `genlab prepare` reads it),
mapped to levels by round(v * (L - 1) / 255) rounded half up, the inverse of
`genlab.evaluation.grids.to_uint8_pixels`. For grayscale data an image must be grey: mode 'L',
'1', 16-bit grey, or a palette / RGB(A) / LA image whose pixels all have R = G = B (an exact
conversion); a colour image is an error, never converted to grey. For RGB data a grey image
is taken as R = G = B. Transparent pixels are an error (their colour is undefined).

Scores (genlab.evaluation.predict.score_images): log p(x) in nats, exact or a lower bound with
`prediction.bound_samples` Monte Carlo draws (flow matching: its own `prediction_samples`
ODE solves), or -E(x) for an energy model; a conditional family
marginalises the label, p(x) = sum_y p(x | y) p(y), with p(y) the train split's class frequencies.

Verdict: the statistic `prediction.statistic` (log p(x) itself, or the typicality
-|log p(x) - mean log p(x) on validation|, Nalisnick et al. 2019) is compared with the threshold
that rejects a fraction `prediction.fpr` of the validation split; an image is in-distribution iff
its statistic >= that threshold.

CSV columns, one row per image (`image` is the file name, or the row index of a .npy array):

- exact likelihood families:  image, nats, bits_per_dim, statistic, in_distribution
- bound likelihood families:  image, nats_bound, bits_per_dim_bound, statistic, in_distribution
  (upper bounds on -log p(x), as `test/nll_bound_nats` in the metrics)
- energy families:            image, energy, statistic, in_distribution
  (E(x) = -log p(x) - log Z with log Z unknown: no nats, no bits/dim)

nats = -log p(x) per image; bits_per_dim = nats / (C·H·W · ln 2); in_distribution is true/false.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genlab", description="The pipeline's stages as commands (what dvc.yaml runs)."
    )
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="dataset -> data/prepared")
    sub.add_parser("evaluator", help="train the evaluation classifier")
    sub.add_parser(
        "reference", help="the real data's features for the sample metrics -> data/reference"
    )
    seed_help = "training seed (default: the first of `seeds` in params)"
    for name, text in (("train", "train one family"), ("evaluate", "evaluate one family")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("family", choices=sorted(FAMILIES))
        cmd.add_argument("--seed", type=_seed, help=seed_help)
    sub.add_parser(
        "baselines", help="the copycat, held-out real and real-data rows -> metrics/baselines.json"
    )
    sub.add_parser("report", help="compare all families in reports/")
    score = sub.add_parser(
        "score",
        help="per-image nats, bits/dim and an in-distribution verdict (CSV)",
        description=SCORE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument(
        "family",
        choices=sorted(FAMILIES),
        help="a trained family (models/<family>/seed<k>/model.ckpt)",
    )
    score.add_argument("input", help="a folder of images, one image file or a .npy array of levels")
    score.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    score.add_argument(
        "--seed", type=_seed, help="which training seed's model (default: the first)"
    )
    sync = sub.add_parser(
        "sync",
        help="push the local MLflow store's runs to the team tracking server",
        description="Push runs of the local store (mlflow.db at the repository root) to the team "
        "server that MLFLOW_TRACKING_URI or tracking.uri in the params file names: each run's "
        "params, tags, metric histories, dataset inputs, files and status that the server lacks. "
        "Pushing twice sends nothing the second time; a push cut short is finished by the next.",
    )
    sync.add_argument(
        "runs",
        nargs="*",
        metavar="RUN_ID",
        help="local run ids (default: every run of the local store)",
    )
    sync.add_argument("--experiment", help="only the runs of this MLflow experiment")
    profile = sub.add_parser(
        "profile",
        help="write params profiles (profiles/<name>.yaml) into the params file",
        description="Merge each profile, in order, over the params file and write it there "
        "(comments kept), after checking the result as every stage reads it: e.g. `genlab "
        "profile mnist`, then `dvc repro`. A profile holds only the keys it changes; mappings "
        "merge key by key, other values replace. Applying it again changes nothing.",
    )
    profile.add_argument(
        "profiles", nargs="*", metavar="NAME", help="a name in profiles/ or a .yaml file"
    )
    profile.add_argument(
        "--force", action="store_true", help="apply over uncommitted edits of the params file"
    )
    return parser


def _seed(text: str) -> int:
    """A training seed on the command line: an integer in 0..2^32 - 1."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is in 0..{2**32 - 1}, got {seed}")
    return seed


def run_sync(params_file: str, runs: list[str], experiment: str | None) -> None:
    from pathlib import Path

    from genlab.sync import local_runs, push
    from genlab.tracking import resolve_stores

    params_uri = None
    if Path(params_file).is_file():  # only its tracking.uri; MLFLOW_TRACKING_URI wins over it
        from genlab.config import load_params

        params_uri = load_params(params_file, check_models=False).tracking.uri
    stores = resolve_stores(params_uri)
    runs = runs or local_runs(stores, experiment)
    if not runs:
        print(f"no runs in {stores.local}: nothing to push")
        return
    for result in push(stores, runs):
        if result.remote_run_id is None:
            print(f"run {result.local_run_id} ({result.run_name}): deleted on the server, skipped")
        else:
            print(
                f"run {result.local_run_id} ({result.run_name}) -> {result.remote_run_id}: "
                f"{result.counts.summary()}"
            )


def run_profile(params_file: str, names: list[str], *, force: bool) -> None:
    from pathlib import Path

    from genlab.profiles import apply_profiles, available, resolve

    params = Path(params_file)
    root = params.resolve().parent
    if not names:
        print("profiles: " + (", ".join(available(root)) or f"none in {root / 'profiles'}"))
        return
    applied = apply_profiles(params, [resolve(name, root) for name in names], force=force)
    what = "wrote" if applied.changed else "already holds"
    print(f"{what} {params}: {' then '.join(names)} merged over it; `git diff {params}` shows it")


def run(args: argparse.Namespace) -> None:
    if args.command == "sync":
        run_sync(args.params, args.runs, args.experiment)
        return
    if args.command == "profile":
        run_profile(args.params, args.profiles, force=args.force)
        return
    with _collector_paused():
        from genlab.config import load_params

        # Checking the model sections imports every family's code (and Lightning); prepare
        # reads none.
        params = load_params(args.params, check_models=args.command != "prepare")
        stage = importlib.import_module(STAGE_MODULES[args.command])
    if args.command in ("train", "evaluate"):
        stage.main(params, args.family, _or_first(args.seed, params.seeds))
    elif args.command == "score":
        stage.run_score(params, args.family, args.input, out=args.out, seed=args.seed)
    else:
        stage.main(params)


# The module of each command that reads the params file: imported only when that command runs.
STAGE_MODULES = {
    "prepare": "genlab.stages.prepare",
    "evaluator": "genlab.stages.evaluator",
    "reference": "genlab.stages.reference",
    "train": "genlab.stages.train",
    "evaluate": "genlab.stages.evaluate",
    "baselines": "genlab.stages.baselines",
    "report": "genlab.stages.report",
    "score": "genlab.scoring",
}


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a command loads its params and imports its
    module (torch, Lightning, MLflow), then one full collection before the command runs: the
    imports create ~570,000 objects, which the collector, run by allocation counts, would go over
    again and again while they load. Measured on 2 cores (2026-12-07), a `genlab train` process
    that stops after its imports (no prepared data), median of 5: 7.16 s with the collector on
    throughout, 6.80 s so (its imports 5.85 -> 5.32 s); paused without the collection 6.92 s,
    the imports' garbage then collected at exit. The collector is back as it was, also when the
    block raises."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.collect()
    finally:
        if enabled:
            gc.enable()


def _or_first(seed: int | None, seeds: list[int]) -> int:
    return seeds[0] if seed is None else seed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (GenlabError, FileNotFoundError) as exc:
        print(f"genlab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


# The exit status of a finished `main` (see `_exit_without_teardown`); empty until then.
_finished: list[int] = []


def _exit_without_teardown() -> None:
    """The last exit handler of a `genlab` process: once every other exit handler has run
    (MLflow's, torch's, logging's, those registered later than this one and so run earlier),
    end the process with `main`'s status and skip the interpreter's teardown.

    That teardown frees, one by one, every object torch, torchvision, Lightning and MLflow
    created at import, and nothing genlab writes depends on it (every file is closed and
    renamed into place before `main` returns). Measured on 2 cores (2026-12-07): a process that
    imports genlab's train stage spends 1.3 s after its exit handlers, 0.06 s with this; a
    `genlab train` of one VAE epoch took 8.07 -> 6.39 s (median of 5), and the default
    `dvc repro`'s 17 processes about 26 s less in all.

    It runs only where `main` ended (returned, or exited through argparse): an uncaught
    exception or a Ctrl-C finishes as Python does. An exit handler registered before
    `entry` registered this one (none in a `genlab` process: `tests/test_cli.py` checks) would
    run after it, and so not at all."""
    if not _finished:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let Python report it as it would
        return
    os._exit(_finished[0])


def entry() -> None:
    """The `genlab` command: `main` in this process, which then ends without the
    interpreter's teardown (`_exit_without_teardown`)."""
    atexit.register(_exit_without_teardown)
    try:
        status = main()
    except SystemExit as exc:  # argparse: --help (0), a usage error (2)
        if exc.code is None or isinstance(exc.code, int):
            _finished.append(exc.code or 0)
        raise
    _finished.append(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
