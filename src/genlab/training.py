"""Train one family: Lightning Trainer, MLflow run, resumable checkpoints, final outputs.

Known traps handled here (DESIGN.md): Lightning exits 0 after SIGTERM, so an interrupted fit raises
`TrainingInterrupted` and final outputs are written only after a finished fit; in-progress
checkpoints live in a folder keyed by a hash of the training config and are resumed with
`ckpt_path="last"`; the MLflow URI is passed explicitly; checkpoints are logged as plain artifacts.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.exceptions import MlflowException

from genlab.compute import ComputeBudget, CurveSamples, draw
from genlab.config import Params, TrainerParams, config_hash
from genlab.data.datamodule import PreparedDataModule, derived_seed
from genlab.data.prepared import read_meta
from genlab.errors import TrainingDiverged, TrainingInterrupted
from genlab.evaluation.grids import image_grid
from genlab.evaluation.vocabulary import CURVE, NUM_PARAMS, TRAIN_WALL_S, nll_key
from genlab.io import copy_file_atomic, write_json_atomic
from genlab.models import MODELS, GenerativeModule
from genlab.paths import CURVE_SAMPLES_FILE, MODEL_FILE, RUN_FILE, TRAIN_COST_FILE, run_name
from genlab.progress import fit_progress
from genlab.sync import push_after_stage
from genlab.tracking import (
    RunRecord,
    Stores,
    check_reachable,
    flatten,
    is_global_zero,
    local_client,
    log_dataset,
    provenance_tags,
    register_model,
    registered_model_name,
    resolve_stores,
    start_run,
    without_userinfo,
)

LAST = "last"  # in-progress checkpoint: <checkpoint_root>/<config hash>/last.ckpt
BEST = "best"  # the best validation epoch so far (likelihood families), next to it
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
# Two of Lightning's warnings that are wrong about a genlab fit, printed by every training: the
# checkpoint folder holds the run's run.json before its first checkpoint, and the
# curves are logged by global step, so an epoch shorter than `log_every_n_steps` still logs.
MISLEADING_WARNINGS = (
    r"Checkpoint directory .* exists and is not empty",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


@contextmanager
def without_nvml_cuda_check() -> Iterator[None]:
    """The block runs without the PYTORCH_NVML_BASED_CUDA_CHECK=1 that importing Lightning sets.

    Lightning sets it so that looking for CUDA does not initialise CUDA in a process that forks
    later. torch's optimisers look for an accelerator at every step, and with the variable set
    each look first tries to load NVML: where there is none (a CPU machine) that fails, uncached,
    and CUDA is asked anyway. It was 0.3 ms per optimiser step, 4% of a VAE step on 2 cores. A
    fit forks nothing that uses CUDA (DDP starts fresh processes), and once CUDA is initialised
    torch caches the answer, so without it nothing changes but the cost."""
    saved = os.environ.pop(NVML_CHECK, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[NVML_CHECK] = saved


@contextmanager
def without_misleading_warnings() -> Iterator[None]:
    """The block runs with MISLEADING_WARNINGS ignored (the filters are restored after it)."""
    with warnings.catch_warnings():
        for message in MISLEADING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


class StepSeeds(Callback):
    """Reseeds the global torch RNG before every training batch from (seed, epoch, batch, rank).

    Dropout, reparameterisation noise, diffusion timesteps, Langevin chains: every random draw
    of a training step then depends on where the step is, not on the history of the process, so
    a run resumed from a checkpoint draws exactly what the uninterrupted run drew. (Saving the
    RNG state in the checkpoint does not do it: DESIGN.md, "Known traps".)

    The seeds from a batch to its epoch's end are derived together, at the epoch's first batch
    (or a resumed epoch's first): one tight loop costs a fraction of deriving each between two
    training steps.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._epoch: int | None = None
        self._seeds: dict[int, int] = {}  # batch -> seed, for the epoch `_epoch`

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        epoch, rank = trainer.current_epoch, trainer.global_rank
        if epoch != self._epoch or batch_idx not in self._seeds:
            n = trainer.num_training_batches  # inf for an endless loader: one seed at a time
            end = int(n) if math.isfinite(n) else batch_idx + 1
            batches = range(batch_idx, max(end, batch_idx + 1))
            self._seeds = {b: derived_seed(self.seed, epoch, b, rank) for b in batches}
            self._epoch = epoch
        seed = self._seeds[batch_idx]
        # The generators a training step draws from: the CPU's and, on a GPU, its device's.
        # (torch.manual_seed also reseeds every other backend's, a millisecond per step here.)
        torch.default_generator.manual_seed(seed)
        if pl_module.device.type == "cuda":
            torch.cuda.manual_seed(seed)


class FiniteCheck(Callback):
    """Stops training with `TrainingDiverged` when a loss turns NaN/Inf or the family reports
    divergence (`GenerativeModule.divergence`), before any checkpoint of the broken state.

    Each step's losses are kept as they are (detached, on the device: no op, no host sync); the
    host looks at them every `every_n_steps` batches (where Lightning syncs to log anyway) and at
    the last batch of every epoch, which precedes validation and the epoch's checkpoints;
    `SignalCheckpoint` looks before it saves.
    """

    def __init__(self, every_n_steps: int, ckpt_dir: Path) -> None:
        self.every_n_steps = every_n_steps
        self.ckpt_dir = ckpt_dir
        self._losses: list[tuple[int, list[torch.Tensor]]] = []  # (step, losses) since a check
        self._batches = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        losses = outputs.values() if isinstance(outputs, dict) else [outputs]
        # The step this loss is logged at in MLflow (global_step already counts this batch).
        step = trainer.global_step - 1
        self._losses.append((step, [v.detach() for v in losses if isinstance(v, torch.Tensor)]))
        self._batches += 1
        if self._batches % self.every_n_steps == 0 or batch_idx + 1 >= trainer.num_training_batches:
            self.check(trainer, pl_module, synced=True)

    def _first_bad_step(self, device: torch.device) -> torch.Tensor:
        """The first kept step with a non-finite loss, -1 if none (a 0-d tensor on `device`)."""
        kept = [(step, v) for step, losses in self._losses for v in losses]
        if not kept:
            return torch.tensor(-1, device=device)
        values = [v for _, v in kept]
        if all(v.dim() == 0 for v in values):
            # The losses are scalars: one stack and a handful of ops per check, whatever their
            # number (a flag per loss, three ops each, was 0.44 ms a check for the VAE's 50).
            finite = torch.stack(values).to(device).isfinite()
        else:
            finite = torch.stack([v.isfinite().all().to(device) for v in values])
        steps = torch.tensor([step for step, _ in kept], device=device)
        # argmax returns the first of equal maxima: the first non-finite loss.
        return torch.where(finite.all(), -1, steps[(~finite).int().argmax()])

    def check(self, trainer: L.Trainer, model: GenerativeModule, *, synced: bool) -> None:
        """Raise if this rank (or, `synced`, any rank: a collective call every rank makes at the
        same step) saw a non-finite loss or divergence."""
        reason = model.divergence()
        bad = self._first_bad_step(model.device)
        self._losses.clear()
        diverged = torch.tensor(int(reason is not None), device=model.device)
        flags = torch.stack([bad, diverged])
        if synced and trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        step, diverged = (int(v) for v in flags.tolist())
        if step < 0 and not diverged:
            return
        last = self.ckpt_dir / f"{LAST}.ckpt"
        keep = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint yet"
        if step >= 0:
            raise TrainingDiverged(
                f"the training loss became NaN/Inf at step {step} (epoch {trainer.current_epoch}); "
                f"{keep}. Lower the learning rate or clip gradients, then re-run"
            )
        if diverged:
            raise TrainingDiverged(
                f"training diverged by step {trainer.global_step} (epoch {trainer.current_epoch}): "
                f"{reason or 'reported by another rank'}; {keep}"
            )


class SignalCheckpoint(Callback):
    """On SIGTERM (or SLURM's pre-emption signal, forwarded as SIGTERM) writes the resume
    checkpoint where Lightning stops, after the current batch and all its hooks (an EMA update
    in the module's `on_train_batch_end` included), mid-epoch if need be: the stateful loaders
    and `StepSeeds` make resuming from it exact. `train_family` then exits non-zero so DVC does
    not record the stage."""

    def __init__(self, ckpt_dir: Path, finite: FiniteCheck) -> None:
        self.ckpt_dir = ckpt_dir
        self.finite = finite

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        # Only where Lightning stops between two training batches. Stopped at an epoch's end,
        # last.ckpt of that epoch is the resume point already (its loop state is the one
        # Lightning restores from; a second save after the epoch counter moved would skip an
        # epoch on resume); stopped during validation, the epoch is redone from its start.
        epoch = trainer.fit_loop.epoch_progress.current
        if trainer.validating or epoch.processed >= epoch.ready:
            return
        self.finite.check(trainer, pl_module, synced=False)  # never save a broken state
        # Lightning writes through an fsspec transaction: a temporary file, then a rename.
        trainer.save_checkpoint(self.ckpt_dir / f"{LAST}.ckpt")


class MovableCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose state survives a move of its folder (`dvc exp run --temp`, a moved
    or re-cloned repository).

    Lightning restores a checkpoint callback's state only when the folder has the absolute path
    it had when the state was saved; otherwise it keeps `best_model_path` alone, naming a file in
    the old folder, and forgets the best score: a resumed fit then takes its next epoch as the
    best whatever its score, or fails copying a file that is not there. Every path in this
    state names a file of the checkpoint folder, so here they move with it."""

    @cached_property
    def state_key(self) -> str:
        """ModelCheckpoint's key, computed once: the settings it names are fixed at construction,
        and Lightning reads it for every callback hook it calls (about 2.4 us a read, six hooks
        a step, two checkpoint callbacks: 30 us of a 10 ms VAE step, benchmarks/overhead.py)."""
        return super().state_key

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:

            def moved(path: str) -> str:
                return str(Path(self.dirpath) / Path(path).name) if path else path

            state_dict = state_dict | {
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict["best_model_path"]),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                "last_model_path": moved(state_dict.get("last_model_path", "")),
                "best_k_models": {
                    moved(path): score
                    for path, score in state_dict.get("best_k_models", {}).items()
                },
            }
        super().load_state_dict(state_dict)


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint a fit resumes from: last.ckpt, or if it cannot be read (a torn or
    corrupted file) the best-validation checkpoint, the previous good state, with a warning;
    None: a fresh start."""
    for name in (LAST, BEST):
        path = ckpt_dir / f"{name}.ckpt"
        if not path.is_file():
            continue
        try:  # mmap: the file is checked without being read into memory
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # any failure to read it means: not this one
            warnings.warn(f"{path} cannot be read ({exc}); not resuming from it", stacklevel=2)
            continue
        return path
    if (ckpt_dir / f"{LAST}.ckpt").is_file():
        warnings.warn(f"no readable checkpoint in {ckpt_dir}: training starts afresh", stacklevel=2)
    return None


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
        samples, _ = draw(model, self.n, self.seed)
        nrow = model.num_classes if model.conditional else int(self.n**0.5) or 1
        grid = image_grid(samples, model.levels, nrow=nrow)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_image(logger.run_id, grid, key="samples", step=epoch)
        self.logged_steps.append(epoch)


def _callbacks(
    params: Params, family: str, seed: int, model: GenerativeModule, ckpt_dir: Path
) -> tuple[list[Callback], ModelCheckpoint | None]:
    """Per-step seeds, the finite-loss check, resumable `last.ckpt` (every epoch and on SIGTERM),
    the best-validation checkpoint, early stopping, sample grids."""
    fp = params.family(family)
    finite = FiniteCheck(params.trainer.log_every_n_steps, ckpt_dir)
    callbacks: list[Callback] = [
        StepSeeds(seed),
        finite,
        SignalCheckpoint(ckpt_dir, finite),
        SampleGridCallback(
            params.trainer.sample_every_n_epochs, params.trainer.sample_grid_size, seed
        ),
    ]
    best = None
    if model.likelihood != "none":
        monitor = nll_key("val", model.likelihood)
        # Before last.ckpt's callback (checkpoint callbacks run in list order, after the
        # others): an epoch's last.ckpt then holds the best score that epoch made, and a fit
        # resumed from it never takes a worse epoch for the best.
        best = MovableCheckpoint(
            dirpath=ckpt_dir,
            filename=BEST,
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
    # The latest epoch, every epoch, for resume. Not `save_last=True`: since Lightning 2.6 it
    # writes last.ckpt only in steps where a top-k checkpoint was saved. No version counter, so a
    # resumed fit keeps writing the same file.
    callbacks.append(
        MovableCheckpoint(
            dirpath=ckpt_dir, filename=LAST, save_top_k=1, enable_version_counter=False
        )
    )
    return callbacks, best


@dataclass(frozen=True)
class TrainResult:
    run: RunRecord | None
    checkpoint: Path
    epochs: int
    wall_s: float


def _open_run(
    stores: Stores, experiment: str, run_name: str, ckpt_dir: Path, tags: dict[str, str]
) -> RunRecord:
    """The MLflow run of this training in the local store: the one `ckpt_dir` names if the store
    has it (a resumed fit, also from a moved copy of the repository), else a new one."""
    if stores.remote is not None:
        check_reachable(stores.remote)  # an unreachable team server fails here, in seconds
    check_reachable(stores.local)
    client = local_client(stores)
    record_path = ckpt_dir / RUN_FILE
    if record_path.is_file():
        record = RunRecord.load(record_path)
        try:
            run = client.get_run(record.run_id)
        except MlflowException:  # a checkpoint folder from another store
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(record.run_id, status="RUNNING")
            record = RunRecord(run.info.experiment_id, record.run_id, stores.local)
            record.save(record_path)
            return record
    record = start_run(client, experiment, run_name=run_name, tags=tags)
    record.save(record_path)
    return record


def mlflow_logger(stores: Stores, run_id: str) -> MLFlowLogger:
    """Lightning's MLflow logger for run `run_id` of the local store, used once here.

    Its first use calls `mlflow.set_tracking_uri`, which also sets MLFLOW_TRACKING_URI (for
    subprocesses). genlab reads that variable to find the team server, so it is put back as it
    was: a later stage in the same process (a library user's, a test's) still pushes."""
    logger = MLFlowLogger(tracking_uri=stores.local, run_id=run_id)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        logger.experiment  # noqa: B018 (the first use)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return logger


@contextmanager
def system_metrics(
    record: RunRecord | None, stores: Stores, every_s: float | None
) -> Iterator[None]:
    """MLflow's own system metrics monitor (CPU, memory, disk, network; GPU where pynvml is
    installed) logging `system/*` curves into the run while the block runs (rank 0 only)."""
    if record is None or every_s is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        record.run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=stores.local
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def strategy(tp: TrainerParams, model: GenerativeModule) -> str | DDPStrategy:
    """Lightning's strategy for `tp`: DDP, told whether the family leaves parameters unused,
    whenever more than one process may train; else Lightning's choice."""
    if tp.multi_process:
        return DDPStrategy(find_unused_parameters=model.ddp_find_unused_parameters)
    return "auto"


def build_model(params: Params, family: str, prepared_dir: str | Path) -> GenerativeModule:
    meta = read_meta(prepared_dir)
    return MODELS[family](
        image_shape=meta.shape,
        levels=meta.levels,
        num_classes=meta.num_classes,
        **params.family(family).model_kwargs(),
    )


def for_speed(model: GenerativeModule, tp: TrainerParams) -> GenerativeModule:
    """`model` as `trainer.channels_last` and `trainer.compile` ask: channels_last convolutions,
    each network compiled in place (the state dict keeps its keys, checkpoints load as ever)."""
    if tp.channels_last:
        model = model.convolutions_channels_last()
    if tp.compile:
        for network in model.networks():
            network.compile()
    return model


def train_family(
    params: Params,
    family: str,
    *,
    seed: int,
    prepared_dir: str | Path,
    out_dir: str | Path,
    checkpoint_root: str | Path,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Fit `family` with training seed `seed` and write `out_dir/model.ckpt` and
    `out_dir/run.json` after a finished fit. Reads the training and validation splits only:
    checkpoint selection and early stopping use validation, and the test split is never opened.

    `callbacks` are added to genlab's own (a library user's hooks, a test's fault injection)."""
    start = time.perf_counter()
    meta = read_meta(prepared_dir)
    fp = params.family(family)
    config = params.training_config(family, seed) | {"data_sha256": meta.data_sha256}
    ckpt_dir = Path(checkpoint_root) / config_hash(config)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(seed, workers=True)
    model = for_speed(build_model(params, family, prepared_dir), params.trainer)
    tp = params.trainer
    datamodule = PreparedDataModule(prepared_dir, fp.batch_size, seed=seed)

    record = None
    loggers = []
    stores = resolve_stores(params.tracking.uri)
    if is_global_zero():
        tags = provenance_tags(stage=f"train@{family}-{seed}", data_sha256=meta.data_sha256)
        tags |= {"family": family, "seed": str(seed), "dataset": meta.dataset}
        tags |= {"config_hash": config_hash(config)}
        record = _open_run(stores, params.experiment_name, run_name(family, seed), ckpt_dir, tags)
        log_dataset(
            local_client(stores),
            record.run_id,
            name=meta.dataset,
            sha256=meta.data_sha256,
            profile=meta.profile(),
            context="training",
        )
        # Lightning's own logger, into the local store: a file, which no outage can stop. The
        # team server gets the run by the push at the end.
        loggers.append(mlflow_logger(stores, record.run_id))

    own, best = _callbacks(params, family, seed, model, ckpt_dir)
    monitor = nll_key("val", model.likelihood) if model.likelihood != "none" else None
    budget = ComputeBudget(max_steps=fp.max_steps, max_flops=tp.budget_flops, monitor=monitor)
    curve = CurveSamples(tp.curve_samples, seed, budget, fp.max_epochs)
    # A terminal: Lightning's bar; a log (DVC, CI): a line every 30 s.
    bar, progress = fit_progress(f"train {run_name(family, seed)}", max_steps=fp.max_steps)
    callbacks = [*callbacks, budget, curve, *own, *progress]
    trainer = L.Trainer(
        max_epochs=fp.max_epochs,
        accelerator=tp.accelerator,
        devices=tp.devices,
        num_nodes=tp.num_nodes,
        strategy=strategy(tp, model),
        precision=tp.precision,
        logger=loggers or False,
        callbacks=callbacks,
        log_every_n_steps=tp.log_every_n_steps,
        default_root_dir=ckpt_dir,
        # PreparedDataModule shards by rank itself (seeded per epoch, unpadded validation).
        use_distributed_sampler=False,
        enable_progress_bar=bar,
        enable_model_summary=False,
    )
    if record is not None:
        logger = loggers[0]
        data = {"data.levels": meta.levels, "data.shape": list(meta.shape)}
        data |= {"data.num_classes": meta.num_classes}
        model_info = {"model.class": type(model).__name__, "model.likelihood": model.likelihood}
        # batch_size is per process; what one optimiser step sees is batch_size x world size.
        world = {"trainer.world_size": trainer.world_size}
        world |= {"trainer.global_batch_size": fp.batch_size * trainer.world_size}
        logger.log_hyperparams(flatten(config) | data | model_info | world)
        resolved = params.resolved()
        if resolved["tracking"]["uri"]:  # never a password into the run
            resolved["tracking"]["uri"] = without_userinfo(resolved["tracking"]["uri"])
        logger.experiment.log_text(record.run_id, yaml.safe_dump(resolved), "params.yaml")
    resume = resume_checkpoint(ckpt_dir)
    try:
        with (
            system_metrics(record, stores, params.tracking.system_metrics_every_s),
            without_nvml_cuda_check(),
            without_misleading_warnings(),
        ):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        # Lightning raises SystemExit(None) here: exit code 0, which DVC would record as a
        # finished stage. Turn it into a failure; SignalCheckpoint saved the last batch.
        raise TrainingInterrupted(
            f"training of {family} received SIGTERM at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}); checkpoint kept in {ckpt_dir}, re-run to resume"
        ) from None
    stopped_early = any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in callbacks)
    if (
        trainer.received_sigterm
        or trainer.interrupted
        or not (trainer.current_epoch >= fp.max_epochs or stopped_early or budget.reached)
    ):
        raise TrainingInterrupted(
            f"training of {family} stopped at epoch {trainer.current_epoch}/{fp.max_epochs}; "
            f"checkpoints kept in {ckpt_dir}, re-run to resume"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / MODEL_FILE
    if best is not None and best.best_model_path:
        # The checkpoint with the best validation likelihood, not the last one: on small data
        # the likelihood families overfit long before max_epochs.
        if trainer.is_global_zero:
            copy_file_atomic(best.best_model_path, final)
    else:
        # Every rank takes part (a barrier inside); rank 0 writes, through a temporary file.
        trainer.save_checkpoint(final)
    wall_s = time.perf_counter() - start
    num_params = sum(p.numel() for p in model.parameters())
    cost = budget.metrics() | {TRAIN_WALL_S: wall_s, NUM_PARAMS: num_params}
    if trainer.is_global_zero:  # what the evaluate stage puts next to the family's metrics
        write_json_atomic(out_dir / TRAIN_COST_FILE, cost | {CURVE: budget.curve})
        if curve.sets:
            curve.save(out_dir / CURVE_SAMPLES_FILE)
        else:  # none drawn (curve_samples: 0): no earlier training's sets beside this model
            (out_dir / CURVE_SAMPLES_FILE).unlink(missing_ok=True)
    if record is not None:
        logger = loggers[0]
        logger.experiment.log_artifact(record.run_id, str(final), "checkpoint")
        register_model(
            logger.experiment,
            record.run_id,
            name=registered_model_name(params.experiment_name, family),
            description=f"genlab's {family} family trained on {meta.dataset}",
            tags={"family": family, "seed": str(seed), "config_hash": config_hash(config)},
        )
        logger.log_metrics(cost, step=trainer.global_step)
        logger.finalize("success")
        record.save(out_dir / RUN_FILE)
        push_after_stage(stores, [record.run_id])  # to the team server, if there is one
    return TrainResult(record, final, trainer.current_epoch, wall_s)
