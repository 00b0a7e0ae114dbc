"""The gated PixelCNN on tiny images: causality, exact likelihood, sampling, checkpoints."""

from __future__ import annotations

import itertools

import pytest
import torch

from genlab.evaluation import vocabulary as v
from genlab.models.pixelcnn import PixelCNN

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
TINY = {"channels": 12, "num_layers": 2}
# Both output heads: every property of the factorisation holds for each.
OUTPUTS = pytest.mark.parametrize("output", ["categorical", "logistic"])


def make(shape: tuple[int, int, int] = SHAPE, levels: int = LEVELS, **overrides) -> PixelCNN:
    torch.manual_seed(0)
    model = PixelCNN(image_shape=shape, levels=levels, num_classes=CLASSES, **(TINY | overrides))
    return model.eval()


def randomise(model: PixelCNN, std: float = 0.1) -> PixelCNN:
    """Random weights everywhere (zero-initialised biases too), so no gradient is zero by luck."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def images(
    n: int, shape: tuple[int, int, int] = SHAPE, levels: int = LEVELS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def order(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(channel, row, col) of every input in the model's order: raster, then channel."""
    c, h, w = shape
    return [(ch, r, col) for r, col, ch in itertools.product(range(h), range(w), range(c))]


# -- causality ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3], ids=["C=1", "C=3"])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@OUTPUTS
def test_each_output_depends_on_exactly_the_inputs_before_it(
    channels: int, conditional: bool, output: str
) -> None:
    """d logits_i / d x_j is exactly 0 for j >= i and nonzero for every j < i (no blind spot).

    Five 3-wide layers reach across a 5 x 5 image, so every earlier input must be seen: in
    particular the pixel above-right, which a single masked-conv stack misses.
    """
    shape = (channels, 5, 5)
    model = randomise(
        make(shape, levels=4, channels=12, num_layers=5, conditional=conditional, output=output)
    )
    model.double()
    x = torch.rand(1, *shape, dtype=torch.float64) * 2 - 1  # scaled input, (1, C, H, W)
    y = torch.tensor([3]) if conditional else None
    jac = torch.autograd.functional.jacobian(lambda inp: model.net(inp, y), x, vectorize=True)
    jac = jac[0].abs().sum(0)[..., 0, :, :, :]  # (C, H, W) outputs x (C, H, W) inputs
    positions = order(shape)
    depends = torch.tensor([[bool(jac[i][j] != 0) for j in positions] for i in positions])
    earlier = torch.ones(len(positions), len(positions), dtype=torch.bool).tril(-1)
    assert torch.equal(depends, earlier)

    # The same, spelled out for the neighbours a blind spot or a missing shift would lose.
    for ch, r, col in positions:
        if ch > 0:
            assert jac[ch, r, col][ch - 1, r, col] != 0  # the previous channel of this pixel
        if col > 0:
            assert jac[ch, r, col][channels - 1, r, col - 1] != 0  # the pixel to the left
        if r > 0:
            assert jac[ch, r, col][:, r - 1, col].ne(0).all()  # the pixel above
        if r > 0 and col < 4:
            assert jac[ch, r, col][:, r - 1, col + 1].ne(0).all()  # above-right
        assert jac[ch, r, col][ch:, r, col].eq(0).all()  # itself and later channels


# -- likelihood ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [SHAPE, (3, 4, 4)], ids=["C=1", "C=3"])
def test_log_prob_is_a_finite_discrete_log_probability(shape: tuple[int, int, int]) -> None:
    model = make(shape)
    x, _ = images(6, shape)
    with torch.no_grad():
        log_prob = model.log_prob(x)
    assert log_prob.shape == (6,)
    assert torch.isfinite(log_prob).all()
    assert (log_prob <= 0).all()


@OUTPUTS
def test_log_prob_is_the_chain_rule_sum_of_one_step_predictions(output: str) -> None:
    """log p(x) = sum_i log p(x_i | x_<i), each factor read with every x_>=i replaced by noise
    (for the logistic head this also checks its observed-level path against its all-levels one)."""
    shape = (3, 3, 3)
    model = randomise(make(shape, levels=5, conditional=True, output=output), std=0.3)
    x, y = images(4, shape, levels=5)
    noise, _ = images(4, shape, levels=5, seed=1)
    positions = order(shape)
    expected = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for i, (ch, r, col) in enumerate(positions):
            seen = noise.clone()
            for c2, r2, col2 in positions[:i]:
                seen[:, c2, r2, col2] = x[:, c2, r2, col2]
            log_p = model.logits(seen, y).log_softmax(dim=1)  # (B, L, C, H, W)
            expected += log_p[torch.arange(4), x[:, ch, r, col].long(), ch, r, col].double()
        log_prob = model.log_prob(x, y)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-4)


