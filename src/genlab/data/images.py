"""Reading an image file: the one decoder behind `genlab prepare` (a folder dataset) and
`genlab score`, so that one file becomes the same pixels in training and in scoring.

Image files are untrusted. The size a file declares is checked before any pixel is decoded (a
170 KB PNG can declare 13000 x 13000 pixels, 2 GB once decoded; Pillow only warns below 89 MP),
and a JPEG is decoded at the smallest scale that still covers the size asked for (`Image.draft`).
16-bit grey becomes 8 bits as round(v * 255 / 65535), half up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# A 64-megapixel photo; a file that declares more is refused before it is decoded.
MAX_PIXELS = 64 * 2**20
SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageTooLarge(ValueError):
    """A file declares more pixels than genlab decodes (its header's `size`, width x height)."""

    def __init__(self, size: tuple[int, int], max_pixels: int) -> None:
        super().__init__(
            f"it declares {size[0]}x{size[1]} pixels, more than the {max_pixels} genlab decodes"
        )
        self.size = size


def pixels_to_levels(v: np.ndarray, *, max_value: int, levels: int) -> np.ndarray:
    """Pixel values 0..max_value -> levels round(v * (L - 1) / max_value), half up, in exact
    integer arithmetic (so a level written by `to_uint8_pixels` reads back as itself)."""
    v = v.astype(np.int64)
    return (2 * v * (levels - 1) + max_value) // (2 * max_value)


@contextmanager
def open_image(
    path: str | Path, *, max_pixels: int = MAX_PIXELS, at_least: tuple[int, int] | None = None
) -> Iterator[Image.Image]:
    """The image file at `path`, opened lazily (nothing decoded yet) after its declared size was
    checked against `max_pixels`; with `at_least` (width, height), a JPEG decodes at the
    smallest scale whose size still covers it."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(image.size, max_pixels)
        if at_least is not None:
            image.draft(None, at_least)
        yield image


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey as 8-bit grey ('L', round(v * 255 / 65535)); a floating-point image is a
    ValueError; any other mode as it is. Decodes the pixels."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_GREY:
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError("32-bit integer pixels: save the image with 8 or 16 bits")
        return Image.fromarray(
            pixels_to_levels(values, max_value=65535, levels=256).astype(np.uint8)
        )
    if image.mode == "F":
        raise ValueError("floating-point pixels (mode F): save the image with 8 or 16 bits")
    return image
