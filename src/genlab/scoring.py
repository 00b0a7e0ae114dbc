"""`genlab score FAMILY INPUT`: how likely each given image is under a trained family, and whether
it looks like the data (an in-distribution verdict).

What it reads and writes (input formats, the scores, the verdict, the CSV columns) is the command's
help, `genlab score --help` (`SCORE_DESCRIPTION` in cli.py, which imports no torch to show it).
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from genlab import paths
from genlab.config import EvaluateParams, Params, PredictionParams
from genlab.data.images import (
    SIXTEEN_BIT_GREY,
    ImageTooLarge,
    eight_bit,
    open_image,
    pixels_to_levels,
)
from genlab.data.prepared import Meta, load_split, read_meta
from genlab.errors import DataError, GenlabError
from genlab.evaluation import ood
from genlab.evaluation.evaluate import for_inference
from genlab.evaluation.predict import (
    Scorer,
    detection_shortlist,
    log_prior,
    score_images,
    scorer,
)
from genlab.io import write_text_atomic
from genlab.models import MODELS, GenerativeModule
from genlab.models.base import Likelihood, bits_per_dim
from genlab.paths import MODEL_FILE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# PIL modes read as 8-bit pixels through an exact conversion to RGBA.
_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX")


# ----------------------------------------------------------------------------- reading


class Images(NamedTuple):
    names: list[str]  # file name per image, or its index in a .npy array
    x: torch.Tensor  # (N, C, H, W) uint8 levels 0..L-1


def read_images(path: str | Path, *, meta: Meta) -> Images:
    """The images at `path` (a folder of image files, one image file or a .npy array of levels)
    as levels of the prepared data's geometry; a DataError naming the file and the fix if not."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found; pass a folder of images, an image file or a .npy file")
    if path.is_dir():
        return _read_folder(path, meta)
    if path.suffix.lower() == ".npy":
        return _read_npy(path, meta)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Images([path.name], _read_image(path, meta)[None])
    raise DataError(
        f"{path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a .npy array of levels"
    )


def _read_folder(folder: Path, meta: Meta) -> Images:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for p in entries:
        if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            raise DataError(
                f"{p} is not an image file ({', '.join(IMAGE_SUFFIXES)}); "
                f"move it out of {folder} or score the images one by one"
            )
    if not entries:
        raise DataError(f"{folder} holds no images; put {', '.join(IMAGE_SUFFIXES)} files in it")
    x = torch.stack([_read_image(p, meta) for p in entries])  # (N, C, H, W)
    return Images([p.name for p in entries], x)


