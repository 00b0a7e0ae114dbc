"""Training as a real process: SIGTERM is not success, and the next run resumes the same run."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.config import DatasetParams, Params, config_hash, parse_params
from genlab.data.prepared import prepare, read_meta
from genlab.errors import TrainingDiverged, TrainingInterrupted
from genlab.evaluation import vocabulary as v
from genlab.models import MODELS
from genlab.models.ebm import ENERGY_GAP_STEPS
from genlab.models.gan import D_WIN_STEPS
from genlab.paths import MODEL_FILE, run_name
from genlab.stages import train as train_stage
from genlab.training import NVML_CHECK, FiniteCheck, MovableCheckpoint, train_family
from pre_emption import start_until_checkpoint

GENLAB = [sys.executable, "-m", "genlab.cli"]


def _params(tmp: Path, max_epochs: int) -> None:
    params = {
        "families": ["vae"],
        "trainer": {"sample_every_n_epochs": 1000, "log_every_n_steps": 1},
        "models": {"vae": {"max_epochs": max_epochs, "batch_size": 500, "hidden_dim": 8}},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))


def _env(tmp: Path) -> dict[str, str]:
    env = {k: x for k, x in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {"OMP_NUM_THREADS": "1", "DVC_ROOT": str(tmp)}


def test_sigterm_exits_nonzero_writes_nothing_final_and_resume_finishes(tmp_path: Path) -> None:
    prepare(DatasetParams(), tmp_path / "data/prepared")
    _params(tmp_path, max_epochs=150)
    proc = start_until_checkpoint(
        [*GENLAB, "train", "vae"], cwd=tmp_path, env=_env(tmp_path), timeout_s=120
    )
    ckpt_root = tmp_path / paths.family_checkpoints("vae", 0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)

    assert proc.returncode != 0, output
    assert "received SIGTERM" in output
    assert not (tmp_path / paths.family_model_dir("vae", 0) / MODEL_FILE).exists()
    (ckpt_dir,) = ckpt_root.iterdir()
    run_id = json.loads((ckpt_dir / "run.json").read_text())["run_id"]
    kept = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    # The kill may land right after the first epoch's checkpoint, whose "epoch" is 0: what must
    # hold is that some training was kept and that it is not the finished run.
    assert kept["global_step"] > 0 and kept["epoch"] < 149, (kept["epoch"], kept["global_step"])

    # Same config: resumes from last.ckpt into the same MLflow run and finishes. (Fewer epochs
    # would be another config, hence another checkpoint folder: never resumed silently.)
    done = subprocess.run(
        [*GENLAB, "train", "vae"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / paths.family_model_dir("vae", 0) / MODEL_FILE).is_file()
    record = tmp_path / paths.family_model_dir("vae", 0) / "run.json"
    assert json.loads(record.read_text())["run_id"] == run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(client.search_experiments()[0].experiment_id.split())
    assert [r.info.run_id for r in runs] == [run_id]
    steps = sorted(m.step for m in client.get_metric_history(run_id, v.TRAIN_LOSS))
    assert set(steps) == set(range(150 * 2))  # 1000 images / batch 500 = 2 steps per epoch
    # Only the epoch cut short by the kill is trained (and logged) again after resume.
    redone = {s for s in steps if steps.count(s) > 1}
    assert all(s >= kept["global_step"] for s in redone), redone


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sample_grids_logged_during_training_land_in_the_mlflow_run(
    family: str, tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """The sample-grid callback fires every `sample_every_n_epochs` and at the end: one image
    artifact per epoch here, in the family's own MLflow run, for every family."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params(
        {
            "families": [family],
            "trainer": {"sample_every_n_epochs": 1, "sample_grid_size": 4},
            "models": {family: tiny.get(family, {}) | {"max_epochs": 2, "batch_size": 500}},
            "tracking": {"uri": store},
        }
    )
    result = _train(params, family, prepared_digits, tmp_path)
    assert (tmp_path / "model" / MODEL_FILE).is_file()
    client = MlflowClient(store)
    images = [a.path for a in client.list_artifacts(result.run.run_id, "images")]
    grids = [p for p in images if p.startswith("images/samples") and p.endswith(".png")]
    # MLflow stores each logged image as a full-size and a compressed png.
    assert len([p for p in grids if "compressed" not in p]) == 2, images


