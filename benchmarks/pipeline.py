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

The first stage's time includes starting the copy's warm-start server (`genlab.warm`: the
libraries' imports, once); later stages run as its workers, as they do for a user.

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

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and genlab live here
# Directories the pipeline writes (whatever of them git does not ignore is still not copied).
OUTPUT_DIRS = ("data/prepared", "data/reference", "models", "checkpoints", "metrics", "reports")
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
TARGET_S, NOOP_TARGET_S = 600.0, 10.0

sys.path.insert(0, str(ROOT / "scripts"))
from ci_train import overlay  # noqa: E402  (scripts/ is not a package)


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
) -> None:
    for name in project_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for directory in OUTPUT_DIRS:
        (dest / directory).mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if quick:
        params = overlay(params, yaml.safe_load((ROOT / "ci/params.yaml").read_text()))
    if profile is not None:
        params = overlay(params, yaml.safe_load(profile.read_text()))
    if families:
        params["families"] = families
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = environment(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True)


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
        make_copy(copy, args.quick, args.families, args.profile)
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
    print(
        f"pipeline: clean dvc repro ({what}) {total:.0f} s (target {TARGET_S:.0f} s with the "
        f"default params), no-op {statistics.median(noop):.1f} s (target {NOOP_TARGET_S:.0f} s) "
        f"on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
