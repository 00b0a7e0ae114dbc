"""Stage `evaluator`: the classifier whose features define this dataset's sample metrics.

It is chosen on the validation split and never reads the test split (its test accuracy is
measured by the `baselines` stage, part of the final evaluation)."""

from genlab import paths
from genlab.config import Params
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluator import train_evaluator
from genlab.io import write_json_atomic


def main(params: Params) -> None:
    result = train_evaluator(
        paths.PREPARED,
        paths.EVALUATOR,
        params=params.evaluator,
        trainer=params.trainer,
        seed=params.evaluator.seed,
    )
    if not result.global_zero:  # one writer of the shared file: rank 0
        return
    write_json_atomic(paths.EVALUATOR_METRICS, {v.evaluator_acc("val"): result.val_accuracy})
    print(f"evaluator: validation accuracy {result.val_accuracy:.4f}")
