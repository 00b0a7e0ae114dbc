"""Params profiles: overlays of params.yaml for a data size or a purpose, written into it.

A profile (`profiles/<name>.yaml`) holds only the keys that differ from params.yaml, nested as
there: mappings merge key by key, any other value (a number, a string, a list) replaces the one in
params.yaml, and a key params.yaml does not have is an error (a misspelt key would otherwise be
added silently). `genlab profile mnist` writes the merge into params.yaml itself, because DVC reads
params from that one file: `dvc params diff` then shows what the profile changed, `dvc repro` runs
what it changed, and `dvc exp run -S key=value` varies it further.

The merge keeps params.yaml's comments and layout (ruamel.yaml's round trip: the YAML library DVC
itself uses). Before anything is written the merged file is read back the way every genlab stage
reads params.yaml (YAML 1.2, strict params), so a profile that would leave params.yaml invalid
changes nothing. Applying a profile again is a no-op; applying one over uncommitted edits of
params.yaml is refused unless forced (they would be mixed with the profile's values).
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genlab.errors import ConfigError
from genlab.paths import PROFILES


class ProfileError(ConfigError):
    """A profile that does not fit params.yaml, or one that would destroy uncommitted edits."""


def overlay(base: dict[str, Any], profile: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`base` with `profile` merged over it: mappings key by key, any other value replaced.
    `base` is changed in place (a ruamel mapping keeps its comments that way) and returned."""
    for key, value in profile.items():
        name = f"{where}{key}"
        if key not in base:
            raise ProfileError(f"profile key {name} is not in params.yaml; fix the profile")
        if isinstance(value, dict):
            if not isinstance(base[key], dict):
                raise ProfileError(
                    f"profile key {name} is a section but params.yaml holds a value there"
                )
            overlay(base[key], value, f"{name}.")
        elif isinstance(base[key], dict):
            raise ProfileError(f"profile key {name} is a value but params.yaml holds a section")
        else:
            base[key] = _like(base[key], value)
    return base


def _like(old: Any, new: Any) -> Any:
    """`new`, written the way `old` was where that matters: a list in flow style ([0, 1]) stays
    in flow style."""
    from ruamel.yaml.comments import CommentedSeq

    if isinstance(new, list) and isinstance(old, CommentedSeq) and old.fa.flow_style():
        seq = CommentedSeq(new)
        seq.fa.set_flow_style()
        return seq
    return new


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, key order and quotes kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    # None as `null`, as params.yaml writes it (ruamel would write nothing after the colon).
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


def resolve(name: str, root: Path) -> Path:
    """A profile by name (`mnist`: root/profiles/mnist.yaml) or by path (a .yaml file)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else root / PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available(root)) or "none"
        raise ProfileError(f"no profile {name!r} ({path} not found); profiles here: {known}")
    return path


def available(root: Path) -> list[str]:
    """The names of the profiles in root/profiles."""
    return sorted(p.stem for p in (root / PROFILES).glob("*.yaml"))


def _read(path: Path) -> dict[str, Any]:
    """A YAML mapping, refused where YAML 1.1 and 1.2 read it differently (as params.yaml is)."""
    from genlab.config import read_yaml

    text = path.read_text()
    data = read_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of params keys at the top level")
    return data


@dataclass(frozen=True)
class Applied:
    params: Path
    profiles: list[Path]
    changed: bool  # False: params.yaml already held every value (nothing written)


def apply_profiles(params: Path, profiles: list[Path], *, force: bool = False) -> Applied:
    """Write `profiles`, in order, merged over `params` (in place, atomically), after checking
    the result as every stage will read it; nothing is written when any check fails."""
    from genlab.config import parse_params, read_yaml
    from genlab.io import write_text_atomic

    if not params.is_file():
        raise ProfileError(f"{params}: file not found; run genlab from the repository root")
    yaml = _yaml()
    text = params.read_text()
    read_yaml(text, params)  # params.yaml itself is readable to begin with
    merged = yaml.load(text)
    for profile in profiles:
        try:
            overlay(merged, _read(profile))
        except ProfileError as exc:
            raise ProfileError(f"{profile}: {exc}") from None
    out = io.StringIO()
    yaml.dump(merged, out)
    new = out.getvalue()
    if new == text:
        return Applied(params, profiles, changed=False)
    parse_params(read_yaml(new, params), f"{params} with {', '.join(map(str, profiles))}")
    if not force and _uncommitted(params):
        raise ProfileError(
            f"{params} has uncommitted changes that the profile would mix with its own; commit "
            "or discard them, or pass --force"
        )
    write_text_atomic(params, new)
    return Applied(params, profiles, changed=True)


def _uncommitted(path: Path) -> bool:
    """True when git tracks `path` and it differs from HEAD (False outside a git repository)."""

    def git(*args: str) -> int:
        return subprocess.run(["git", *args], cwd=path.parent, capture_output=True).returncode

    try:
        tracked = git("ls-files", "--error-unmatch", "--", path.name) == 0
        return tracked and git("diff", "--quiet", "HEAD", "--", path.name) == 1
    except OSError:  # no git at all
        return False
