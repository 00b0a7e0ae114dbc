"""Evaluator fixtures for the evaluation tests: one tiny trained evaluator per session."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from genlab.config import EvaluatorParams, TrainerParams
from genlab.evaluation.evaluator import EvaluatorResult, train_evaluator

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
