"""Every pipeline output path, relative to the working directory DVC runs a stage in.

`dvc.yaml` declares the same paths; `tests/test_pipeline.py` checks the two agree.
"""

from pathlib import Path

PREPARED = Path("data/prepared")
EVALUATOR = Path("models/evaluator.pt")
EVALUATOR_METRICS = Path("metrics/evaluator.json")
METRICS_DIR = Path("metrics")
REPORTS = Path("reports")
REPORT_SUMMARY = REPORTS / "summary.md"
REPORT_FIGURE = REPORTS / "comparison.png"
REAL_DATA_METRICS = REPORTS / "real_data.json"


def family_model_dir(family: str) -> Path:
    """The final checkpoint (model.ckpt) and its MLflow run (run.json), written after a full fit."""
    return Path("models") / family


def family_checkpoints(family: str) -> Path:
    """In-progress checkpoints (persisted by DVC across re-runs), one folder per config hash."""
    return Path("checkpoints") / family


def family_metrics(family: str) -> Path:
    return METRICS_DIR / f"{family}.json"


def family_samples(family: str) -> Path:
    return REPORTS / "samples" / f"{family}.png"
