"""Real datasets on tiny files the tests write in the real on-disk formats: MNIST/Fashion-MNIST
idx files, CIFAR-10 pickled batches, a folder of PNG/JPEG images with a corrupt one.

No network: the download path is exercised against a closed local port, so it fails at once.
"""

from __future__ import annotations

import inspect
import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from formats import cifar_md5s, write_cifar, write_idx_dataset
from genlab.config import DatasetParams, parse_params
from genlab.data.datasets import DATASETS, load_dataset
from genlab.data.prepared import SPLITS, load_split, prepare, read_meta
from genlab.errors import ConfigError, DataError

N_TRAIN, N_TEST = 30, 10
IDX = {"mnist": MNIST, "fashion_mnist": FashionMNIST}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _closed_port_url() -> str:
    """An http URL on which nothing listens: a download from it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _write_idx_dataset(root: Path, cls: type[MNIST]) -> dict[str, np.ndarray]:
    return write_idx_dataset(root, cls.__name__, N_TRAIN, N_TEST)


@pytest.mark.parametrize("name", sorted(IDX))
def test_idx_datasets_load_with_official_test_and_last_val_size_as_val(
    tmp_path: Path, name: str
) -> None:
    arrays = _write_idx_dataset(tmp_path, IDX[name])
    # download: true (the default) reads files already there without touching the network.
    raw = load_dataset(DatasetParams(name=name, root=str(tmp_path), val_size=8))
    assert raw.levels == 256
    assert raw.class_names == IDX[name].classes
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    expected = {
        "train": (train_x[:22], train_y[:22]),
        "val": (train_x[22:], train_y[22:]),  # the last val_size of the official train set
        "test": (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    }
    for split, (x, y) in expected.items():
        got = raw.splits[split]
        assert got.x.dtype == torch.uint8 and got.x.shape == (len(x), 1, 28, 28)
        np.testing.assert_array_equal(got.x[:, 0].numpy(), x)
        np.testing.assert_array_equal(got.y.numpy(), y)


def _write_cifar(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return write_cifar(root, N_TRAIN, N_TEST)


def _accept_written_cifar(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """torchvision's CIFAR10 checks every file against the md5 of the official one
    (`_check_integrity`, also before `download()` skips the download), and no option turns that
    off. The test writes its own files, so it puts their md5s in the class's file lists; every
    other line of the real class (existence and md5 checks, unpickling, the meta file) runs as
    it does on the real data."""
    md5 = cifar_md5s(root)
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", CIFAR10.meta | {"md5": md5[CIFAR10.meta["filename"]]})


def test_cifar10_loads_pickled_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_x, train_y, test_x, test_y = _write_cifar(tmp_path)
    _accept_written_cifar(monkeypatch, tmp_path)
    raw = load_dataset(DatasetParams(name="cifar10", root=str(tmp_path), val_size=6))
    assert raw.levels == 256
    assert raw.class_names[:3] == ["airplane", "automobile", "bird"]
    assert [len(raw.splits[s]) for s in SPLITS] == [24, 6, 10]
    for split, rows, labels in (
        ("train", train_x[:24], train_y[:24]),
        ("val", train_x[24:], train_y[24:]),  # = data_batch_5: the last 6 training images
        ("test", test_x, test_y),
    ):
        got = raw.splits[split]
        assert got.x.dtype == torch.uint8 and got.x.shape == (len(rows), 3, 32, 32)
        # Row layout -> (C, H, W): each row is the R, G, B planes one after the other.
        np.testing.assert_array_equal(got.x.numpy(), rows.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(got.y.numpy(), labels)


def test_cifar10_files_failing_the_md5_check_are_a_clear_error(tmp_path: Path) -> None:
    _write_cifar(tmp_path)  # present, but not the official files
    with pytest.raises(DataError) as info:
        load_dataset(DatasetParams(name="cifar10", root=str(tmp_path), download=False))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "cannot read" in message


EXPECTED_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion_mnist": ("FashionMNIST/raw", ["train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]),
    "cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_missing_files_offline_name_the_files_and_the_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(DatasetParams(name=name, root=str(tmp_path / "raw"), download=False))
    message = str(info.value)
    folder, files = EXPECTED_FILES[name]
    assert "\n" not in message
    assert f"not found in {tmp_path / 'raw' / folder} and dataset.download is false" in message
    assert all(file in message for file in files)
    assert not (tmp_path / "raw").exists()  # nothing written


def test_failed_download_is_the_same_clear_error_and_keeps_the_prepared_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real download code, pointed at a port nothing listens on: refused at once, with or
    # without a network.
    monkeypatch.setattr(MNIST, "mirrors", [_closed_port_url()])
    monkeypatch.setattr(CIFAR10, "url", _closed_port_url() + CIFAR10.filename)
    out = tmp_path / "data" / "prepared"
    _write_tiny_classes(tmp_path / "images", {"a": 10})
    prepare(_folder(tmp_path / "images", image_size=8), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name, (folder, files) in EXPECTED_FILES.items():
        if name == "fashion_mnist":
            continue  # same code path as mnist
        params = DatasetParams(name=name, root=str(tmp_path / "raw"), download=True)
        with pytest.raises(DataError) as info:
            prepare(params, out)
        message = str(info.value)
        assert "\n" not in message
        assert f"not found in {tmp_path / 'raw' / folder} and the download failed" in message
        assert all(file in message for file in files)
    # The previous prepared data is untouched and no temporary folder is left behind.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]


def test_val_size_must_leave_training_images(tmp_path: Path) -> None:
    _write_idx_dataset(tmp_path, MNIST)
    with pytest.raises(DataError, match=r"dataset\.val_size 30 leaves no training images"):
        load_dataset(DatasetParams(name="mnist", root=str(tmp_path), val_size=N_TRAIN))


# --- folder ----------------------------------------------------------------------------------

RED, BLUE, GREEN = (200, 30, 10), (0, 0, 255), (0, 255, 0)


def _image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _write_folder(root: Path) -> None:
    """3 classes, 16 files: RGB PNG and JPEG of several sizes, a grayscale PNG and JPEG, a
    banded PNG, one corrupt PNG, and a text file that is not an image."""
    rng = _rng(2)
    for c in ("cat", "dog", "fox"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _image(rng, (40, 24), "RGB").save(root / c / f"{i}.png")
            _image(rng, (24, 40), "RGB").save(root / c / f"{i}.jpg", quality=90)
    _image(rng, (20, 20), "L").save(root / "cat" / "gray.png")
    _image(rng, (30, 20), "L").save(root / "dog" / "gray.jpeg")
    # 64x32: the centre square red, blue and green bands that the centre crop cuts away.
    banded = np.zeros((32, 64, 3), dtype=np.uint8)
    banded[:, :16], banded[:, 16:48], banded[:, 48:] = BLUE, RED, GREEN
    Image.fromarray(banded).save(root / "fox" / "banded.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "fox" / "notes.txt").write_text("not an image: ignored")


def _folder(path: Path, **kw: object) -> DatasetParams:
    return DatasetParams(name="folder", path=str(path), **kw)  # type: ignore[arg-type]


def _all(raw) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.cat([raw.splits[s].x for s in SPLITS]),
        torch.cat([raw.splits[s].y for s in SPLITS]),
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_skips_the_corrupt_image_with_a_count_resizes_and_converts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, channels: int
) -> None:
    _write_folder(tmp_path / "images")
    params = _folder(
        tmp_path / "images", image_size=16, channels=channels, corrupt="skip", val_fraction=0.2
    )
    with caplog.at_level(logging.WARNING):
        raw = load_dataset(params)
    broken = tmp_path / "images" / "dog" / "broken.png"
    assert f"skipped 1 unreadable image(s) of 22: {broken}" in caplog.text
    assert raw.levels == 256 and raw.class_names == ["cat", "dog", "fox"]
    x, y = _all(raw)
    assert x.dtype == torch.uint8 and x.shape == (21, channels, 16, 16)
    assert torch.bincount(y).tolist() == [7, 7, 7]
    if channels == 3:
        # The grayscale files become RGB with three equal planes; the colour files do not.
        gray = (x[:, 0] == x[:, 1]).all(dim=(1, 2)) & (x[:, 1] == x[:, 2]).all(dim=(1, 2))
        assert int(gray.sum()) == 2
        # The banded image: short side resized to 16 (64x32 -> 32x16), centre cropped: red.
        red = torch.tensor(RED, dtype=torch.uint8)[:, None, None]
        banded = [img for img in x if (img[:, 2:-2, 2:-2] == red).all()]
        assert len(banded) == 1
        assert banded[0][0].float().mean() > 150  # edge pixels too are mostly red, not blue


def test_folder_corrupt_error_names_the_file(tmp_path: Path) -> None:
    _write_folder(tmp_path / "images")
    with pytest.raises(DataError) as info:
        load_dataset(_folder(tmp_path / "images", corrupt="error"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'images' / 'dog' / 'broken.png'}: unreadable image")
    assert "dataset.corrupt: skip" in message


def test_folder_16_bit_grayscale_is_rounded_to_8_bits(tmp_path: Path) -> None:
    """Pillow's own convert() clips 16-bit pixels at 255 (every value above 255 would read
    white); the loader rounds v * 255 / 65535 instead (genlab.data.images, as `genlab score`)."""
    (tmp_path / "images" / "scan").mkdir(parents=True)
    for i in range(10):
        pixels = np.full((12, 12), 40000 + 256 * i, dtype=np.uint16)
        Image.fromarray(pixels).save(tmp_path / "images" / "scan" / f"{i}.png")  # mode I;16
    x, _ = _all(load_dataset(_folder(tmp_path / "images", image_size=8, channels=1)))
    assert x.shape == (10, 1, 8, 8)
    assert sorted(int(img.unique()) for img in x) == list(range(156, 166))  # 155.6 -> 156


def _write_tiny_classes(root: Path, per_class: dict[str, int]) -> None:
    rng = _rng(3)
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            _image(rng, (8, 8), "RGB").save(root / c / f"{i:02d}.png")


def test_folder_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    _write_tiny_classes(tmp_path / "images", {"a": 10, "b": 20, "c": 5})
    params = _folder(tmp_path / "images", image_size=8, val_fraction=0.2, test_fraction=0.2)
    raw = load_dataset(params)
    counts = {s: torch.bincount(raw.splits[s].y, minlength=3).tolist() for s in SPLITS}
    # Per class: round(0.2 n) val, round(0.2 n) test, the rest train.
    assert counts == {"train": [6, 12, 3], "val": [2, 4, 1], "test": [2, 4, 1]}
    again = load_dataset(params)
    other = load_dataset(params.model_copy(update={"split_seed": 1}))
    for s in SPLITS:
        assert torch.equal(raw.splits[s].x, again.splits[s].x)
        assert torch.bincount(other.splits[s].y, minlength=3).tolist() == counts[s]
    assert not torch.equal(raw.splits["val"].x, other.splits["val"].x)
    # Every image in exactly one split.
    x, _ = _all(raw)
    assert len({bytes(img.numpy()) for img in x}) == 35


@pytest.mark.parametrize(
    ("layout", "says"),
    [
        ("missing", "is not a directory"),
        ("no-classes", "has no class sub-folders"),
        ("empty-class", "it holds no images"),
        ("only-corrupt", "none of its 1 image(s) can be read"),
        ("empty-split", "the val split of"),
    ],
)
def test_folder_layout_errors(tmp_path: Path, layout: str, says: str) -> None:
    root = tmp_path / "images"
    if layout == "no-classes":
        root.mkdir()
        _image(_rng(0), (8, 8), "RGB").save(root / "loose.png")
    elif layout == "empty-class":
        _write_tiny_classes(root, {"full": 5})
        (root / "empty").mkdir()
    elif layout == "only-corrupt":
        _write_tiny_classes(root, {"full": 5})
        (root / "bad").mkdir()
        (root / "bad" / "x.jpg").write_bytes(b"nope")
    elif layout == "empty-split":
        _write_tiny_classes(root, {"a": 2, "b": 2})  # round(0.1 * 2) = 0 val images per class
    with pytest.raises(DataError) as info:
        load_dataset(_folder(root, corrupt="skip"))
    assert "\n" not in str(info.value)
    assert says in str(info.value)
    if layout == "empty-class":
        assert str(root / "empty") in str(info.value)


def test_prepare_folder_end_to_end(tmp_path: Path) -> None:
    _write_folder(tmp_path / "images")
    params = _folder(tmp_path / "images", image_size=12, corrupt="skip", val_fraction=0.2)
    out = tmp_path / "data" / "prepared"
    meta = prepare(params, out)
    raw = json.loads((out / "meta.json").read_text())
    assert raw["dataset"] == "folder"
    assert raw["levels"] == 256
    assert raw["shape"] == [3, 12, 12]
    assert raw["class_names"] == ["cat", "dog", "fox"]
    assert sum(raw["splits"][s]["n"] for s in SPLITS) == 21
    assert read_meta(out) == meta
    for s in SPLITS:
        assert load_split(out, s).x.shape[1:] == (3, 12, 12)


# --- params ----------------------------------------------------------------------------------


def test_every_loader_reads_only_dataset_params() -> None:
    for name, loader in DATASETS.items():
        assert set(inspect.signature(loader).parameters) <= set(DatasetParams.model_fields), name


@pytest.mark.parametrize(
    ("dataset", "says"),
    [
        ({"name": "folder"}, "dataset: Value error, dataset.path is required"),
        ({"name": "folder", "path": "x", "val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
        ({"image_size": 4}, "dataset.image_size:"),
        ({"channels": 2}, "dataset.channels:"),
        ({"corrupt": "ignore"}, "dataset.corrupt:"),
        ({"name": "imagenet"}, "dataset.name:"),
    ],
)
def test_dataset_params_errors_name_the_key(dataset: dict, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"families": ["vae"], "dataset": dataset})
    assert "\n" not in str(info.value)
    assert says in str(info.value)


def test_keys_of_other_datasets_are_ignored_so_one_key_switches() -> None:
    params = parse_params({"families": ["vae"], "dataset": {"name": "mnist", "image_size": 64}})
    assert params.dataset.name == "mnist"
