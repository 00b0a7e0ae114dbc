"""Train one family: Lightning Trainer, MLflow run, resumable checkpoints, final outputs.

Known traps handled here (DESIGN.md): Lightning exits 0 after SIGTERM, so an interrupted fit raises
`TrainingInterrupted` and final outputs are written only after a finished fit; in-progress
checkpoints live in a folder keyed by a hash of the training config and are resumed with
`ckpt_path="last"`; the MLflow URI is passed explicitly; checkpoints are logged as plain artifacts.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.tracking import MlflowClient

from genlab.config import Params, config_hash
from genlab.data.datamodule import PreparedDataModule
from genlab.data.prepared import read_meta
from genlab.errors import TrainingInterrupted
from genlab.evaluation.grids import image_grid
from genlab.models import MODELS, GenerativeModule
from genlab.models.base import nll_key
from genlab.tracking import (
    RunRecord,
    flatten,
    is_global_zero,
    provenance_tags,
    resolve_tracking_uri,
    start_run,
)

RUN_FILE = "run.json"
MODEL_FILE = "model.ckpt"
LAST = "last"  # in-progress checkpoint: <checkpoint_root>/<config hash>/last.ckpt


def grid_labels(model: GenerativeModule, n: int) -> torch.Tensor | None:
    """Labels for a sample grid: classes in turn (a row per class on a num_classes-wide grid)."""
    return torch.arange(n) % model.num_classes if model.conditional else None


class SampleGridCallback(Callback):
    """Logs a grid of samples to the MLflow run every `every_n_epochs` epochs and at the end.

    The same seed every time, so the grids show how one set of draws evolves over training.
    """

    def __init__(self, every_n_epochs: int, n: int, seed: int) -> None:
        self.every_n_epochs = every_n_epochs
        self.n = n
        self.seed = seed
        self.logged_steps: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs:
            self._log(trainer, pl_module, epoch)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, model: GenerativeModule, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            samples = model.sample(self.n, grid_labels(model, self.n), generator=generator)
        finally:
            model.train(was_training)
        nrow = model.num_classes if model.conditional else int(self.n**0.5) or 1
        grid = image_grid(samples, model.levels, nrow=nrow)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_image(logger.run_id, grid, key="samples", step=epoch)
        self.logged_steps.append(epoch)


def _callbacks(
    params: Params, family: str, model: GenerativeModule, ckpt_dir: Path
) -> tuple[list[Callback], ModelCheckpoint | None]:
    """Resumable `last.ckpt`, the best-validation checkpoint, early stopping, sample grids."""
    fp = params.family(family)
    callbacks: list[Callback] = [
        # The latest epoch, every epoch, for resume. Not `save_last=True`: since Lightning 2.6 it
        # writes last.ckpt only in steps where a top-k checkpoint was saved. No version counter,
        # so a resumed fit keeps writing the same file.
        ModelCheckpoint(
            dirpath=ckpt_dir, filename=LAST, save_top_k=1, enable_version_counter=False
        ),
        SampleGridCallback(
            params.trainer.sample_every_n_epochs, params.trainer.sample_grid_size, params.seed
        ),
    ]
    best = None
    if model.likelihood != "none":
        monitor = nll_key("val", model.likelihood)
        best = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=monitor,
            mode="min",
            save_top_k=1,
            enable_version_counter=False,
        )
        callbacks.append(best)
        if fp.early_stopping_patience is not None:
            callbacks.append(
                EarlyStopping(monitor=monitor, mode="min", patience=fp.early_stopping_patience)
            )
    return callbacks, best


@dataclass(frozen=True)
class TrainResult:
    run: RunRecord | None
    checkpoint: Path
    epochs: int
    wall_s: float


def _open_run(params: Params, family: str, ckpt_dir: Path, tags: dict[str, str]) -> RunRecord:
    """The MLflow run of this training: resumed from `ckpt_dir` if it holds one, else new."""
    record_path = ckpt_dir / RUN_FILE
    client = MlflowClient(resolve_tracking_uri(params.tracking.uri))
    if record_path.is_file():
        record = RunRecord.load(record_path)
        if record.tracking_uri == client.tracking_uri:
            client.set_terminated(record.run_id, status="RUNNING")
            return record
    record = start_run(client, params.experiment_name, run_name=family, tags=tags)
    record.save(record_path)
    return record


def build_model(params: Params, family: str, prepared_dir: str | Path) -> GenerativeModule:
    meta = read_meta(prepared_dir)
    return MODELS[family](
        image_shape=meta.shape,
        levels=meta.levels,
        num_classes=meta.num_classes,
        **params.family(family).model_kwargs(),
    )


def train_family(
    params: Params,
    family: str,
    *,
    prepared_dir: str | Path,
    out_dir: str | Path,
    checkpoint_root: str | Path,
) -> TrainResult:
    """Fit `family` and write `out_dir/model.ckpt` and `out_dir/run.json` after a finished fit."""
    start = time.perf_counter()
    meta = read_meta(prepared_dir)
    fp = params.family(family)
    config = params.training_config(family) | {"data_sha256": meta.data_sha256}
    ckpt_dir = Path(checkpoint_root) / config_hash(config)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(params.seed, workers=True)
    model = build_model(params, family, prepared_dir)
    datamodule = PreparedDataModule(prepared_dir, fp.batch_size, seed=params.seed)

    record = None
    loggers = []
    if is_global_zero():
        tags = provenance_tags(stage=f"train@{family}", data_sha256=meta.data_sha256)
        tags |= {"family": family, "dataset": meta.dataset, "config_hash": config_hash(config)}
        record = _open_run(params, family, ckpt_dir, tags)
        logger = MLFlowLogger(tracking_uri=record.tracking_uri, run_id=record.run_id)
        data = {"data.levels": meta.levels, "data.shape": list(meta.shape)}
        data |= {"data.num_classes": meta.num_classes}
        model_info = {"model.class": type(model).__name__, "model.likelihood": model.likelihood}
        logger.log_hyperparams(flatten(config) | data | model_info)
        logger.experiment.log_text(
            record.run_id, yaml.safe_dump(params.model_dump()), "params.yaml"
        )
        loggers.append(logger)

    callbacks, best = _callbacks(params, family, model, ckpt_dir)
    trainer = L.Trainer(
        max_epochs=fp.max_epochs,
        accelerator=params.trainer.accelerator,
        devices=params.trainer.devices,
        precision=params.trainer.precision,
        logger=loggers or False,
        callbacks=callbacks,
        log_every_n_steps=params.trainer.log_every_n_steps,
        default_root_dir=ckpt_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    last = ckpt_dir / f"{LAST}.ckpt"
    resume = last if last.is_file() else None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        # Lightning raises SystemExit(None) here: exit code 0, which DVC would record as a
        # finished stage. Turn it into a failure; last.ckpt of the last full epoch is kept.
        raise TrainingInterrupted(
            f"training of {family} received SIGTERM in epoch {trainer.current_epoch}; "
            f"checkpoints kept in {ckpt_dir}, re-run to resume"
        ) from None
    stopped_early = any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in callbacks)
    if (
        trainer.received_sigterm
        or trainer.interrupted
        or not (trainer.current_epoch >= fp.max_epochs or stopped_early)
    ):
        raise TrainingInterrupted(
            f"training of {family} stopped at epoch {trainer.current_epoch}/{fp.max_epochs}; "
            f"checkpoints kept in {ckpt_dir}, re-run to resume"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / MODEL_FILE
    if trainer.is_global_zero:
        if best is not None and best.best_model_path:
            # The checkpoint with the best validation likelihood, not the last one: on small
            # data the likelihood families overfit long before max_epochs.
            shutil.copyfile(best.best_model_path, out_dir / f".{MODEL_FILE}.tmp")
        else:
            trainer.save_checkpoint(out_dir / f".{MODEL_FILE}.tmp")
        os.replace(out_dir / f".{MODEL_FILE}.tmp", final)
    wall_s = time.perf_counter() - start
    if record is not None:
        client = MlflowClient(record.tracking_uri)
        client.log_artifact(record.run_id, str(final), "checkpoint")
        client.log_metric(record.run_id, "train/wall_s", wall_s)
        client.log_metric(
            record.run_id, "model/num_params", sum(p.numel() for p in model.parameters())
        )
        record.save(out_dir / RUN_FILE)
    return TrainResult(record, final, trainer.current_epoch, wall_s)
