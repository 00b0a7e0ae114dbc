"""`genlab`: the pipeline stages as commands (what dvc.yaml runs)."""

from __future__ import annotations

import argparse
import sys

from genlab.errors import GenlabError


def build_parser() -> argparse.ArgumentParser:
    from genlab import scoring
    from genlab.models import MODELS

    parser = argparse.ArgumentParser(prog="genlab", description=__doc__)
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
        cmd.add_argument("family", choices=sorted(MODELS))
        cmd.add_argument("--seed", type=_seed, help=seed_help)
    sub.add_parser(
        "baselines", help="the copycat, held-out real and real-data rows -> metrics/baselines.json"
    )
    sub.add_parser("report", help="compare all families in reports/")
    score = sub.add_parser(
        "score",
        help="per-image nats, bits/dim and an in-distribution verdict (CSV)",
        description=scoring.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument(
        "family",
        choices=sorted(MODELS),
        help="a trained family (models/<family>/seed<k>/model.ckpt)",
    )
    score.add_argument("input", help="a folder of images, one image file or a .npy array of levels")
    score.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    score.add_argument(
        "--seed", type=_seed, help="which training seed's model (default: the first)"
    )
    sync = sub.add_parser(
        "sync",
        help="replay MLflow logging spooled during a tracking outage",
        description="Replay every spool (logging a training could not send to its MLflow run) "
        "into its run. Each spool knows its tracking URI and run id; a replayed record is never "
        "sent twice, and an unreachable store leaves the spool as it was.",
    )
    sync.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="spool folders, or folders searched for spools (default: checkpoints/)",
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


def run_sync(paths: list[str]) -> None:
    from pathlib import Path

    from genlab.spool import sync
    from genlab.tracking import project_root

    folders = [Path(p) for p in paths] or [project_root() / "checkpoints"]
    found = False
    for r in sync(folders):
        found = True
        if r.counts.total == 0 and not r.left:
            print(f"run {r.run_id}: nothing to replay ({r.spool})")
        else:
            print(f"run {r.run_id}: replayed {r.counts.summary()} from {r.spool}")
    if not found:
        print(f"no spools in {', '.join(map(str, folders))}: nothing to replay")


def run(args: argparse.Namespace) -> None:
    if args.command == "sync":  # needs no params: each spool knows its store and run
        run_sync(args.paths)
        return
    from genlab.config import load_params

    params = load_params(args.params)
    if args.command == "prepare":
        from genlab.stages import prepare

        prepare.main(params)
    elif args.command == "evaluator":
        from genlab.stages import evaluator

        evaluator.main(params)
    elif args.command == "reference":
        from genlab.stages import reference

        reference.main(params)
    elif args.command == "train":
        from genlab.stages import train

        train.main(params, args.family, _or_first(args.seed, params.seeds))
    elif args.command == "evaluate":
        from genlab.stages import evaluate

        evaluate.main(params, args.family, _or_first(args.seed, params.seeds))
    elif args.command == "baselines":
        from genlab.stages import baselines

        baselines.main(params)
    elif args.command == "report":
        from genlab.stages import report

        report.main(params)
    elif args.command == "score":
        from genlab.scoring import run_score

        run_score(params, args.family, args.input, out=args.out, seed=args.seed)


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


if __name__ == "__main__":
    sys.exit(main())
