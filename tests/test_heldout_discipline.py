"""The test split is read only by the final evaluation: training, checkpoint selection, early
stopping, the evaluator and a whole tuning evaluation (`evaluate.split: val`) run with the test
split's file deleted. Any read of it raises, so these tests fail the moment one creeps in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from genlab import paths
from genlab.config import EvaluatorParams, TrainerParams, parse_params
from genlab.data.prepared import load_split
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluator import train_evaluator
from genlab.stages import baselines, evaluate, reference, report
from genlab.training import train_family


@pytest.fixture
def without_test(prepared_digits: Path, tmp_path: Path) -> Path:
    """The prepared digits without test.pt (meta.json still lists it)."""
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_digits, prepared)
    (prepared / "test.pt").unlink()
    with pytest.raises(Exception, match="test"):  # the guard itself works
        load_split(prepared, "test")
    return prepared


def test_training_and_checkpoint_selection_never_read_the_test_split(
    without_test: Path, tmp_path: Path, tiny: dict
) -> None:
    result = train_evaluator(
        without_test,
        tmp_path / "evaluator.pt",
        params=EvaluatorParams(max_epochs=2, width=8, feature_dim=16),
        trainer=TrainerParams(),
        seed=0,
    )
    assert 0 <= result.val_accuracy <= 1
    params = parse_params(
        {
            "families": ["vae"],
            # Early stopping and the best-validation checkpoint: the choices made on val.
            "models": {"vae": tiny["vae"] | {"max_epochs": 3, "early_stopping_patience": 1}},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )
    out = train_family(
        params,
        "vae",
        seed=0,
        prepared_dir=without_test,
        out_dir=tmp_path / "model",
        checkpoint_root=tmp_path / "checkpoints",
    )
    assert out.checkpoint.is_file()


def test_a_tuning_evaluation_never_reads_the_test_split(
    without_test: Path, tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(without_test, paths.PREPARED)
    params = parse_params(
        {
            "families": ["vae"],
            "evaluator": {"max_epochs": 2, "width": 8, "feature_dim": 16},
            "models": {"vae": tiny["vae"] | {"max_epochs": 1, "eval_samples": 2}},
            "evaluate": {
                "split": "val",
                "num_samples": 50,
                "sample_seeds": 2,
                "bootstrap": 10,
                "kid_subset_size": 20,
                "kid_subsets": 3,
            },
            "prediction": {"bound_samples": 2, "ood_sets": ["noise"]},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )
    train_evaluator(
        paths.PREPARED, paths.EVALUATOR, params=params.evaluator, trainer=params.trainer, seed=0
    )
    train_family(
        params,
        "vae",
        seed=0,
        prepared_dir=paths.PREPARED,
        out_dir=paths.family_model_dir("vae", 0),
        checkpoint_root=paths.family_checkpoints("vae", 0),
    )
    reference.main(params)
    evaluate.main(params, "vae", 0)
    baselines.main(params)
    report.main(params)
    metrics = json.loads(paths.family_metrics("vae", 0).read_text())
    assert metrics["protocol"]["reference_split"] == "val"
    assert v.nll_key("val", "lower_bound") in metrics and v.probe_acc("val") in metrics
    assert not any(key.startswith("test/") for key in metrics)
    assert (
        "held-out numbers are on the `val` split".lower()
        in paths.REPORT_SUMMARY.read_text().lower()
    )
