"""Stage `evaluator`: the classifier whose features define this dataset's sample metrics."""

from genlab import paths
from genlab.config import Params
from genlab.evaluation.evaluator import train_evaluator
from genlab.io import write_json_atomic


def main(params: Params) -> None:
    result = train_evaluator(
        paths.PREPARED,
        paths.EVALUATOR,
        params=params.evaluator,
        trainer=params.trainer,
        seed=params.seed,
    )
    write_json_atomic(
        paths.EVALUATOR_METRICS,
        {"val/accuracy": result.val_accuracy, "test/accuracy": result.test_accuracy},
    )
    print(f"evaluator: test accuracy {result.test_accuracy:.4f} (val {result.val_accuracy:.4f})")
