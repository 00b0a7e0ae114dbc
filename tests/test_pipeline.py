"""The pipeline end to end: real `dvc repro` / `dvc exp run` in a temporary copy of the repository,
on tiny params, checked against the real SQLite MLflow store it writes."""

from __future__ import annotations

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
from genlab.evaluation import vocabulary as v
from genlab.evaluation.figures import FIGURES
from genlab.evaluation.predict import scorer
from genlab.models import MODELS
from genlab.profiles import overlay
from genlab.tracking import BASELINES_TAG, REPORT_TAG
from pre_emption import start_until_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and genlab live here

# The CI profile (what .github/workflows/train.yml trains): every family, tiny; merged over
# params.yaml by the very function `genlab profile` (and `scripts/ci_train.py`) applies it with.
TINY = yaml.safe_load((REPO / "profiles/ci.yaml").read_text())


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
    params = load_params(REPO / "params.yaml")
    outputs = dvc_outputs(
        yaml.safe_load((REPO / "dvc.yaml").read_text()), params.families, params.seeds
    )
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


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command as a user would (with `env` added to the environment); its stdout (stderr
    shown only when it fails)."""
    result = subprocess.run(cmd, cwd=cwd, env=_env() | (env or {}), capture_output=True, text=True)
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


def dvc_outputs(dvc_yaml: dict, families: list[str], seeds: list[int]) -> list[Path]:
    """Every output path dvc.yaml declares (outs, metrics, plots), matrix expanded."""
    found: list[Path] = []
    for stage in dvc_yaml["stages"].values():
        items = [(f, s) for f in families for s in seeds] if "matrix" in stage else [None]
        for item in items:
            for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                if item is not None:
                    name = name.replace("${item.family}", item[0])
                    name = name.replace("${item.seed}", str(item[1]))
                found.append(Path(name))
    return found


def copy_project(root: Path) -> Path:
    """A git repository at `root` holding this project's files as they are here."""
    for name in _tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline"], root)
    return root


