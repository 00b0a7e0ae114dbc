"""The one image decoder of `genlab prepare` and `genlab score`: bounded before decoding, and one
file is the same pixels in both."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genlab.config import DatasetParams
from genlab.data.datasets import load_dataset
from genlab.data.images import ImageTooLarge, open_image
from genlab.data.prepared import SPLITS, Meta
from genlab.errors import DataError
from genlab.scoring import read_images


def _bomb(path: Path, side: int = 13000) -> Path:
    """A PNG of a few dozen bytes whose header declares side x side grey pixels (a real bomb
    compresses 169 MB of zeros into 170 KB; what matters is that its size is read first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\0" * (side + 1))  # one row: the rest is never read
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def _meta(levels: int, side: int) -> Meta:
    return Meta(
        "folder", levels, (1, side, side), ["a"], {s: {"n": 1, "sha256": ""} for s in SPLITS}
    )


def test_a_file_that_declares_too_many_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageTooLarge, match="declares 13000x13000 pixels"), open_image(bomb):
        pass
    # genlab score: the size is not the data's, said before a pixel is decoded.
    with pytest.raises(DataError, match="is 13000x13000 \\(HxW\\) but the model takes 8x8"):
        read_images(bomb, meta=_meta(256, 8))
    # genlab prepare: a folder dataset names the file and the reason.
    (tmp_path / "images" / "a").mkdir(parents=True)
    _bomb(tmp_path / "images" / "a" / "bomb.png")
    params = DatasetParams(name="folder", path=str(tmp_path / "images"), corrupt="error")
    with pytest.raises(DataError, match=r"bomb.png: unreadable image .*declares 13000x13000"):
        load_dataset(params)


def test_prepare_and_score_read_a_16_bit_file_as_the_same_pixels(tmp_path: Path) -> None:
    """Values that the top byte (v >> 8) and rounding (v * 255 / 65535) map differently."""
    values = np.array([[0, 200, 383, 40000], [40256, 65280, 65407, 65535]] * 2, dtype=np.uint16)
    values = np.tile(values, (2, 2))[:8, :8]  # (8, 8)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i in range(10):  # enough for three non-empty splits
        Image.fromarray(values).save(tmp_path / "images" / "a" / f"{i}.png")
    assert Image.open(tmp_path / "images" / "a" / "0.png").mode.startswith("I")
    raw = load_dataset(
        DatasetParams(name="folder", path=str(tmp_path / "images"), image_size=8, channels=1)
    )
    prepared = raw.splits["train"].x[0, 0].numpy()
    scored = read_images(tmp_path / "images" / "a" / "0.png", meta=_meta(256, 8)).x[0, 0].numpy()
    np.testing.assert_array_equal(prepared, scored)
    assert prepared[0, 1] == 1  # 200 * 255 / 65535 = 0.78 -> 1 (its top byte would say 0)
