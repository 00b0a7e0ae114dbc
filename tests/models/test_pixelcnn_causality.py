"""PixelCNN is autoregressive in raster-then-channel order with no blind spot (by gradients).

For every output position i = (row, col, channel), the gradient of its logits with respect to every
input at or after i is exactly zero; with enough layers, every input strictly before i has a
non-zero gradient (the gated PixelCNN's vertical/horizontal stacks leave no blind spot, unlike the
original masked PixelCNN whose receptive field misses the pixels above and to the right).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from genlab.models.pixelcnn import PixelCNN

SIZE = 4  # 4x4 images: 6 layers of 3x3 reach every earlier pixel


def order(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Positions (channel, row, col) in the model's order: raster over pixels, then channels."""
    c, h, w = shape
    return [(ch, r, col) for r, col in itertools.product(range(h), range(w)) for ch in range(c)]


def random_model(
    shape: tuple[int, int, int], conditional: bool, features: int | None = None
) -> PixelCNN:
    """Random weights; `features` per stack, 6 per image channel unless given."""
    torch.manual_seed(0)
    model = PixelCNN(
        image_shape=shape,
        levels=5,
        num_classes=3,
        channels=6 * shape[0] if features is None else features,
        num_layers=6,
        dropout=0.0,
        conditional=conditional,
    ).double()
    with torch.no_grad():  # no accidental zeros from initialisation
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def assert_autoregressive(model: PixelCNN, shape: tuple[int, int, int], y: torch.Tensor | None):
    positions = order(shape)
    for i, (ch, r, col) in enumerate(positions):
        x = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
        logits = model.net(x, y)  # (1, L, C, H, W)
        (grad,) = torch.autograd.grad(logits[0, :, ch, r, col].sum(), x)
        grad = grad[0]  # (C, H, W)
        for j, (ch2, r2, col2) in enumerate(positions):
            g = grad[ch2, r2, col2].item()
            if j >= i:
                assert g == 0.0, f"output {(ch, r, col)} sees input {(ch2, r2, col2)} (at/after)"
            else:
                assert g != 0.0, f"output {(ch, r, col)} is blind to input {(ch2, r2, col2)}"


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_output_depends_on_exactly_the_inputs_before_it(channels: int, conditional: bool):
    shape = (channels, SIZE, SIZE)
    y = torch.tensor([2]) if conditional else None
    assert_autoregressive(random_model(shape, conditional), shape, y)


def test_rgb_order_holds_when_features_do_not_split_evenly() -> None:
    """R -> G -> B within a pixel with groups of unequal size (7 features: 3, 2, 2), as the
    default 64 features per stack split for RGB images (22, 21, 21)."""
    shape = (3, SIZE, SIZE)
    assert_autoregressive(random_model(shape, conditional=False, features=7), shape, None)


def test_the_label_reaches_every_position() -> None:
    """The class embedding conditions every conditional, the first pixel's included."""
    model = random_model((1, SIZE, SIZE), conditional=True)
    x = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.float64)
    a = model.net(x, torch.tensor([0]))
    b = model.net(x, torch.tensor([1]))
    changed = (a - b).abs().amax(dim=1)[0, 0]  # (H, W): largest logit change per position
    assert bool((changed > 0).all())
