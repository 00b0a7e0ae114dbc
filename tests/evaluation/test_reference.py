"""The `reference` stage: the real data's features computed once per protocol, reused by every
evaluate@<family> and by the report, and the protocol recorded next to every FID.

Real stages in a temporary working directory (a tiny trained GAN, the session's trained
evaluator, a real MLflow store); features are counted by a forward hook on the evaluator's
classifier (a torch hook, not a mock): it sees the images each stage extracts features of.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from torch import nn

from genlab import paths
from genlab.config import parse_params
from genlab.data.prepared import load_split, read_meta
from genlab.errors import DataError, GenlabError
from genlab.evaluation.evaluator import Classifier
from genlab.evaluation.fidelity import Protocol, measurement, sample_metrics
from genlab.io import write_json_atomic
from genlab.stages import evaluate, reference, report
from genlab.training import train_family

BIN = Path(sys.executable).parent  # the venv's bin: dvc lives here


class ImagesSeen:
    """How many images went through any genlab evaluator classifier since the last `take()`."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, Classifier):
            self.count += args[0].shape[0]

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.fixture
def images_seen() -> Iterator[ImagesSeen]:
    seen = ImagesSeen()
    handle = nn.modules.module.register_module_forward_hook(seen)
    yield seen
    handle.remove()


def test_reference_is_computed_once_and_reused_by_evaluate_and_report(
    trained_evaluator,
    tiny: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    images_seen: ImagesSeen,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_evaluator.prepared_dir, paths.PREPARED)
    paths.EVALUATOR.parent.mkdir()
    shutil.copy(trained_evaluator.path, paths.EVALUATOR)
    raw = {
        "families": ["gan"],
        "models": {"gan": tiny["gan"] | {"max_epochs": 1, "batch_size": 500, "conditional": True}},
        "evaluate": {"num_samples": 100, "batch_size": 50, "kid_subset_size": 50, "kid_subsets": 5},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    params = parse_params(raw)
    train_family(
        params,
        "gan",
        prepared_dir=paths.PREPARED,
        out_dir=paths.family_model_dir("gan"),
        checkpoint_root=paths.family_checkpoints("gan"),
    )
    images_seen.take()

    reference.main(params)
    assert images_seen.take() == 447 + 100  # the test split and the floor's 100 train images
    (cached,) = paths.REFERENCE.iterdir()
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED))
    assert cached.name == f"{protocol.features_id}.pt"
    written = cached.stat().st_mtime_ns

    for _ in range(2):
        evaluate.main(params, "gan")
        # The 100 samples once, for every metric (FID ... conditional accuracy, per-class FID);
        # not one real image: the reference is read, not recomputed.
        assert images_seen.take() == 100
    assert cached.stat().st_mtime_ns == written and list(paths.REFERENCE.iterdir()) == [cached]

    metrics = json.loads(paths.family_metrics("gan").read_text())
    assert metrics["protocol"] == protocol.as_dict()
    assert {"eval/fid", "eval/cond_acc", "eval/class_fid_mean"} <= set(metrics)
    client = MlflowClient(raw["tracking"]["uri"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tags = run.data.tags
    for key, value in protocol.as_dict().items():
        assert tags[f"eval.protocol.{key}"] == str(value), key
    assert run.data.metrics["eval/fid"] == pytest.approx(metrics["eval/fid"])

    paths.EVALUATOR_METRICS.write_text(json.dumps({"test/accuracy": 0.9}))
    report.main(params)
    assert images_seen.take() == 0  # the real-data floor comes from the cache too
    real = json.loads(paths.REAL_DATA_METRICS.read_text())
    assert real["protocol"] == protocol.as_dict()
    test = load_split(paths.PREPARED, "test").x
    train = load_split(paths.PREPARED, "train").x[:100]
    direct = sample_metrics(train, test, paths.EVALUATOR, protocol=params.evaluate)
    assert real["eval/fid"] == pytest.approx(direct.fid, rel=1e-9)
    assert real["eval/recall"] == pytest.approx(direct.recall, rel=1e-9)
    images_seen.take()

    # Another protocol: the report refuses to compare, evaluate refuses before sampling.
    other = parse_params(raw | {"evaluate": raw["evaluate"] | {"kid_subsets": 6}})
    with pytest.raises(GenlabError, match=r"metrics/gan\.json .*kid_subsets 5 \(want 6\)"):
        report.main(other)
    metrics["protocol"] = metrics["protocol"] | {"weights_sha256": "0" * 64}
    write_json_atomic(paths.family_metrics("gan"), metrics)
    with pytest.raises(GenlabError, match="weights_sha256"):
        report.main(params)
    more = parse_params(raw | {"evaluate": raw["evaluate"] | {"num_samples": 120}})
    with pytest.raises(DataError, match="run `dvc repro reference`"):
        evaluate.main(more, "gan")
    assert images_seen.take() == 0


def _protocol(extractor: str, sha: str) -> Protocol:
    return Protocol(
        extractor=extractor,
        weights_sha256=sha,
        feature_layer="2048",
        isc_layer="logits_unbiased",
        input="uint8 as is",
        resize="bilinear to 299x299 (torch-fidelity, TF1-compatible)",
        data_sha256="d" * 64,
        reference_split="test",
        floor_split="train",
        num_samples=1000,
        kid_subset_size=200,
        kid_subsets=100,
        prc_neighborhood=3,
        isc_splits=10,
        seed=1234,
    )


def test_dvc_metrics_show_and_diff_list_the_protocol(tmp_path: Path) -> None:
    """The protocol's strings and integers next to the numbers are what `dvc metrics show`
    lists and `dvc metrics diff` compares (strings: old and new, no numeric change)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "GIT_AUTHOR_NAME": "t"}
    env |= {"GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t.invalid"}

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: 'true'\n    metrics:\n"
        "      - metrics/gan.json:\n          cache: false\n"
    )
    before = _protocol("genlab-evaluator", "a" * 64)
    after = _protocol("inception-v3-compat", "b" * 64)
    path = tmp_path / paths.family_metrics("gan")
    write_json_atomic(path, {"eval/fid": 2.0, "protocol": before.as_dict()})
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "evaluator protocol")
    write_json_atomic(path, {"eval/fid": 7.5, "protocol": after.as_dict()})

    shown = json.loads(run("dvc", "metrics", "show", "--json"))
    data = shown[""]["data"]["metrics/gan.json"]["data"]
    assert data["protocol"] == after.as_dict()
    diff = json.loads(run("dvc", "metrics", "diff", "--json"))["metrics/gan.json"]
    assert diff["eval/fid"] == {"old": 2.0, "new": 7.5, "diff": 5.5}
    assert diff["protocol.extractor"] == {"old": "genlab-evaluator", "new": "inception-v3-compat"}
    assert diff["protocol.id"] == {"old": before.id, "new": after.id}
    assert "protocol.num_samples" not in diff  # unchanged
    table = run("dvc", "metrics", "diff", "--md")
    assert "protocol.weights_sha256" in table and "b" * 64 in table
