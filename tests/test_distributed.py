"""DDP on CPU with real processes (gloo): `torchrun` launches 2 ranks, the way a multi-GPU or
multi-node job does, and genlab's own training path runs in them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.models import MODELS
from genlab.paths import MODEL_FILE

HERE = Path(__file__).parent / "distributed"


def torchrun(script: str, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"OMP_NUM_THREADS": "1", "DVC_ROOT": str(cwd)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, str(HERE / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_process_ddp_trains_every_family_into_exactly_one_mlflow_run(
    tiny: dict, prepared_digits: Path, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    families = sorted(MODELS)
    params = {
        "families": families,
        "trainer": {"devices": 2, "sample_every_n_epochs": 1, "sample_grid_size": 4},
        # 1000 images over 2 ranks of 250: 2 steps per epoch, a global batch of 500.
        "models": {f: tiny.get(f, {}) | {"max_epochs": 2, "batch_size": 250} for f in families},
        "tracking": {"uri": store},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = (prepared_digits, tmp_path, tmp_path / "params.yaml")
    done = torchrun("train_all.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["family"] for r in runs) == families  # one run each, from rank 0
    for run in runs:
        family = run.data.tags["family"]
        assert (run.info.run_name, run.data.tags["seed"]) == (f"{family} (seed 0)", "0")
        assert run.info.status == "FINISHED", family
        assert run.data.params["trainer.world_size"] == "2", family
        assert run.data.params["trainer.global_batch_size"] == "500", family
        # 2 epochs x 2 steps: every rank stepped in lockstep on its own half of the data.
        ckpt = torch.load(
            tmp_path / paths.family_model_dir(family, 0) / MODEL_FILE, weights_only=True
        )
        assert ckpt["global_step"] in (2, 4), family
        grids = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert len([p for p in grids if "compressed" not in p]) == 2, (family, grids)


def test_two_process_evaluator_writes_its_shared_metrics_file_from_rank_0_only(
    prepared_digits: Path, tmp_path: Path
) -> None:
    """Both ranks train the evaluator together; only rank 0 writes metrics/evaluator.json (two
    writers of one file once tore it)."""
    shutil.copytree(prepared_digits, tmp_path / paths.PREPARED)
    params = {"families": ["vae"], "trainer": {"devices": 2}, "evaluator": {"max_epochs": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = torchrun("evaluator_writes.py", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    writers = (tmp_path / "writers.txt").read_text().splitlines()
    assert writers == [f"0 {paths.EVALUATOR_METRICS}"], writers
    assert (tmp_path / paths.EVALUATOR_METRICS).is_file() and (tmp_path / paths.EVALUATOR).is_file()
