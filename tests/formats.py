"""Small datasets in the real on-disk formats users bring: MNIST's idx files and CIFAR-10's
pickled python batches (the tests never download). Shared by the dataset tests and the tiny
pipeline runs of the profiles."""

from __future__ import annotations

import hashlib
import pickle
import struct
import textwrap
from pathlib import Path

import numpy as np

CIFAR_FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "f", "g", "h", "i", "j"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of LeCun's MNIST files: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian
    int32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_idx_dataset(root: Path, folder: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """<root>/<folder>/raw/ with the four uncompressed idx files (torchvision reads only these
    names; a .gz is extracted only by download(), after checking the official md5), random
    28x28 images and labels 0..9."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def write_cifar(
    root: Path, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cifar-10-batches-py as the official archive holds it: pickled dicts with `data` rows of
    3072 bytes (the red, green, blue 32x32 planes) and `labels`; batches.meta holds the names.
    Returns train x, train y, test x, test y."""
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, n_train + n_test)
    per_batch = n_train // 5
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        batch = {"data": x[rows], "labels": y[rows].tolist()}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch))
    test = {"data": x[n_train:], "labels": y[n_train:].tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_NAMES}))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def cifar_md5s(root: Path) -> dict[str, str]:
    """The md5 of every file written by `write_cifar`, by name."""
    folder = root / CIFAR_FOLDER
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def accept_cifar_in_subprocesses(root: Path, site: Path) -> Path:
    """A `sitecustomize.py` in `site` (put it on PYTHONPATH) that, in every Python process of a
    real `dvc repro`, gives torchvision's CIFAR10 the md5s of the files under `root` once
    torchvision.datasets.cifar is imported (and costs nothing in processes that never import
    it). torchvision checks each CIFAR file against the official md5 and no option turns that
    off; every other line of the real class runs as on the real data."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""\
            import importlib.abc, importlib.machinery, sys

            MD5 = {cifar_md5s(root)!r}


            def _patch(module):
                cls = module.CIFAR10
                cls.train_list = [[n, MD5[n]] for n, _ in cls.train_list]
                cls.test_list = [[n, MD5[n]] for n, _ in cls.test_list]
                cls.meta = dict(cls.meta, md5=MD5[cls.meta["filename"]])


            class _Finder(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path, target=None):
                    if name != "torchvision.datasets.cifar":
                        return None
                    spec = importlib.machinery.PathFinder.find_spec(name, path)
                    run = spec.loader.exec_module

                    def exec_module(module):
                        run(module)
                        _patch(module)

                    spec.loader.exec_module = exec_module
                    return spec


            sys.meta_path.insert(0, _Finder())
            """
        )
    )
    return site
