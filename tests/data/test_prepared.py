"""The prepared-data format: the Tomczak split of the digits, hashed, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from genlab.config import DatasetParams
from genlab.data.datamodule import PreparedDataModule
from genlab.data.prepared import SPLITS, load_split, prepare, read_meta, split_sha256
from genlab.errors import DataError

SIZES = {"train": 1000, "val": 350, "test": 447}
# Pinned once: a change here means the split (and so every published number) changed.
EXPECTED_SHA256 = {
    "train": "6bd92ee018c33ed937ba95d4ac973803e0330b40a8b444a3ea575b5da5942443",
    "val": "1304475d68021c32d6a3a85715732a18e6860dd1dbad93544fdf4777542b47c0",
    "test": "e3339ebd88659e1e7a2d8ade9d7aedd6dcb55ac3ef646b9ff091b5f488aa6e2b",
}
EXPECTED_DATA_SHA256 = "e2f02c74ff4fbadadd56803fa77a824a999a60bcc3d62814b8889c04f6ec4b75"


@pytest.fixture(scope="module")
def splits(prepared_digits: Path) -> dict:
    return {name: load_split(prepared_digits, name) for name in SPLITS}


def test_prepare_writes_only_the_splits_and_meta(prepared_digits: Path) -> None:
    assert sorted(p.name for p in prepared_digits.iterdir()) == [
        "meta.json",
        "test.pt",
        "train.pt",
        "val.pt",
    ]


def test_split_sizes_shapes_dtypes_and_levels(splits: dict) -> None:
    top = 0
    for name, split in splits.items():
        assert split.x.shape == (SIZES[name], 1, 8, 8)
        assert split.y.shape == (SIZES[name],)
        assert split.x.dtype == torch.uint8
        assert split.y.dtype == torch.int64
        assert int(split.x.min()) == 0 and int(split.x.max()) <= 16
        assert set(split.y.tolist()) == set(range(10))
        top = max(top, int(split.x.max()))
    assert top == 16  # the 17 levels are all reachable


def test_meta_json_fields(prepared_digits: Path) -> None:
    raw = json.loads((prepared_digits / "meta.json").read_text())
    assert raw == {
        "dataset": "digits",
        "levels": 17,
        "shape": [1, 8, 8],
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "splits": {name: {"n": SIZES[name], "sha256": EXPECTED_SHA256[name]} for name in SPLITS},
        "data_sha256": EXPECTED_DATA_SHA256,
    }
    meta = read_meta(prepared_digits)
    assert meta.shape == (1, 8, 8)
    assert meta.dims == 64
    assert meta.num_classes == 10
    assert meta.data_sha256 == EXPECTED_DATA_SHA256


def test_hashes_are_of_contents_and_stable_across_prepares(
    prepared_digits: Path, splits: dict, tmp_path: Path
) -> None:
    again = prepare(DatasetParams(), tmp_path / "elsewhere")
    assert again.to_json() == read_meta(prepared_digits).to_json()
    for name, split in splits.items():
        assert split_sha256(split) == EXPECTED_SHA256[name]


def test_splits_are_sklearn_digits_in_order(splits: dict) -> None:
    bunch = load_digits()
    x = np.concatenate([splits[name].x.numpy() for name in SPLITS])  # (1797, 1, 8, 8)
    y = np.concatenate([splits[name].y.numpy() for name in SPLITS])
    np.testing.assert_array_equal(x[:, 0].astype(np.float64), bunch.images)
    np.testing.assert_array_equal(y, bunch.target)
    # First 1000 train, next 350 validation, last 447 test.
    np.testing.assert_array_equal(splits["val"].y.numpy(), bunch.target[1000:1350])
    np.testing.assert_array_equal(splits["test"].y.numpy(), bunch.target[-447:])


def test_load_split_detects_a_tampered_file(prepared_digits: Path, tmp_path: Path) -> None:
    copy = tmp_path / "prepared"
    shutil.copytree(prepared_digits, copy)
    blob = torch.load(copy / "val.pt", weights_only=True)
    blob["x"][3, 0, 4, 4] = (blob["x"][3, 0, 4, 4] + 1) % 17
    torch.save(blob, copy / "val.pt")
    with pytest.raises(DataError, match=r"val\.pt does not match meta\.json"):
        load_split(copy, "val")
    load_split(copy, "train")  # the untouched splits still load


def test_read_meta_missing_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"meta\.json not found"):
        read_meta(tmp_path)


def test_prepare_replaces_an_existing_dir_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "data" / "prepared"
    out.mkdir(parents=True)
    (out / "stale.pt").write_bytes(b"old")
    (out / "meta.json").write_text("{}")
    prepare(DatasetParams(), out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.pt", "train.pt", "val.pt"]
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]
    assert read_meta(out).data_sha256 == EXPECTED_DATA_SHA256


def _train_labels(prepared: Path, seed: int) -> torch.Tensor:
    dm = PreparedDataModule(prepared, batch_size=100, seed=seed)
    dm.setup("fit")
    return torch.cat([y for _, y in dm.train_dataloader()])


def test_datamodule_batches(prepared_digits: Path) -> None:
    dm = PreparedDataModule(prepared_digits, batch_size=64, seed=0)
    dm.setup("fit")
    for loader, n in (
        (dm.train_dataloader(), 1000),
        (dm.val_dataloader(), 350),
        (dm.test_dataloader(), 447),
    ):
        x, y = next(iter(loader))
        assert x.dtype == torch.uint8 and x.shape == (64, 1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (64,)
        assert sum(len(b[0]) for b in loader) == n
    # Validation and test keep the split order.
    val = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(val, load_split(prepared_digits, "val").y)
    test = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(test, load_split(prepared_digits, "test").y)


def test_datamodule_fits_without_the_test_split(prepared_digits: Path, tmp_path: Path) -> None:
    """Setting up for a fit reads train and validation only: with test.pt gone, both loaders
    work; only asking for the test loader reads (and here fails on) the test split."""
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_digits, prepared)
    (prepared / "test.pt").unlink()
    dm = PreparedDataModule(prepared, batch_size=100, seed=0)
    dm.setup("fit")
    assert sum(len(y) for _, y in dm.train_dataloader()) == SIZES["train"]
    assert sum(len(y) for _, y in dm.val_dataloader()) == SIZES["val"]
    with pytest.raises(FileNotFoundError, match=r"test\.pt"):
        dm.test_dataloader()


def test_datamodule_training_order_is_seeded(prepared_digits: Path) -> None:
    a = _train_labels(prepared_digits, seed=0)
    assert torch.equal(a, _train_labels(prepared_digits, seed=0))
    assert not torch.equal(a, _train_labels(prepared_digits, seed=1))
    # A permutation of the training split, not the split order.
    train_y = load_split(prepared_digits, "train").y
    assert torch.equal(a.sort().values, train_y.sort().values)
    assert not torch.equal(a, train_y)
