"""The evaluator: a small classifier trained on the training split of the prepared dataset.

Its penultimate activations are the dataset-specific feature space for FID, KID,
precision/recall and the memorisation statistics (see `features.py`, which registers it with
torch-fidelity), and its logits give the Inception-style score and the accuracy of
class-conditional samples. Its epoch is chosen on the validation split and it never sees the test
split: its test accuracy is measured by the final evaluation (the `baselines` stage). The file it
writes holds only plain values and tensors, so it loads with
`torch.load(path, weights_only=True)`:

    {"format": "genlab-evaluator/1", "config": {Classifier kwargs}, "state_dict": {...},
     "val_accuracy": float, "dataset_sha256": str}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from genlab.config import EvaluatorParams, TrainerParams
from genlab.data.datamodule import PreparedDataModule
from genlab.data.prepared import read_meta
from genlab.errors import TrainingInterrupted
from genlab.io import save_torch_atomic
from genlab.progress import fit_progress

FORMAT = "genlab-evaluator/1"


def stage_sizes(size: int) -> list[int]:
    """Sides of the classifier's feature maps, one per stage: the image side, then 2x max-pooled
    (rounding up) while above 4. [8, 4] for the digits, [28, 14, 7, 4], [64, 32, 16, 8, 4]."""
    sizes = [size]
    while sizes[-1] > 4 or len(sizes) == 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class Classifier(nn.Module):
    """Conv stages of two 3x3 convolutions with 2x max-pooling between them, global mean and max
    pooling, one hidden layer (the features), a head.

    The number of stages follows the image side (`stage_sizes`): two for the 8x8 digits, one more
    per halving of a larger image, so the last stage reads a map of at most 4x4 whose receptive
    field covers the whole image (14 pixels after the digits' two stages, 68 after 32x32's four);
    the width doubles per stage up to 4x `width`. Global pooling (adaptive pooling to 1x1) makes
    the network accept other sizes too (the digits' two stages any H, W >= 2). It is written as
    `mean`/`amax` because, unlike `nn.AdaptiveAvgPool2d`/`AdaptiveMaxPool2d`, these have a
    deterministic CUDA backward (the Trainer runs with `deterministic=True`). The max keeps some
    of the "where" that the mean averages away (+0.2 points of test accuracy on digits, over 8
    seeds).
    """

    def __init__(
        self,
        *,
        in_channels: int,  # image channels C
        levels: int,  # integer levels per channel L; inputs hold 0..L-1
        num_classes: int,
        width: int = 32,  # channels of the first stage; x2 per stage, at most 4 * width
        feature_dim: int = 128,  # size of the feature vector FID/KID/PRC are computed on
        dropout: float = 0.2,  # between the features and the head, training only
        # Side of the (square) images, which sets the depth; 8 (two stages) for files written
        # before the key existed, all of them on the digits.
        image_size: int = 8,
    ) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "levels": levels,
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
            "dropout": dropout,
            "image_size": image_size,
        }
        self.levels = levels

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        sizes = stage_sizes(image_size)
        layers = [*conv(in_channels, width), *conv(width, width)]
        ch = width
        for i, side in enumerate(sizes[:-1]):
            out = width * min(2 ** (i + 1), 4)
            # ceil_mode only where the side is odd, so its last row and column are pooled too.
            layers += [nn.MaxPool2d(2, ceil_mode=side % 2 == 1), *conv(ch, out), *conv(out, out)]
            ch = out
        self.convs = nn.Sequential(*layers)
        self.hidden = nn.Linear(2 * ch, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: integer levels (B, C, H, W) -> features (B, feature_dim), logits (B, num_classes)."""
        dtype = self.hidden.weight.dtype
        h = x.to(dtype) * (2 / (self.levels - 1)) - 1  # (B, C, H, W) in [-1, 1]
        h = self.convs(h)  # (B, w', H', W'), H' and W' <= 4 at the image size built for
        h = torch.cat([h.mean(dim=(-2, -1)), h.amax(dim=(-2, -1))], dim=1)  # (B, 2w')
        features = F.relu(self.hidden(h))  # (B, feature_dim)
        logits = self.head(self.dropout(features))  # (B, num_classes)
        return features, logits


def random_affine(x: Tensor, *, degrees: float, scale: float, shift: float) -> Tensor:
    """Rotate, scale and shift each image by a random small amount; keep integer levels.

    x: (B, C, H, W) integer levels. Angles are uniform in +-degrees, scales in 1 +- scale, shifts
    in +-shift pixels; bilinear resampling, then rounding back to the levels. Outside the image
    is level 0, the background of the digits (for datasets where it is not, the filled corners are
    a mild artefact that only the evaluator's training sees). Writers differ in slant and size,
    and the digits' test split is other writers' digits. Re-checked on validation only
    (benchmarks/defaults.py, 4 seeds): 0.9993 +- 0.0014 with it, 0.9979 +- 0.0027 without, a tie
    that keeps it on.
    """
    b, c, h, w = x.shape
    angle = torch.empty(b, device=x.device).uniform_(-degrees, degrees) * (math.pi / 180)
    zoom = torch.empty(b, device=x.device).uniform_(1 - scale, 1 + scale)
    # Normalised coordinates span 2 across the image, so one pixel is 2/W across, 2/H down.
    pixel = torch.tensor([2 / w, 2 / h], device=x.device)
    move = torch.empty(b, 2, device=x.device).uniform_(-shift, shift) * pixel  # (B, 2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # (B,)
    theta = torch.stack(
        [torch.stack([cos, -sin, move[:, 0]], dim=1), torch.stack([sin, cos, move[:, 1]], dim=1)],
        dim=1,
    )  # (B, 2, 3): output pixel -> where in the input it is read from
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().to(x.dtype)  # convex combinations of levels stay in 0..L-1


class EvaluatorModule(L.LightningModule):
    """Trains a `Classifier` with cross-entropy and remembers the weights of its best epoch."""

    def __init__(
        self,
        *,
        in_channels: int,
        levels: int,
        num_classes: int,
        width: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.2,
        image_size: int = 8,  # side of the images: the classifier's depth
        lr: float = 2e-3,  # AdamW peak learning rate (cosine-decayed to 0 over training)
        label_smoothing: float = 0.1,  # of the training cross-entropy (validation uses plain CE)
        # Training augmentation (see `random_affine`); all zero turns it off.
        augment_degrees: float = 10.0,
        augment_scale: float = 0.1,
        augment_shift: float = 1.0,  # pixels
    ) -> None:
        super().__init__()
        self.classifier = Classifier(
            in_channels=in_channels,
            levels=levels,
            num_classes=num_classes,
            width=width,
            feature_dim=feature_dim,
            dropout=dropout,
            image_size=image_size,
        )
        self.lr = lr
        self.label_smoothing = label_smoothing
        self.augment = {"degrees": augment_degrees, "scale": augment_scale, "shift": augment_shift}
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()
        # Weights (on the CPU) of the epoch with the highest validation accuracy so far; ties
        # (frequent: 350 validation images, accuracy near 1) go to the lower validation loss.
        self.best_val_accuracy = -1.0
        self.best_val_loss = float("inf")
        self.best_state: dict[str, Tensor] | None = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if any(self.augment.values()):
            x = random_affine(x, **self.augment)
        _, logits = self.classifier(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, batch_size=len(y))  # the progress line shows it
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        _, logits = self.classifier(x)
        # Sum-then-divide over the epoch: the mean weighted by batch size.
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.val_accuracy.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        accuracy, loss = self.val_accuracy.compute(), self.val_loss.compute()
        self.log("val/accuracy", accuracy)
        self.log("val/loss", loss)
        self.val_accuracy.reset()
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            return
        if (accuracy.item(), -loss.item()) > (self.best_val_accuracy, -self.best_val_loss):
            self.best_val_accuracy, self.best_val_loss = accuracy.item(), loss.item()
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.classifier.state_dict().items()
            }

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, fused=True)
        # Cosine decay to 0 over the whole run, stepped per batch: the later epochs fit finely,
        # which makes the best-validation epoch a far less noisy choice than with a constant lr.
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class EvaluatorResult(NamedTuple):
    val_accuracy: float  # of the kept (best) epoch
    num_params: int
    global_zero: bool  # this process wrote the evaluator (the others of a DDP launch did not)


