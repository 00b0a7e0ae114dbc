"""Evaluator fixtures for the evaluation tests: one tiny trained evaluator per session."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from genlab import paths
from genlab.config import EvaluatorParams, TrainerParams
from genlab.evaluation.evaluator import (
    Classifier,
    EvaluatorResult,
    save_evaluator,
    train_evaluator,
)

# Small enough to train in about a second on one CPU thread, good enough to beat chance clearly.
TINY = EvaluatorParams(max_epochs=3, width=16, feature_dim=32)


class Trained(NamedTuple):
    path: Path
    result: EvaluatorResult
    prepared_dir: Path


@pytest.fixture(scope="session")
def trained_evaluator(prepared_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A real `train_evaluator` run on the digits (real Trainer, tiny params), written once."""
    path = tmp_path_factory.mktemp("evaluator") / "evaluator.pt"
    result = train_evaluator(prepared_digits, path, params=TINY, trainer=TrainerParams(), seed=0)
    return Trained(path, result, prepared_digits)


@pytest.fixture(scope="module")
def random_evaluator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained classifier in the real file format: enough where training does not matter."""
    torch.manual_seed(0)
    net = Classifier(in_channels=1, levels=17, num_classes=10, width=8, feature_dim=16)
    path = tmp_path_factory.mktemp("random-evaluator") / "evaluator.pt"
    save_evaluator(path, net, val_accuracy=0.1, dataset_sha256="none")
    return path


@pytest.fixture
def project_dir(
    trained_evaluator: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A working directory laid out as the pipeline leaves it after `prepare` and `evaluator`
    (the digits and the session's trained evaluator), with no MLflow URI from outside."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_evaluator.prepared_dir, paths.PREPARED)
    paths.EVALUATOR.parent.mkdir()
    shutil.copy(trained_evaluator.path, paths.EVALUATOR)
    return tmp_path
