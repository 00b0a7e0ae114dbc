"""`dvc metrics diff --md` against a base revision, as the markdown of CI's job summary and PR
comment.

    uv run scripts/ci_metrics_diff.py --base origin/main --out metrics-diff.md
    uv run scripts/ci_metrics_diff.py --base HEAD --out diff.md --summary "$GITHUB_STEP_SUMMARY"

Compares the metrics files of the working tree (what `scripts/ci_train.py` just produced) with
those committed at `--base`. `--out` (the PR comment) is cut to `--max-chars`, below GitHub's
65,536-character limit on a comment; `--summary` gets the whole report, appended, as GitHub's job
summary file expects. The first line is a marker the workflow uses to update its earlier PR comment
instead of adding one per push.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- genlab-ci-metrics-diff -->"
MAX_CHARS = 60_000


class DiffError(RuntimeError):
    """`dvc metrics diff` failed (an unknown revision, no DVC repository, ...)."""


def metrics_table(base: str, repo: Path) -> str:
    """DVC's markdown table of the metrics that differ between `base` and the working tree."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "diff", "--md", base],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise DiffError(f"dvc metrics diff {base} failed in {repo}: {lines[-1]}")
    return done.stdout.strip()


def render(base: str, table: str) -> str:
    """The report: a title, what the numbers are, and the table (or a line saying nothing moved)."""
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]  # past the header
    body = table if rows else f"No metric differs from `{base}`."
    return "\n".join(
        [
            MARKER,
            f"## genlab CI training: metrics against `{base}`",
            "",
            "Every family trained and evaluated on the CI profile (`profiles/ci.yaml` merged over "
            "`params.yaml`): tiny models, to catch breakage and large moves. The base column is "
            "whatever metrics are committed at the base revision.",
            "",
            body,
            "",
        ]
    )


def shorten(report: str, max_chars: int) -> str:
    """`report` cut to at most `max_chars` at a line end, saying how many table rows it left out."""
    if len(report) <= max_chars:
        return report
    lines = report.splitlines(keepends=True)
    budget = max_chars - 100  # the note below
    kept: list[str] = []
    for line in lines:
        if len(line) > budget:
            break
        kept.append(line)
        budget -= len(line)
    n = sum(line.startswith("|") and not line.startswith("|--") for line in lines[len(kept) :])
    rows = "row" if n == 1 else "rows"
    return "".join(kept) + f"\n{n} more {rows}: the job summary and the report artifact have all.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--summary", type=Path, help="markdown file to append to as well")
    parser.add_argument(
        "--max-chars", type=int, default=MAX_CHARS, help="cut --out to this (%(default)s)"
    )
    parser.add_argument(
        "--repo", type=Path, default=Path.cwd(), help="repository (default: working directory)"
    )
    args = parser.parse_args(argv)
    try:
        report = render(args.base, metrics_table(args.base, args.repo))
    except DiffError as exc:
        print(f"ci_metrics_diff: error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(shorten(report, args.max_chars))
    if args.summary is not None:
        with args.summary.open("a") as f:
            f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
