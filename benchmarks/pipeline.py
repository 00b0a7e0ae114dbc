"""Wall time of the default `dvc repro` from a clean state, stage by stage, and of a no-op repro.

Copies this working tree's project files (what git tracks or would track, without the pipeline's
outputs, dvc.lock or DVC cache) into a temporary directory, makes it a git repository and runs
`dvc repro` there as a user would on a fresh clone: the copy's own src/ (PYTHONPATH), this
environment's dvc and genlab, every core (no thread limit), a fresh SQLite MLflow store. Then
`dvc repro` again with nothing changed, three times.

    uv run python benchmarks/pipeline.py           # default params.yaml (the issue 8 target)
    uv run python benchmarks/pipeline.py --quick   # CI profile, prepare and evaluator only
    uv run python benchmarks/pipeline.py --keep    # leave the copy (its mlflow.db, reports) behind
    uv run python benchmarks/pipeline.py --families vae   # what a subset of the families costs
    uv run python benchmarks/pipeline.py --profile profiles/three-seeds.yaml   # a params profile

Each stage is its own `genlab` process (imports included), as it is for a user.

Targets: the default repro under 600 s on 2 CPU cores (issue 8), the three-seed profile under
1800 s (issue 17), the no-op repro under 10 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from genlab.paths import PROFILES
from genlab.profiles import overlay

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and genlab live here
# Directories the pipeline writes (whatever of them git does not ignore is still not copied).
OUTPUT_DIRS = ("data/prepared", "data/reference", "models", "checkpoints", "metrics", "reports")
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
# A matrix stage's name (dvc.yaml): train@<family>-<seed>, evaluate@<family>-<seed>.
MATRIX_STAGE = re.compile(r"^(?P<kind>[^@]+)@(?P<family>.+)-(?P<seed>\d+)$")
TARGET_S, NOOP_TARGET_S = 600.0, 10.0  # the default repro (one seed), the no-op repro
SEEDS_TARGET_S = {1: TARGET_S, 3: 1800.0}  # a clean repro by number of seeds (issues 8, 17)


class Stage(NamedTuple):
    """One `dvc repro` stage: its kind (prepare, train, evaluate, baselines, ...) and, for a
    matrix stage, the family and training seed."""

    name: str
    kind: str
    family: str | None
    seed: int | None


def parse_stage(name: str) -> Stage:
    """'train@vae-0' -> Stage('train@vae-0', 'train', 'vae', 0); 'baselines' -> no family."""
    if match := MATRIX_STAGE.match(name):
        return Stage(name, match["kind"], match["family"], int(match["seed"]))
    return Stage(name, name, None, None)


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    skip = ("dvc.lock", "mlflow.db")
    return [
        name
        for name in listed
        if (ROOT / name).is_file()
        and name not in skip
        and not any(name.startswith(f"{d}/") for d in OUTPUT_DIRS)
    ]


def environment(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy / "src")  # the copy's code, ahead of the editable install
    env["PYTHONUNBUFFERED"] = "1"  # DVC's "Running stage" lines arrive when they are written
    for who in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{who}_NAME", "genlab benchmark")
        env.setdefault(f"GIT_{who}_EMAIL", "benchmark@genlab.invalid")
    return env


def make_copy(
    dest: Path, quick: bool, families: list[str] | None, profile: Path | None = None
) -> dict:
    """Copy the project into `dest` with its params (returned) and make it a git repository."""
    for name in project_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for directory in OUTPUT_DIRS:
        (dest / directory).mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if quick:
        params = overlay(params, yaml.safe_load((ROOT / PROFILES / "ci.yaml").read_text()))
    if profile is not None:
        params = overlay(params, yaml.safe_load(profile.read_text()))
    if families:
        params["families"] = families
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = environment(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return params


def timed_repro(copy: Path, targets: list[str]) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro [targets]` in `copy`; its wall time and each stage's (from DVC's
    'Running stage' lines)."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    tail: list[str] = []
    process = subprocess.Popen(
        ["dvc", "repro", *targets],
        cwd=copy,
        env=environment(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        tail = [*tail[-40:], line]
        if match := STAGE_LINE.match(line):
            marks.append((match.group(1), time.perf_counter()))
            print(f"  {time.perf_counter() - started:7.1f} s  {match.group(1)}", flush=True)
    if process.wait() != 0:
        sys.exit(f"dvc repro failed in {copy}:\n{''.join(tail)}")
    ended = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [ended]
    return ended - started, [(name, end - t) for (name, t), end in zip(marks, ends, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI profile, first two stages")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--families", nargs="+", metavar="FAMILY", help="train only these")
    parser.add_argument("--profile", type=Path, help="a params profile merged over params.yaml")
    args = parser.parse_args(argv)

    copy = Path(tempfile.mkdtemp(prefix="genlab-pipeline-"))
    try:
        params = make_copy(copy, args.quick, args.families, args.profile)
        targets = ["evaluator"] if args.quick else []
        what = "CI profile, prepare and evaluator" if args.quick else "default params"
        if args.families:
            what += f", families {' '.join(args.families)}"
        if args.profile:
            what += f", profile {args.profile}"
        print(f"dvc repro in {copy} ({what}):")
        total, stages = timed_repro(copy, targets)
        noop = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(
                ["dvc", "repro", *targets],
                cwd=copy,
                env=environment(copy),
                check=True,
                capture_output=True,
            )
            noop.append(time.perf_counter() - started)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    header = f"{'stage':<22} {'seconds':>8} {'share':>6}"
    print(header)
    print("-" * len(header))
    for name, seconds in stages:
        print(f"{name:<22} {seconds:>8.1f} {seconds / total:>6.1%}")
    print(f"{'dvc repro (clean)':<22} {total:>8.1f}")
    print(f"{'dvc repro (no-op)':<22} {statistics.median(noop):>8.1f}   (median of 3)")

    # The same seconds by kind of stage, then the matrix stages by family (over its seeds).
    parsed = [(parse_stage(name), seconds) for name, seconds in stages]
    by_kind: dict[str, list[float]] = {}
    by_family: dict[tuple[str, str], list[float]] = {}
    for stage, seconds in parsed:
        by_kind.setdefault(stage.kind, []).append(seconds)
        if stage.family is not None:
            by_family.setdefault((stage.kind, stage.family), []).append(seconds)
    print()
    header = f"{'kind':<22} {'stages':>6} {'seconds':>8} {'share':>6} {'mean s':>8}"
    print(header)
    print("-" * len(header))
    for kind, times in by_kind.items():
        print(
            f"{kind:<22} {len(times):>6} {sum(times):>8.1f} {sum(times) / total:>6.1%} "
            f"{statistics.mean(times):>8.1f}"
        )
    for (kind, family), times in by_family.items():
        label = f"  {kind}@{family}"
        print(
            f"{label:<22} {len(times):>6} {sum(times):>8.1f} {sum(times) / total:>6.1%} "
            f"{statistics.mean(times):>8.1f}"
        )

    seeds = params.get("seeds", [0])
    target = SEEDS_TARGET_S.get(len(seeds))
    target_text = (
        f"target {target:.0f} s with the default params and {len(seeds)} seed(s)"
        if target is not None
        else f"no target for {len(seeds)} seeds"
    )
    print(
        f"pipeline: clean dvc repro ({what}, seeds {seeds}) {total:.0f} s ({target_text}), "
        f"no-op {statistics.median(noop):.1f} s (target {NOOP_TARGET_S:.0f} s) "
        f"on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
