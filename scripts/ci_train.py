"""Train and evaluate every family on the CI-sized params profile: the train workflow's one command.

    uv run scripts/ci_train.py                  # ci/params.yaml over params.yaml, then dvc repro
    uv run scripts/ci_train.py --params-only    # only write the merged params.yaml

The profile is written into params.yaml in place, because DVC reads params from that one file (and
`dvc params diff` then shows what the profile changed). Run it in a CI checkout or a copy of the
repository: it refuses to overwrite uncommitted edits of params.yaml. Running it again is a no-op
for the params (the merge is idempotent) and `dvc repro` re-runs only what changed.

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
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "ci" / "params.yaml"
PARAMS = ROOT / "params.yaml"


class ProfileError(ValueError):
    """The profile does not fit params.yaml, or applying it would destroy uncommitted edits."""


def overlay(base: dict[str, Any], profile: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`base` with `profile` merged over it: mappings key by key, any other value replaced.

    Every key of the profile must exist in `base`: a misspelt key would otherwise be added
    silently (and then rejected by genlab's strict params, far from the profile that holds it).
    """
    out = dict(base)
    for key, value in profile.items():
        name = f"{where}{key}"
        if key not in base:
            raise ProfileError(f"profile key {name} is not in params.yaml; fix the profile")
        if isinstance(value, dict):
            if not isinstance(base[key], dict):
                raise ProfileError(
                    f"profile key {name} is a section but params.yaml holds a value there"
                )
            out[key] = overlay(base[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def _uncommitted(path: Path) -> bool:
    """True when git tracks `path` and it differs from HEAD (False outside a git repository,
    where `git diff` would compare two paths instead)."""

    def git(*args: str) -> int:
        return subprocess.run(["git", *args], cwd=path.parent, capture_output=True).returncode

    try:
        tracked = git("ls-files", "--error-unmatch", "--", path.name) == 0
        return tracked and git("diff", "--quiet", "HEAD", "--", path.name) == 1
    except OSError:  # no git at all
        return False


def apply_profile(params: Path, profile: Path) -> dict[str, Any]:
    """Write `profile` merged over `params` into `params`; the merged params."""
    current = yaml.safe_load(params.read_text())
    merged = overlay(current, yaml.safe_load(profile.read_text()) or {})
    if merged == current:  # already applied (a re-run)
        return merged
    if _uncommitted(params):
        raise ProfileError(
            f"{params} has uncommitted changes that the CI profile would overwrite; commit them "
            f"or run in a copy of the repository"
        )
    params.write_text(yaml.safe_dump(merged, sort_keys=False))
    return merged


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
        merged = apply_profile(args.params, args.profile)
    except (ProfileError, OSError, yaml.YAMLError) as exc:
        print(f"ci_train: error: {exc}", file=sys.stderr)
        return 2
    print(f"ci_train: wrote {args.params} ({args.profile} merged over it)")
    print(f"ci_train: families {', '.join(merged['families'])}")
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
