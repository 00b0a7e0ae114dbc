"""torch-fidelity integration: the registered extractor and the sample metrics it feeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.config import EvaluateParams
from genlab.data.prepared import load_split
from genlab.evaluation.evaluator import Classifier, load_classifier, save_evaluator
from genlab.evaluation.fidelity import (
    EXTRACTOR_NAME,
    EvaluatorFeatureExtractor,
    SampleMetrics,
    classifier_accuracy,
    register_extractor,
    sample_metrics,
)

PROTOCOL = EvaluateParams(kid_subsets=20)


@pytest.fixture(scope="module")
def random_evaluator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained classifier in the real file format: enough where training does not matter."""
    torch.manual_seed(0)
    net = Classifier(in_channels=1, levels=17, num_classes=10, width=8, feature_dim=16)
    path = tmp_path_factory.mktemp("random-evaluator") / "evaluator.pt"
    save_evaluator(path, net, val_accuracy=0.1, test_accuracy=0.1, dataset_sha256="none")
    return path


@pytest.fixture(scope="module")
def digits_test(prepared_digits: Path) -> torch.Tensor:
    return load_split(prepared_digits, "test").x  # (447, 1, 8, 8) uint8


def test_extractor_returns_requested_features_in_order(random_evaluator: Path) -> None:
    net = load_classifier(random_evaluator)
    x = torch.randint(0, 17, (6, 1, 8, 8), dtype=torch.uint8)
    features, logits = net(x)
    for order in (["features", "logits"], ["logits", "features"], ["logits"], ["features"]):
        extractor = EvaluatorFeatureExtractor(
            EXTRACTOR_NAME, order, feature_extractor_weights_path=str(random_evaluator)
        ).eval()
        out = extractor(x)
        expected = {"features": features, "logits": logits}
        assert isinstance(out, tuple) and len(out) == len(order)
        for name, tensor in zip(order, out, strict=True):
            torch.testing.assert_close(tensor, expected[name])


def test_extractor_defaults_and_errors(random_evaluator: Path) -> None:
    cls = EvaluatorFeatureExtractor
    assert {
        m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "kid", "prc", "isc")
    } == {
        "fid": "features",
        "kid": "features",
        "prc": "features",
        "isc": "logits",
    }
    assert cls.can_be_compiled() is False
    assert cls.get_dummy_input_for_compile() is None
    with pytest.raises(ValueError, match="feature_extractor_weights_path"):
        cls(EXTRACTOR_NAME, ["features"])
    with pytest.raises(ValueError):  # torch-fidelity's own check of the requested names
        cls(EXTRACTOR_NAME, ["pool3"], feature_extractor_weights_path=str(random_evaluator))


def test_register_extractor_is_idempotent() -> None:
    register_extractor()
    register_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is EvaluatorFeatureExtractor


def test_a_set_against_itself(random_evaluator: Path, digits_test: torch.Tensor) -> None:
    m = sample_metrics(digits_test, digits_test, random_evaluator, protocol=PROTOCOL)
    assert abs(m.fid) < 1e-3
    assert m.precision == 1.0 and m.recall == 1.0 and m.f_score == pytest.approx(1.0)
    assert m.isc_mean >= 1.0  # exp(KL) >= 1


def test_metrics_separate_real_from_noise(trained_evaluator, digits_test: torch.Tensor) -> None:
    train = load_split(trained_evaluator.prepared_dir, "train").x
    noise = torch.randint(
        0, 17, (447, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    path = trained_evaluator.path
    itself = sample_metrics(digits_test, digits_test, path, protocol=PROTOCOL)
    real = sample_metrics(train, digits_test, path, protocol=PROTOCOL)
    fake = sample_metrics(noise, digits_test, path, protocol=PROTOCOL)
    assert abs(itself.fid) < 1e-3
    assert fake.fid > 10 * real.fid
    # KID's unbiased estimate is near 0 for a set against itself; for identical sets it is biased
    # a little below 0 (subsets that share images), but far from the real-vs-noise value.
    assert abs(itself.kid_mean) < 0.1 * fake.kid_mean
    assert fake.kid_mean > 10 * abs(real.kid_mean)
    assert fake.recall < real.recall
    assert fake.isc_mean < real.isc_mean


def test_small_sets_shrink_kid_subsets_and_isc_splits(
    random_evaluator: Path, digits_test: torch.Tensor
) -> None:
    m = sample_metrics(digits_test[:5], digits_test, random_evaluator, protocol=PROTOCOL)
    values = m.as_dict()
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values


def test_as_dict_names() -> None:
    m = SampleMetrics(1.0, 2.0, 3.0, 0.5, 0.25, 0.3, 4.0, 0.1)
    assert m.as_dict() == {
        "eval/fid": 1.0,
        "eval/kid_mean": 2.0,
        "eval/kid_std": 3.0,
        "eval/precision": 0.5,
        "eval/recall": 0.25,
        "eval/f_score": 0.3,
        "eval/isc_mean": 4.0,
        "eval/isc_std": 0.1,
    }
    assert set(m.as_dict("real")) == {k.replace("eval/", "real/") for k in m.as_dict()}


def test_sample_metrics_rejects_bad_inputs(
    random_evaluator: Path, digits_test: torch.Tensor
) -> None:
    x = digits_test
    with pytest.raises(ValueError, match="uint8"):
        sample_metrics(x.float(), x, random_evaluator, protocol=PROTOCOL)
    with pytest.raises(ValueError, match="uint8"):
        sample_metrics(x, x[:, 0], random_evaluator, protocol=PROTOCOL)
    with pytest.raises(ValueError, match="same"):
        sample_metrics(x.expand(-1, 3, -1, -1).contiguous(), x, random_evaluator, protocol=PROTOCOL)
    with pytest.raises(ValueError, match="same"):
        sample_metrics(x[:, :, :4], x, random_evaluator, protocol=PROTOCOL)
    with pytest.raises(ValueError, match="at least 2"):
        sample_metrics(x[:1], x, random_evaluator, protocol=PROTOCOL)
    with pytest.raises(ValueError, match="levels"):
        sample_metrics(x + 1, x, random_evaluator, protocol=PROTOCOL)
    with pytest.raises(FileNotFoundError, match="dvc repro evaluator"):
        sample_metrics(x, x, random_evaluator.parent / "missing.pt", protocol=PROTOCOL)


def test_classifier_accuracy_is_a_count(random_evaluator: Path, digits_test: torch.Tensor) -> None:
    x = digits_test[:101]
    y = torch.randint(0, 10, (101,), generator=torch.Generator().manual_seed(1))
    net = load_classifier(random_evaluator)
    with torch.no_grad():
        correct = sum(int(net(x[i : i + 1])[1].argmax() == y[i]) for i in range(len(x)))
    assert classifier_accuracy(random_evaluator, x, y, batch_size=7) == correct / 101
    assert classifier_accuracy(random_evaluator, x, net(x)[1].argmax(1)) == 1.0
    with pytest.raises(ValueError, match="int64"):
        classifier_accuracy(random_evaluator, x, y.int())