def make_repo(root: Path, override: dict | None = None) -> Path:
    """A git repository at `root` holding this project's files with tiny params (and then
    `override` merged over them)."""
    copy_project(root)
    params = overlay(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    params = overlay(params, override or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-q", "-am", "tiny params"], root)
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
    declared = set(dvc_outputs(dvc_yaml, ["vae"], [0, 3]))
    expected = {
        paths.PREPARED,
        paths.REFERENCE,
        paths.EVALUATOR,
        paths.EVALUATOR_METRICS,
        *(paths.family_model_dir("vae", s) for s in (0, 3)),
        *(paths.family_checkpoints("vae", s) for s in (0, 3)),
        *(paths.family_metrics("vae", s) for s in (0, 3)),
        *(paths.family_figures("vae", s) for s in (0, 3)),
        paths.BASELINE_METRICS,
        paths.REPORT_SUMMARY,
        paths.REPORT_FIGURES,
    }
    assert declared == expected


def test_evaluate_depends_on_every_evaluation_module_but_the_report() -> None:
    """The evaluate stages list their modules one by one, so that editing the report re-runs the
    report alone; a new evaluation module must be added there (or here, if only the report or
    the baselines use it)."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = set(dvc_yaml["stages"]["evaluate"]["deps"])
    modules = {
        f"src/genlab/evaluation/{p.name}"
        for p in (REPO / "src/genlab/evaluation").glob("*.py")
        if p.name not in ("__init__.py", "report.py", "figures.py", "baselines.py")
    }
    assert {d for d in deps if d.startswith("src/genlab/evaluation")} == modules


def test_dvc_yaml_params_exist_in_params_yaml() -> None:
    """Every params key a stage declares is a real key of params.yaml."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = load_params(REPO / "params.yaml").model_dump()
    for stage in dvc_yaml["stages"].values():
        for key in stage.get("params", []):
            for family in params["families"]:
                node = params
                for part in key.replace("${item.family}", family).split("."):
                    assert part in node, f"dvc.yaml declares unknown param {key}"
                    node = node[part]


def test_repro_then_experiment_lands_in_one_store(repo_copy: Path) -> None:
    root = repo_copy
    run(["dvc", "repro"], root)

    # Every output dvc.yaml declares exists.
    params = load_params(root / "params.yaml")
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    for out in dvc_outputs(dvc_yaml, params.families, params.seeds):
        assert (root / out).exists(), f"dvc repro did not produce {out}"
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert (meta["dataset"], meta["shape"], meta["levels"]) == ("folder", [3, 8, 8], 256)
    metrics = json.loads((root / paths.family_metrics("vae", 0)).read_text())
    nll, bpd = v.nll_key("test", "lower_bound"), v.bpd_key("test", "lower_bound")
    for key in (v.FID, v.KID, v.PRECISION, v.RECALL, v.DENSITY, v.COVERAGE, v.ISC, v.C_T):
        assert metrics[v.ci_low(key)] <= metrics[key] <= metrics[v.ci_high(key)], key
    assert metrics[nll] > 0 and metrics[v.se(nll)] > 0 and v.NLL_GAP in metrics
    assert metrics[bpd] == pytest.approx(metrics[nll] / (3 * 8 * 8 * 0.6931471805599453))

    # The baseline rows under the same protocol; the copycat is flagged in the summary.
    rows = json.loads((root / paths.BASELINE_METRICS).read_text())
    assert {"copycat", "heldout", "real", "protocol"} <= set(rows)
    assert rows["copycat"][v.EXACT_COPIES] == 1.0 and rows["heldout"][v.EXACT_COPIES] < 0.05
    summary = (root / paths.REPORT_SUMMARY).read_text()
    assert "| *copycat* |" in summary and "| *held-out real* |" in summary
    copycat_line = next(line for line in summary.splitlines() if line.startswith("| *copycat*"))
    assert "**copies**: 100% exact copies of training images" in copycat_line
    assert "## Rankings" in summary and "**generation: FID ↓**" in summary

    # The MLflow store at the repository root holds one run for the family and seed, complete.
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("folder-tinted")
    assert experiment is not None
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    assert len(runs) == 1
    run_ = runs[0]
    assert (run_.info.run_name, run_.data.tags["seed"]) == ("vae (seed 0)", "0")
    assert run_.data.params["model.latent_dim"] == "4"
    assert run_.data.params["trainer.precision"] == "32-true"
    head = run(["git", "rev-parse", "HEAD"], root).strip()
    tags = run_.data.tags
    assert tags["git_commit"] == head
    assert tags["git_dirty"] in ("true", "false")
    assert tags["dvc_stage"] == "train@vae-0"
    assert tags["data_sha256"] == meta["data_sha256"]
    assert len(client.get_metric_history(run_.info.run_id, v.TRAIN_LOSS)) >= 2
    # One point per validation epoch; the evaluate stage adds test metrics at the kept
    # checkpoint's step, after the first training step.
    assert len(client.get_metric_history(run_.info.run_id, v.nll_key("val", "lower_bound"))) == 2
    (test_point,) = client.get_metric_history(run_.info.run_id, nll)
    assert test_point.step > 0
    assert metrics[nll] <= metrics[v.single_draw_key("test")]  # IWAE-8 >= ELBO
    protocol = metrics.pop("protocol")  # strings and numbers: tags, not MLflow metrics
    assert protocol == rows["protocol"] and protocol["extractor"] == "genlab-evaluator"
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
    for tag in (BASELINES_TAG, REPORT_TAG):
        assert len(client.search_runs([experiment.experiment_id], f"tags.family = '{tag}'")) == 1

    # Every family of the default params went through the same stages into its own run, and
    # answered exactly the questions its contract and its params let it answer.
    for family in params.families:
        metrics = json.loads((root / paths.family_metrics(family, 0)).read_text())
        (family_run,) = client.search_runs([experiment.experiment_id], f"tags.family = '{family}'")
        for key in (v.FID, v.ci_high(v.FID), v.KID, v.SAMPLES_PER_S, v.NFE_PER_SAMPLE):
            assert family_run.data.metrics[key] == pytest.approx(metrics[key]), (family, key)
        images = client.list_artifacts(family_run.info.run_id, "images")
        assert any(a.path.endswith(".png") for a in images), f"no sample grids for {family}"
        assert f"| {family} |" in summary
        cls = MODELS[family]
        conditional = params.family(family).model_kwargs()["conditional"]
        scores = scorer(cls) is not None
        assert (v.auroc("noise") in metrics) == scores, family
        assert (v.class_acc("test") in metrics) == (scores and conditional), family
        assert (v.probe_acc("test") in metrics) == cls.has_latent, family
        assert (v.CLASS_FID_MEAN in metrics) == conditional, family
        assert (v.NLL_GAP in metrics) == (cls.likelihood != "none"), family
        # Sample quality against compute: the training's sample sets, each with its cheap FID.
        curve = json.loads((root / paths.family_compute_curve(family, 0)).read_text())
        fids = [p for p in curve if v.CURVE_FID in p]
        assert fids and all(p[v.CURVE_FID] >= 0 and p["flops"] > 0 for p in fids), family
        grids = {p.name for p in (root / paths.family_figures(family, 0)).iterdir()}
        assert {"samples.png"} <= grids
        assert ("classes.png" in grids) == conditional, family
        assert ("interpolation.png" in grids) == cls.has_latent, family
        logged = {a.path for a in client.list_artifacts(family_run.info.run_id, "evaluation")}
        assert {f"evaluation/{name}" for name in grids} <= logged, family

    # `dvc plots show` renders a figure per question and the families' grids side by side.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], root))["data"]
    for name in FIGURES:
        assert f"reports/figures/{name}.png" in plots, name
    shutil.rmtree(root / "dvc_plots", ignore_errors=True)
    assert rows["real"][v.probe_acc("test")] > 0.5  # the raw-pixel probe

    # A second repro with nothing changed runs nothing.
    out = run(["dvc", "repro"], root)
    assert "Running stage" not in out
    # Editing one family's file makes that family's training stale, no other.
    family_file = root / "src/genlab/models/gan.py"
    original = family_file.read_text()
    family_file.write_text(original + "\n# edited\n")
    stale = json.loads(run(["dvc", "status", "--json"], root))
    assert {stage for stage in stale if stage.startswith("train@")} == {"train@gan-0"}
    family_file.write_text(original)
    # One run per family and seed, plus the baselines and the report.
    assert len(client.search_runs([experiment.experiment_id])) == len(params.families) + 2

    # An experiment in a temporary copy lands in the same store and compares with the baseline.
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline results"], root)
    run(["dvc", "exp", "run", "--temp", "-n", "small-z", "-S", "models.vae.latent_dim=3"], root)
    runs = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    assert len(runs) == 2
    exp_run = next(r for r in runs if r.data.tags.get("dvc_exp_name") == "small-z")
    assert exp_run.data.params["model.latent_dim"] == "3"
    assert v.FID in exp_run.data.metrics  # evaluate logged into the experiment's run
    exp_artifacts = {a.path for a in client.list_artifacts(exp_run.info.run_id)}
    assert "checkpoint" in exp_artifacts  # artifacts did not vanish with the temporary copy

    vae_metrics = str(paths.family_metrics("vae", 0))
    shown = find_named(json.loads(run(["dvc", "exp", "show", "--json"], root)), "small-z")
    assert shown, "dvc exp show does not list the experiment"
    assert any(vae_metrics in json.dumps(entry) for entry in shown)
    run(["dvc", "exp", "apply", "small-z"], root)
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], root))
    assert v.FID in diff[vae_metrics]


