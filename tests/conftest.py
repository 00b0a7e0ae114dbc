"""Fixtures shared by the whole test suite: tiny, CPU, seeded (STYLE.md rule 8)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlab.config import DatasetParams
from genlab.data.prepared import prepare
from genlab.models import GenerativeModule


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """The test machines are small and shared: one intra-op thread keeps runs predictable."""
    torch.set_num_threads(1)


REPO = Path(__file__).resolve().parents[1]
# What a run that lost its way writes into the working directory (MLflow's defaults).
STRAYS = ("mlruns", "mlartifacts", "mlflow.db", "mlflow.db.push.lock", "mlflow.db.init.lock")


@pytest.fixture(autouse=True, scope="session")
def _nothing_written_into_the_repository() -> Iterator[None]:
    """Every test writes under its own temporary folder: the suite leaves no MLflow store or
    artifacts in the repository."""
    before = {name for name in STRAYS if (REPO / name).exists()}
    yield
    after = {name for name in STRAYS if (REPO / name).exists()}
    assert after <= before, f"the tests wrote {sorted(after - before)} into {REPO}"


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits, prepared once per session (read-only for tests: copy to modify)."""
    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare(DatasetParams(), out)
    return out


@pytest.fixture
def tiny_vae_kwargs() -> dict:
    """VAE constructor overrides small enough for a CPU unit test."""
    return {"latent_dim": 2, "hidden_dim": 8, "num_layers": 1}


@pytest.fixture
def tiny(tiny_vae_kwargs: dict) -> dict[str, dict]:
    """Per family, constructor overrides that shrink its defaults to a CPU unit test (a family
    with no entry runs at its defaults, so give a new family one if those are slow)."""
    return {
        "vae": tiny_vae_kwargs,
        "pixelcnn": {"channels": 4, "num_layers": 2},
        "flow": {"hidden_channels": 4, "steps_per_scale": 1, "max_scales": 2, "eval_samples": 2},
        "gan": {"latent_dim": 4, "channels": 4},
        "ebm": {"width": 4, "langevin_steps": 2, "sample_steps": 3, "buffer_size": 32},
        "diffusion": {
            "channels": 8,
            "timesteps": 20,
            "sample_steps": 5,
            "val_samples": 2,
            "eval_samples": 3,
            "ode_images": 4,
        },
        "flow_matching": {"channels": 8, "sample_steps": 2, "val_images": 8},
    }


FitAndReload = Callable[
    [GenerativeModule, torch.Tensor, torch.Tensor], tuple[L.Trainer, GenerativeModule]
]


@pytest.fixture
def fit_and_reload(tmp_path: Path) -> FitAndReload:
    """Fit a model for one epoch on (x, y) with a real Trainer (train and validation loops), save
    a Lightning checkpoint and load it back with `weights_only=True`: (trainer, reloaded model),
    both in eval mode. Checks what every family's checkpoint must bring back: the data geometry,
    the conditional flag, every tensor of the state, and so the same seeded samples."""

    def run(model: GenerativeModule, x: torch.Tensor, y: torch.Tensor):
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            # Training values are logged on logging steps only (GenerativeModule.log_train):
            # every step here, so callback_metrics hold them.
            log_every_n_steps=1,
        )
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        trainer.fit(model, loader, loader)
        assert trainer.global_step == -(-len(x) // 8)
        path = tmp_path / "model.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(model).load_from_checkpoint(path, weights_only=True)

        assert (loaded.image_shape, loaded.levels, loaded.num_classes, loaded.conditional) == (
            model.image_shape,
            model.levels,
            model.num_classes,
            model.conditional,
        )
        model.eval()
        loaded.eval()
        state = loaded.state_dict()
        assert state.keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        labels = y[:4] if model.conditional else None
        g = torch.Generator
        assert torch.equal(
            model.sample(4, labels, generator=g().manual_seed(0)),
            loaded.sample(4, labels, generator=g().manual_seed(0)),
        )
        return trainer, loaded

    return run
