"""Every family at every image geometry genlab loads (issue 7): 8x8 digits, 28x28 MNIST, 32x32
CIFAR-10, folders of 8..64 pixels; 1 or 3 channels; 256 levels (and the digits' 17).

Each family, built from its params defaults shrunk by conftest's `tiny`, must construct, train a
step with a real Trainer, score (log_prob / energy), encode and decode, and sample valid images of
the data's shape and levels. Then the shape rules behind that: how deep each network gets for a
size, and that the memory-bounding chunks of the bounds shrink for large images.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlab.config import family_params_model
from genlab.models import MODELS, GenerativeModule
from genlab.models.diffusion import BOUND_CHUNK, BOUND_CHUNK_PIXELS, Diffusion
from genlab.models.flow import Flow
from genlab.models.gan import GAN, feature_sizes
from genlab.models.vae import IWAE_CHUNK, IWAE_CHUNK_LOGITS, VAE

FAMILIES = sorted(MODELS)
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 16, 16)]
CLASSES = 10
BATCH = 4

# On top of conftest's `tiny`: the VAE's conv channels too (its default 16 is slow at 64x64 RGB
# with 256 levels), and the flow at its default 3 scales, so 28x28 shows the divisibility limit.
SMALLER = {"vae": {"channels": 4}, "flow": {"max_scales": 3}}


def build(
    family: str,
    tiny: dict[str, dict],
    shape: tuple[int, int, int],
    levels: int,
    conditional: bool,
    **overrides,
) -> GenerativeModule:
    kwargs = family_params_model(family)().model_kwargs() | tiny.get(family, {})
    kwargs |= SMALLER.get(family, {}) | {"conditional": conditional} | overrides
    torch.manual_seed(0)
    return MODELS[family](image_shape=shape, levels=levels, num_classes=CLASSES, **kwargs)


def images(n: int, shape: tuple[int, int, int], levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % CLASSES


def assert_valid_images(x: torch.Tensor, n: int, shape: tuple[int, int, int], levels: int):
    assert x.dtype == torch.uint8
    assert x.shape == (n, *shape)
    assert int(x.max()) <= levels - 1


def train_one_step(model: GenerativeModule, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimiser step through a real Trainer (a GAN's manual optimisation included)."""
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    assert trainer.global_step == 1
    # models/base.py: every family's Adam/AdamW is fused (one kernel a step, on CPU too).
    assert all(group["fused"] for opt in trainer.optimizers for group in opt.param_groups)
    after = dict(model.named_parameters())
    assert any(not torch.equal(p, after[n]) for n, p in trainable.items()), "nothing trained"


def shape_id(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


# 8-bit images in both forms; the digits' 17 levels at every shape in the unconditional form.
CASES = [
    pytest.param(shape, levels, conditional, id=f"{shape_id(shape)}-{levels}-{form}")
    for shape in SHAPES
    for levels, conditional, form in [
        (256, False, "uncond"),
        (256, True, "cond"),
        (17, False, "uncond"),
    ]
]

# PixelCNN draws one pixel and channel per network pass (3072 passes for 3x32x32, 12288 for
# 3x64x64: 10 s and 40 s here), so its samples are checked up to 28x28 pixels (the RGB order at
# 3x16x16) here and at the two larger RGB sizes in the slow test below.
PIXELCNN_SAMPLING_MAX_DIMS = 28 * 28


@pytest.mark.parametrize(("shape", "levels", "conditional"), CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_scores_and_samples_at_every_shape(
    family: str, shape: tuple[int, int, int], levels: int, conditional: bool, tiny: dict
) -> None:
    model = build(family, tiny, shape, levels, conditional)
    x, y = images(BATCH, shape, levels)
    train_one_step(model, x, y)
    model.eval()
    labels = y if conditional else None

    if model.likelihood != "none":
        log_px = model.log_prob(x, labels, samples=2)
        assert log_px.shape == (BATCH,) and torch.isfinite(log_px).all()
        if model.likelihood == "exact":
            assert (log_px <= 0).all()  # a probability of discrete data
    if model.has_energy:
        energy = model.energy(x, labels)
        assert energy.shape == (BATCH,) and torch.isfinite(energy).all()
    if model.has_latent:
        latent_labels = labels if model.encodes_with_labels else None
        z = model.encode(x, latent_labels)
        assert z.shape[0] == BATCH and torch.isfinite(z).all()
        assert_valid_images(model.decode(z, latent_labels), BATCH, shape, levels)

    if family == "pixelcnn" and model.dims > PIXELCNN_SAMPLING_MAX_DIMS:
        return
    n = 2
    generator = torch.Generator().manual_seed(0)
    samples = model.sample(n, y[:n] if conditional else None, generator=generator)
    assert_valid_images(samples, n, shape, levels)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64)], ids=shape_id)
def test_pixelcnn_samples_large_rgb_images(shape: tuple[int, int, int], tiny: dict) -> None:
    model = build("pixelcnn", tiny, shape, 256, conditional=True).eval()
    samples = model.sample(1, torch.tensor([3]), generator=torch.Generator().manual_seed(0))
    assert_valid_images(samples, 1, shape, 256)


# -- how each network follows the size -------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (8, [8, 4]),  # the digits: as before
        (28, [28, 14, 7]),  # exact halvings only: 7 is odd and small
        (32, [32, 16, 8, 4]),
        (64, [64, 32, 16, 8, 4]),
        (62, [62, 31, 16, 8, 4]),  # an odd side above 8 keeps halving, rounded up
        (9, [9, 5]),
    ],
)
def test_gan_feature_sizes(size: int, sizes: list[int]) -> None:
    assert feature_sizes(size) == sizes


