"""The evaluator classifier and the out-of-distribution sets at every image geometry genlab loads
(issue 7): 8x8 digits, 28x28 MNIST, 32x32 CIFAR-10, folders of 8..64 pixels; 1 or 3 channels;
256 levels and the digits' 17."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genlab.config import EvaluatorParams, TrainerParams
from genlab.data.datasets import Split
from genlab.data.prepared import SPLITS, Meta, split_sha256
from genlab.evaluation.evaluator import (
    Classifier,
    load_classifier,
    save_evaluator,
    stage_sizes,
    train_evaluator,
)
from genlab.evaluation.ood import ood_sets

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 16, 16)]
OOD_NAMES = ["noise", "inverted", "hflip", "vflip", "rot90", "natural"]


def shape_id(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def images(n: int, shape: tuple[int, int, int], levels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(levels, (n, *shape), generator=g, dtype=torch.uint8)


# -- the evaluator classifier ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (8, [8, 4]),  # the digits: two stages, as before
        (16, [16, 8, 4]),
        (28, [28, 14, 7, 4]),
        (32, [32, 16, 8, 4]),
        (64, [64, 32, 16, 8, 4]),
        (4, [4, 2]),  # at least one pooling
    ],
)
def test_stage_sizes(size: int, sizes: list[int]) -> None:
    assert stage_sizes(size) == sizes


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_classifier_depth_follows_the_image(shape: tuple[int, int, int], levels: int) -> None:
    c, h, _ = shape
    torch.manual_seed(0)
    net = Classifier(
        in_channels=c, levels=levels, num_classes=10, width=4, feature_dim=12, image_size=h
    ).eval()
    pools = [m for m in net.convs if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == len(stage_sizes(h)) - 1
    x = images(3, shape, levels)
    last = net.convs(x.float())  # the map global pooling reads
    assert last.shape[-2:] == (stage_sizes(h)[-1],) * 2
    assert last.shape[-1] <= 4
    features, logits = net(x)
    assert features.shape == (3, 12) and logits.shape == (3, 10)
    assert torch.isfinite(logits).all() and (features >= 0).all()


def test_digits_classifier_is_unchanged_by_the_size_rule() -> None:
    """image_size 8 (and an evaluator file without the key) is the two-stage network."""
    torch.manual_seed(0)
    sized = Classifier(in_channels=1, levels=17, num_classes=10, image_size=8)
    torch.manual_seed(0)
    default = Classifier(in_channels=1, levels=17, num_classes=10)
    assert repr(sized) == repr(default)
    widths = [m.out_channels for m in default.convs if isinstance(m, torch.nn.Conv2d)]
    assert widths == [32, 32, 64, 64]
    assert default.hidden.in_features == 128


def test_evaluator_file_without_image_size_loads_as_the_digits_network(tmp_path: Path) -> None:
    net = Classifier(in_channels=1, levels=17, num_classes=10, width=4, feature_dim=8)
    path = tmp_path / "evaluator.pt"
    save_evaluator(path, net, val_accuracy=0.5, dataset_sha256="0" * 64)
    blob = torch.load(path, weights_only=True)
    del blob["config"]["image_size"]  # as written before the key existed
    torch.save(blob, path)
    loaded = load_classifier(path)
    x = images(2, (1, 8, 8), 17)
    torch.testing.assert_close(loaded(x), net.eval()(x))


def write_prepared(out: Path, shape: tuple[int, int, int], levels: int, classes: int = 2) -> Path:
    """A prepared dataset in the on-disk format of `genlab.data.prepared` (split files plus
    meta.json): images whose mean brightness is their class, 8 per class and split."""
    out.mkdir(parents=True)
    splits = {}
    for i, name in enumerate(SPLITS):
        y = torch.arange(8 * classes) % classes
        g = torch.Generator().manual_seed(i)
        noise = torch.randint(levels // 4, (len(y), *shape), generator=g)
        x = (noise + y[:, None, None, None] * (levels // 2)).clamp(max=levels - 1).to(torch.uint8)
        splits[name] = Split(x=x, y=y)
        torch.save({"x": x, "y": y}, out / f"{name}.pt")
    meta = Meta(
        dataset="folder",
        levels=levels,
        shape=shape,
        class_names=[f"class{k}" for k in range(classes)],
        splits={n: {"n": len(s.y), "sha256": split_sha256(s)} for n, s in splits.items()},
    )
    (out / "meta.json").write_text(json.dumps(meta.to_json()))
    return out


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)], ids=shape_id)
def test_train_evaluator_builds_the_classifier_for_the_data(
    shape: tuple[int, int, int], tmp_path: Path
) -> None:
    prepared = write_prepared(tmp_path / "prepared", shape, 256)
    path = tmp_path / "evaluator.pt"
    params = EvaluatorParams(max_epochs=2, batch_size=8, width=4, feature_dim=8)
    result = train_evaluator(prepared, path, params=params, trainer=TrainerParams(), seed=0)
    net = load_classifier(path)
    assert net.config["image_size"] == shape[1]
    assert net.config["in_channels"] == shape[0] and net.config["levels"] == 256
    assert result.num_params == sum(p.numel() for p in net.parameters())
    features, logits = net(images(4, shape, 256))
    assert features.shape == (4, 8) and logits.shape == (4, 2)


# -- out-of-distribution sets -------------------------------------------------------------------


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_every_ood_set_has_the_data_shape_and_levels(
    shape: tuple[int, int, int], levels: int
) -> None:
    x = images(6, shape, levels)
    sets = ood_sets(OOD_NAMES, x, levels, seed=0)
    for name in OOD_NAMES:
        s = sets[name]
        assert s.dtype == torch.uint8 and s.shape == x.shape, name
        assert int(s.max()) <= levels - 1, name
    assert torch.equal(sets["inverted"].long() + x.long(), torch.full(x.shape, levels - 1))
    assert torch.equal(sets["rot90"].rot90(-1, dims=(-2, -1)), x)
    # Every set uses the whole range of levels, not the digits' 17 of 256.
    assert int(sets["noise"].max()) > levels // 2
    assert int(sets["natural"].max()) > levels // 4


def test_natural_images_are_colour_for_rgb_and_grey_for_one_channel() -> None:
    rgb = ood_sets(["natural"], images(20, (3, 32, 32), 256), 256, seed=0)["natural"]
    grey = ood_sets(["natural"], images(20, (1, 32, 32), 256), 256, seed=0)["natural"]
    # The photographs have colour: the channels of an RGB crop differ.
    assert (rgb[:, 0].float() - rgb[:, 2].float()).abs().mean() > 5
    assert grey.shape == (20, 1, 32, 32)
    # The same crops (same seed): the grey image is the luma of the colour one, up to rounding.
    luma = (torch.tensor([0.299, 0.587, 0.114])[:, None, None] * rgb.float()).sum(1, keepdim=True)
    assert (luma - grey.float()).abs().max() <= 1.5


def test_natural_images_need_one_or_three_channels() -> None:
    with pytest.raises(ValueError, match="grey or RGB"):
        ood_sets(["natural"], images(2, (2, 16, 16), 256), 256, seed=0)