@OUTPUTS
def test_probabilities_of_all_images_sum_to_one(output: str) -> None:
    shape, levels = (2, 1, 2), 3  # 3^4 = 81 images
    model = randomise(make(shape, levels=levels, channels=8, output=output), std=0.5)
    every = torch.tensor(list(itertools.product(range(levels), repeat=4)), dtype=torch.uint8)
    with torch.no_grad():
        log_prob = model.log_prob(every.view(-1, *shape))  # (81,)
    torch.testing.assert_close(
        log_prob.double().exp().sum(), torch.tensor(1.0, dtype=torch.float64)
    )


def test_a_model_with_zero_logits_scores_log2_levels_bits_per_dim() -> None:
    model = make()
    with torch.no_grad():
        last = model.net.head[-1]
        last.weight.zero_()
        last.bias.zero_()
        log_prob = model.log_prob(images(3)[0])
    dims = SHAPE[0] * SHAPE[1] * SHAPE[2]
    torch.testing.assert_close(log_prob, torch.full((3,), -dims * torch.log(torch.tensor(17.0))))


@pytest.mark.parametrize("shape", [SHAPE, (3, 4, 4)], ids=["C=1", "C=3"])
@OUTPUTS
def test_every_parameter_gets_a_gradient(shape: tuple[int, int, int], output: str) -> None:
    """No dead weights: both stacks, both label biases, the skips and the head all take part."""
    model = make(shape, conditional=True, num_layers=3, output=output)  # first, middle, last
    x, y = images(8, shape)
    model.nll(x, y).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_training_on_a_fixed_batch_improves_the_likelihood() -> None:
    model = make().train()
    x, _ = images(16)
    before = -model.eval().log_prob(x).mean().item()
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        optimiser.zero_grad()
        model.nll(x).mean().backward()
        optimiser.step()
    after = -model.eval().log_prob(x).mean().item()
    assert after < before - 10.0, (before, after)


def test_even_kernel_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="odd"):
        make(kernel_size=4)


# -- sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [SHAPE, (3, 4, 4)], ids=["C=1", "C=3"])
def test_sample_is_uint8_in_levels_and_seeded(shape: tuple[int, int, int]) -> None:
    model = make(shape)
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8
    assert s.shape == (5, *shape)
    assert int(s.max()) <= LEVELS - 1
    assert torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(1)))


@OUTPUTS
def test_samples_follow_the_distribution_log_prob_scores(output: str) -> None:
    """On a 2-channel, 1 x 2 image with 2 levels, sample frequencies of all 16 images match
    exp(log_prob): ancestral sampling and the likelihood share one factorisation and order.

    The model is first fitted to a few strongly correlated patterns, so that sampling in a wrong
    order (channel-major, say) gives visibly wrong images (total variation ~0.45)."""
    shape, levels, n = (2, 1, 2), 2, 4000
    every = torch.tensor(list(itertools.product(range(levels), repeat=4)), dtype=torch.uint8)
    every = every.view(-1, *shape)  # (16, C, H, W), image k has bits k in (c, h, w) order
    g = torch.Generator().manual_seed(0)
    pick = torch.multinomial(torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]), 256, True, generator=g)
    data = every[torch.tensor([0, 15, 6, 9, 3])][pick]  # (256, C, H, W)
    model = make(shape, levels=levels, channels=8, output=output).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        optimiser.zero_grad()
        model.nll(data).mean().backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        p = model.log_prob(every).exp()  # (16,)
    s = model.sample(n, generator=torch.Generator().manual_seed(0)).view(n, 4).long()
    index = (s * torch.tensor([8, 4, 2, 1])).sum(1)  # the image k each sample is
    freq = torch.bincount(index, minlength=16).float() / n
    assert 0.5 * (freq - p).abs().sum() < 0.05  # total variation; sampling noise is ~0.01


