"""The standard Inception-v3 feature space: torch-fidelity's `inception-v3-compat`, offline.

Published FIDs use the 2015 TensorFlow Inception graph, which torch-fidelity ports as
`inception-v3-compat` (2048-d pool features for FID/KID/precision-recall, the 1008 "unbiased"
logits for the Inception Score) and which upscales every image to 299x299 itself with
TensorFlow 1.x's bilinear resize. What is genlab's to do:

- find the weights: a path from params, or where torch-fidelity's own download lands
  (torch's hub cache), and verify their sha256 before torch-fidelity loads them; genlab never
  lets torch-fidelity download (it would, silently, when given no path);
- feed it what it expects: uint8 RGB in 0..255. Integer levels 0..L-1 map to round(v·255/(L-1))
  (the identity for 8-bit data), and grayscale is replicated to 3 channels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from genlab.errors import DataError

EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name
# The file name torch-fidelity's download gets (torch hub keeps the URL's last part).
WEIGHTS_FILE = Path(urlparse(URL_INCEPTION_V3).path).name
# sha256 of that file (95,628,359 bytes). torch-fidelity does not print it; it is the hash that
# several independent projects pin for this file, and its first 8 digits are the "6726825d" the
# file name carries (torch hub's convention for a file's sha256 prefix).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299  # torch-fidelity's FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
RESIZE = f"bilinear to {INPUT_SIZE}x{INPUT_SIZE} (torch-fidelity, TF1-compatible)"


def default_weights_path() -> Path:
    """Where torch-fidelity's own download puts the weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_weights(path: str | Path | None, sha256: str) -> Path:
    """The verified weights file: `path` (evaluate.inception_weights) or torch's hub cache.

    Raises DataError naming the expected file and where to get it when it is absent, and both
    hashes when its sha256 is not `sha256` (evaluate.inception_sha256).
    """
    where = Path(path).expanduser() if path is not None else default_weights_path()
    if not where.is_file():
        raise DataError(
            f"Inception weights not found at {where} (expected torch-fidelity's {WEIGHTS_FILE}); "
            f"download {URL_INCEPTION_V3} to that path, or set evaluate.inception_weights to a "
            f"local copy (genlab never downloads them)"
        )
    actual = file_sha256(where)
    if actual != sha256:
        raise DataError(
            f"Inception weights {where} have sha256 {actual}, but evaluate.inception_sha256 is "
            f"{sha256}; replace the file with torch-fidelity's {WEIGHTS_FILE} or, for other "
            f"weights on purpose, set evaluate.inception_sha256 to their hash"
        )
    return where


def describe_input(levels: int, channels: int) -> str:
    """What `to_inception_input` does to images of `levels` levels and `channels` channels."""
    scale = "uint8 as is" if levels == 256 else f"levels 0..{levels - 1} -> uint8 0..255"
    return scale + (", gray -> 3 channels" if channels == 1 else "")


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(
            f"the Inception extractor takes RGB or grayscale images, not {channels} channels; "
            f"use evaluate.feature_extractor: evaluator for this dataset"
        )


def to_inception_input(x: Tensor, levels: int) -> Tensor:
    """uint8 (N, C, H, W) in 0..levels-1, C in {1, 3} -> uint8 (N, 3, H, W) in 0..255."""
    check_channels(x.shape[1])
    if levels != 256:
        # round(v * 255 / (L - 1)) in float64: exact for every level, 0 -> 0 and L-1 -> 255.
        x = (x.double() * (255 / (levels - 1))).round_().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W); a copy when C == 1
