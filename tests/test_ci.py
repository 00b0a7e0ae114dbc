"""CI: the workflows pass actionlint (with shellcheck on their `run:` scripts), actions are pinned
to releases, and the commands the train workflow runs work here: the CI params profile and the
metrics diff (the profile's full `dvc repro` runs in tests/test_pipeline.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genlab.config import load_params
from genlab.models import MODELS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: actionlint and shellcheck (dev group)
WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.y*ml"))
CI_TRAIN = REPO / "scripts/ci_train.py"
METRICS_DIFF = REPO / "scripts/ci_metrics_diff.py"
PROFILE = REPO / "profiles/ci.yaml"


def _tool(name: str) -> Path:
    path = BIN / name
    assert path.is_file(), f"{path} missing: `uv sync` installs it with the dev dependencies"
    return path


def actionlint(*files: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """actionlint with shellcheck from the venv (named explicitly: actionlint silently skips the
    shell checks when it finds no shellcheck)."""
    cmd = [str(_tool("actionlint")), f"-shellcheck={_tool('shellcheck')}", "-no-color"]
    return subprocess.run([*cmd, *map(str, files)], cwd=cwd, capture_output=True, text=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    for who in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{who}_NAME"] = "genlab test"
        env[f"GIT_{who}_EMAIL"] = "test@genlab.invalid"
    return env


def sh(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def script(path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A scripts/ command as the workflow runs it (`uv run scripts/x.py` = this venv's python)."""
    return subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, env=_env(), capture_output=True, text=True
    )


def test_actionlint_passes_on_every_workflow() -> None:
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "train.yml"}
    done = actionlint(*WORKFLOWS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_and_shellcheck_reject_a_broken_workflow(tmp_path: Path) -> None:
    """The check above is not vacuous: an unquoted variable (shellcheck) and an untrusted
    expression inside a script (actionlint) are both reported."""
    bad = tmp_path / ".github/workflows/bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: pull_request\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo $RUNNER_TEMP ${{ github.event.pull_request.title }}\n"
    )
    done = actionlint(bad, cwd=tmp_path)
    assert done.returncode == 1
    assert "SC2086" in done.stdout and "potentially untrusted" in done.stdout, done.stdout


def _steps(workflow: Path) -> list[dict]:
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    return [step for job in jobs.values() for step in job.get("steps", [])]


def test_actions_are_pinned_to_commits_with_their_release_in_a_comment() -> None:
    """`uses:` names a full commit SHA (a tag can be moved to other code), followed by the exact
    release it is (`# vX.Y.Z`) for whoever updates it."""
    pinned = re.compile(r"uses: [\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+")
    for workflow in WORKFLOWS:
        uses = [line.strip().removeprefix("- ") for line in workflow.read_text().splitlines()]
        uses = [line for line in uses if line.startswith("uses:")]
        assert len(uses) == sum("uses" in step for step in _steps(workflow)) > 0
        for line in uses:
            assert pinned.fullmatch(line), (workflow.name, line)


def test_workflows_grant_least_privilege_and_secrets_only_to_their_steps() -> None:
    """A read-only token unless a job says why it needs more; a secret reaches a step's
    environment only (never the whole workflow or job, where every action would see it)."""
    for workflow in WORKFLOWS:
        doc = yaml.safe_load(workflow.read_text())
        assert doc["permissions"] == {"contents": "read"}, workflow.name
        for name, job in doc["jobs"].items():
            extra = {k: v for k, v in job.get("permissions", {}).items() if v != "read"}
            assert extra in ({}, {"pull-requests": "write"}), (workflow.name, name, extra)
            assert "secrets." not in json.dumps(job.get("env", {})), (workflow.name, name)
        assert "secrets." not in json.dumps(doc.get("env", {})), workflow.name


def test_train_workflow_runs_only_commands_tested_here() -> None:
    """Each `run:` of the train workflow is `uv sync` or one of the scripts these tests run."""
    (train,) = [w for w in WORKFLOWS if w.name == "train.yml"]
    runs = [" ".join(step["run"].split()) for step in _steps(train) if "run" in step]
    tested = {f"scripts/{CI_TRAIN.name}", f"scripts/{METRICS_DIFF.name}"}
    called = set()
    for run in runs:
        if run == "uv sync --locked":
            continue
        match = re.match(r"uv run (scripts/\S+\.py)\b", run)
        assert match and match[1] in tested, run
        called.add(match[1])
    assert called == tested


# -- the CI params profile ---------------------------------------------------------------------


