"""The family registry: one explicit line per family (no self-filling registries)."""

from genlab.models.base import GenerativeModule
from genlab.models.vae import VAE

MODELS: dict[str, type[GenerativeModule]] = {
    "vae": VAE,
}

__all__ = ["MODELS", "GenerativeModule"]
