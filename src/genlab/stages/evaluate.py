"""Stage `evaluate@<family>-<seed>`: metrics/<family>/seed<k>.json and the grids, both into the
training run of that family and seed.

The metrics file holds the metrics (each with its interval or standard error) and, under
"protocol", what they were measured under (`protocol.Protocol`: strings and numbers, which
`dvc metrics show/diff` list beside the metrics); the run gets the same as `eval.protocol.<key>`
tags.
"""

import json
from pathlib import Path

import numpy as np
import torch

from genlab import paths
from genlab.compute import load_curve_sets
from genlab.config import Params
from genlab.data.prepared import Meta, read_meta
from genlab.distributed import launch
from genlab.evaluation.evaluate import evaluate_model
from genlab.evaluation.grids import save_png
from genlab.evaluation.vocabulary import CURVE, PROTOCOL, TRAINING_COST, is_uncertainty
from genlab.io import atomic_folder, write_json_atomic
from genlab.models import MODELS
from genlab.paths import (
    COMPUTE_CURVE_FILE,
    CURVE_SAMPLES_FILE,
    MODEL_FILE,
    RUN_FILE,
    TRAIN_COST_FILE,
    run_name,
)
from genlab.progress import scope
from genlab.sync import push_after_stage
from genlab.tracking import RunRecord, flatten, log_evaluation, resolve_stores


def write_grids(
    grids: dict[str, np.ndarray], folder: Path, curve: list[dict[str, float]]
) -> list[Path]:
    """`folder`/<name>.png for every grid and the training's compute curve, replacing the folder
    whole: it is written next to the old one and swapped in, so it never mixes two
    evaluations' files."""
    with atomic_folder(folder) as tmp:
        for name, grid in grids.items():
            save_png(grid, tmp / f"{name}.png")
        (tmp / COMPUTE_CURVE_FILE).write_text(json.dumps(curve, indent=1))
    return [folder / f"{name}.png" for name in grids] + [folder / COMPUTE_CURVE_FILE]


def held_out_dataset(meta: Meta, split: str) -> tuple[str, str, dict]:
    """The split the evaluation scored as an MLflow dataset (name, sha256, profile): a dataset
    of its own, since MLflow keeps one input per dataset and run (the training's is the whole
    prepared data)."""
    profile = meta.profile() | {"split": split}
    return f"{meta.dataset} ({split} split)", meta.splits[split]["sha256"], profile


def training_cost(model_dir: Path) -> tuple[dict[str, float], list[dict[str, float]]]:
    """What the training cost (the `TRAINING_COST` keys of the train stage's train.json) and its
    compute curve; ({}, []) for a model trained before genlab wrote them."""
    path = model_dir / TRAIN_COST_FILE
    if not path.is_file():
        return {}, []
    cost = json.loads(path.read_text())
    curve = [{str(k): float(x) for k, x in point.items()} for point in cost.get(CURVE, [])]
    return {key: float(cost[key]) for key in TRAINING_COST if key in cost}, curve


def merged(*curves: list[dict[str, float]]) -> list[dict[str, float]]:
    """Curves of points {"steps", "flops", <metric>: ..} as one, in order of steps: points at
    the same step become one point with every metric measured there."""
    by_step: dict[float, dict[str, float]] = {}
    for curve in curves:
        for point in curve:
            by_step.setdefault(point["steps"], {}).update(point)
    return [by_step[k] for k in sorted(by_step)]


def main(params: Params, family: str, seed: int) -> None:
    model_dir = paths.family_model_dir(family, seed)
    meta = read_meta(paths.PREPARED)
    curve_sets = load_curve_sets(model_dir / CURVE_SAMPLES_FILE, meta.shape, meta.levels)
    record = RunRecord.load(model_dir / RUN_FILE)
    shard, device = launch(params.trainer)  # processes as trainer.devices/num_nodes ask
    checkpoint = model_dir / MODEL_FILE
    model = MODELS[family].load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
    # Metrics go in at the checkpoint's step, so the final val/... point sits on the training
    # curve where that checkpoint was chosen.
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    with scope(f"evaluate {run_name(family, seed)}"):  # how its progress lines start
        result = evaluate_model(
            model,
            prepared_dir=paths.PREPARED,
            evaluator_path=paths.EVALUATOR,
            reference_dir=paths.REFERENCE,
            protocol=params.evaluate,
            prediction=params.prediction,
            representation=params.representation,
            shard=shard,
            curve_sets=curve_sets,
            channels_last=params.trainer.channels_last,
        )
    if result is None:  # a rank that only sampled: rank 0 writes and logs
        return
    cost, curve = training_cost(model_dir)
    metrics = result.metrics | cost
    curve = merged(curve, result.curve)
    figures = write_grids(result.grids, paths.family_figures(family, seed), curve)
    metrics_file = paths.family_metrics(family, seed)
    write_json_atomic(metrics_file, metrics | {PROTOCOL: result.protocol.as_dict()})
    protocol = {
        "evaluate": params.evaluate.model_dump(),
        "prediction": params.prediction.model_dump(),
        "representation": params.representation.model_dump(),
        "protocol": result.protocol.as_dict(),
    }
    stores = resolve_stores(params.tracking.uri)
    log_evaluation(
        record,
        stores,
        result.metrics,  # the training cost is in the run already
        step=step,
        protocol=flatten(protocol),
        artifacts=[*figures, metrics_file],
        data=held_out_dataset(meta, params.evaluate.split),
        confidence=params.evaluate.confidence,
    )
    push_after_stage(stores, [record.run_id])  # to the team server, if there is one
    shown = {k: round(v, 4) for k, v in metrics.items() if not is_uncertainty(k)}
    print(f"evaluated {family} (seed {seed}): {shown}")
