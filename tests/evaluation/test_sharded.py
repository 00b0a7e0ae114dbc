"""Sharded evaluation with real processes: `genlab evaluate` with `trainer.devices: 2` launches a
second process (Lightning Fabric, gloo on CPU) that samples half of the batches; the samples, and
so every metric, are those of a single process, and only rank 0 writes and logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.config import parse_params
from genlab.evaluation import vocabulary as v
from genlab.training import train_family

GENLAB = [sys.executable, "-m", "genlab.cli"]


def test_one_and_two_processes_give_identical_samples_and_metrics(
    trained_evaluator, tiny: dict, tmp_path: Path
) -> None:
    root = tmp_path / "project"
    shutil.copytree(trained_evaluator.prepared_dir, root / "data/prepared")
    (root / "models").mkdir()
    shutil.copyfile(trained_evaluator.path, root / "models/evaluator.pt")
    store = f"sqlite:///{root / 'mlflow.db'}"
    raw = {
        "families": ["vae"],
        "models": {"vae": tiny["vae"] | {"max_epochs": 1, "conditional": True}},
        # 2 sets of 2 batches of 25: two batches per rank, rank 1 draws the second of each set.
        "evaluate": {
            "num_samples": 50,
            "sample_seeds": 2,
            "bootstrap": 20,
            "batch_size": 25,
            "kid_subset_size": 25,
        },
        "prediction": {"bound_samples": 2, "ood_sets": ["noise"]},
        "tracking": {"uri": store},
    }
    train_family(
        parse_params(raw),
        "vae",
        seed=0,
        prepared_dir=root / "data/prepared",
        out_dir=root / paths.family_model_dir("vae", 0),
        checkpoint_root=root / paths.family_checkpoints("vae", 0),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"OMP_NUM_THREADS": "1"}

    def genlab(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
        params = raw | {"trainer": {"devices": devices}}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        return subprocess.run([*GENLAB, *args], cwd=root, env=env, capture_output=True, text=True)

    reference = genlab("reference")  # the real data's features, which evaluate reads
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    def evaluate(devices: int) -> tuple[dict[str, float], bytes, str]:
        done = genlab("evaluate", "vae", devices=devices)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        metrics = json.loads((root / paths.family_metrics("vae", 0)).read_text())
        grid = (root / paths.family_samples("vae", 0)).read_bytes()
        return metrics, grid, done.stdout

    one, one_grid, _ = evaluate(1)
    two, two_grid, two_out = evaluate(2)
    assert two_grid == one_grid  # the same 64 samples, pixel for pixel

    def measured(metrics: dict[str, float]) -> dict[str, float]:  # all but the timings
        timings = {v.SAMPLES_PER_S, *(v.phase_seconds(p) for p in ("sampling", "features"))}
        return {k: x for k, x in metrics.items() if k not in timings and "time/" not in k}

    assert measured(two) == measured(one)  # intervals included: the same sets, the same draws
    phases = ("sampling", "features", "metrics", "memorisation")
    assert {v.phase_seconds(p) for p in phases} <= one.keys()
    assert v.FID in two and v.COND_ACC in two and v.ci_high(v.FID) in two
    assert two_out.count("evaluated vae") == 1  # rank 0 alone reports (and writes, and logs)

    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    fid = client.get_metric_history(run.info.run_id, v.FID)
    assert [m.value for m in fid] == [one[v.FID], two[v.FID]]