def _read_image(path: Path, meta: Meta) -> torch.Tensor:
    """One image file -> uint8 (C, H, W) levels."""
    c, h, w = meta.shape
    if c not in (1, 3):
        raise DataError(
            f"the data has {c} channels and image files hold 1 or 3; pass a .npy array of levels"
        )
    expected = "8-bit grayscale (mode 'L')" if c == 1 else "8-bit RGB (mode 'RGB')"
    try:
        with open_image(path, max_pixels=h * w) as im:
            # Frames and size are in the header: checked before a pixel is decoded.
            frames, mode, size = getattr(im, "n_frames", 1), im.mode, im.size
            if frames > 1:
                raise DataError(f"{path} holds {frames} frames; save one image per file")
            if size != (w, h):
                raise _wrong_size(path, size, (h, w))
            if mode not in (*_EIGHT_BIT_MODES, *SIXTEEN_BIT_GREY):
                raise DataError(f"{path} has PIL mode {mode!r}; save it as {expected}")
            # 16-bit grey to 8 bits as `genlab prepare` reads it; the rest exactly, as RGBA.
            pixels = np.asarray(eight_bit(im).convert("RGBA")).transpose(2, 0, 1)  # (4, H, W)
    except ImageTooLarge as exc:  # larger than the data's images: said from the header alone
        raise _wrong_size(path, exc.size, (h, w)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read image {path}: {exc}; replace or remove the file") from None
    if (pixels[3] != 255).any():
        raise DataError(f"{path} has transparent pixels; flatten it and save it as {expected}")
    rgb = pixels[:3]  # (3, H, W)
    if c == 1:
        if (rgb != rgb[:1]).any():
            raise DataError(
                f"{path} is a colour image (mode {mode!r}) but the data is grayscale; "
                f"save it as {expected} (colour is not converted to grey for you)"
            )
        rgb = rgb[:1]  # (1, H, W)
    lv = pixels_to_levels(rgb, max_value=255, levels=meta.levels)
    out = torch.from_numpy(np.ascontiguousarray(lv)).to(torch.uint8)
    return out.expand(c, h, w).clone()  # a grey image for RGB data: R = G = B


def _wrong_size(path: Path, size: tuple[int, int], hw: tuple[int, int]) -> DataError:
    (h, w), (width, height) = hw, size
    return DataError(
        f"{path} is {height}x{width} (HxW) but the model takes {h}x{w}; resize to {h}x{w}"
    )


def _read_npy(path: Path, meta: Meta) -> Images:
    c, h, w = meta.shape
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a .npy array: {exc}") from None
    if not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise DataError(
            f"{path} holds {a.dtype} values; expected integer levels 0..{meta.levels - 1} "
            f"(convert pixels v in 0..255 with round(v * {meta.levels - 1} / 255))"
        )
    shape = a.shape
    forms = {4: "(N, C, H, W)"}
    if c == 1:
        forms |= {3: "(N, H, W)", 2: "(H, W)"}
        a = a[:, None] if a.ndim == 3 else a[None, None] if a.ndim == 2 else a
    else:
        forms |= {3: "(C, H, W)"}
        a = a[None] if a.ndim == 3 else a
    if a.ndim != 4 or tuple(a.shape[1:]) != (c, h, w):
        allowed = " or ".join(
            f.replace("C", str(c)).replace("H", str(h)).replace("W", str(w)) for f in forms.values()
        )
        raise DataError(f"{path} has shape {shape}; expected levels shaped {allowed}")
    if a.shape[0] == 0:
        raise DataError(f"{path} holds no images (N = 0)")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= meta.levels:
        raise DataError(
            f"{path} has values {lo}..{hi}; expected integer levels 0..{meta.levels - 1} "
            f"(convert pixels v in 0..255 with round(v * {meta.levels - 1} / 255))"
        )
    x = torch.from_numpy(a.astype(np.uint8))  # (N, C, H, W)
    return Images([str(i) for i in range(len(x))], x)


# ----------------------------------------------------------------------------- the model


def load_family(
    family: str, *, seed: int, meta: Meta, device: torch.device, channels_last: bool
) -> GenerativeModule:
    """The trained `family` (training seed `seed`) from models/<family>/seed<k>/model.ckpt,
    checked against the data's
    geometry; an error saying what to run when it cannot score images or is missing."""
    cls = MODELS[family]
    if scorer(cls) is None:
        raise GenlabError(
            f"{family} cannot score images: it has neither a likelihood nor an energy "
            f"(families that can: {', '.join(sorted(f for f, m in MODELS.items() if scorer(m)))})"
        )
    checkpoint = paths.family_model_dir(family, seed) / MODEL_FILE
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} not found; train the family first: "
            f"uv run dvc repro train@{family}-{seed}"
        )
    model = cls.load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
    if (tuple(model.image_shape), model.levels) != (tuple(meta.shape), meta.levels):
        raise DataError(
            f"{checkpoint} was trained on {model.levels}-level {model.image_shape} images but "
            f"data/prepared holds {meta.levels}-level {meta.shape}; "
            f"re-run uv run dvc repro train@{family}-{seed}"
        )
    return for_inference(model, channels_last=channels_last)


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoreTable:
    family: str
    scorer: Scorer
    likelihood: Likelihood
    dims: int  # C·H·W
    names: list[str]
    log_px: torch.Tensor  # (N,) float64: log p(x) nats (a lower bound for a bound), or -E(x)
    statistic: torch.Tensor  # (N,) float64, higher = more in-distribution
    calibration: ood.Calibration

    @property
    def in_distribution(self) -> torch.Tensor:  # (N,) bool
        return self.statistic >= self.calibration.threshold

    @property
    def columns(self) -> list[str]:
        if self.scorer == "energy":
            return ["image", "energy", "statistic", "in_distribution"]
        if self.likelihood == "exact":
            return ["image", "nats", "bits_per_dim", "statistic", "in_distribution"]
        return ["image", "nats_bound", "bits_per_dim_bound", "statistic", "in_distribution"]

    def rows(self) -> list[list[str]]:
        out = []
        columns = (self.log_px.tolist(), self.statistic.tolist(), self.in_distribution.tolist())
        for name, lp, s, ok in zip(self.names, *columns, strict=True):
            values = [-lp] if self.scorer == "energy" else [-lp, bits_per_dim(-lp, self.dims)]
            out.append([name, *(f"{v:.6f}" for v in values), f"{s:.6f}", str(ok).lower()])
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows())
        return buf.getvalue()

    def summary(self) -> str:
        cal = self.calibration
        n, m = len(self.names), int(self.in_distribution.sum())
        what = {"likelihood": "log p(x)", "typicality": "-|log p(x) - validation mean|"}[cal.kind]
        if self.scorer == "energy":
            what = what.replace("log p(x)", "-E(x)")
            note = "energy E(x) is -log p(x) up to the unknown log Z (no nats or bits/dim)"
        elif self.likelihood == "exact":
            note = "nats are exact -log p(x)"
        else:
            note = f"nats are upper bounds on -log p(x) ({self.family}'s likelihood is a bound)"
        return (
            f"{self.family}: {m} of {n} images judged in-distribution, {what} >= "
            f"{cal.threshold:.4f} (statistic {cal.kind}; the threshold rejects fpr = {cal.fpr:g} "
            f"of the validation split); {note}"
        )


