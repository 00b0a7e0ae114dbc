"""Sharded evaluation with real processes: `genlab evaluate` with `trainer.devices: 2` launches a
second process (Lightning Fabric, gloo on CPU) that samples half of the batches; the samples, and
so every metric, are those of a single process, and only rank 0 writes and logs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.config import parse_params
from genlab.distributed import ONE_PROCESS, Shard
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluate import generate
from genlab.evaluation.protocol import Protocol
from genlab.models import MODELS
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
        # 2 sets of 45: one stream of 4 batches (25, 25, 25, 15), two per rank (rank 1 draws
        # batches 1 and 3); the first set ends inside batch 1, which rank 1 draws.
        "evaluate": {
            "num_samples": 45,
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
    env = {k: x for k, x in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
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
    assert two_grid == one_grid  # the same 45 samples of the first set, pixel for pixel

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
    assert one[v.SAMPLE_SETS] == two[v.SAMPLE_SETS] == 2


@dataclasses.dataclass(frozen=True)
class InProcess(Shard):
    """Rank `rank` of `world_size`, all in this process: `gather` hands rank 0 the batches every
    rank posted (the others run first), in batch order, as `dist.gather_object` would."""

    posted: dict = dataclasses.field(default_factory=dict)  # rank -> {batch: samples}

    def gather(self, mine: dict[int, torch.Tensor]) -> list[torch.Tensor] | None:
        self.posted[self.rank] = mine
        if not self.is_zero:
            return None
        merged = {b: t for part in self.posted.values() for b, t in part.items()}
        return [merged[b] for b in sorted(merged)]


def _protocol(num_samples: int, sample_seeds: int, seed: int = 1234) -> Protocol:
    """A protocol with the fields `generate` reads; the rest as the defaults would make them."""
    return Protocol(
        extractor="genlab-evaluator",
        weights_sha256="0" * 64,
        feature_layer="features",
        isc_layer="logits",
        input="uint8 levels",
        resize="none",
        data_sha256="0" * 64,
        reference_split="test",
        heldout_split="val",
        num_samples=num_samples,
        sample_seeds=sample_seeds,
        bootstrap=10,
        confidence=0.95,
        kid_subset_size=2,
        kid_subsets=1,
        prc_neighborhood=3,
        isc_splits=1,
        copying_cells=2,
        copying_tau=0.05,
        seed=seed,
    )


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("num_samples", "sample_seeds", "batch_size"), [(20, 2, 5), (13, 3, 5)])
def test_generate_gives_the_same_sets_however_many_processes_share_the_batches(
    tiny: dict, world_size: int, num_samples: int, sample_seeds: int, batch_size: int
) -> None:
    """`sample_seeds` sets of `num_samples` each, from batches seeded by (seed, batch index):
    split over any number of ranks, rank 0 gathers exactly the single process's samples (also
    when a set ends inside a batch), the other ranks get None, and every batch is drawn once."""
    torch.manual_seed(0)
    kwargs = tiny["vae"] | {"conditional": True}
    model = MODELS["vae"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs)
    protocol = _protocol(num_samples, sample_seeds)
    single = generate(model, protocol, batch_size=batch_size, shard=ONE_PROCESS)
    assert single is not None and len(single.sets) == sample_seeds
    for samples in single.sets:
        assert samples.dtype == torch.uint8 and samples.shape == (num_samples, 1, 8, 8)
    # Independent sets: no two alike. Each asks for the same balanced classes.
    for a in range(sample_seeds):
        for b in range(a + 1, sample_seeds):
            assert not torch.equal(single.sets[a], single.sets[b])
    assert torch.equal(single.labels, torch.arange(num_samples) % 10)

    posted: dict = {}
    shards = [InProcess(rank, world_size, posted) for rank in range(world_size)]
    for shard in shards[1:]:
        assert generate(model, protocol, batch_size=batch_size, shard=shard) is None
    gathered = generate(model, protocol, batch_size=batch_size, shard=shards[0])
    assert gathered is not None and len(gathered.sets) == sample_seeds
    for ours, theirs in zip(gathered.sets, single.sets, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(gathered.labels, single.labels)
    batches = [b for part in posted.values() for b in part]
    total = -(-num_samples * sample_seeds // batch_size)
    assert sorted(batches) == list(range(total))  # each batch drawn once, by one rank
    # Another protocol seed: other samples.
    other = generate(model, _protocol(num_samples, sample_seeds, seed=1), batch_size=batch_size)
    assert not torch.equal(other.sets[0], single.sets[0])
