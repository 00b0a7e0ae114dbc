"""The pipeline end to end: real `dvc repro` / `dvc exp run` in a temporary copy of the repository,
on tiny params, checked against the real SQLite MLflow store it writes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil  # a dependency of dvc's
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.config import load_params
from genlab.evaluation.predict import scorer
from genlab.models import MODELS
from pre_emption import start_until_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and genlab live here

# The CI profile (what .github/workflows/train.yml trains): every family, tiny; merged over
# params.yaml by the very function `scripts/ci_train.py` applies it with.
TINY = yaml.safe_load((REPO / "ci/params.yaml").read_text())
_spec = importlib.util.spec_from_file_location("ci_train", REPO / "scripts/ci_train.py")
ci_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ci_train)


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # Pipeline outputs of this working tree (a half-finished local repro leaves some untracked)
    # are never part of the copy: the copy's own dvc repro produces them.
    families = load_params(REPO / "params.yaml").families
    outputs = dvc_outputs(yaml.safe_load((REPO / "dvc.yaml").read_text()), families)
    generated = [str(o) for o in outputs if not str(o).endswith((".json", ".md"))]
    return [
        f
        for f in out
        if (REPO / f).is_file() and not any(f == g or f.startswith(f"{g}/") for g in generated)
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    for who in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{who}_NAME"] = "genlab test"
        env[f"GIT_{who}_EMAIL"] = "test@genlab.invalid"
    return env


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command as a user would; its stdout (stderr shown only when it fails)."""
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def find_named(tree: object, name: str) -> list[dict]:
    """Every mapping with "name" == `name` anywhere inside a JSON document."""
    if isinstance(tree, list):
        return [hit for item in tree for hit in find_named(item, name)]
    if isinstance(tree, dict):
        own = [tree] if tree.get("name") == name else []
        return own + [hit for value in tree.values() for hit in find_named(value, name)]
    return []


def dvc_outputs(dvc_yaml: dict, families: list[str]) -> list[Path]:
    """Every output path dvc.yaml declares (outs and metrics), foreach expanded."""
    found: list[Path] = []
    for stage in dvc_yaml["stages"].values():
        items = families if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for item in items:
            for entry in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                found.append(Path(name.replace("${item}", item or "")))
    return found


