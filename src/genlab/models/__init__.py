"""The family registry: one explicit line per family (no self-filling registries)."""

from genlab.models.base import GenerativeModule
from genlab.models.flow import Flow
from genlab.models.pixelcnn import PixelCNN
from genlab.models.vae import VAE

MODELS: dict[str, type[GenerativeModule]] = {
    "pixelcnn": PixelCNN,
    "flow": Flow,
    "vae": VAE,
}

__all__ = ["MODELS", "GenerativeModule"]
