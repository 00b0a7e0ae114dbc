"""Fixtures shared by the whole test suite: tiny, CPU, seeded (STYLE.md rule 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genlab.data.prepared import prepare


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """The test machines are small and shared: one intra-op thread keeps runs predictable."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits, prepared once per session (read-only for tests: copy to modify)."""
    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare("digits", out)
    return out


@pytest.fixture
def tiny_vae_kwargs() -> dict:
    """VAE constructor overrides small enough for a CPU unit test."""
    return {"latent_dim": 2, "hidden_dim": 8, "num_layers": 1}
