"""Stage `evaluate@<family>`: metrics/<family>.json, a sample grid, both into the family's run."""

import torch

from genlab import paths
from genlab.config import Params
from genlab.evaluation.evaluate import evaluate_model
from genlab.evaluation.grids import save_png
from genlab.io import write_json_atomic
from genlab.models import MODELS
from genlab.tracking import RunRecord, log_evaluation
from genlab.training import MODEL_FILE, RUN_FILE


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def main(params: Params, family: str) -> None:
    model_dir = paths.family_model_dir(family)
    record = RunRecord.load(model_dir / RUN_FILE)
    device = pick_device(params.trainer.accelerator)
    checkpoint = model_dir / MODEL_FILE
    model = MODELS[family].load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
    # Metrics go in at the checkpoint's step, so the final val/... point sits on the training
    # curve where that checkpoint was chosen.
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    result = evaluate_model(
        model, prepared_dir=paths.PREPARED, evaluator_path=paths.EVALUATOR, protocol=params.evaluate
    )
    write_json_atomic(paths.family_metrics(family), result.metrics)
    save_png(result.grid, paths.family_samples(family))
    log_evaluation(
        record,
        result.metrics,
        step=step,
        protocol=params.evaluate.model_dump(),
        artifacts=[paths.family_samples(family), paths.family_metrics(family)],
    )
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"evaluated {family}: {shown}")
