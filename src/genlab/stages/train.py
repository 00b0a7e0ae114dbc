"""Stage `train@<family>-<seed>`: fit one family with one training seed; final checkpoint and
run id only after a full fit."""

from genlab import paths
from genlab.config import Params
from genlab.training import train_family


def main(params: Params, family: str, seed: int) -> None:
    result = train_family(
        params,
        family,
        seed=seed,
        prepared_dir=paths.PREPARED,
        out_dir=paths.family_model_dir(family, seed),
        checkpoint_root=paths.family_checkpoints(family, seed),
    )
    if result.run is not None:  # the process that tracks (global rank 0) reports
        print(
            f"trained {family} (seed {seed}): {result.epochs} epochs in {result.wall_s:.1f}s, "
            f"MLflow run {result.run.run_id}"
        )