def _tiny_params(family: str, tiny: dict, tmp: Path, *, max_epochs: int, log_every_n_steps: int):
    """`family` alone, tiny, batches of 250 (4 steps per epoch), its own SQLite store in `tmp`."""
    return parse_params(
        {
            "families": [family],
            "trainer": {"sample_every_n_epochs": 1000, "log_every_n_steps": log_every_n_steps},
            "models": {
                family: tiny.get(family, {}) | {"max_epochs": max_epochs, "batch_size": 250}
            },
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        }
    )


def _train(params: Params, family: str, prepared: Path, root: Path, *callbacks: Callback):
    """`train_family` with its outputs under `root`: model/ (final) and checkpoints/."""
    return train_family(
        params,
        family,
        seed=params.seeds[0],
        prepared_dir=prepared,
        out_dir=root / "model",
        checkpoint_root=root / "checkpoints",
        callbacks=list(callbacks),
    )


class KillAt(Callback):
    """Sends this process SIGTERM as a pre-empting scheduler would, once `global_step` is `step`:
    in the middle of a training batch (the batch finishes, genlab checkpoints it, the fit stops),
    during validation, or at an epoch's end."""

    def __init__(self, step: int, phase: str = "batch") -> None:
        self.step, self.phase, self.sent = step, phase, False

    def _maybe(self, trainer, phase: str) -> None:
        if phase == self.phase and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, *args) -> None:
        self._maybe(trainer, "batch")

    def on_validation_batch_start(self, trainer, *args) -> None:
        self._maybe(trainer, "validation")

    def on_train_epoch_end(self, trainer, *args) -> None:
        self._maybe(trainer, "epoch_end")


def _state(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: ckpt[k] for k in ("state_dict", "optimizer_states", "global_step", "epoch")}