def test_first_pixel_marginal_matches_its_softmax() -> None:
    model = randomise(make((1, 3, 3), levels=5), std=0.3)
    with torch.no_grad():
        x, _ = images(1, (1, 3, 3), levels=5)
        p = model.logits(x).softmax(dim=1)[0, :, 0, 0, 0]  # (L,), the same for any x
    n = 2000
    s = model.sample(n, generator=torch.Generator().manual_seed(0))[:, 0, 0, 0]
    freq = torch.bincount(s.long(), minlength=5).float() / n
    assert (freq - p).abs().max() < 0.04, (freq, p)  # ~3.5 standard errors


def test_conditional_model_requires_labels() -> None:
    model = make(conditional=True)
    x, _ = images(4)
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(4)
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)


def test_conditional_samples_are_seeded_and_depend_on_the_label() -> None:
    model = randomise(make(conditional=True), std=0.3)
    y = torch.arange(8) % CLASSES
    s = model.sample(8, y, generator=torch.Generator().manual_seed(0))
    assert s.shape == (8, *SHAPE) and s.dtype == torch.uint8
    assert torch.equal(s, model.sample(8, y, generator=torch.Generator().manual_seed(0)))
    other = model.sample(8, (y + 1) % CLASSES, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(s, other)


@pytest.mark.parametrize("channels", [1, 3], ids=["C=1", "C=3"])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@OUTPUTS
def test_row_windows_give_the_whole_images_logits_at_every_pixel(
    channels: int, conditional: bool, output: str
) -> None:
    """The sampler's per-pixel logits (the vertical stack once per row, the horizontal stack on a
    window of the row) equal `forward`'s on the whole image. Two layers reach 2 rows up and 2
    columns left, so on 8 x 9 images the windows cut rows and columns off."""
    shape = (channels, 8, 9)
    model = randomise(make(shape, conditional=conditional, output=output), std=0.3)
    assert model.net.reach < 8
    x, y = images(3, shape)
    labels = y if conditional else None
    whole = model.logits(x, labels)  # (B, L, C, H, W)
    scaled = model._scale(x)
    for row in range(shape[1]):
        links = model.net.links(scaled, labels, row)
        for col in range(shape[2]):
            out = model.net.row_outputs(scaled, links, labels, row, col)  # (B, C, P)
            got = model.net.logits_of(out[..., None, None])[..., 0, 0]  # (B, L, C)
            torch.testing.assert_close(got, whole[..., row, col], atol=1e-5, rtol=1e-5)


@OUTPUTS
def test_samples_are_the_ancestral_draws_of_the_whole_images_logits(output: str) -> None:
    """Drawn from the same generator, the row-window sampler gives the images that drawing each
    pixel from `forward`'s logits on the partial image gives."""
    shape = (3, 5, 6)
    model = randomise(make(shape, conditional=True, output=output), std=0.3)
    y = torch.tensor([2, 7, 7, 0])
    got = model.sample(4, y, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(4, *shape, dtype=torch.long)
    for row, col, ch in itertools.product(range(shape[1]), range(shape[2]), range(shape[0])):
        out = model.net.outputs(model._scale(x), y)[:, ch, :, row, col]  # (B, P)
        x[:, ch, row, col] = model.draw(out, g)
    assert torch.equal(got, x.to(torch.uint8))


def test_sampling_in_chunks_keeps_each_label_with_its_image(monkeypatch) -> None:
    """Seven images in chunks of three: each chunk is sampled with its own labels, from the
    generator where the previous chunk left it."""
    model = randomise(make(conditional=True), std=0.3)
    monkeypatch.setattr("genlab.models.pixelcnn.SAMPLE_CHUNK", 3)
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    whole = model.sample(7, y, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    parts = [model.sample(len(part), part, generator=g) for part in y.split(3)]
    assert torch.equal(whole, torch.cat(parts))
    assert model.sample(0, y[:0]).shape == (0, *SHAPE)


def test_unconditional_model_ignores_labels() -> None:
    model = make()
    x, y = images(4)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x, y), model.log_prob(x))


# -- system -------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_lightning_fit_and_checkpoint_round_trip(fit_and_reload, conditional: bool) -> None:
    model = make(conditional=conditional).train()
    x, y = images(16)
    trainer, loaded = fit_and_reload(model, x, y)
    assert torch.isfinite(trainer.callback_metrics[v.TRAIN_LOSS])
    assert torch.isfinite(trainer.callback_metrics[v.nll_key("val", "exact")])
    assert torch.isfinite(trainer.callback_metrics[v.bpd_key("val", "exact")])
    assert loaded.conditional is conditional
    labels = y if conditional else None
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, labels), loaded.log_prob(x, labels))