def test_ci_profile_is_valid_params_and_trains_every_family_tiny(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    done = script(CI_TRAIN, "--params-only", "--params", str(params), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    merged = load_params(params)  # genlab's strict validation of every key
    # Registered, not in the default run yet: flow matching's evaluation solves an ODE per
    # scored image, draw and class, which the default run's time on 2 cores cannot hold yet.
    pending = {"flow_matching"}
    assert set(merged.families) == set(MODELS) - pending
    profile = yaml.safe_load(PROFILE.read_text())
    assert "families" not in profile  # every family params.yaml lists, even a new one
    assert set(profile["models"]) == set(MODELS), "give each family a tiny entry in the profile"
    for family in MODELS:
        assert merged.family(family).max_epochs <= 2, family
    assert merged.evaluate.num_samples <= 100

    # Applying it again changes nothing.
    before = params.read_text()
    assert script(CI_TRAIN, "--params-only", "--params", str(params), cwd=tmp_path).returncode == 0
    assert params.read_text() == before


def test_ci_profile_errors_name_the_key_and_never_overwrite_edits(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"models": {"vae": {"latent_dims": 3}}}))
    done = script(
        CI_TRAIN, "--params-only", "--params", str(params), "--profile", str(profile), cwd=tmp_path
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "models.vae.latent_dims" in line and "not in params.yaml" in line

    # Uncommitted edits of params.yaml are not overwritten.
    sh(["git", "init", "-q"], tmp_path)
    sh(["git", "add", "params.yaml"], tmp_path)
    sh(["git", "commit", "-q", "-m", "params"], tmp_path)
    params.write_text(params.read_text().replace("seed: 0", "seed: 7"))
    edited = params.read_text()
    done = script(CI_TRAIN, "--params-only", "--params", str(params), cwd=tmp_path)
    assert done.returncode == 2 and "uncommitted changes" in done.stderr
    assert params.read_text() == edited


# -- the metrics diff ------------------------------------------------------------------------


def _write_metrics(root: Path, vae: dict, gan: dict) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/vae.json").write_text(json.dumps(vae))
    (root / "metrics/gan.json").write_text(json.dumps(gan))


@pytest.fixture
def metrics_repo(tmp_path: Path) -> Path:
    """A git + DVC repository with two commits of metrics files."""
    root = tmp_path / "repo"
    root.mkdir()
    sh(["git", "init", "-q"], root)
    sh([sys.executable, "-m", "dvc", "init", "-q"], root)
    (root / "dvc.yaml").write_text("metrics:\n  - metrics/vae.json\n  - metrics/gan.json\n")
    _write_metrics(root, {"eval/fid": 10.0, "test/bpd": 2.5}, {"eval/fid": 20.0})
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "first results"], root)
    _write_metrics(root, {"eval/fid": 8.0, "test/bpd": 2.5}, {"eval/fid": 21.5})
    sh(["git", "commit", "-q", "-a", "-m", "second results"], root)
    return root


def _rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(path, metric) -> the remaining cells, for each data row of the markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {(c[0], c[1]): c[2:] for c in cells}


def test_metrics_diff_writes_a_markdown_table_of_what_changed(metrics_repo: Path) -> None:
    summary = metrics_repo.parent / "summary.md"
    summary.write_text("earlier step\n")
    out = metrics_repo.parent / "report/diff.md"
    args = ["--base", "HEAD~1", "--out", str(out), "--summary", str(summary)]
    done = script(METRICS_DIFF, *args, cwd=metrics_repo)
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    assert report.splitlines()[0] == "<!-- genlab-ci-metrics-diff -->"
    assert "`HEAD~1`" in report.splitlines()[1]
    header = next(line for line in report.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == [
        "Path",
        "Metric",
        "HEAD~1",
        "workspace",
    ]
    rows = _rows(report)
    assert set(rows) == {("metrics/vae.json", "eval/fid"), ("metrics/gan.json", "eval/fid")}
    assert [float(v) for v in rows["metrics/vae.json", "eval/fid"]] == [10.0, 8.0, -2.0]
    assert [float(v) for v in rows["metrics/gan.json", "eval/fid"]] == [20.0, 21.5, 1.5]
    assert summary.read_text() == "earlier step\n" + report  # appended, not replaced

    # The CI case: fresh results in the working tree against the committed ones.
    _write_metrics(metrics_repo, {"eval/fid": 8.0, "test/bpd": 3.0}, {"eval/fid": 21.5})
    args = ["--base", "HEAD", "--out", str(out)]
    assert script(METRICS_DIFF, *args, cwd=metrics_repo).returncode == 0
    assert set(_rows(out.read_text())) == {("metrics/vae.json", "test/bpd")}

    # Too long for a PR comment: cut after a row, saying how many rows it left out.
    _write_metrics(metrics_repo, {f"eval/m{i}": float(i) for i in range(12)}, {"eval/fid": 20.0})
    args = ["--base", "HEAD", "--out", str(out), "--summary", str(summary)]
    assert script(METRICS_DIFF, *args, cwd=metrics_repo).returncode == 0
    full = out.read_text()
    n = len(_rows(full))
    assert n >= 12
    table = [line for line in full.splitlines(keepends=True) if line.startswith("|")]
    limit = full.index(table[2]) + len(table[2]) + 101  # the header, one row and the note
    args = ["--base", "HEAD", "--out", str(out), "--max-chars", str(limit)]
    assert script(METRICS_DIFF, *args, cwd=metrics_repo).returncode == 0
    short = out.read_text()
    assert len(short) <= limit and len(_rows(short)) == 1
    assert f"{n - 1} more rows: the job summary" in short
    assert summary.read_text().endswith(full)  # the summary has them all


def test_metrics_diff_says_when_nothing_changed_and_fails_in_one_line(metrics_repo: Path) -> None:
    out = metrics_repo.parent / "diff.md"
    args = ["--base", "HEAD", "--out", str(out)]
    assert script(METRICS_DIFF, *args, cwd=metrics_repo).returncode == 0
    assert "No metric differs from `HEAD`." in out.read_text()
    assert not _rows(out.read_text())

    done = script(METRICS_DIFF, "--base", "no-such-rev", "--out", str(out), cwd=metrics_repo)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "no-such-rev" in line
