"""Images of integer-level samples, for MLflow and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from genlab.io import atomic_file


def to_uint8_pixels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels 0..L-1 -> pixel values 0..255, rounded."""
    return (x.float() * (255.0 / (levels - 1))).round().clamp(0, 255).to(torch.uint8)


def image_grid(x: torch.Tensor, levels: int, *, nrow: int = 8, scale: int = 4) -> np.ndarray:
    """(N, C, H, W) integer levels -> one (H', W', 3) uint8 grid, images upscaled `scale`x."""
    pixels = to_uint8_pixels(x.detach().cpu(), levels)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(pixels, nrow=nrow, padding=scale, pad_value=128)  # (3, H', W')
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_png(grid: np.ndarray, path: str | Path) -> None:
    """Write atomically: a PNG is either complete or absent."""
    with atomic_file(path) as f:
        Image.fromarray(grid).save(f, format="PNG")
