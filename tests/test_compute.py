"""Training compute (genlab.compute): FLOPs counted by torch's counter match a hand count, a budget
in FLOPs or steps stops every family within one step of it, and the counts survive a resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genlab.compute import (
    ComputeBudget,
    CurveSamples,
    count_sample_flops,
    draw,
    load_curve_sets,
    sampling_flops,
)
from genlab.config import parse_params
from genlab.errors import DataError
from genlab.evaluation import vocabulary as v
from genlab.models import MODELS
from genlab.paths import CURVE_SAMPLES_FILE, TRAIN_COST_FILE
from genlab.training import train_family


class TwoLayers(L.LightningModule):
    """x (B, n_in) -> Linear(n_in, h) -> tanh -> Linear(h, n_out): a network to count by hand."""

    def __init__(self, n_in: int, h: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, h), nn.Tanh(), nn.Linear(h, n_out))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(
    module: L.LightningModule,
    loader: DataLoader,
    budget: ComputeBudget | list[Callback],
    root: Path,
    *,
    max_epochs: int = 100,
    ckpt_path: Path | None = None,
) -> L.Trainer:
    """A real Trainer on the CPU with `budget` as its one callback, or with a list of them
    (resumed from `ckpt_path`)."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=budget if isinstance(budget, list) else [budget],
        max_epochs=max_epochs,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_the_counted_flops_of_a_small_network_match_a_hand_count(tmp_path: Path) -> None:
    """Per step: forward 2B(n_in h + h n_out); backward, the second layer's weight and input
    gradients 2 x 2B h n_out and the first layer's weight gradient 2B n_in h (its input needs
    none). Elementwise work (tanh, the loss, SGD) is not counted. The last batch is smaller and
    counted at its own size."""
    n_in, h, n_out, b = 6, 5, 3, 4
    loader = DataLoader(TensorDataset(torch.randn(10, n_in)), batch_size=b)  # 4, 4, 2
    budget = ComputeBudget()
    _fit(TwoLayers(n_in, h, n_out), loader, budget, tmp_path, max_epochs=2)

    def step(b: int) -> int:
        return 2 * b * (n_in * h + h * n_out) + 4 * b * h * n_out + 2 * b * n_in * h

    assert budget.per_batch == {4: step(4), 2: step(2)}
    assert budget.steps == 6
    assert budget.flops == 2 * (2 * step(4) + step(2))


def _images(family: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 17, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 10


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_flop_budget_stops_every_family_within_one_step(
    family: str, tiny: dict, tmp_path: Path
) -> None:
    """One step measures the family's FLOPs per step f; a budget of 4.5 f then stops the fit in
    its second epoch (3 batches each) after step 5, the first to reach it."""
    x, y = _images(family, 24)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def model():
        torch.manual_seed(0)
        kw = tiny.get(family, {})
        return MODELS[family](image_shape=(1, 8, 8), levels=17, num_classes=10, **kw)

    probe = ComputeBudget(max_steps=1)
    trainer = _fit(model(), loader, probe, tmp_path)
    assert probe.steps == 1 and trainer.global_step >= 1
    (per_step,) = probe.per_batch.values()
    assert per_step > 0

    budget = ComputeBudget(max_flops=4.5 * per_step)
    _fit(model(), loader, budget, tmp_path)
    assert budget.reached and budget.steps == 5  # inside the second epoch, not at its end
    assert budget.max_flops <= budget.flops < budget.max_flops + per_step


def test_the_counts_survive_a_resume_and_a_used_up_budget_takes_no_step(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.randn(12, 6)), batch_size=4)  # 3 batches an epoch
    first = ComputeBudget(max_steps=4)
    trainer = _fit(TwoLayers(6, 5, 3), loader, first, tmp_path)
    path = tmp_path / "stopped.ckpt"
    trainer.save_checkpoint(path)
    assert first.steps == 4

    more = ComputeBudget(max_steps=7)
    _fit(TwoLayers(6, 5, 3), loader, more, tmp_path, ckpt_path=path)
    assert more.steps == 7 and more.flops == 7 * first.per_batch[4]

    done = ComputeBudget(max_steps=4)
    _fit(TwoLayers(6, 5, 3), loader, done, tmp_path, ckpt_path=path)
    assert done.steps == 4  # already used up: no step more


