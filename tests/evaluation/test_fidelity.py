"""torch-fidelity integration: the registered extractor and the sample metrics it feeds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genlab.config import EvaluateParams
from genlab.data.prepared import load_split, read_meta
from genlab.errors import DataError, GenlabError
from genlab.evaluation.evaluate import generation_metrics
from genlab.evaluation.evaluator import Classifier, load_classifier, save_evaluator
from genlab.evaluation.fidelity import (
    EXTRACTOR_NAME,
    EvaluatorFeatureExtractor,
    Reference,
    SampleMetrics,
    _Images,
    check_protocols,
    class_fid,
    classifier_accuracy,
    compute_reference,
    evaluator_outputs,
    extract_features,
    floor_metrics,
    load_reference,
    measurement,
    register_extractor,
    sample_metrics,
    save_reference,
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


# ---------------------------------------------------------------- features once, then metrics


def test_from_features_equals_one_calculate_metrics_call(
    trained_evaluator, digits_test: torch.Tensor
) -> None:
    """The cached-features path gives the numbers of a direct torch-fidelity call (what the
    evaluate stage computed before features were cached), to float tolerance."""
    evaluator = trained_evaluator.path
    generated = load_split(trained_evaluator.prepared_dir, "train").x[:300]
    new = sample_metrics(generated, digits_test, evaluator, protocol=PROTOCOL)
    register_extractor()
    direct = torch_fidelity.calculate_metrics(
        input1=_Images(generated),
        input2=_Images(digits_test),
        fid=True,
        kid=True,
        prc=True,
        isc=True,
        feature_extractor=EXTRACTOR_NAME,
        feature_extractor_weights_path=str(evaluator),
        kid_subset_size=PROTOCOL.kid_subset_size,
        kid_subsets=PROTOCOL.kid_subsets,
        prc_neighborhood=PROTOCOL.prc_neighborhood,
        isc_splits=PROTOCOL.isc_splits,
        batch_size=PROTOCOL.batch_size,
        cuda=False,
        cache=False,
        verbose=False,
        rng_seed=PROTOCOL.seed,
        save_cpu_ram=True,
    )
    expected = {
        "fid": torch_fidelity.KEY_METRIC_FID,
        "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
        "kid_std": torch_fidelity.KEY_METRIC_KID_STD,
        "precision": torch_fidelity.KEY_METRIC_PRECISION,
        "recall": torch_fidelity.KEY_METRIC_RECALL,
        "f_score": torch_fidelity.KEY_METRIC_F_SCORE,
        "isc_mean": torch_fidelity.KEY_METRIC_ISC_MEAN,
        "isc_std": torch_fidelity.KEY_METRIC_ISC_STD,
    }
    assert new.fid > 0.01 and new.isc_mean > 1.1  # real numbers, not two empty ones
    for ours, theirs in expected.items():
        assert getattr(new, ours) == pytest.approx(direct[theirs], rel=1e-9, abs=1e-12), ours


def test_conditional_metrics_from_the_same_features(
    trained_evaluator, digits_test: torch.Tensor
) -> None:
    """Conditional accuracy and per-class FID from the one extraction equal what the evaluator
    applied separately gives (the evaluate stage's former second pass)."""
    evaluator, prepared_digits = trained_evaluator.path, trained_evaluator.prepared_dir
    meta = read_meta(prepared_digits)
    samples = load_split(prepared_digits, "train").x[:200]
    labels = torch.arange(200) % 10
    test_y = load_split(prepared_digits, "test").y
    extractor, protocol = measurement(PROTOCOL, evaluator, meta)
    reference = Reference(
        key=protocol.features_key(),
        test=extract_features(digits_test, extractor, batch_size=PROTOCOL.batch_size),
        floor=extract_features(samples[:4], extractor, batch_size=PROTOCOL.batch_size),
    )
    got = generation_metrics(
        samples,
        labels,
        extractor=extractor,
        reference=reference,
        reference_y=test_y,
        evaluator_path=evaluator,
        protocol=PROTOCOL,
        num_classes=10,
    )
    kw = {"batch_size": PROTOCOL.batch_size}
    gen_features, gen_logits = evaluator_outputs(evaluator, samples, **kw)
    test_features, _ = evaluator_outputs(evaluator, digits_test, **kw)
    per_class = class_fid(gen_features, labels, test_features, test_y, 10)
    assert got["eval/cond_acc"] == float((gen_logits.argmax(1) == labels).double().mean())
    for k, v in per_class.items():
        assert got[f"eval/class_fid_{k}"] == pytest.approx(v, rel=1e-9), k
    assert got["eval/class_fid_mean"] == pytest.approx(sum(per_class.values()) / len(per_class))
    assert got["eval/fid"] == pytest.approx(
        sample_metrics(samples, digits_test, evaluator, protocol=PROTOCOL).fid, rel=1e-9
    )


# ---------------------------------------------------------------- the protocol


def test_protocol_names_everything_a_number_depends_on(
    random_evaluator: Path, prepared_digits: Path
) -> None:
    meta = read_meta(prepared_digits)
    _, protocol = measurement(PROTOCOL, random_evaluator, meta)
    record = protocol.as_dict()
    assert all(isinstance(v, (str, int)) for v in record.values()), record
    assert record["extractor"] == EXTRACTOR_NAME
    assert record["weights_sha256"] == hashlib.sha256(random_evaluator.read_bytes()).hexdigest()
    assert record["resize"] == "none"
    assert record["reference_split"] == "test" and record["floor_split"] == "train"
    assert record["data_sha256"] == meta.data_sha256
    assert (record["num_samples"], record["kid_subset_size"]) == (1000, 200)
    assert record["id"] == protocol.id and len(protocol.id) == 16

    # Every setting moves the id; only what the real data's features depend on moves their key.
    for change, moves_features in (
        ({"kid_subsets": 21}, False),
        ({"kid_subset_size": 100}, False),
        ({"seed": 1}, False),
        ({"isc_splits": 5}, False),
        ({"prc_neighborhood": 5}, False),
        ({"num_samples": 999}, True),
    ):
        other = measurement(PROTOCOL.model_copy(update=change), random_evaluator, meta).protocol
        assert other.id != protocol.id, change
        assert (other.features_id != protocol.features_id) == moves_features, change
    assert measurement(PROTOCOL, random_evaluator, meta).protocol == protocol  # deterministic


def test_check_protocols_refuses_other_or_missing_protocols(
    random_evaluator: Path, prepared_digits: Path
) -> None:
    meta = read_meta(prepared_digits)
    _, protocol = measurement(PROTOCOL, random_evaluator, meta)
    check_protocols({"metrics/a.json": protocol.as_dict()}, protocol)  # the same: fine
    other = measurement(PROTOCOL.model_copy(update={"num_samples": 500}), random_evaluator, meta)
    with pytest.raises(GenlabError, match=r"metrics/b\.json .*num_samples 500 \(want 1000\)"):
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
    protocol_params = PROTOCOL.model_copy(update={"num_samples": 50})
    extractor, protocol = measurement(protocol_params, random_evaluator, meta)
    with pytest.raises(DataError, match="run `dvc repro reference`"):
        load_reference(tmp_path / "reference", protocol)
    reference = compute_reference(prepared_digits, extractor, protocol, batch_size=100)
    assert (len(reference.test), len(reference.floor)) == (447, 50)
    stale = tmp_path / "reference" / "0123456789abcdef.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"another protocol's features")
    path = save_reference(reference, tmp_path / "reference", protocol)
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{protocol.features_id}.pt"]
    back = load_reference(tmp_path / "reference", protocol)
    assert back.key == protocol.features_key()
    for a, b in ((back.test, reference.test), (back.floor, reference.floor)):
        assert torch.equal(a.features, b.features) and torch.equal(a.logits, b.logits)
    floor = floor_metrics(back, protocol_params)
    train = load_split(prepared_digits, "train").x[:50]
    direct = sample_metrics(
        train, load_split(prepared_digits, "test").x, random_evaluator, protocol=protocol_params
    )
    assert floor.fid == pytest.approx(direct.fid, rel=1e-9)
    assert floor.kid_mean == pytest.approx(direct.kid_mean, rel=1e-9)

    other = measurement(PROTOCOL.model_copy(update={"num_samples": 60}), random_evaluator, meta)
    with pytest.raises(DataError, match=f"holds {protocol.features_id}"):
        load_reference(tmp_path / "reference", other.protocol)