def _assert_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("family", "kill"),
    [(family, KillAt(5)) for family in sorted(MODELS)]
    # Where else a signal lands: in validation (the epoch is redone from its start), at an
    # epoch's end (resumed from that epoch's checkpoint, the next epoch not skipped).
    + [("vae", KillAt(8, "validation")), ("vae", KillAt(4, "epoch_end"))],
    ids=lambda p: p.phase if isinstance(p, KillAt) else p,
)
def test_resume_after_a_kill_is_bit_identical(
    family: str, kill: KillAt, tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """N steps uninterrupted against k steps, SIGTERM, resume to N: weights (EMA, replay buffer
    and every other buffer included), optimiser state and step counters are equal bit for bit,
    and the run logged every training step."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # 1000 images / 250 = 4 steps per epoch; the kill lands in the second epoch.
    params = _tiny_params(family, tiny, tmp_path, max_epochs=2, log_every_n_steps=1)

    def train(name: str, *callbacks: Callback):
        return _train(params, family, prepared_digits, tmp_path / name, *callbacks)

    train("straight")
    with pytest.raises(TrainingInterrupted, match="received SIGTERM"):
        train("resumed", kill)
    (ckpt_dir,) = (tmp_path / "resumed/checkpoints").iterdir()
    # Mid-epoch: the batch in flight is kept; otherwise the first epoch's checkpoint.
    assert _state(ckpt_dir / "last.ckpt")["global_step"] == (6 if kill.phase == "batch" else 4)
    result = train("resumed")
    client = MlflowClient(result.run.tracking_uri)
    steps = {m.step for m in client.get_metric_history(result.run.run_id, v.TRAIN_LOSS)}
    assert steps == set(range(8))

    (straight_dir,) = (tmp_path / "straight/checkpoints").iterdir()
    _assert_equal(_state(straight_dir / "last.ckpt"), _state(ckpt_dir / "last.ckpt"))
    straight = torch.load(tmp_path / "straight/model" / MODEL_FILE, weights_only=True)
    resumed = torch.load(tmp_path / "resumed/model" / MODEL_FILE, weights_only=True)
    _assert_equal(straight["state_dict"], resumed["state_dict"], "final model")


class ScriptedValidation(Callback):
    """Sets each epoch's monitored validation value to `values[epoch]` before the checkpoint
    callbacks read it (they run after every other callback): the test decides when validation
    gets better and when worse."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values = values

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            key = v.nll_key("val", pl_module.likelihood)
            trainer.callback_metrics[key] = torch.tensor(self.values[trainer.current_epoch])


class CrashAt(Callback):
    """A crash as epoch `epoch` starts (a SIGKILL, an OOM kill): nothing more is saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("crashed")


def _final_epoch(root: Path) -> int:
    return torch.load(root / "model" / MODEL_FILE, weights_only=True)["epoch"]


# Validation of epochs 0, 1, 2: the best is epoch 1, and epoch 2 is worse than it but better
# than epoch 0 (a resumed fit that forgot epoch 1's score would take epoch 2).
BETTER_THEN_WORSE = {0: 10.0, 1: 5.0, 2: 7.0}


@pytest.mark.parametrize("moved", [False, True], ids=["same-folder", "moved-repository"])
def test_a_fit_resumed_after_a_crash_keeps_the_best_epoch_an_uninterrupted_fit_keeps(
    moved: bool, tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """Crashed as epoch 2 starts and resumed (in the same folder, or after the repository moved,
    as `dvc exp run --temp` does): the final model is epoch 1, as without the crash."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny_params("vae", tiny, tmp_path, max_epochs=3, log_every_n_steps=1)
    scripted = ScriptedValidation(BETTER_THEN_WORSE)
    _train(params, "vae", prepared_digits, tmp_path / "straight", scripted)
    assert _final_epoch(tmp_path / "straight") == 1

    with pytest.raises(RuntimeError, match="crashed"):
        _train(params, "vae", prepared_digits, tmp_path / "crashed", scripted, CrashAt(2))
    root = tmp_path / "crashed"
    if moved:
        root = tmp_path / "elsewhere"
        shutil.move(tmp_path / "crashed", root)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dirpath has changed")
        _train(params, "vae", prepared_digits, root, scripted)
    assert _final_epoch(root) == 1


def test_checkpoint_callbacks_keep_lightnings_state_key(tmp_path: Path) -> None:
    """The cached key is the one ModelCheckpoint computes: a checkpoint's callback state saved
    under it is found again on resume."""
    best = MovableCheckpoint(dirpath=tmp_path, filename="best", monitor="val/nll", mode="min")
    last = MovableCheckpoint(dirpath=tmp_path, filename="last")
    for callback in (best, last):
        assert callback.state_key == ModelCheckpoint.state_key.fget(callback)
    assert best.state_key != last.state_key


def test_the_finite_check_names_the_first_step_with_a_non_finite_value(tmp_path: Path) -> None:
    """Losses of any shape (a step may log none, a vector, a bfloat16 value): the first step
    holding a NaN/Inf element, -1 when every element is finite."""
    check = FiniteCheck(every_n_steps=50, ckpt_dir=tmp_path)
    cpu = torch.device("cpu")
    nan, inf = float("nan"), float("inf")
    check._losses = [(s, [torch.tensor(float(s)), torch.ones(3)]) for s in range(10)]
    assert check._first_bad_step(cpu).item() == -1
    check._losses[6][1][1][2] = inf
    check._losses[8][1][0].fill_(nan)
    assert check._first_bad_step(cpu).item() == 6
    check._losses = [(0, []), (1, [torch.ones(0)]), (2, [torch.tensor(nan, dtype=torch.bfloat16)])]
    assert check._first_bad_step(cpu).item() == 2
    check._losses = [(0, [torch.ones(0)])]
    assert check._first_bad_step(cpu).item() == -1


def test_a_torn_last_checkpoint_resumes_from_the_best_one_with_a_warning(
    tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny_params("vae", tiny, tmp_path, max_epochs=3, log_every_n_steps=1)
    scripted = ScriptedValidation({0: 5.0, 1: 10.0, 2: 7.0})  # best: epoch 0
    with pytest.raises(RuntimeError, match="crashed"):
        _train(params, "vae", prepared_digits, tmp_path, scripted, CrashAt(2))
    (ckpt_dir,) = (tmp_path / "checkpoints").iterdir()
    last = ckpt_dir / "last.ckpt"
    assert _state(last)["epoch"] == 1
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn mid-write
    with pytest.warns(UserWarning, match="last.ckpt cannot be read"):
        result = _train(params, "vae", prepared_digits, tmp_path, scripted)
    assert result.epochs == 3
    assert _final_epoch(tmp_path) == 0


class PoisonAt(Callback):
    """Turns the first weight of the model NaN as training step `step` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class DiscriminatorWinsAt(Callback):
    """Makes the GAN's own divergence statistic report a discriminator that has won for
    D_WIN_STEPS steps, a state whose loss is finite. At the epoch's last batch, where the
    finite check looks next."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            pl_module.d_win_streak.fill_(D_WIN_STEPS)


class EnergyGapAt(Callback):
    """Makes the EBM's own divergence statistic report chain samples that have stayed far above
    the data's energy for ENERGY_GAP_STEPS steps (the loss stays finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            pl_module.gap_streak.fill_(ENERGY_GAP_STEPS)


@pytest.mark.parametrize(
    ("family", "fault", "message"),
    [
        ("vae", PoisonAt(5), r"NaN/Inf at step 5 \(epoch 1\)"),
        ("gan", PoisonAt(5), r"NaN/Inf at step 5 \(epoch 1\)"),
        ("gan", DiscriminatorWinsAt(8), r"discriminator loss stayed below"),
        ("ebm", EnergyGapAt(8), r"energy gap E\(x-\) - E\(x\+\) stayed above"),
    ],
)
def test_a_nan_loss_or_divergence_stops_training_and_keeps_the_last_good_checkpoint(
    family: str,
    fault: Callback,
    message: str,
    tiny: dict,
    prepared_digits: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny_params(family, tiny, tmp_path, max_epochs=3, log_every_n_steps=50)
    with pytest.raises(TrainingDiverged, match=message) as error:
        _train(params, family, prepared_digits, tmp_path, fault)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "model" / MODEL_FILE).exists()
    (ckpt_dir,) = (tmp_path / "checkpoints").iterdir()
    kept = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    # The first epoch's checkpoint (4 steps), untouched by the poisoned second epoch.
    assert kept["global_step"] == 4
    assert all(t.isfinite().all() for t in kept["state_dict"].values() if t.is_floating_point())
    assert str(ckpt_dir / "last.ckpt") in str(error.value)


def _per_step(key: str) -> bool:
    """A training value logged on Lightning's logging steps (not a cost: FLOPs and steps once an
    epoch, the wall time once)."""
    return key.startswith("train/") and key not in v.TRAINING_COST


class StoreSeen(Callback):
    """At each epoch's start, how many points each train/* curve has in the MLflow store."""

    def __init__(self) -> None:
        self.points: dict[int, set[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        logger = trainer.logger
        client, run_id = logger.experiment, logger.run_id
        keys = [k for k in client.get_run(run_id).data.metrics if _per_step(k)]
        lengths = {len(client.get_metric_history(run_id, k)) for k in keys}
        self.points[trainer.current_epoch] = lengths


@pytest.mark.parametrize("family", ["vae", "gan"])  # one automatic, one manual optimisation
def test_training_values_reach_mlflow_on_lightnings_logging_steps(
    family: str, tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """`log_train` calls Lightning's self.log only on the steps Lightning sends to the loggers:
    every train/* curve still has one point every `log_every_n_steps` batches, all at the same
    steps, each in the local store as soon as it is logged: the point of batch 5 is there when
    epoch 2 starts."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny_params(family, tiny, tmp_path, max_epochs=3, log_every_n_steps=5)
    seen = StoreSeen()
    result = _train(params, family, prepared_digits, tmp_path, seen)
    assert seen.points == {0: set(), 1: set(), 2: {1}}, seen.points
    client = MlflowClient(params.tracking.uri)
    run = client.get_run(result.run.run_id)
    keys = [k for k in run.data.metrics if _per_step(k)]
    assert v.TRAIN_LOSS in keys and len(keys) > 1
    batches = 3 * 4  # 1000 training images in batches of 250
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == batches // 5, (key, steps)
        assert len({b - a for a, b in itertools.pairwise(steps)}) == 1, (key, steps)  # evenly
    first = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)] for k in keys}
    assert len({tuple(s) for s in first.values()}) == 1, first


class EnvironmentSeen(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.nvml_check = os.environ.get(NVML_CHECK, "unset")


def test_the_fit_runs_without_lightnings_nvml_cuda_check_and_misleading_warnings(
    tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which makes every optimiser step
    try to load NVML; the fit runs without it, and the process gets it back after. Lightning's
    warnings about a non-empty checkpoint folder (run.json is there) and an epoch shorter than
    the logging interval (curves log by global step) are not printed; others still are."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert os.environ.get(NVML_CHECK) == "1"  # as importing Lightning left it
    # 4 batches per epoch, logging every 8 steps: the curves still get their points.
    params = _tiny_params("vae", tiny, tmp_path, max_epochs=2, log_every_n_steps=8)
    seen = EnvironmentSeen()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(params, "vae", prepared_digits, tmp_path, seen)
        warnings.warn("Checkpoint directory /x exists and is not empty.", stacklevel=1)
    assert seen.nvml_check == "unset"
    assert os.environ.get(NVML_CHECK) == "1"
    messages = [str(w.message) for w in caught]
    assert not any("logging interval" in m for m in messages), messages
    assert sum("exists and is not empty" in m for m in messages) == 1, messages  # ours only
    client = MlflowClient(params.tracking.uri)
    assert [m.step for m in client.get_metric_history(result.run.run_id, v.TRAIN_LOSS)] == [7]


class NetworksSeen(Callback):
    """What the fitted module's networks look like during training."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.compiled = [n._compiled_call_impl is not None for n in pl_module.networks()]
        convs = [m for m in pl_module.modules() if isinstance(m, torch.nn.Conv2d)]
        self.channels_last = [
            m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs
        ]


def test_compiled_channels_last_training_checkpoints_load_into_a_plain_model(
    tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """trainer.compile compiles every network in place and trainer.channels_last converts the
    convolutions; the checkpoint keeps the plain model's keys, so evaluation loads it as ever."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny_params("vae", tiny, tmp_path, max_epochs=1, log_every_n_steps=1)
    trainer = params.trainer.model_copy(update={"compile": True, "channels_last": True})
    params = params.model_copy(update={"trainer": trainer})
    seen = NetworksSeen()
    result = _train(params, "vae", prepared_digits, tmp_path, seen)
    assert seen.compiled and all(seen.compiled)
    assert seen.channels_last and all(seen.channels_last)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    model = MODELS["vae"].load_from_checkpoint(result.checkpoint, weights_only=True)
    assert model.sample(3).dtype == torch.uint8


def test_each_training_seed_is_its_own_run_checkpoint_folder_and_model(
    tiny: dict, prepared_digits: Path, tmp_path: Path, monkeypatch
) -> None:
    """`seeds: [0, 7]`: the train stage fits each seed into models/<family>/seed<k>/ and
    checkpoints/<family>/seed<k>/<config hash>/, in its own MLflow run named "<family> (seed k)"
    and tagged with the seed; the seed is part of the training's config, and of its weights."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(prepared_digits, paths.PREPARED)
    params = parse_params(
        {
            "seeds": [0, 7],
            "families": ["vae"],
            "trainer": {"sample_every_n_epochs": 1000, "log_every_n_steps": 2},
            "models": {"vae": tiny["vae"] | {"max_epochs": 1, "batch_size": 250}},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )
    for seed in params.seeds:
        train_stage.main(params, "vae", seed)

    client = MlflowClient(params.tracking.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_seed = {r.data.tags["seed"]: r for r in runs}
    assert len(runs) == 2 and set(by_seed) == {"0", "7"}
    data_sha256 = read_meta(paths.PREPARED).data_sha256
    weights = {}
    for seed in params.seeds:
        run = by_seed[str(seed)]
        assert run.info.run_name == run_name("vae", seed) == f"vae (seed {seed})"
        assert run.info.status == "FINISHED"
        assert run.data.tags["family"] == "vae"
        assert run.data.tags["dvc_stage"] == f"train@vae-{seed}"
        assert run.data.params["seed"] == str(seed)
        model_dir = paths.family_model_dir("vae", seed)
        assert model_dir == Path("models") / "vae" / f"seed{seed}"
        assert json.loads((model_dir / "run.json").read_text())["run_id"] == run.info.run_id
        (ckpt_dir,) = paths.family_checkpoints("vae", seed).iterdir()
        assert paths.family_checkpoints("vae", seed) == Path("checkpoints") / "vae" / f"seed{seed}"
        config = params.training_config("vae", seed) | {"data_sha256": data_sha256}
        assert ckpt_dir.name == config_hash(config) == run.data.tags["config_hash"]
        weights[seed] = torch.load(model_dir / MODEL_FILE, weights_only=True)["state_dict"]
    assert weights[0].keys() == weights[7].keys()
    assert any(not torch.equal(weights[0][k], weights[7][k]) for k in weights[0])
    # Each seed's run holds its own training curve: 4 steps, a point every 2.
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, v.TRAIN_LOSS)]
        assert sorted(steps) == [1, 3], steps
