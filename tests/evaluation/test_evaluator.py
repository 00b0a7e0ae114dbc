"""The evaluator classifier, its training run and its file format."""

from __future__ import annotations

import pytest
import torch

from genlab.config import EvaluatorParams, TrainerParams
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation.evaluator import (
    FORMAT,
    Classifier,
    EvaluatorResult,
    classifier_predictions,
    evaluator_outputs,
    load_classifier,
    random_affine,
    save_evaluator,
    train_evaluator,
)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 16, 16), (3, 16, 16), (2, 9, 13)])
def test_classifier_shapes(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    c, h, w = shape
    net = Classifier(in_channels=c, levels=17, num_classes=10, width=4, feature_dim=12).eval()
    x = torch.randint(0, 17, (5, c, h, w), dtype=torch.uint8)
    features, logits = net(x)
    assert features.shape == (5, 12)
    assert logits.shape == (5, 10)
    assert torch.isfinite(logits).all()
    # Penultimate activations: after the ReLU, and the head is the only thing after them.
    assert (features >= 0).all()
    torch.testing.assert_close(net.head(features), logits)


def test_classifier_reads_levels_not_raw_bytes() -> None:
    """Same picture at 17 and at 33 levels -> same input to the network after its scaling."""
    torch.manual_seed(0)
    a = Classifier(in_channels=1, levels=17, num_classes=10, width=4, feature_dim=8).eval()
    b = Classifier(in_channels=1, levels=33, num_classes=10, width=4, feature_dim=8).eval()
    b.load_state_dict(a.state_dict())
    x17 = torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.uint8)
    x33 = 2 * x17  # level k of 17 is level 2k of 33: the same intensity k / 16
    torch.testing.assert_close(a(x17), b(x33))


def test_random_affine_keeps_levels() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 17, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_affine(x, degrees=10, scale=0.1, shift=1)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert int(out.max()) <= 16
    assert not torch.equal(out, x)
    # No rotation, scaling or shift: bilinear sampling at the pixel centres is the identity.
    assert torch.equal(random_affine(x, degrees=0, scale=0, shift=0), x)


def test_train_evaluator_writes_documented_file(trained_evaluator) -> None:
    path, result, prepared = trained_evaluator
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {
        "format",
        "config",
        "state_dict",
        "val_accuracy",
        "dataset_sha256",
    }
    assert blob["format"] == FORMAT
    assert blob["config"] == {
        "in_channels": 1,
        "levels": 17,
        "num_classes": 10,
        "width": 16,
        "feature_dim": 32,
        "dropout": 0.2,
        "image_size": 8,
    }
    assert blob["dataset_sha256"] == read_meta(prepared).data_sha256
    assert blob["val_accuracy"] == result.val_accuracy
    assert result.val_accuracy > 0.3  # chance is 0.1
    assert result.num_params == sum(p.numel() for p in load_classifier(path).parameters())
    # Training reports nothing about the test split (its accuracy is the baselines stage's).
    assert EvaluatorResult._fields == ("val_accuracy", "num_params", "global_zero")
    assert result.global_zero  # one process: it wrote the file


def test_the_kept_weights_classify_unseen_test_images(trained_evaluator) -> None:
    """What `test_accuracy` used to say, now measured where it is needed: the weights chosen on
    validation classify the test images, which training never read, well above chance."""
    path, _, prepared = trained_evaluator
    test = load_split(prepared, "test")
    predictions = classifier_predictions(path, test.x, batch_size=100)
    assert predictions.dtype == torch.int64 and predictions.shape == test.y.shape
    assert float((predictions == test.y).double().mean()) > 0.3  # chance is 0.1
    # The predictions are the argmax of the evaluator's logits, batch size aside.
    _, logits = evaluator_outputs(path, test.x)
    assert torch.equal(predictions, logits.argmax(dim=1))


def test_saved_weights_are_the_reported_ones(trained_evaluator) -> None:
    """The file holds the kept (best-validation) weights: their validation accuracy is the one
    reported."""
    path, result, prepared = trained_evaluator
    s = load_split(prepared, "val")
    accuracy = (classifier_predictions(path, s.x) == s.y).double().mean()
    assert float(accuracy) == pytest.approx(result.val_accuracy, abs=1e-6)


def test_train_evaluator_is_reproducible_and_restores_torch_flags(
    prepared_digits, tmp_path
) -> None:
    params = EvaluatorParams(max_epochs=1, width=4, feature_dim=8)
    torch.use_deterministic_algorithms(False)
    results, states = [], []
    for name in ("a.pt", "b.pt"):
        results.append(
            train_evaluator(
                prepared_digits, tmp_path / name, params=params, trainer=TrainerParams(), seed=3
            )
        )
        assert not torch.are_deterministic_algorithms_enabled()
        states.append(torch.load(tmp_path / name, weights_only=True)["state_dict"])
    assert results[0] == results[1]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_load_classifier_is_in_eval_mode(trained_evaluator) -> None:
    net = load_classifier(trained_evaluator.path)
    assert not net.training
    x = torch.randint(0, 17, (4, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(net(x), net(x))  # dropout off, batch-norm running statistics


def test_save_is_atomic_over_an_existing_file(tmp_path) -> None:
    net = Classifier(in_channels=1, levels=17, num_classes=10, width=4, feature_dim=8)
    path = tmp_path / "evaluator.pt"
    path.write_text("old")
    save_evaluator(path, net, val_accuracy=0.25, dataset_sha256="abc")
    assert [p.name for p in tmp_path.iterdir()] == ["evaluator.pt"]
    assert torch.load(path, weights_only=True)["val_accuracy"] == 0.25


def test_load_classifier_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="dvc repro evaluator"):
        load_classifier(tmp_path / "nope.pt")


def test_load_classifier_rejects_other_files(tmp_path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a genlab evaluator"):
        load_classifier(other)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a genlab evaluator"):
        load_classifier(text)
