"""Every pipeline output path, relative to the working directory DVC runs a stage in.

`dvc.yaml` declares the same paths; `tests/test_pipeline.py` checks the two agree.
"""

from pathlib import Path

PREPARED = Path("data/prepared")
# The real data's features under the current protocol: <features id>.pt (DVC's cache keeps
# those of other protocols).
REFERENCE = Path("data/reference")
EVALUATOR = Path("models/evaluator.pt")
EVALUATOR_METRICS = Path("metrics/evaluator.json")
METRICS_DIR = Path("metrics")
REPORTS = Path("reports")
REPORT_SUMMARY = REPORTS / "summary.md"
REAL_DATA_METRICS = REPORTS / "real_data.json"
# One figure per question (generation, likelihood, prediction, representation, conditional)
# and the families' grids side by side: what `dvc plots show` renders.
REPORT_FIGURES = REPORTS / "figures"


def family_model_dir(family: str) -> Path:
    """The final checkpoint (model.ckpt) and its MLflow run (run.json), written after a full fit."""
    return Path("models") / family


def family_checkpoints(family: str) -> Path:
    """In-progress checkpoints (persisted by DVC across re-runs), one folder per config hash."""
    return Path("checkpoints") / family


def family_metrics(family: str) -> Path:
    return METRICS_DIR / f"{family}.json"


def family_figures(family: str) -> Path:
    """The evaluate stage's grids of one family (which exist depends on what it can do)."""
    return REPORTS / "families" / family


def family_samples(family: str) -> Path:
    return family_figures(family) / "samples.png"


def family_class_grid(family: str) -> Path:
    """One row per class (conditional families)."""
    return family_figures(family) / "classes.png"


def family_interpolation(family: str) -> Path:
    """Latent interpolations between test images (families that encode)."""
    return family_figures(family) / "interpolation.png"


def family_traversal(family: str) -> Path:
    """Latent traversals (families whose latent compresses the image)."""
    return family_figures(family) / "traversal.png"
