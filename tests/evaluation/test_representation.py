"""Representation: the linear probe, slerp, and the latent grids on tiny real models (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genlab.config import RepresentationParams
from genlab.data.datasets import Split
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation import vocabulary as v
from genlab.evaluation.grids import to_uint8_pixels
from genlab.evaluation.intervals import wilson
from genlab.evaluation.representation import (
    interpolation_grid,
    interpolation_pairs,
    latents,
    linear_probe,
    probe_metrics,
    represent,
    slerp,
    traversal_grid,
)
from genlab.models import MODELS, GenerativeModule

SCALE = 4  # image_grid's default upscaling, which is also its padding


def make(family: str, tiny: dict, meta, **overrides) -> GenerativeModule:
    torch.manual_seed(0)
    return MODELS[family](
        image_shape=meta.shape,
        levels=meta.levels,
        num_classes=len(meta.class_names),
        **(tiny[family] | overrides),
    ).eval()


def tile(grid: np.ndarray, row: int, col: int, h: int, w: int) -> np.ndarray:
    """The (h*SCALE, w*SCALE, 3) pixels of one image in an image_grid."""
    top, left = SCALE + row * (h * SCALE + SCALE), SCALE + col * (w * SCALE + SCALE)
    return grid[top : top + h * SCALE, left : left + w * SCALE]


def pixels(image: torch.Tensor, levels: int) -> np.ndarray:
    """What image_grid draws for one grey image (1, 1, h, w): (h*SCALE, w*SCALE, 3) uint8."""
    p = to_uint8_pixels(image[0, 0], levels)  # (h, w)
    p = p.repeat_interleave(SCALE, 0).repeat_interleave(SCALE, 1)
    return p[..., None].expand(-1, -1, 3).numpy()


def grid_size(rows: int, cols: int, h: int, w: int) -> tuple[int, int, int]:
    return (rows * (h * SCALE + SCALE) + SCALE, cols * (w * SCALE + SCALE) + SCALE, 3)


@pytest.fixture(scope="module")
def digits(prepared_digits: Path):
    meta = read_meta(prepared_digits)
    return meta, load_split(prepared_digits, "train"), load_split(prepared_digits, "test")


# -- the probe ----------------------------------------------------------------------------------
def test_probe_scores_one_on_separable_features_and_chance_on_noise() -> None:
    g = torch.Generator().manual_seed(0)
    k, d = 4, 6
    centres = 10 * torch.randn(k, d, generator=g)
    y_train, y_test = torch.arange(400) % k, torch.arange(200) % k
    z_train = centres[y_train] + torch.randn(400, d, generator=g)
    z_test = centres[y_test] + torch.randn(200, d, generator=g)
    assert linear_probe(z_train, y_train, z_test, y_test, c=1.0) == 1.0

    # Labels independent of the features: nothing to learn, accuracy near 1/k.
    noise_train, noise_test = torch.randn(400, d, generator=g), torch.randn(2000, d, generator=g)
    labels_train = torch.randint(0, k, (400,), generator=g)
    labels_test = torch.randint(0, k, (2000,), generator=g)
    acc = linear_probe(noise_train, labels_train, noise_test, labels_test, c=1.0)
    assert abs(acc - 1 / k) < 0.05, acc
    # Deterministic: the same fit gives the same accuracy.
    assert acc == linear_probe(noise_train, labels_train, noise_test, labels_test, c=1.0)


def test_probe_on_raw_pixels_beats_chance_clearly(digits) -> None:
    _, train, test = digits
    acc = linear_probe(
        train.x.flatten(1).float(), train.y, test.x.flatten(1).float(), test.y, c=1.0
    )
    assert acc > 0.85, acc


# -- slerp --------------------------------------------------------------------------------------
def test_slerp_hits_the_endpoints_and_keeps_the_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)  # |a| = |b| per row
    t = torch.linspace(0, 1, 7)
    path = slerp(a, b, t)  # (7, 3, 16)
    assert path.shape == (7, 3, 16) and path.dtype == a.dtype
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    torch.testing.assert_close(path.norm(dim=-1), a.norm(dim=-1).expand(7, 3))
    # The midpoint lies on the bisector, at equal angles from a and b; a float t gives one point.
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid, path[3])
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(cos(mid, a, dim=-1), cos(mid, b, dim=-1))


def test_slerp_of_parallel_vectors_is_linear() -> None:
    a = torch.tensor([1.0, 2.0, -2.0])
    t = torch.linspace(0, 1, 5)
    for b in (2 * a, -a, a):  # parallel, opposite, identical: sin(theta) = 0
        path = slerp(a, b, t)
        assert torch.isfinite(path).all()
        torch.testing.assert_close(path, (1 - t)[:, None] * a + t[:, None] * b)


# -- latents ------------------------------------------------------------------------------------
def test_latents_are_flat_float_features_in_any_batching(digits, tiny: dict) -> None:
    meta, _, test = digits
    x, y = test.x[:20], test.y[:20]
    vae = make("vae", tiny, meta)
    z = latents(vae, x, batch_size=7)
    assert z.shape == (20, tiny["vae"]["latent_dim"]) and z.dtype == torch.float32
    torch.testing.assert_close(z, latents(vae, x, batch_size=20))
    flow = make("flow", tiny, meta)
    assert latents(flow, x, y, batch_size=8).shape == (20, flow.dims)  # labels ignored
    conditional = make("vae", tiny, meta, conditional=True)
    with pytest.raises(ValueError, match="class-conditional"):
        latents(conditional, x, batch_size=8)
    zc = latents(conditional, x, y, batch_size=8)
    assert not torch.equal(zc, latents(conditional, x, (y + 1) % 10, batch_size=8))
    with pytest.raises(ValueError, match="no latent space"):
        latents(make("pixelcnn", tiny, meta), x, batch_size=8)


# -- grids --------------------------------------------------------------------------------------
def test_interpolation_pairs_follow_the_classes() -> None:
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0])  # class 0 at 1, 3, 6; class 1 at 2, 5; class 2 at 0, 4
    assert interpolation_pairs(y, num_classes=3, pairs=4, same_class=False) == [
        (1, 2, 0),  # first of class 0 -> first of class 1
        (2, 0, 1),
        (0, 1, 2),  # class 2 wraps round to class 0
        (3, 5, 0),  # second pass over the classes: the second images
    ]
    # Same class: the 1st and 2nd of each class; the 3rd and 4th of class 0 do not exist.
    assert interpolation_pairs(y, num_classes=3, pairs=4, same_class=True) == [
        (1, 3, 0),
        (2, 5, 1),
        (0, 4, 2),
    ]


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_interpolation_grid_ends_at_the_decoded_test_images(
    digits, tiny: dict, conditional: bool
) -> None:
    meta, _, test = digits
    _, h, w = meta.shape
    model = make("vae", tiny, meta, conditional=conditional)
    pairs, steps = 3, 5
    grid = interpolation_grid(model, test.x, test.y, pairs=pairs, steps=steps, levels=meta.levels)
    assert grid.dtype == np.uint8 and grid.shape == grid_size(pairs, steps, h, w)
    rows = interpolation_pairs(test.y, num_classes=10, pairs=pairs, same_class=conditional)
    for r, (a, b, k) in enumerate(rows):
        label = torch.tensor([k]) if conditional else None
        for col, i in ((0, a), (steps - 1, b)):
            image = model.decode(model.encode(test.x[i : i + 1], label), label)
            np.testing.assert_array_equal(tile(grid, r, col, h, w), pixels(image, meta.levels))
        if conditional:
            assert test.y[a] == test.y[b] == k
        else:
            assert (test.y[a], test.y[b]) == (k, (k + 1) % 10)


def test_interpolation_grid_skips_classes_with_too_few_images(digits, tiny: dict) -> None:
    meta, _, test = digits
    _, h, w = meta.shape
    model = make("vae", tiny, meta, conditional=True)
    keep = torch.cat([torch.nonzero(test.y == 0).flatten(), torch.nonzero(test.y == 1)[:1, 0]])
    grid = interpolation_grid(
        model, test.x[keep], test.y[keep], pairs=2, steps=3, levels=meta.levels
    )
    assert grid.shape == grid_size(1, 3, h, w)  # class 1 has one image: its row is skipped
    with pytest.raises(ValueError, match="too few"):
        interpolation_grid(model, test.x[:1], test.y[:1], pairs=2, steps=3, levels=meta.levels)


def test_traversal_only_for_a_latent_smaller_than_the_image(digits, tiny: dict) -> None:
    meta, _, test = digits
    _, h, w = meta.shape
    x, y = test.x[:50], test.y[:50]
    flow = make("flow", tiny, meta)
    assert traversal_grid(flow, x, y, dims=4, steps=5, levels=meta.levels) is None

    vae = make("vae", tiny, meta, latent_dim=6)
    grid = traversal_grid(vae, x, y, dims=4, steps=5, levels=meta.levels)
    assert grid is not None and grid.dtype == np.uint8
    assert grid.shape == grid_size(4, 5, h, w)
    # More rows asked than latent units: one row per unit.
    grid = traversal_grid(vae, x, y, dims=10, steps=5, levels=meta.levels)
    assert grid is not None and grid.shape == grid_size(6, 5, h, w)


# -- the whole stage ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "overrides", "has_traversal"),
    [
        ("vae", {}, True),
        ("flow", {}, False),
        ("vae", {"conditional": True}, True),
        ("diffusion", {"conditional": True}, False),
    ],
    ids=["vae", "flow", "conditional-vae", "conditional-diffusion"],
)
def test_represent_reports_a_probe_accuracy_and_grids(
    digits, tiny: dict, family: str, overrides: dict, has_traversal: bool
) -> None:
    meta, train, test = digits
    _, h, w = meta.shape
    model = make(family, tiny, meta, **overrides)
    params = RepresentationParams(
        interpolation_pairs=3, interpolation_steps=4, traversal_dims=2, traversal_steps=3
    )
    out = represent(
        model,
        Split(train.x[:200], train.y[:200]),
        Split(test.x[:100], test.y[:100]),
        params,
        levels=meta.levels,
        batch_size=64,
    )
    key = v.probe_acc("test")
    assert set(out.metrics) == {key, v.ci_low(key), v.ci_high(key)}
    # A Wilson interval of the accuracy over the 100 held-out images.
    assert 0.0 <= out.metrics[v.ci_low(key)] <= out.metrics[key] <= out.metrics[v.ci_high(key)] <= 1
    expected = wilson(round(out.metrics[key] * 100), 100, confidence=0.95)
    assert (out.metrics[v.ci_low(key)], out.metrics[v.ci_high(key)]) == (
        expected.low,
        expected.high,
    )
    assert out.interpolation.shape == grid_size(3, 4, h, w)
    if has_traversal:
        assert out.traversal is not None and out.traversal.shape == grid_size(2, 3, h, w)
    else:
        assert out.traversal is None


def test_probe_metrics_name_the_split_and_widen_with_the_confidence() -> None:
    """The probe's accuracy on n held-out images: named after the split it was measured on
    (`val` when tuning), with Wilson's interval at the protocol's confidence."""
    narrow = probe_metrics(0.8, 50, "val", 0.8)
    wide = probe_metrics(0.8, 50, "val", 0.99)
    key = v.probe_acc("val")
    assert set(narrow) == set(wide) == {key, v.ci_low(key), v.ci_high(key)}
    assert narrow[key] == wide[key] == 0.8
    assert wide[v.ci_low(key)] < narrow[v.ci_low(key)] < 0.8 < narrow[v.ci_high(key)]
    assert narrow[v.ci_high(key)] < wide[v.ci_high(key)]
    expected = wilson(40, 50, confidence=0.8)
    assert (narrow[v.ci_low(key)], narrow[v.ci_high(key)]) == (expected.low, expected.high)
    perfect = probe_metrics(1.0, 50, "test", 0.95)
    assert perfect[v.ci_high(v.probe_acc("test"))] == 1.0 > perfect[v.ci_low(v.probe_acc("test"))]
