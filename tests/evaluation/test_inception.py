"""The standard Inception FID path, offline: torch-fidelity's `inception-v3-compat` with a weights
file the test writes (random weights in the exact state_dict format torch-fidelity loads).

TORCH_HOME points at an empty folder in every test, so nothing can come from (or go to) the
real hub cache, and a download attempt would fail (there is no network): the code path must use
the file it is given.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from genlab import cli, paths
from genlab.config import Params, parse_params
from genlab.data.datasets import Split
from genlab.data.prepared import SPLITS, Meta, load_split, read_meta, split_sha256
from genlab.errors import ConfigError, DataError
from genlab.evaluation import inception
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluator import Classifier, evaluator_outputs, save_evaluator
from genlab.evaluation.features import _Images, extract_features
from genlab.evaluation.protocol import load_reference, measurement
from genlab.evaluation.rows import Row, generation_metrics
from genlab.stages import reference as reference_stage


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 that keeps its random initialisation instead of loading
    weights: its state_dict has exactly the keys and shapes of the published file."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = _RandomInception(inception.EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=empty)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # variance-preserving, so features are not ~1e-8
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / inception.WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("torch-home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_prepared(out: Path, splits: dict[str, Split], *, levels: int) -> Meta:
    """A prepared-data folder in the real format (split files and meta.json)."""
    out.mkdir(parents=True)
    for name, split in splits.items():
        torch.save({"x": split.x, "y": split.y}, out / f"{name}.pt")
    meta = Meta(
        dataset="tiny-rgb",
        levels=levels,
        shape=tuple(splits["train"].x.shape[1:]),
        class_names=["a", "b"],
        splits={n: {"n": len(splits[n].x), "sha256": split_sha256(splits[n])} for n in SPLITS},
    )
    (out / "meta.json").write_text(json.dumps(meta.to_json()))
    return meta


def rgb_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return Split(x, torch.arange(n) % 2)


def inception_params(weights: Path | None, sha: str, **evaluate: object) -> Params:
    return parse_params(
        {
            "families": ["gan"],
            "evaluate": {
                "feature_extractor": "inception",
                "inception_weights": None if weights is None else str(weights),
                "inception_sha256": sha,
                "num_samples": 2,  # the held-out real row's size (the validation split)
                "sample_seeds": 2,
                "bootstrap": 10,
                "copying_cells": 2,
                "batch_size": 4,
                "kid_subset_size": 2,
                "kid_subsets": 3,
                "isc_splits": 2,
            }
            | evaluate,
        }
    )


def test_levels_map_to_uint8_and_gray_to_three_channels() -> None:
    gray = torch.tensor([0, 1, 8, 15, 16], dtype=torch.uint8).view(1, 1, 1, 5)
    rgb = inception.to_inception_input(gray, levels=17)
    assert rgb.shape == (1, 3, 1, 5) and rgb.dtype == torch.uint8
    assert rgb[0, :, 0].tolist() == [[0, 16, 128, 239, 255]] * 3  # round(v * 255 / 16)
    eight_bit = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(inception.to_inception_input(eight_bit, levels=256), eight_bit)
    assert inception.describe_input(17, 1) == "levels 0..16 -> uint8 0..255, gray -> 3 channels"
    assert inception.describe_input(256, 3) == "uint8 as is"
    with pytest.raises(ValueError, match="RGB or grayscale"):
        inception.to_inception_input(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), levels=256)


def test_missing_weights_name_the_expected_path_file_and_source(torch_home: Path) -> None:
    expected = torch_home / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    assert inception.default_weights_path() == expected
    with pytest.raises(DataError) as error:
        inception.resolve_weights(None, inception.WEIGHTS_SHA256)
    message = str(error.value)
    assert str(expected) in message and "6726825d" in message
    assert "https://github.com/toshas/torch-fidelity/releases/" in message
    assert "evaluate.inception_weights" in message and "\n" not in message
    with pytest.raises(DataError, match=r"/nowhere/w\.pth"):
        inception.resolve_weights("/nowhere/w.pth", inception.WEIGHTS_SHA256)


def test_sha256_mismatch_names_both_hashes(weights: Path) -> None:
    actual = sha256(weights)
    assert inception.resolve_weights(weights, actual) == weights
    with pytest.raises(DataError) as error:
        inception.resolve_weights(weights, inception.WEIGHTS_SHA256)
    assert actual in str(error.value) and inception.WEIGHTS_SHA256 in str(error.value)
    assert "evaluate.inception_sha256" in str(error.value)


def test_the_cli_stops_with_one_line_naming_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    torch_home: Path,
    weights: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_prepared(paths.PREPARED, {s: rgb_split(4, i) for i, s in enumerate(SPLITS)}, levels=256)
    params = {
        "families": ["gan"],
        "evaluate": {"feature_extractor": "inception", "inception_weights": None},
    }
    Path("params.yaml").write_text(json.dumps(params))  # JSON is YAML
    assert cli.main(["reference"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "genlab reference: error:" in err
    assert str(torch_home / "hub" / "checkpoints" / inception.WEIGHTS_FILE) in err
    params["evaluate"] |= {"inception_weights": str(weights)}
    Path("params.yaml").write_text(json.dumps(params))
    assert cli.main(["reference"]) == 1  # the published hash is not the test file's
    assert sha256(weights) in capsys.readouterr().err
    assert not paths.REFERENCE.exists()


def test_grayscale_levels_reach_inception_as_rgb_bytes(weights: Path, tmp_path: Path) -> None:
    """Digits-like images (1 channel, 17 levels) give the features of their 0..255 RGB copy."""
    splits = {
        s: Split(torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.uint8), torch.arange(3) % 2)
        for s in SPLITS
    }
    meta = write_prepared(tmp_path / "prepared", splits, levels=17)
    params = inception_params(weights, sha256(weights)).evaluate
    extractor, protocol = measurement(params, tmp_path / "no-evaluator.pt", meta)
    assert protocol.input == "levels 0..16 -> uint8 0..255, gray -> 3 channels"
    x = splits["test"].x
    got = extract_features(x, extractor, batch_size=4)
    net = FeatureExtractorInceptionV3(
        inception.EXTRACTOR_NAME,
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=weights,
    )
    rgb = (x.double() * 255 / 16).round().to(torch.uint8).repeat(1, 3, 1, 1)
    with torch.no_grad():
        features, logits = net(rgb)
    torch.testing.assert_close(got.features, features)
    torch.testing.assert_close(got.logits, logits)
    assert got.features.shape == (3, 2048) and got.logits.shape == (3, 1008)


def test_inception_protocol_end_to_end(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reference stage -> every sample metric of some samples, equal to a direct torch-fidelity
    call with its Inception-v3; the protocol records the extractor, weights and resize."""
    monkeypatch.chdir(tmp_path)
    meta = write_prepared(
        paths.PREPARED,
        {"train": rgb_split(6, 0), "val": rgb_split(2, 1), "test": rgb_split(6, 2)},
        levels=256,
    )
    torch.manual_seed(0)
    net = Classifier(in_channels=3, levels=256, num_classes=2, width=4, feature_dim=8)
    save_evaluator(paths.EVALUATOR, net, val_accuracy=0.5, dataset_sha256="-")
    params = inception_params(weights, sha256(weights))
    reference_stage.main(params)

    extractor, protocol = measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED))
    record = protocol.as_dict()
    assert record["extractor"] == "inception-v3-compat"
    assert record["weights_sha256"] == sha256(weights)
    assert "299x299" in record["resize"] and record["input"] == "uint8 as is"
    assert (record["feature_layer"], record["isc_layer"]) == ("2048", "logits_unbiased")
    assert record["data_sha256"] == meta.data_sha256
    (cached,) = paths.REFERENCE.iterdir()
    assert cached.name == f"{protocol.features_id}.pt"
    reference = load_reference(paths.REFERENCE, protocol)
    assert reference.reference.features.shape == (6, 2048)
    assert (len(reference.train), len(reference.heldout)) == (6, 2)

    samples = rgb_split(4, 3).x
    # All of class 0: one per-class FID (each costs an eigendecomposition of 2048 x 2048).
    labels = torch.zeros(4, dtype=torch.int64)
    test = load_split(paths.PREPARED, "test")
    row = Row([samples], labels)
    features = [extract_features(samples, extractor, batch_size=4)]
    metrics = generation_metrics(
        row,
        features,
        reference=reference,
        reference_y=test.y,
        protocol=protocol,
        num_classes=2,
        extractor=extractor,
        evaluator_path=paths.EVALUATOR,
        batch_size=4,
    )
    direct = torch_fidelity.calculate_metrics(
        input1=_Images(samples),  # 8-bit RGB: what torch-fidelity takes as is
        input2=_Images(test.x),
        fid=True,
        kid=True,
        prc=True,
        isc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights),
        kid_subset_size=2,
        kid_subsets=3,
        isc_splits=2,
        prc_neighborhood=params.evaluate.prc_neighborhood,
        rng_seed=params.evaluate.seed,
        batch_size=4,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    for ours, theirs in (
        (v.FID, torch_fidelity.KEY_METRIC_FID),
        (v.KID, torch_fidelity.KEY_METRIC_KID_MEAN),
        (v.PRECISION, torch_fidelity.KEY_METRIC_PRECISION),
        (v.RECALL, torch_fidelity.KEY_METRIC_RECALL),
        (v.ISC, torch_fidelity.KEY_METRIC_ISC_MEAN),
    ):
        assert metrics[ours] == pytest.approx(direct[theirs], rel=1e-6, abs=1e-9), ours
    assert metrics[v.FID] > 0
    assert metrics[v.ci_low(v.FID)] <= metrics[v.FID] <= metrics[v.ci_high(v.FID)]
    # Conditional accuracy is the evaluator's (Inception's logits are ImageNet classes).
    _, logits = evaluator_outputs(paths.EVALUATOR, samples)
    assert metrics[v.COND_ACC] == float((logits.argmax(1) == labels).double().mean())
    assert metrics[v.CLASS_FID_MEAN] == metrics[v.class_fid(0)] >= 0
    assert v.class_fid(1) not in metrics  # no samples of class 1


def test_params_name_a_bad_hash_or_extractor() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.inception_sha256"):
        parse_params({"families": ["gan"], "evaluate": {"inception_sha256": "6726825d"}})
    with pytest.raises(ConfigError, match=r"evaluate\.feature_extractor"):
        parse_params({"families": ["gan"], "evaluate": {"feature_extractor": "clip"}})
    default = parse_params({"families": ["gan"]}).evaluate
    assert (default.feature_extractor, default.inception_weights) == ("evaluator", None)
    assert default.inception_sha256 == inception.WEIGHTS_SHA256
