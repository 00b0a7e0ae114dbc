"""The family registry: one explicit line per family (no self-filling registries)."""

from genlab.models.base import GenerativeModule
from genlab.models.diffusion import Diffusion
from genlab.models.ebm import EBM
from genlab.models.flow import Flow
from genlab.models.flow_matching import FlowMatching
from genlab.models.gan import GAN
from genlab.models.pixelcnn import PixelCNN
from genlab.models.vae import VAE

MODELS: dict[str, type[GenerativeModule]] = {
    "pixelcnn": PixelCNN,
    "flow": Flow,
    "vae": VAE,
    "diffusion": Diffusion,
    "flow_matching": FlowMatching,
    "ebm": EBM,
    "gan": GAN,
}

__all__ = ["MODELS", "GenerativeModule"]
