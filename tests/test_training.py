"""Training as a real process: SIGTERM is not success, and the next run resumes the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from genlab.config import parse_params
from genlab.data.prepared import prepare
from genlab.models import MODELS
from genlab.training import MODEL_FILE, train_family

GENLAB = [sys.executable, "-m", "genlab.cli"]


def _params(tmp: Path, max_epochs: int) -> None:
    params = {
        "families": ["vae"],
        "trainer": {"sample_every_n_epochs": 1000, "log_every_n_steps": 1},
        "models": {"vae": {"max_epochs": max_epochs, "batch_size": 500, "hidden_dim": 8}},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {"OMP_NUM_THREADS": "1", "DVC_ROOT": str(tmp)}


def test_sigterm_exits_nonzero_writes_nothing_final_and_resume_finishes(tmp_path: Path) -> None:
    prepare("digits", tmp_path / "data/prepared")
    _params(tmp_path, max_epochs=150)
    proc = subprocess.Popen(
        [*GENLAB, "train", "vae"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ckpt_root = tmp_path / "checkpoints/vae"
    deadline = time.monotonic() + 120
    while not list(ckpt_root.glob("*/last.ckpt")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)

    assert proc.returncode != 0, output
    assert "received SIGTERM" in output
    assert not (tmp_path / "models/vae/model.ckpt").exists()
    (ckpt_dir,) = ckpt_root.iterdir()
    run_id = json.loads((ckpt_dir / "run.json").read_text())["run_id"]
    kept = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    # The kill may land right after the first epoch's checkpoint, whose "epoch" is 0: what must
    # hold is that some training was kept and that it is not the finished run.
    assert kept["global_step"] > 0 and kept["epoch"] < 149, (kept["epoch"], kept["global_step"])

    # Same config: resumes from last.ckpt into the same MLflow run and finishes. (Fewer epochs
    # would be another config, hence another checkpoint folder: never resumed silently.)
    done = subprocess.run(
        [*GENLAB, "train", "vae"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "models/vae/model.ckpt").is_file()
    assert json.loads((tmp_path / "models/vae/run.json").read_text())["run_id"] == run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(client.search_experiments()[0].experiment_id.split())
    assert [r.info.run_id for r in runs] == [run_id]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(steps) == set(range(150 * 2))  # 1000 images / batch 500 = 2 steps per epoch
    # Only the epoch cut short by the kill is trained (and logged) again after resume.
    redone = {s for s in steps if steps.count(s) > 1}
    assert all(s >= kept["global_step"] for s in redone), redone


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sample_grids_logged_during_training_land_in_the_mlflow_run(
    family: str, tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """The sample-grid callback fires every `sample_every_n_epochs` and at the end: one image
    artifact per epoch here, in the family's own MLflow run, for every family."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params(
        {
            "families": [family],
            "trainer": {"sample_every_n_epochs": 1, "sample_grid_size": 4},
            "models": {family: tiny.get(family, {}) | {"max_epochs": 2, "batch_size": 500}},
            "tracking": {"uri": store},
        }
    )
    result = train_family(
        params,
        family,
        prepared_dir=prepared_digits,
        out_dir=tmp_path / "model",
        checkpoint_root=tmp_path / "checkpoints",
    )
    assert (tmp_path / "model" / MODEL_FILE).is_file()
    client = MlflowClient(store)
    images = [a.path for a in client.list_artifacts(result.run.run_id, "images")]
    grids = [p for p in images if p.startswith("images/samples") and p.endswith(".png")]
    # MLflow stores each logged image as a full-size and a compressed png.
    assert len([p for p in grids if "compressed" not in p]) == 2, images