def train_evaluator(
    prepared_dir: str | Path,
    out_path: str | Path,
    *,
    params: EvaluatorParams,
    trainer: TrainerParams,
    seed: int,
) -> EvaluatorResult:
    """Train the evaluator on `prepared_dir`, keep its best validation epoch, write `out_path`."""
    L.seed_everything(seed, workers=True)
    meta = read_meta(prepared_dir)
    module = EvaluatorModule(
        in_channels=meta.shape[0],
        levels=meta.levels,
        num_classes=meta.num_classes,
        image_size=min(meta.shape[1:]),
        width=params.width,
        feature_dim=params.feature_dim,
        dropout=params.dropout,
        lr=params.lr,
        augment_degrees=params.augment_degrees,
        augment_scale=params.augment_scale,
        augment_shift=params.augment_shift,
    )
    data = PreparedDataModule(prepared_dir, batch_size=params.batch_size, seed=seed)
    # `deterministic=True` switches torch-wide flags and Lightning never switches them back; a
    # library call should not change how the rest of the process runs, so restore them after.
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    # On MNIST this fit takes minutes: a bar on a terminal, else a line every 30 s.
    bar, progress = fit_progress("train evaluator")
    try:
        fitter = L.Trainer(
            max_epochs=params.max_epochs,
            accelerator=trainer.accelerator,
            devices=trainer.devices,
            precision=trainer.precision,
            log_every_n_steps=trainer.log_every_n_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=bar,
            callbacks=progress,
            enable_model_summary=False,
            deterministic=True,
        )
        try:
            fitter.fit(module, datamodule=data)
        except SIGTERMException:  # a SystemExit(0): would look like success to DVC
            raise TrainingInterrupted(
                "evaluator training received SIGTERM; nothing written"
            ) from None
        if fitter.interrupted or fitter.received_sigterm or module.best_state is None:
            raise TrainingInterrupted("evaluator training did not finish; nothing written")
        module.classifier.load_state_dict(module.best_state)
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]
    result = EvaluatorResult(
        val_accuracy=module.best_val_accuracy,
        num_params=sum(p.numel() for p in module.classifier.parameters()),
        global_zero=fitter.is_global_zero,
    )
    if fitter.is_global_zero:
        save_evaluator(
            out_path,
            module.classifier,
            val_accuracy=result.val_accuracy,
            dataset_sha256=meta.data_sha256,
        )
    return result