def make_repo(root: Path, override: dict | None = None) -> Path:
    """A git repository at `root` holding this project's files with tiny params (and then
    `override` merged over them)."""
    for name in _tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    params = ci_train.overlay(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    params = ci_train.overlay(params, override or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline"], root)
    return root


def write_image_folder(root: Path) -> Path:
    """A folder dataset in the format users bring: one sub-folder of PNG files per class (here
    the digits, each class tinted its own colour, as RGB images)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    tints = np.array([[1.0, 0.2 + 0.08 * k, 1.0 - 0.09 * k] for k in range(10)])  # (10, 3)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        rgb = (image[..., None] / 16 * tints[label] * 255).round().astype(np.uint8)  # (8, 8, 3)
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / f"class_{label}" / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository on the CI profile, with a folder of RGB images as its dataset (outside the
    repository, so `dvc exp run --temp` sees it too)."""
    images = write_image_folder(tmp_path_factory.mktemp("images") / "tinted")
    dataset = {"name": "folder", "path": str(images), "image_size": 8, "channels": 3}
    return make_repo(tmp_path_factory.mktemp("genlab-repo"), {"dataset": dataset})


def test_dvc_yaml_outputs_match_library_paths() -> None:
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = set(dvc_outputs(dvc_yaml, ["vae"]))
    expected = {
        paths.PREPARED,
        paths.REFERENCE,
        paths.EVALUATOR,
        paths.EVALUATOR_METRICS,
        paths.family_model_dir("vae"),
        paths.family_checkpoints("vae"),
        paths.family_metrics("vae"),
        paths.family_figures("vae"),
        paths.REPORT_SUMMARY,
        paths.REPORT_FIGURES,
        paths.REAL_DATA_METRICS,
    }
    assert declared == expected


def test_evaluate_depends_on_every_evaluation_module_but_the_report() -> None:
    """The evaluate stages list their modules one by one, so that editing the report re-runs the
    report alone; a new evaluation module must be added there (or here, if only the report uses
    it)."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = set(dvc_yaml["stages"]["evaluate"]["do"]["deps"])
    modules = {
        f"src/genlab/evaluation/{p.name}"
        for p in (REPO / "src/genlab/evaluation").glob("*.py")
        if p.name not in ("__init__.py", "report.py")
    }
    assert {d for d in deps if d.startswith("src/genlab/evaluation")} == modules


def test_dvc_yaml_params_exist_in_params_yaml() -> None:
    """Every params key a stage declares is a real key of params.yaml."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = load_params(REPO / "params.yaml").model_dump()
    for stage in dvc_yaml["stages"].values():
        for key in stage.get("do", stage).get("params", []):
            for family in params["families"]:
                node = params
                for part in key.replace("${item}", family).split("."):
                    assert part in node, f"dvc.yaml declares unknown param {key}"
                    node = node[part]


def test_repro_then_experiment_lands_in_one_store(repo_copy: Path) -> None:
    root = repo_copy
    run(["dvc", "repro"], root)

    # Every output dvc.yaml declares exists.
    families = ["vae"]
    for out in dvc_outputs(yaml.safe_load((root / "dvc.yaml").read_text()), families):
        assert (root / out).exists(), f"dvc repro did not produce {out}"
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert (meta["dataset"], meta["shape"], meta["levels"]) == ("folder", [3, 8, 8], 256)
    metrics = json.loads((root / "metrics/vae.json").read_text())
    for key in ("eval/fid", "eval/kid_mean", "eval/precision", "eval/recall", "eval/isc_mean"):
        assert key in metrics
    assert metrics["test/nll_bound_nats"] > 0
    assert metrics["test/bpd_bound"] == pytest.approx(
        metrics["test/nll_bound_nats"] / (3 * 8 * 8 * 0.6931471805599453)
    )
    real = json.loads((root / "reports/real_data.json").read_text())
    assert real["eval/fid"] < metrics["eval/fid"]
    summary = (root / "reports/summary.md").read_text()
    assert "| vae | lower_bound |" in summary and "real data" in summary

    # The MLflow store at the repository root holds one run for the family, complete.
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("folder-tinted")
    assert experiment is not None
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.data.params["model.latent_dim"] == "4"
    assert run_.data.params["trainer.precision"] == "32-true"
    head = run(["git", "rev-parse", "HEAD"], root).strip()
    tags = run_.data.tags
    assert tags["git_commit"] == head
    assert tags["git_dirty"] in ("true", "false")
    assert tags["dvc_stage"] == "train@vae"
    assert tags["data_sha256"] == meta["data_sha256"]
    assert len(client.get_metric_history(run_.info.run_id, "train/loss")) >= 2
    # One point per validation epoch; the evaluate stage adds test metrics at the kept
    # checkpoint's step, after the first training step.
    assert len(client.get_metric_history(run_.info.run_id, "val/nll_bound_nats")) == 2
    (test_point,) = client.get_metric_history(run_.info.run_id, "test/nll_bound_nats")
    assert test_point.step > 0
    assert metrics["test/nll_bound_nats"] <= metrics["test/nll_bound_k1_nats"]  # IWAE-8 >= ELBO
    protocol = metrics.pop("protocol")  # strings and integers: tags, not MLflow metrics
    assert protocol == real["protocol"] and protocol["extractor"] == "genlab-evaluator"
    assert run_.data.tags["eval.protocol.id"] == protocol["id"]
    for key, value in metrics.items():
        assert run_.data.metrics[key] == pytest.approx(value), key
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"checkpoint", "evaluation", "params.yaml", "images"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_.info.run_id, "checkpoint")] == [
        "checkpoint/model.ckpt"
    ]
    images = client.list_artifacts(run_.info.run_id, "images")
    assert any(a.path.endswith(".png") for a in images), "sample grids were not logged"
    report_runs = client.search_runs([experiment.experiment_id], "tags.family = 'real_data'")
    assert len(report_runs) == 1

    # Every family of the default params went through the same stages into its own run, and
    # answered exactly the questions its contract and its params let it answer.
    params = load_params(root / "params.yaml")
    for family in params.families:
        metrics = json.loads((root / f"metrics/{family}.json").read_text())
        (family_run,) = client.search_runs([experiment.experiment_id], f"tags.family = '{family}'")
        for key in ("eval/fid", "eval/kid_mean", "eval/samples_per_s", "eval/nfe_per_sample"):
            assert family_run.data.metrics[key] == pytest.approx(metrics[key]), (family, key)
        images = client.list_artifacts(family_run.info.run_id, "images")
        assert any(a.path.endswith(".png") for a in images), f"no sample grids for {family}"
        assert f"| {family} |" in summary
        cls = MODELS[family]
        conditional = params.family(family).model_kwargs()["conditional"]
        scores = scorer(cls) is not None
        assert ("ood/auroc_noise" in metrics) == scores, family
        assert ("test/class_acc" in metrics) == (scores and conditional), family
        assert ("test/probe_acc" in metrics) == cls.has_latent, family
        assert ("eval/class_fid_mean" in metrics) == conditional, family
        grids = {p.name for p in (root / paths.family_figures(family)).iterdir()}
        assert {"samples.png"} <= grids
        assert ("classes.png" in grids) == conditional, family
        assert ("interpolation.png" in grids) == cls.has_latent, family
        logged = {a.path for a in client.list_artifacts(family_run.info.run_id, "evaluation")}
        assert {f"evaluation/{name}" for name in grids} <= logged, family

    # `dvc plots show` renders a figure per question and the families' grids side by side.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], root))["data"]
    for name in ("generation", "likelihood", "prediction", "representation", "conditional"):
        assert f"reports/figures/{name}.png" in plots, name
    assert "reports/figures/grids.png" in plots
    shutil.rmtree(root / "dvc_plots", ignore_errors=True)
    assert real["test/probe_acc"] > 0.5  # the raw-pixel probe of the report

    # A second repro with nothing changed runs nothing.
    out = run(["dvc", "repro"], root)
    assert "Running stage" not in out
    families = yaml.safe_load((root / "params.yaml").read_text())["families"]
    assert len(client.search_runs([experiment.experiment_id])) == len(families) + 1  # + report

    # An experiment in a temporary copy lands in the same store and compares with the baseline.
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline results"], root)
    run(["dvc", "exp", "run", "--temp", "-n", "small-z", "-S", "models.vae.latent_dim=3"], root)
    runs = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    assert len(runs) == 2
    exp_run = next(r for r in runs if r.data.tags.get("dvc_exp_name") == "small-z")
    assert exp_run.data.params["model.latent_dim"] == "3"
    assert "eval/fid" in exp_run.data.metrics  # evaluate logged into the experiment's run
    exp_artifacts = {a.path for a in client.list_artifacts(exp_run.info.run_id)}
    assert "checkpoint" in exp_artifacts  # artifacts did not vanish with the temporary copy

    shown = find_named(json.loads(run(["dvc", "exp", "show", "--json"], root)), "small-z")
    assert shown, "dvc exp show does not list the experiment"
    assert any("metrics/vae.json" in json.dumps(entry) for entry in shown)
    run(["dvc", "exp", "apply", "small-z"], root)
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], root))
    assert "eval/fid" in diff["metrics/vae.json"]


