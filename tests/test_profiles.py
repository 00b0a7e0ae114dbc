"""Params profiles (`genlab profile`, `genlab.profiles`): every profile of profiles/ applies to
params.yaml and gives valid params; the merge keeps params.yaml's comments, is idempotent, and
a bad profile or uncommitted edits change nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genlab.cli import main
from genlab.config import load_params
from genlab.profiles import available

REPO = Path(__file__).resolve().parents[1]
PROFILES = available(REPO)


def _project(tmp_path: Path, *, git: bool = False) -> Path:
    """A folder with this repository's params.yaml and profiles/ (a git repository with them
    committed, when `git`)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    if git:
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "params"]):
            subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True)
    return tmp_path


def _profile(tmp_path: Path, name: str, *args: str, cwd: Path) -> tuple[int, str, str]:
    """`genlab profile ...` in a fresh process in `cwd`: exit code, stdout, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "genlab.cli", "profile", name, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    return done.returncode, done.stdout, done.stderr


def test_the_profiles_for_each_data_size_exist() -> None:
    assert {"ci", "three-seeds", "mnist", "cifar10", "folder-32", "folder-64"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_each_profile_applies_to_params_yaml_and_keeps_its_comments(
    name: str, tmp_path: Path, capsys
) -> None:
    project = _project(tmp_path)
    before = (project / "params.yaml").read_text()
    assert main(["--params", str(project / "params.yaml"), "profile", name]) == 0
    assert "wrote" in capsys.readouterr().out
    after = (project / "params.yaml").read_text()
    params = load_params(project / "params.yaml")  # strict, every family's section checked
    profile = yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text())
    merged = yaml.safe_load(after)
    _assert_holds(merged, profile)
    # Comments and keys the profile does not touch are as they were.
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert all(line in after.splitlines() for line in comments)
    assert params.tracking == load_params(REPO / "params.yaml").tracking or "tracking" in profile
    # Again: nothing to change, nothing written.
    assert main(["--params", str(project / "params.yaml"), "profile", name]) == 0
    assert "already holds" in capsys.readouterr().out
    assert (project / "params.yaml").read_text() == after


def _assert_holds(merged: dict, profile: dict, where: str = "") -> None:
    for key, value in profile.items():
        if isinstance(value, dict):
            _assert_holds(merged[key], value, f"{where}{key}.")
        else:
            assert merged[key] == value, f"{where}{key}"


def test_profiles_apply_in_order_and_a_tiny_variant_is_the_ci_profile_over_one(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path)
    assert main(["--params", str(project / "params.yaml"), "profile", "mnist", "ci"]) == 0
    params = load_params(project / "params.yaml")
    assert params.dataset.name == "mnist"  # from mnist (ci leaves the dataset alone)
    assert params.family("vae").max_epochs <= 2  # ci, applied last, wins
    assert params.trainer.accelerator == "cpu"


def test_a_bad_profile_is_one_line_naming_the_key_and_writes_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path)
    before = (project / "params.yaml").read_text()
    cases = {
        "misspelt.yaml": ("models:\n  vae:\n    latent_dims: 3\n", "models.vae.latent_dims"),
        "out-of-range.yaml": ("models:\n  vae:\n    latent_dim: -1\n", "models.vae.latent_dim"),
        "yaml11.yaml": ("trainer:\n  compile: off\n", "YAML 1.1"),
        "section.yaml": ("trainer: cpu\n", "trainer is a value but params.yaml holds a section"),
        "twice.yaml": ("seeds: [0]\nseeds: [1]\n", "written twice"),
    }
    for name, (text, says) in cases.items():
        (project / name).write_text(text)
        code, _, err = _profile(tmp_path, name, cwd=project)
        assert code == 1, name
        (line,) = err.strip().splitlines()
        assert line.startswith("genlab profile: error:") and says in line, line
        assert (project / "params.yaml").read_text() == before, name
    code, _, err = _profile(tmp_path, "no-such-profile", cwd=project)
    assert code == 1 and "no profile 'no-such-profile'" in err and "mnist" in err


def test_uncommitted_edits_of_params_yaml_are_not_mixed_with_a_profile(tmp_path: Path) -> None:
    project = _project(tmp_path, git=True)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("seeds: [0]", "seeds: [7]"))
    edited = params.read_text()
    code, _, err = _profile(tmp_path, "mnist", cwd=project)
    assert code == 1 and "uncommitted changes" in err and "--force" in err
    assert params.read_text() == edited
    code, _, _ = _profile(tmp_path, "mnist", "--force", cwd=project)
    assert code == 0
    assert load_params(params).seeds == [7] and load_params(params).dataset.name == "mnist"


def test_profile_without_a_name_lists_the_profiles_and_imports_no_torch(tmp_path: Path) -> None:
    project = _project(tmp_path)
    code = (
        "import sys; from genlab.cli import main; code = main(['profile']); "
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules)); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True
    )
    listed, imported = done.stdout.strip().splitlines()
    assert all(name in listed for name in PROFILES)
    assert imported == "[]"
