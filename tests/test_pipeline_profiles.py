"""Each data-size profile's tiny variant (`genlab profile <name> ci`) runs a real `dvc repro` end to
end on small files in the format that profile reads: MNIST idx files, CIFAR-10 python batches, a
folder of images. The profile's data settings and trainer flags stay as written; the ci profile
shrinks the networks and the evaluation and puts the run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from formats import accept_cifar_in_subprocesses, write_cifar, write_idx_dataset
from genlab import paths
from genlab.config import load_params
from genlab.evaluation import vocabulary as v
from test_pipeline import copy_project, run

FAMILIES = ["pixelcnn", "flow", "vae", "diffusion", "ebm", "gan"]


def _tiny_variant(root: Path, profile: str, override: dict, env: dict | None = None) -> Path:
    """The project at `root` with `genlab profile <profile> ci <override>` applied (through the
    real command), then `dvc repro`; the prepared data's meta."""
    copy_project(root)
    extra = root.parent / f"{root.name}-override.yaml"
    extra.write_text(yaml.safe_dump(override))
    run(["genlab", "profile", profile, "ci", str(extra)], root)
    params = load_params(root / "params.yaml")
    run(["dvc", "repro"], root, env)
    for family in params.families:
        metrics = json.loads((root / paths.family_metrics(family, 0)).read_text())
        assert metrics[v.FID] >= 0, family
    summary = (root / paths.REPORT_SUMMARY).read_text()
    assert "## Compute" in summary and all(f in summary for f in params.families)
    return root


def _shape(root: Path) -> tuple[list[int], int]:
    meta = json.loads((root / paths.PREPARED / "meta.json").read_text())
    return meta["shape"], meta["levels"]


def _small_evaluation(n: int) -> dict:
    return {"evaluate": {"num_samples": n}, "dataset": {"val_size": n}}


def test_the_mnist_profile_runs_end_to_end_on_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_idx_dataset(raw, "MNIST", n_train=260, n_test=80)
    override = _small_evaluation(60) | {"families": ["vae", "gan"]}
    override["dataset"] |= {"root": str(raw), "download": False}
    override["evaluate"]["scored_images"] = 30  # of the 80 test images, as the profile bounds it
    override["representation"] = {"probe_images": 100}  # of the training images
    root = _tiny_variant(tmp_path / "repo", "mnist", override)
    assert _shape(root) == ([1, 28, 28], 256)
    vae = json.loads((root / paths.family_metrics("vae", 0)).read_text())
    assert 0 <= vae[v.probe_acc("test")] <= 1
    assert vae[v.SCORED_IMAGES] == 30 and v.SCORED_IMAGES not in json.loads(
        (root / paths.family_metrics("gan", 0)).read_text()
    )


@pytest.mark.slow
def test_the_mnist_profile_trains_every_family_at_28_pixels(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_idx_dataset(raw, "MNIST", n_train=260, n_test=80)
    override = _small_evaluation(60) | {"families": FAMILIES}
    override["dataset"] |= {"root": str(raw), "download": False}
    _tiny_variant(tmp_path / "repo", "mnist", override)


@pytest.mark.slow
def test_the_cifar10_profile_runs_end_to_end_on_python_batches(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_cifar(raw, n_train=300, n_test=80)
    site = accept_cifar_in_subprocesses(raw, tmp_path / "site")
    override = _small_evaluation(60) | {"families": FAMILIES}
    override["dataset"] |= {"root": str(raw), "download": False}
    root = _tiny_variant(tmp_path / "repo", "cifar10", override, {"PYTHONPATH": str(site)})
    assert _shape(root) == ([3, 32, 32], 256)


def _image_folder(root: Path, per_class: int, size: int) -> Path:
    """Three classes of RGB PNGs, larger than `size` and not square (prepare resizes and crops)."""
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(min(255, c + 3 * i) for c in colour)
            image = Image.new("RGB", (size + 8, size + 4), shade)
            image.putpixel((i % size, i % size), (255, 255, 255))
            image.save(folder / f"{i:03d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64])
def test_the_folder_profiles_run_end_to_end_on_a_folder_of_images(
    tmp_path: Path, size: int
) -> None:
    images = _image_folder(tmp_path / "images", per_class=200, size=size)
    override = {
        "dataset": {"name": "folder", "path": str(images), "val_fraction": 0.2},
        "evaluate": {"num_samples": None},
    }
    root = _tiny_variant(tmp_path / "repo", f"folder-{size}", override)
    assert _shape(root) == ([3, size, size], 256)
    # The profile's families: every one at 32 px; folder-64 leaves PixelCNN out (its samples
    # take 12288 sequential passes at 64 px RGB: hours on a CPU).
    trained = load_params(root / "params.yaml").families
    assert trained == (FAMILIES if size == 32 else [f for f in FAMILIES if f != "pixelcnn"])