def test_a_killed_training_is_not_recorded_and_the_next_repro_resumes_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SIGTERM to the training process of a real `dvc repro` (what a pre-empting scheduler
    sends): dvc fails, records nothing for the stage, and the next `dvc repro` resumes the
    kept checkpoint into the same MLflow run and finishes."""
    epochs = 150  # 2 steps each: long enough to be caught mid-training
    override = {
        "families": ["vae"],
        "trainer": {"log_every_n_steps": 1},
        "models": {"vae": {"max_epochs": epochs, "batch_size": 500}},
    }
    root = make_repo(tmp_path_factory.mktemp("genlab-sigterm"), override)
    (root / "dvc.lock").unlink()  # the copied lock records the repository's own runs
    repro = start_until_checkpoint(["dvc", "repro", "train@vae"], cwd=root, env=_env())
    (training,) = [
        p for p in psutil.Process(repro.pid).children(recursive=True) if "train" in p.cmdline()
    ]
    training.send_signal(signal.SIGTERM)
    output, _ = repro.communicate(timeout=120)

    assert repro.returncode != 0, output
    assert "received SIGTERM" in output
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "prepare" in stages and "train@vae" not in stages
    assert not (root / "models/vae").exists()
    (ckpt_dir,) = (root / "checkpoints/vae").iterdir()
    run_id = json.loads((ckpt_dir / "run.json").read_text())["run_id"]
    kept = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]

    run(["dvc", "repro", "train@vae"], root)
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "train@vae" in stages
    assert json.loads((root / "models/vae/run.json").read_text())["run_id"] == run_id
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    (run_,) = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    assert run_.info.run_id == run_id and run_.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(steps) == set(range(2 * epochs))
    # Resumed, not restarted: only steps after the kept checkpoint were trained twice.
    assert kept > 0 and all(s >= kept for s in steps if steps.count(s) > 1), kept
    assert "Running stage" not in run(["dvc", "repro", "train@vae"], root)


@pytest.mark.slow
def test_queued_experiments_land_complete_in_the_same_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = make_repo(tmp_path_factory.mktemp("genlab-queue"))

    for name, latent in (("q-three", 3), ("q-five", 5)):
        run(
            ["dvc", "exp", "run", "--queue", "-n", name, "-S", f"models.vae.latent_dim={latent}"],
            root,
        )
    run(["dvc", "queue", "start", "-j", "1"], root)
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], root)
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert "Failed" not in status, status + run(["dvc", "queue", "logs", "q-three"], root)

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    by_exp = {r.data.tags.get("dvc_exp_name"): r for r in runs}
    assert set(by_exp) == {"q-three", "q-five"}
    for name, latent in (("q-three", 3), ("q-five", 5)):
        run_ = by_exp[name]
        assert run_.data.params["model.latent_dim"] == str(latent)
        assert "eval/fid" in run_.data.metrics and "test/nll_bound_nats" in run_.data.metrics
        assert "checkpoint" in {a.path for a in client.list_artifacts(run_.info.run_id)}