def save_evaluator(
    path: str | Path,
    classifier: Classifier,
    *,
    val_accuracy: float,
    dataset_sha256: str,
) -> None:
    """Write the evaluator file atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "config": dict(classifier.config),
        "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        "val_accuracy": float(val_accuracy),
        "dataset_sha256": dataset_sha256,
    }
    save_torch_atomic(blob, path)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """Load the evaluator written by `train_evaluator`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluator {path} not found; run `dvc repro evaluator` first")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a genlab evaluator file (cannot load it: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(
            f"{path} is not a genlab evaluator file (format {found!r}, want {FORMAT!r})"
        )
    try:
        classifier = Classifier(**blob["config"])
        classifier.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: damaged genlab evaluator file ({exc}); re-run `dvc repro evaluator`"
        ) from None
    return classifier.to(map_location).eval()


# ---------------------------------------------------------------- the evaluator as a classifier


def check_images(name: str, x: Tensor) -> None:
    """Raise one clear ValueError unless x is a uint8 batch of at least two images (N, C, H, W)."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected uint8 images (N, C, H, W), got {what}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 images, got {x.shape[0]}")


@torch.no_grad()
def evaluator_outputs(
    evaluator_path: str | Path,
    x: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The evaluator's features (N, feature_dim) and logits (N, num_classes) of images x
    (uint8 (N, C, H, W)), float64 on the CPU."""
    check_images("x", x)
    classifier = load_classifier(evaluator_path, map_location=device)
    features, logits = [], []
    for xb in x.split(batch_size):
        f, lg = classifier(xb.to(device))
        features.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(features), torch.cat(logits)


def classifier_predictions(
    evaluator_path: str | Path,
    x: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The evaluator's class for each image x (uint8 (N, C, H, W)): int64 (N,)."""
    _, logits = evaluator_outputs(evaluator_path, x, batch_size=batch_size, device=device)
    return logits.argmax(dim=1)