def score_files(
    model: GenerativeModule,
    images: Images,
    *,
    family: str,
    prepared_dir: str | Path,
    prediction: PredictionParams,
    protocol: EvaluateParams,
) -> ScoreTable:
    """Score `images` with `model` and judge each against the threshold calibrated on the
    validation split of `prepared_dir` (class prior from its train split's labels)."""
    meta = read_meta(prepared_dir)
    prior = log_prior(load_split(prepared_dir, "train", meta).y, meta.num_classes)
    val = load_split(prepared_dir, "val", meta).x
    val_log_px = _log_px(model, val, prior=prior, prediction=prediction, protocol=protocol)
    calibration = ood.calibrate(val_log_px, prediction.statistic, prediction.fpr)
    log_px = _log_px(model, images.x, prior=prior, prediction=prediction, protocol=protocol)
    kind = scorer(model)
    assert kind is not None  # load_family refuses families that cannot score
    return ScoreTable(
        family=family,
        scorer=kind,
        likelihood=model.likelihood,
        dims=model.dims,
        names=images.names,
        log_px=log_px,
        statistic=ood.statistic(log_px, calibration.reference_mean, calibration.kind),
        calibration=calibration,
    )


def _log_px(
    model: GenerativeModule,
    x: torch.Tensor,
    *,
    prior: torch.Tensor,
    prediction: PredictionParams,
    protocol: EvaluateParams,
) -> torch.Tensor:
    return score_images(
        model,
        x,
        log_prior=prior,
        samples=prediction.bound_samples,
        batch_size=protocol.batch_size,
        seed=protocol.seed,
        # log p(x) alone, as the evaluation's threshold was calibrated
        shortlist=detection_shortlist(prediction.shortlist),
        joint=False,
    ).log_px


def run_score(
    params: Params,
    family: str,
    source: str | Path,
    *,
    out: str | Path | None,
    seed: int | None = None,
) -> int:
    """What `genlab score` does: read, score, write the CSV to `out` (atomically) or stdout,
    and print the summary to stderr. Returns the number of images judged in-distribution.
    `seed`: which training seed's model (default: the first of `seeds`)."""
    meta = read_meta(paths.PREPARED)
    seed = params.seeds[0] if seed is None else seed
    model = load_family(
        family,
        seed=seed,
        meta=meta,
        device=params.trainer.eval_device,
        channels_last=params.trainer.channels_last,
    )
    images = read_images(source, meta=meta)
    table = score_files(
        model,
        images,
        family=family,
        prepared_dir=paths.PREPARED,
        prediction=params.prediction,
        protocol=params.evaluate,
    )
    text = table.to_csv()
    if out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(out, text)
    print(table.summary(), file=sys.stderr)
    return int(table.in_distribution.sum())
