"""Datasets genlab can prepare, as integer images with `levels` values per channel.

Each loader returns the three splits in memory; `prepare.py` writes them to disk. Images are
uint8 tensors (N, C, H, W) holding levels 0..L-1; labels are int64 (N,). A loader's keyword
arguments are its params: `load_dataset` passes it exactly the `dataset.<key>` values it names.

The splits are deterministic, so every family of every run sees the same images:
- digits: Tomczak's split (see `load_digits`).
- mnist, fashion_mnist, cifar10: the official test set is `test`; `val` is the last `val_size`
  images of the official training set and `train` the images before them.
- folder: stratified: one permutation of all images seeded by `split_seed`; in that order, the
  first round(val_fraction * n) images of each class (n of them) go to `val`, the next
  round(test_fraction * n) to `test`, the rest to `train`.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from genlab.data.images import eight_bit, open_image
from genlab.errors import DataError

if TYPE_CHECKING:
    from PIL import Image
    from torchvision.datasets import MNIST, VisionDataset

    from genlab.config import DatasetParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8, values in 0..levels-1
    y: torch.Tensor  # (N,) int64 class index

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]:
            raise ValueError(f"labels must be int64 (N,), got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class RawDataset:
    splits: dict[str, Split]  # "train", "val", "test"
    levels: int
    class_names: list[str]


def load_digits() -> RawDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 17 grey levels, 10 classes).

    Split as the reference code of Tomczak's *Deep Generative Modeling* does (first 1000 train,
    next 350 validation, last 447 test), so likelihoods compare with its published numbers.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    bounds = {"train": (0, 1000), "val": (1000, 1350), "test": (1350, 1797)}
    splits = {name: Split(x[a:b].clone(), y[a:b].clone()) for name, (a, b) in bounds.items()}
    return RawDataset(splits=splits, levels=17, class_names=[str(d) for d in range(10)])


def load_mnist(*, root: str, download: bool, val_size: int) -> RawDataset:
    """MNIST handwritten digits: 60000 training and 10000 test images, 1x28x28, 256 levels."""
    from torchvision.datasets import MNIST

    return _load_idx(MNIST, root=root, download=download, val_size=val_size)


def load_fashion_mnist(*, root: str, download: bool, val_size: int) -> RawDataset:
    """Fashion-MNIST clothing: 60000 training and 10000 test images, 1x28x28, 256 levels."""
    from torchvision.datasets import FashionMNIST

    return _load_idx(FashionMNIST, root=root, download=download, val_size=val_size)


def load_cifar10(*, root: str, download: bool, val_size: int) -> RawDataset:
    """CIFAR-10: 50000 training and 10000 test colour images, 3x32x32, 256 levels."""
    from torchvision.datasets import CIFAR10

    # torchvision checks each of these files against its md5 (`_check_integrity`) before reading.
    folder = Path(root) / CIFAR10.base_folder
    names = [name for name, _md5 in CIFAR10.train_list + CIFAR10.test_list]
    train, test = _open_official(
        CIFAR10,
        root=root,
        download=download,
        expected=[folder / name for name in [*names, CIFAR10.meta["filename"]]],
        archive=f"or {CIFAR10.filename} in {root}, which is extracted without the network",
    )

    def split(ds: CIFAR10) -> Split:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> NCHW
        return Split(x, torch.tensor(ds.targets, dtype=torch.int64))

    return _official_splits(
        train=split(train), test=split(test), val_size=val_size, class_names=list(train.classes)
    )


def _load_idx(cls: type[MNIST], *, root: str, download: bool, val_size: int) -> RawDataset:
    # torchvision reads the uncompressed idx files in <root>/<class name>/raw (`_check_exists`);
    # the official .gz files are extracted there by `download()`, which skips fetching a .gz
    # already present with the official md5.
    raw = Path(root) / cls.__name__ / "raw"
    train, test = _open_official(
        cls,
        root=root,
        download=download,
        expected=[raw / Path(name).stem for name, _md5 in cls.resources],
        archive="or the official .gz files, which are extracted without the network",
    )

    def split(ds: MNIST) -> Split:
        x = ds.data.unsqueeze(1).contiguous()  # (N, 28, 28) -> (N, 1, 28, 28)
        return Split(x, ds.targets.to(torch.int64))

    return _official_splits(
        train=split(train), test=split(test), val_size=val_size, class_names=list(train.classes)
    )


def _open_official(
    cls: type[VisionDataset], *, root: str, download: bool, expected: list[Path], archive: str
) -> tuple[Any, Any]:
    """Both official splits through torchvision, or one DataError naming the files it needs."""
    try:
        # With the files in place, download() returns before touching the network.
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=False)  # the first call fetched both splits
    except Exception as exc:
        # torchvision says "not found", "corrupted" or "error downloading" with RuntimeError,
        # URLError, OSError, or an assert of the idx parser: all become one line naming the files.
        why = _reason(exc)
        missing = [path for path in expected if not path.is_file()]
        if not missing:
            raise DataError(
                f"{expected[0].parent}: torchvision cannot read the files there ({why}); "
                "delete them and download again (dataset.download: true) or replace them with "
                "the official files"
            ) from exc
        names = ", ".join(path.name for path in missing)
        if download:
            how, fix = f"the download failed ({why}; no network?)", ""
        else:
            how, fix = "dataset.download is false", ", or set dataset.download: true"
        raise DataError(
            f"{names} not found in {missing[0].parent} and {how}: put the files there "
            f"({archive} when dataset.download is true){fix}"
        ) from exc
    return train, test


def _official_splits(
    *, train: Split, test: Split, val_size: int, class_names: list[str]
) -> RawDataset:
    """val: the last `val_size` images of the official training set (a fixed, documented cut)."""
    cut = len(train) - val_size
    if cut < 1:
        raise DataError(
            f"dataset.val_size {val_size} leaves no training images (the official training set "
            f"has {len(train)}): lower dataset.val_size"
        )
    splits = {
        "train": Split(train.x[:cut].clone(), train.y[:cut].clone()),
        "val": Split(train.x[cut:].clone(), train.y[cut:].clone()),
        "test": test,
    }
    return RawDataset(splits=splits, levels=256, class_names=class_names)


def load_folder(
    *,
    path: str,
    image_size: int,
    channels: Literal[1, 3],
    corrupt: Literal["skip", "error"],
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
) -> RawDataset:
    """Any directory of images with one sub-folder per class (the sorted names are the labels).

    torchvision's ImageFolder finds the images (its extensions: PNG, JPEG, BMP, TIFF, WebP, ...)
    and Pillow reads them; each becomes grayscale or RGB, its short side is resized to
    `image_size` and the centre cropped to a square. 256 levels.
    """
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"dataset.path {root} is not a directory: point it at a folder with one sub-folder "
            "of images per class"
        )
    if not any(entry.is_dir() for entry in root.iterdir()):
        raise DataError(
            f"{root} has no class sub-folders: put the images in {root}/<class name>/ "
            "(one sub-folder per class; a single class is fine)"
        )
    folder = ImageFolder(
        root,
        loader=partial(_read_image, mode="L" if channels == 1 else "RGB", size=image_size),
        transform=transforms.Compose(
            [
                transforms.Resize(image_size),  # the short side, antialiased
                transforms.CenterCrop(image_size),
                transforms.PILToTensor(),  # uint8 (C, H, W)
            ]
        ),
        allow_empty=True,  # an empty class is reported below, by name
    )
    images: list[torch.Tensor] = []
    labels: list[int] = []
    unreadable: list[str] = []
    for i, (file, _label) in enumerate(folder.samples):
        try:
            x, label = folder[i]
        # What Pillow raises for a file that is not a whole image of a format it reads.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if corrupt == "error":
                raise DataError(
                    f"{file}: unreadable image ({_reason(exc)}): fix or remove it, or set "
                    "dataset.corrupt: skip"
                ) from exc
            unreadable.append(file)
            continue
        images.append(x)
        labels.append(label)
    if unreadable:
        log.warning(
            "skipped %d unreadable image(s) of %d: %s",
            len(unreadable),
            len(folder.samples),
            unreadable[0],
        )
    y = torch.tensor(labels, dtype=torch.int64)
    for c, name in enumerate(folder.classes):
        if not (y == c).any():
            found = sum(1 for _file, label in folder.samples if label == c)
            what = f"none of its {found} image(s) can be read" if found else "it holds no images"
            raise DataError(
                f"class folder {root / name}: {what} (extensions {', '.join(IMG_EXTENSIONS)}): "
                "add images or remove the folder"
            )
    x = torch.stack(images)  # (N, C, image_size, image_size)

    # Stratified split: every class is cut in the same proportions, so val and test have the
    # class balance of the whole folder. `order` is the split order (classes mixed).
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    part = torch.zeros(len(y), dtype=torch.int64)  # per position in `order`: 0 train, 1 val, 2 test
    for c in range(len(folder.classes)):
        at = (y[order] == c).nonzero().squeeze(1)
        n_val, n_test = (math.floor(f * len(at) + 0.5) for f in (val_fraction, test_fraction))
        part[at[:n_val]] = 1
        part[at[n_val : n_val + n_test]] = 2
    splits = {}
    for k, name in enumerate(("train", "val", "test")):
        index = order[part == k]
        if len(index) == 0:
            raise DataError(
                f"the {name} split of {root} is empty ({len(y)} readable images in "
                f"{len(folder.classes)} classes, dataset.val_fraction {val_fraction}, "
                f"dataset.test_fraction {test_fraction}): add images or change the fractions"
            )
        splits[name] = Split(x[index], y[index])
    return RawDataset(splits=splits, levels=256, class_names=list(folder.classes))


def _read_image(path: str, *, mode: Literal["L", "RGB"], size: int) -> Image.Image:
    """One image of a folder dataset, in `mode`, decoded no larger than needed to resize its
    short side to `size` (genlab.data.images: bounded, 16-bit grey as `genlab score` reads it)."""
    from PIL import ImageOps

    with open_image(path, at_least=(size, size)) as image:
        # Cameras store photos sideways plus an EXIF rotation tag.
        image = eight_bit(ImageOps.exif_transpose(image))
        return image.convert(mode)  # reads the pixels: a broken file raises here


def _reason(exc: BaseException) -> str:
    """An exception as one short line (torchvision's download error puts the cause last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


DATASETS: dict[str, Callable[..., RawDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "folder": load_folder,
}


def load_dataset(params: DatasetParams) -> RawDataset:
    """Run the loader of `params.name` with the `dataset.<key>` values its signature names."""
    loader = DATASETS[params.name]
    return loader(**{key: getattr(params, key) for key in inspect.signature(loader).parameters})