def test_a_step_budget_is_a_finished_training_with_its_cost_recorded(
    tmp_path: Path, prepared_digits: Path, tiny_vae_kwargs: dict, monkeypatch
) -> None:
    """train_family with models.vae.max_steps stops there, mid-epoch, as a finished fit (no
    TrainingInterrupted): train.json and the MLflow run hold its FLOPs, steps and wall time."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params(
        {
            "families": ["vae"],
            "trainer": {"sample_every_n_epochs": 1000, "curve_samples": 32},
            "models": {
                "vae": tiny_vae_kwargs | {"max_epochs": 5, "max_steps": 6, "batch_size": 250}
            },
            "tracking": {"uri": store, "system_metrics_every_s": None},
        }
    )
    result = train_family(
        params,
        "vae",
        seed=0,
        prepared_dir=prepared_digits,
        out_dir=tmp_path / "model",
        checkpoint_root=tmp_path / "checkpoints",
    )
    assert result.epochs == 2  # 4 batches an epoch: the 6th step is in the second
    cost = json.loads((tmp_path / "model" / TRAIN_COST_FILE).read_text())
    assert set(cost) == {*v.TRAINING_COST, v.CURVE}
    # Quality against compute: a validation at the first epoch's end and one where it stopped.
    curve = cost[v.CURVE]
    assert [p["steps"] for p in curve] == [4.0, 6.0]
    assert curve[0]["flops"] < curve[1]["flops"] == cost[v.TRAIN_FLOPS]
    assert all(p[v.nll_key("val", "lower_bound")] > 0 for p in curve)
    assert cost[v.TRAIN_STEPS] == 6 and cost[v.TRAIN_FLOPS] > 0 and cost[v.TRAIN_WALL_S] > 0
    # Sample sets for the cheap FID, after the steps that pass 1/16 and 1/8 (step 1 of 6), 1/4
    # (step 2), 1/2 (step 3) of the step budget, and at its end, where the curve ends too.
    sets = load_curve_sets(tmp_path / "model" / CURVE_SAMPLES_FILE, (1, 8, 8), 17)
    assert [s.steps for s in sets] == [1, 2, 3, 6]
    assert (sets[-1].steps, sets[-1].flops) == (curve[-1]["steps"], curve[-1]["flops"])
    assert all(s.images.shape == (32, 1, 8, 8) and s.labels is None for s in sets)
    run = MlflowClient(store).get_run(result.run.run_id)
    assert run.data.metrics[v.TRAIN_FLOPS] == pytest.approx(cost[v.TRAIN_FLOPS])
    history = MlflowClient(store).get_metric_history(result.run.run_id, v.TRAIN_FLOPS)
    assert len(history) >= 2  # once an epoch, and at the end: flops against steps


class StopAfter(Callback):
    """Stops a fit after `epochs` epochs (as early stopping would)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_curve_samples_are_drawn_at_the_shares_of_the_training_and_kept_over_a_resume(
    tiny: dict, tmp_path: Path
) -> None:
    """A GAN of one step an epoch over 16 epochs, stopped after 5 and resumed: sets after the
    steps that pass 1/16, 1/8 and 1/4 of it, where the first fit stopped (step 5), then at 1/2
    and the end; each with the FLOPs spent by then, the same seeded draws of the weights of that
    moment."""
    x, y = _images("gan", 8)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # one step an epoch
    torch.manual_seed(0)
    model = MODELS["gan"](image_shape=(1, 8, 8), levels=17, num_classes=10, **tiny["gan"])
    budget = ComputeBudget()
    curve = CurveSamples(16, 3, budget, max_epochs=16)
    trainer = _fit(model, loader, [budget, curve, StopAfter(5)], tmp_path, max_epochs=16)
    assert [s["steps"] for s in curve.sets] == [1, 2, 4, 5]
    assert torch.equal(curve.sets[-1]["images"], draw(model, 16, 3)[0])  # drawn at the stop
    path = tmp_path / "stopped.ckpt"
    trainer.save_checkpoint(path)

    budget = ComputeBudget()
    resumed = CurveSamples(16, 3, budget, max_epochs=16)
    _fit(model, loader, [budget, resumed], tmp_path, max_epochs=16, ckpt_path=path)
    assert [s["steps"] for s in resumed.sets] == [1, 2, 4, 5, 8, 16]
    kept = zip(curve.sets, resumed.sets[:4], strict=True)
    assert all(torch.equal(a["images"], b["images"]) for a, b in kept)
    (per_step,) = budget.per_batch.values()
    flops = [s["steps"] * per_step for s in resumed.sets]
    assert [s["flops"] for s in resumed.sets] == pytest.approx(flops, rel=1e-12)
    assert torch.equal(resumed.sets[-1]["images"], draw(model, 16, 3)[0])

    resumed.save(tmp_path / CURVE_SAMPLES_FILE)
    loaded = load_curve_sets(tmp_path / CURVE_SAMPLES_FILE, (1, 8, 8), 17)
    assert [(s.steps, s.flops) for s in loaded] == [(s["steps"], s["flops"]) for s in resumed.sets]
    assert torch.equal(loaded[3].images, curve.sets[3]["images"])
    # A conditional model's sets cycle through the classes.
    assert torch.equal(loaded[0].labels, torch.arange(16) % 10)


