"""The protocol and the `reference` stage: the real data's features computed once per protocol,
reused by every evaluate@<family>-<seed> and by the baselines, and the protocol recorded next to
every number.

Real stages in a temporary working directory (a tiny trained GAN, the session's trained
evaluator, a real MLflow store); features are counted by a forward hook on the evaluator's
classifier (a torch hook, not a mock): it sees the images each stage extracts features of.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from genlab import paths
from genlab.compute import load_curve_sets
from genlab.config import EvaluateParams, parse_params
from genlab.data.prepared import load_split, read_meta
from genlab.errors import DataError, GenlabError
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluator import Classifier
from genlab.evaluation.features import EXTRACTOR_NAME, extract_features
from genlab.evaluation.protocol import (
    Protocol,
    check_protocols,
    compute_reference,
    load_reference,
    measurement,
    save_reference,
)
from genlab.evaluation.sample_metrics import point_metrics
from genlab.io import write_json_atomic
from genlab.paths import CURVE_SAMPLES_FILE
from genlab.stages import baselines, evaluate, reference, report
from genlab.tracking import BASELINES_TAG
from genlab.training import train_family

BIN = Path(sys.executable).parent  # the venv's bin: dvc lives here
PARAMS = EvaluateParams(kid_subsets=20, sample_seeds=2, bootstrap=20)


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


# ---------------------------------------------------------------- the protocol


def test_protocol_names_everything_a_number_depends_on(
    random_evaluator: Path, prepared_digits: Path
) -> None:
    meta = read_meta(prepared_digits)
    _, protocol = measurement(PARAMS, random_evaluator, meta)
    record = protocol.as_dict()
    assert all(isinstance(x, (str, int, float)) for x in record.values()), record
    assert record["extractor"] == EXTRACTOR_NAME
    assert record["weights_sha256"] == hashlib.sha256(random_evaluator.read_bytes()).hexdigest()
    assert record["resize"] == "none"
    assert (record["reference_split"], record["heldout_split"]) == ("test", "val")
    assert record["data_sha256"] == meta.data_sha256
    # null: as many images per set as the held-out real row has (the validation split).
    assert (record["num_samples"], record["kid_subset_size"]) == (350, 200)
    assert (record["sample_seeds"], record["bootstrap"], record["confidence"]) == (2, 20, 0.95)
    assert record["id"] == protocol.id and len(protocol.id) == 16

    # Every setting moves the id; only what the real data's features depend on moves their key.
    for change, moves_features in (
        ({"kid_subsets": 21}, False),
        ({"kid_subset_size": 100}, False),
        ({"isc_splits": 5}, False),
        ({"prc_neighborhood": 5}, True),  # the reference draws' k-NN radii
        ({"num_samples": 300}, False),
        ({"sample_seeds": 3}, False),
        ({"bootstrap": 30}, True),  # the reference draws
        ({"confidence": 0.9}, False),
        ({"copying_tau": 0.1}, False),
        ({"copying_cells": 4}, True),
        ({"seed": 1}, True),
        ({"split": "val"}, True),
    ):
        other = measurement(PARAMS.model_copy(update=change), random_evaluator, meta).protocol
        assert other.id != protocol.id, change
        assert (other.features_id != protocol.features_id) == moves_features, change
    assert measurement(PARAMS, random_evaluator, meta).protocol == protocol  # deterministic
    tuning = measurement(PARAMS.model_copy(update={"split": "val"}), random_evaluator, meta)
    assert (tuning.protocol.reference_split, tuning.protocol.heldout_split) == ("val", "none")


def test_num_samples_bounds_a_set_at_the_heldout_rows_size(
    random_evaluator: Path, prepared_digits: Path
) -> None:
    meta = read_meta(prepared_digits)
    for bound, size in ((351, 350), (10_000, 350), (300, 300)):
        update = {"num_samples": bound}
        protocol = measurement(PARAMS.model_copy(update=update), random_evaluator, meta).protocol
        assert protocol.num_samples == size, bound
    # Tuning on val has no held-out row: any size.
    tuning = PARAMS.model_copy(update={"num_samples": 1000, "split": "val"})
    assert measurement(tuning, random_evaluator, meta).protocol.num_samples == 1000


def test_check_protocols_refuses_other_or_missing_protocols(
    random_evaluator: Path, prepared_digits: Path
) -> None:
    meta = read_meta(prepared_digits)
    _, protocol = measurement(PARAMS, random_evaluator, meta)
    check_protocols({"metrics/a.json": protocol.as_dict()}, protocol)  # the same: fine
    other = measurement(PARAMS.model_copy(update={"num_samples": 300}), random_evaluator, meta)
    with pytest.raises(GenlabError, match=r"metrics/b\.json .*num_samples 300 \(want 350\)"):
        check_protocols(
            {"metrics/a.json": protocol.as_dict(), "metrics/b.json": other.protocol.as_dict()},
            protocol,
        )
    with pytest.raises(GenlabError, match=r"metrics/c\.json records no evaluation protocol"):
        check_protocols({"metrics/c.json": None}, protocol)


def test_reference_round_trip_and_errors(
    random_evaluator: Path, prepared_digits: Path, tmp_path: Path
) -> None:
    meta = read_meta(prepared_digits)
    extractor, protocol = measurement(PARAMS, random_evaluator, meta)
    with pytest.raises(DataError, match="run `dvc repro reference`"):
        load_reference(tmp_path / "reference", protocol)
    ref = compute_reference(prepared_digits, extractor, protocol, batch_size=100)
    assert (len(ref.reference), len(ref.train), len(ref.heldout)) == (447, 1000, 350)
    assert ref.centroids.shape == (protocol.copying_cells, 16)
    assert ref.reference_cells.shape == ref.reference_dist.shape == (447,)
    stale = tmp_path / "reference" / "0123456789abcdef.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"another protocol's features")
    path = save_reference(ref, tmp_path / "reference", protocol)
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{protocol.features_id}.pt"]
    back = load_reference(tmp_path / "reference", protocol)
    assert back.key == protocol.features_key()
    for a, b in (
        (back.reference, ref.reference),
        (back.train, ref.train),
        (back.heldout, ref.heldout),
    ):
        assert torch.equal(a.features, b.features) and torch.equal(a.logits, b.logits)
    assert torch.equal(back.centroids, ref.centroids)
    test = extract_features(load_split(prepared_digits, "test").x, extractor, batch_size=100)
    assert torch.equal(test.features, back.reference.features)

    other = measurement(PARAMS.model_copy(update={"seed": 5}), random_evaluator, meta)
    with pytest.raises(DataError, match=f"holds {protocol.features_id}"):
        load_reference(tmp_path / "reference", other.protocol)
    path.write_bytes(b"torn")  # a torn file: one clear error, not a traceback
    with pytest.raises(DataError, match="not a genlab reference file"):
        load_reference(tmp_path / "reference", protocol)


# ---------------------------------------------------------------- the stages


def test_reference_is_computed_once_and_reused_by_evaluate_baselines_and_report(
    project_dir: Path, tiny: dict, images_seen: ImagesSeen
) -> None:
    tmp_path = project_dir
    protocol_params = {
        "num_samples": 100,
        "sample_seeds": 2,
        "bootstrap": 20,
        "batch_size": 50,
        "kid_subset_size": 50,
        "kid_subsets": 5,
    }
    raw = {
        "families": ["gan"],
        "models": {"gan": tiny["gan"] | {"max_epochs": 1, "batch_size": 500, "conditional": True}},
        "evaluate": protocol_params,
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    params = parse_params(raw)
    train_family(
        params,
        "gan",
        seed=0,
        prepared_dir=paths.PREPARED,
        out_dir=paths.family_model_dir("gan", 0),
        checkpoint_root=paths.family_checkpoints("gan", 0),
    )
    images_seen.take()

    reference.main(params)
    assert images_seen.take() == 447 + 1000 + 350  # the test, train and held-out splits
    (cached,) = paths.REFERENCE.iterdir()
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED))
    assert cached.name == f"{protocol.features_id}.pt"
    written = cached.stat().st_mtime_ns

    meta = read_meta(paths.PREPARED)
    model_dir = paths.family_model_dir("gan", 0)
    curve = load_curve_sets(model_dir / CURVE_SAMPLES_FILE, meta.shape, meta.levels)
    for _ in range(2):
        evaluate.main(params, "gan", 0)
        # Two sets of 100 samples once each, for every metric (FID ... conditional accuracy,
        # per-class FID, memorisation), and the training's curve sets; not one real image: the
        # reference is read.
        assert images_seen.take() == 2 * 100 + sum(len(s.images) for s in curve) > 200
    assert cached.stat().st_mtime_ns == written and list(paths.REFERENCE.iterdir()) == [cached]

    metrics = json.loads(paths.family_metrics("gan", 0).read_text())
    assert metrics["protocol"] == protocol.as_dict()
    for key in (v.FID, v.COND_ACC, v.CLASS_FID_MEAN, v.DENSITY, v.COVERAGE, v.C_T):
        assert metrics[v.ci_low(key)] <= metrics[key] <= metrics[v.ci_high(key)], key
    client = MlflowClient(raw["tracking"]["uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.family = 'gan'")
    assert (run.info.run_name, run.data.tags["seed"]) == ("gan (seed 0)", "0")
    for key, value in protocol.as_dict().items():
        assert run.data.tags[f"eval.protocol.{key}"] == str(value), key
    assert run.data.metrics[v.FID] == pytest.approx(metrics[v.FID])
    assert run.data.metrics[v.ci_high(v.FID)] == pytest.approx(metrics[v.ci_high(v.FID)])

    baselines.main(params)
    # The copycat and held-out rows come from the cached features; the evaluator classifies
    # the test split once for its own accuracy.
    assert images_seen.take() == 447
    rows = json.loads(paths.BASELINE_METRICS.read_text())
    assert rows["protocol"] == protocol.as_dict()
    test = load_split(paths.PREPARED, "test").x
    heldout = load_split(paths.PREPARED, "val").x[:100]
    kw = {"batch_size": 50}
    direct = point_metrics(
        extract_features(heldout, _extractor(params), **kw),
        extract_features(test, _extractor(params), **kw),
        protocol,
    )
    assert rows["heldout"][v.FID] == pytest.approx(direct[v.FID], rel=1e-9)
    assert rows["heldout"][v.RECALL] == pytest.approx(direct[v.RECALL], rel=1e-9)
    assert rows["copycat"][v.EXACT_COPIES] == 1.0
    (logged,) = client.search_runs(experiments, f"tags.family = '{BASELINES_TAG}'")
    assert logged.data.metrics[f"copycat.{v.FID}"] == pytest.approx(rows["copycat"][v.FID])
    images_seen.take()

    report.main(params)
    assert images_seen.take() == 0  # the report reads JSON only
    assert paths.REPORT_SUMMARY.is_file()

    # Another protocol: the report refuses to compare, evaluate refuses before sampling.
    other = parse_params(raw | {"evaluate": protocol_params | {"kid_subsets": 6}})
    with pytest.raises(GenlabError, match=r"metrics/gan/seed0\.json .*kid_subsets 5 \(want 6\)"):
        report.main(other)
    metrics["protocol"] = metrics["protocol"] | {"weights_sha256": "0" * 64}
    write_json_atomic(paths.family_metrics("gan", 0), metrics)
    with pytest.raises(GenlabError, match="weights_sha256"):
        report.main(params)
    more = parse_params(raw | {"evaluate": protocol_params | {"copying_cells": 3}})
    with pytest.raises(DataError, match="run `dvc repro reference`"):
        evaluate.main(more, "gan", 0)
    assert images_seen.take() == 0


def _extractor(params):
    return measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED)).extractor


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
        heldout_split="val",
        num_samples=350,
        sample_seeds=5,
        bootstrap=200,
        confidence=0.95,
        kid_subset_size=200,
        kid_subsets=100,
        prc_neighborhood=3,
        isc_splits=10,
        copying_cells=5,
        copying_tau=0.05,
        seed=1234,
    )


def test_dvc_metrics_show_and_diff_list_the_protocol(tmp_path: Path) -> None:
    """The protocol's strings and numbers next to the metrics are what `dvc metrics show`
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
        "      - metrics/gan/seed0.json:\n          cache: false\n"
    )
    before = _protocol("genlab-evaluator", "a" * 64)
    after = _protocol("inception-v3-compat", "b" * 64)
    path = tmp_path / paths.family_metrics("gan", 0)
    write_json_atomic(path, {"eval/fid": 2.0, "protocol": before.as_dict()})
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "evaluator protocol")
    write_json_atomic(path, {"eval/fid": 7.5, "protocol": after.as_dict()})

    shown = json.loads(run("dvc", "metrics", "show", "--json"))
    data = shown[""]["data"]["metrics/gan/seed0.json"]["data"]
    assert data["protocol"] == after.as_dict()
    diff = json.loads(run("dvc", "metrics", "diff", "--json"))["metrics/gan/seed0.json"]
    assert diff["eval/fid"] == {"old": 2.0, "new": 7.5, "diff": 5.5}
    assert diff["protocol.extractor"] == {"old": "genlab-evaluator", "new": "inception-v3-compat"}
    assert diff["protocol.id"] == {"old": before.id, "new": after.id}
    assert "protocol.num_samples" not in diff  # unchanged
    table = run("dvc", "metrics", "diff", "--md")
    assert "protocol.weights_sha256" in table and "b" * 64 in table