def test_two_seeds_train_each_family_twice_and_the_report_aggregates(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`seeds: [0, 1]`: a matrix stage per family and seed, one MLflow run each (tagged with the
    seed), and a report with mean +- sd over the seeds; adding a seed trains only the new one."""
    override = {"families": ["vae", "gan"], "seeds": [0]}
    root = make_repo(tmp_path_factory.mktemp("genlab-seeds"), override)
    (root / "dvc.lock").unlink()
    run(["dvc", "repro"], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["seeds"] = [0, 1]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], root)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@vae-1", "train@gan-1", "evaluate@vae-1", "evaluate@gan-1", "report"}

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    for family in ("vae", "gan"):
        runs = client.search_runs([experiment.experiment_id], f"tags.family = '{family}'")
        assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"], family
        assert sorted(r.info.run_name for r in runs) == [f"{family} (seed 0)", f"{family} (seed 1)"]
        fids = [
            json.loads((root / paths.family_metrics(family, s)).read_text())[v.FID] for s in (0, 1)
        ]
        assert fids[0] != fids[1]  # two trainings, not one copied
    summary = (root / paths.REPORT_SUMMARY).read_text()
    assert "Training seeds 0, 1" in summary
    mean = (fids[0] + fids[1]) / 2
    assert f"| gan | {v.FID} |" in summary and f"{mean:.3f} ± " in summary


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
    repro = start_until_checkpoint(["dvc", "repro", "train@vae-0"], cwd=root, env=_env())
    (training,) = [
        p for p in psutil.Process(repro.pid).children(recursive=True) if "train" in p.cmdline()
    ]
    training.send_signal(signal.SIGTERM)
    output, _ = repro.communicate(timeout=120)

    assert repro.returncode != 0, output
    assert "received SIGTERM" in output
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "prepare" in stages and "train@vae-0" not in stages
    assert not (root / paths.family_model_dir("vae", 0)).exists()
    (ckpt_dir,) = (root / paths.family_checkpoints("vae", 0)).iterdir()
    run_id = json.loads((ckpt_dir / "run.json").read_text())["run_id"]
    kept = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]

    run(["dvc", "repro", "train@vae-0"], root)
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "train@vae-0" in stages
    record = root / paths.family_model_dir("vae", 0) / "run.json"
    assert json.loads(record.read_text())["run_id"] == run_id
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    (run_,) = client.search_runs([experiment.experiment_id], "tags.family = 'vae'")
    assert run_.info.run_id == run_id and run_.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(steps) == set(range(2 * epochs))
    # Resumed, not restarted: only steps after the kept checkpoint were trained twice.
    assert kept > 0 and all(s >= kept for s in steps if steps.count(s) > 1), kept
    assert "Running stage" not in run(["dvc", "repro", "train@vae-0"], root)


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