def test_a_curve_samples_file_is_checked_before_it_is_used(tmp_path: Path) -> None:
    path = tmp_path / CURVE_SAMPLES_FILE
    assert load_curve_sets(path, (1, 8, 8), 17) == []  # none: a model trained without them
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    good = {"steps": 1, "flops": 2.0, "images": images, "labels": None}
    for bad in (
        {"sets": [good | {"images": images[:, :, :4]}]},  # another image size
        {"sets": [good | {"images": images + 17}]},  # levels the data does not have
        {"sets": [good | {"images": images.float()}]},
        {"sets": [good | {"labels": torch.zeros(3, dtype=torch.int64)}]},
        {"sets": [{"steps": 1}]},
        [1, 2],
    ):
        torch.save(bad, path)
        with pytest.raises(DataError, match="re-run training"):
            load_curve_sets(path, (1, 8, 8), 17)
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="not a curve-samples file"):
        load_curve_sets(path, (1, 8, 8), 17)
    torch.save({"sets": [good]}, path)
    assert load_curve_sets(path, (1, 8, 8), 17)[0].steps == 1


@pytest.mark.parametrize("family", sorted(MODELS))
def test_sampling_flops_from_two_small_counts_equal_a_whole_batchs(family: str, tiny: dict) -> None:
    """Counted at 1 and 2 images, the FLOPs per image at a batch of 8 are those of a batch of 8
    counted whole, for every family (a flow's per-call part included)."""
    torch.manual_seed(0)
    model = MODELS[family](image_shape=(1, 8, 8), levels=17, num_classes=10, **tiny[family])
    assert sampling_flops(model, 8) == pytest.approx(count_sample_flops(model, 8) / 8)


def test_a_diffusion_sample_costs_one_network_pass_per_ddim_step(tiny: dict) -> None:
    def diffusion(steps: int):
        torch.manual_seed(0)
        kw = tiny["diffusion"] | {"sample_steps": steps}
        return MODELS["diffusion"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kw)

    five = sampling_flops(diffusion(5), 4)
    assert five > 0 and sampling_flops(diffusion(10), 4) == pytest.approx(2 * five)
