"""Every pipeline output path, relative to the working directory DVC runs a stage in.

`dvc.yaml` declares the same paths; `tests/test_pipeline.py` checks the two agree. A family's
outputs are per training seed: `models/<family>/seed<k>/`, `metrics/<family>/seed<k>.json`, ...
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
# The copycat, held-out real and real-data rows (stage `baselines`).
BASELINE_METRICS = METRICS_DIR / "baselines.json"
# One figure per question (generation, likelihood, prediction, representation, conditional)
# and the families' grids side by side: what `dvc plots show` renders.
REPORT_FIGURES = REPORTS / "figures"


# Params profiles (an input, not an output): profiles/<name>.yaml, applied by `genlab profile`.
PROFILES = Path("profiles")

# In a family's model folder (family_model_dir): the final checkpoint and its MLflow run.
MODEL_FILE = "model.ckpt"
RUN_FILE = "run.json"
TRAIN_COST_FILE = "train.json"  # the training's FLOPs, steps, wall time and parameters
CURVE_SAMPLES_FILE = "curve_samples.pt"  # sample sets drawn along the training (its compute)
COMPUTE_CURVE_FILE = "compute_curve.json"  # in the evaluate stage's figures folder


def seed_name(seed: int) -> str:
    return f"seed{seed}"


def run_name(family: str, seed: int) -> str:
    """The MLflow run of a family's training with one seed, and how logs name that training."""
    return f"{family} (seed {seed})"


def family_model_dir(family: str, seed: int) -> Path:
    """The final checkpoint (model.ckpt) and its MLflow run (run.json), written after a full fit."""
    return Path("models") / family / seed_name(seed)


def family_checkpoints(family: str, seed: int) -> Path:
    """In-progress checkpoints (persisted by DVC across re-runs), one folder per config hash."""
    return Path("checkpoints") / family / seed_name(seed)


def family_metrics(family: str, seed: int) -> Path:
    return METRICS_DIR / family / f"{seed_name(seed)}.json"


def family_figures(family: str, seed: int) -> Path:
    """The evaluate stage's grids of one family (which exist depends on what it can do)."""
    return REPORTS / "families" / family / seed_name(seed)


def family_samples(family: str, seed: int) -> Path:
    return family_figures(family, seed) / "samples.png"


def family_class_grid(family: str, seed: int) -> Path:
    """One row per class (conditional families)."""
    return family_figures(family, seed) / "classes.png"


def family_interpolation(family: str, seed: int) -> Path:
    """Latent interpolations between held-out images in latent space (families that encode)."""
    return family_figures(family, seed) / "interpolation.png"


def family_traversal(family: str, seed: int) -> Path:
    """Latent traversals (families whose latent compresses the image)."""
    return family_figures(family, seed) / "traversal.png"


def family_compute_curve(family: str, seed: int) -> Path:
    """The validation metric against training steps and FLOPs (from the train stage's
    train.json), next to the grids: what the report's quality-versus-compute figure draws."""
    return family_figures(family, seed) / COMPUTE_CURVE_FILE