@pytest.mark.parametrize("side", [62, 9, 30])
def test_gan_networks_mirror_each_other_at_awkward_sizes(side: int, tiny: dict) -> None:
    """G upsamples to exactly the sizes D downsamples through, so D's features are the base map
    and G's output the image, for sides that halve unevenly."""
    model = build("gan", tiny, (1, side, side), 256, conditional=True)
    assert isinstance(model, GAN)
    base = feature_sizes(side)[-1]
    x = torch.zeros(2, 1, side, side)
    features = model.discriminator.features(x)
    assert features.shape[-2:] == (base, base)
    assert model.generator.res == base
    y = torch.arange(2)
    assert model.generator(torch.randn(2, model.hparams.latent_dim), y).shape == x.shape
    assert model.discriminator(x, y).shape == (2,)


@pytest.mark.parametrize(
    ("side", "resolutions"),
    [
        (8, [8, 4]),  # the digits: as before
        (28, [28, 14, 7]),
        (32, [32, 16, 8, 4]),
        (64, [64, 32, 16, 8, 4]),
        (62, [62, 31, 16, 8, 4]),  # before: 62 -> 31 only, the middle blocks at 31x31
    ],
)
def test_diffusion_unet_levels_follow_the_size(
    side: int, resolutions: list[int], tiny: dict
) -> None:
    model = build("diffusion", tiny, (1, side, side), 256, conditional=False)
    assert isinstance(model, Diffusion)
    net = model.net
    assert len(net.down) == len(resolutions)
    seen = []
    hooks = [b[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for b in net.down]
    x = torch.randn(2, 1, side, side)
    out = net(x, torch.tensor([1, 5]), None)
    for hook in hooks:
        hook.remove()
    assert seen == resolutions
    assert out.shape == x.shape


@pytest.mark.parametrize(
    ("shape", "scales", "latent"),
    [
        ((1, 8, 8), 3, (4, 4, 4)),
        ((1, 28, 28), 2, (4, 14, 14)),  # 28 = 4 x 7: two squeezes, whatever max_scales says
        ((3, 32, 32), 3, (12, 16, 16)),
        ((3, 64, 64), 3, (12, 32, 32)),
    ],
)
def test_flow_scales_are_limited_by_divisibility(
    shape: tuple[int, int, int], scales: int, latent: tuple[int, int, int], tiny: dict
) -> None:
    model = build("flow", tiny, shape, 256, conditional=False)
    assert isinstance(model, Flow)
    depth, scale = 0, model.flow.scales
    while scale is not None:
        depth, scale = depth + 1, scale.inner
    assert depth == scales
    assert model.flow.latent_shape == latent
    x, _ = images(2, shape, 256)
    assert model.encode(x).shape == (2, shape[0] * shape[1] * shape[2])


def test_flow_refuses_odd_sides_naming_the_fix(tiny: dict) -> None:
    with pytest.raises(ValueError, match=r"even.*13x13.*image_size"):
        build("flow", tiny, (3, 13, 13), 256, conditional=False)


# -- memory of the bounds at large images ---------------------------------------------------------


def batch_sizes(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The batch size of every forward call of `module`, recorded by a forward hook."""
    sizes: list[int] = []
    handle = module.register_forward_hook(lambda m, args, out: sizes.append(len(out)))
    return sizes, handle


@pytest.mark.parametrize(
    ("shape", "levels"), [((1, 8, 8), 17), ((3, 64, 64), 256)], ids=["digits", "3x64x64"]
)
def test_iwae_chunks_shrink_with_the_decoder_output(
    shape: tuple[int, int, int], levels: int, tiny: dict
) -> None:
    """The IWAE bound decodes images x samples in chunks of a fixed number of logits: the
    digits' 2048 images at a time on a CPU, one for 3x64x64 at 256 levels (instead of 200 GB)."""
    model = build("vae", tiny, shape, levels, conditional=False).eval()
    assert isinstance(model, VAE)
    b, k = 2, 8
    x, _ = images(b, shape, levels)
    sizes, handle = batch_sizes(model.decoder)
    with torch.no_grad():
        log_px = model.log_prob(x, samples=k)
    handle.remove()
    assert torch.isfinite(log_px).all()
    assert sum(sizes) == b * k
    per_image = shape[0] * shape[1] * shape[2] * levels
    most = max(b, IWAE_CHUNK * IWAE_CHUNK_LOGITS // per_image)  # at least one sample per pass
    assert max(sizes) <= most
    if shape == (1, 8, 8):
        assert sizes == [b * k]  # the digits: one pass, as before
    else:
        assert len(sizes) > 1


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 64, 64)], ids=shape_id)
def test_diffusion_bound_chunks_shrink_with_the_pixels(
    shape: tuple[int, int, int], tiny: dict
) -> None:
    """log_prob evaluates images x bound terms in chunks of a fixed number of pixels: 1024
    digits at a time on a CPU, 16 images of 64x64."""
    model = build("diffusion", tiny, shape, 256, conditional=False, timesteps=200).eval()
    b, k = 2, 100
    x, _ = images(b, shape, 256)
    sizes, handle = batch_sizes(model.ema.module)
    log_px = model.log_prob(x, samples=k)
    handle.remove()
    assert torch.isfinite(log_px).all()
    assert sum(sizes) == b * (k + 1)  # L_0 and k middle terms per image
    assert max(sizes) <= BOUND_CHUNK * BOUND_CHUNK_PIXELS // (shape[1] * shape[2])
    if shape == (1, 8, 8):
        assert len(sizes) == 1  # the digits: one pass, as before
    else:
        assert len(sizes) > 1
