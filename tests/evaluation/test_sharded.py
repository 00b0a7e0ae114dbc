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

from genlab.config import parse_params
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
        # 4 batches of 25: two per rank, rank 1 draws batches 1 and 3.
        "evaluate": {"num_samples": 100, "batch_size": 25, "kid_subset_size": 50},
        "prediction": {"bound_samples": 2, "ood_sets": ["noise"]},
        "tracking": {"uri": store},
    }
    train_family(
        parse_params(raw),
        "vae",
        prepared_dir=root / "data/prepared",
        out_dir=root / "models/vae",
        checkpoint_root=root / "checkpoints/vae",
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
        metrics = json.loads((root / "metrics/vae.json").read_text())
        grid = (root / "reports/families/vae/samples.png").read_bytes()
        return metrics, grid, done.stdout

    one, one_grid, _ = evaluate(1)
    two, two_grid, two_out = evaluate(2)
    assert two_grid == one_grid  # the same 64 samples, pixel for pixel

    def measured(metrics: dict[str, float]) -> dict[str, float]:  # all but the timings
        return {k: v for k, v in metrics.items() if k != "eval/samples_per_s" and "time/" not in k}

    assert measured(two) == measured(one)
    assert {"time/sampling_s", "time/features_s", "time/metrics_s"} <= one.keys()
    assert "eval/fid" in two and "eval/cond_acc" in two
    assert two_out.count("evaluated vae") == 1  # rank 0 alone reports (and writes, and logs)

    client = MlflowClient(store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    fid = client.get_metric_history(run.info.run_id, "eval/fid")
    assert [m.value for m in fid] == [one["eval/fid"], two["eval/fid"]]
