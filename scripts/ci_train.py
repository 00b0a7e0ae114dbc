"""Train and evaluate every family on the CI-sized params profile: the train workflow's one command.

    uv run scripts/ci_train.py                  # profiles/ci.yaml over params.yaml, then dvc repro
    uv run scripts/ci_train.py --params-only    # only write the merged params.yaml

The profile is written into params.yaml in place by genlab's own mechanism (`genlab profile ci`,
`genlab.profiles`), because DVC reads params from that one file (and `dvc params diff` then shows
what the profile changed). Run it in a CI checkout or a copy of the repository: it refuses to
overwrite uncommitted edits of params.yaml. Running it again is a no-op for the params (the merge
is idempotent) and `dvc repro` re-runs only what changed.

MLflow: runs go to the local store (mlflow.db at the repository root) and are pushed to the team
server MLFLOW_TRACKING_URI (else params) names, if any. An empty MLFLOW_* variable, which is what
CI passes for an unset secret, counts as unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from genlab.errors import GenlabError
from genlab.profiles import apply_profiles

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "ci.yaml"
PARAMS = ROOT / "params.yaml"


def _env() -> dict[str, str]:
    """This environment without empty MLFLOW_* variables, with this Python's bin on PATH (where
    dvc and genlab live, also when the script is started without `uv run`)."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MLFLOW_") and not v)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=PROFILE, help="default: %(default)s")
    parser.add_argument("--params", type=Path, default=PARAMS, help="default: %(default)s")
    parser.add_argument(
        "--params-only", action="store_true", help="write the merged params and stop"
    )
    args = parser.parse_args(argv)
    try:
        apply_profiles(args.params, [args.profile])  # what `genlab profile ci` does
    except (GenlabError, OSError) as exc:
        print(f"ci_train: error: {exc}", file=sys.stderr)
        return 2
    print(f"ci_train: wrote {args.params} ({args.profile} merged over it)")
    if args.params_only:
        return 0
    env = _env()
    store = "MLFLOW_TRACKING_URI" if env.get("MLFLOW_TRACKING_URI") else "params"
    print(f"ci_train: dvc repro (MLflow team server, if any, from {store})", flush=True)
    return subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=args.params.parent, env=env
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
