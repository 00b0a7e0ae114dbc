"""The VAE on tiny random integer images: ELBO math, training signal, sampling, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from genlab.evaluation import vocabulary as v
from genlab.models.vae import VAE, conv_sizes
from genlab.nn.discretized import level_log_probs

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
# Both decoders: every property of the bound holds for each.
OUTPUTS = pytest.mark.parametrize("output", ["categorical", "logistic"])


def make_vae(tiny: dict, **overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(image_shape=SHAPE, levels=LEVELS, num_classes=CLASSES, **(tiny | overrides))


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, LEVELS, (n, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def level_logits(model: VAE, out: torch.Tensor) -> torch.Tensor:
    """Every level's logit (B, L, C, H, W) from the decoder's output (B, P, C, H, W)."""
    if model.hparams.output == "categorical":
        return out
    return level_log_probs(out.transpose(1, 2), LEVELS)


def seeded_log_prob(model: VAE, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.log_prob(x, y)


@OUTPUTS
def test_elbo_is_finite_and_every_parameter_gets_a_gradient(
    tiny_vae_kwargs: dict, output: str
) -> None:
    model = make_vae(tiny_vae_kwargs, output=output)
    x, _ = images(8)
    terms = model.elbo(x)
    assert terms.elbo.shape == terms.log_px_z.shape == terms.kl.shape == (8,)
    assert torch.isfinite(terms.elbo).all()
    (-terms.elbo.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@OUTPUTS
def test_elbo_terms_match_torch_distributions(tiny_vae_kwargs: dict, output: str) -> None:
    """elbo = E_q[log p(x|z)] - KL(q || N(0, I)), each term checked independently (log p(x|z)
    from every level's logit, which the logistic decoder's observed-level path skips)."""
    model = make_vae(tiny_vae_kwargs, output=output).eval()
    x, _ = images(6)
    torch.manual_seed(7)
    terms = model.elbo(x)
    torch.testing.assert_close(terms.elbo, terms.log_px_z - terms.kl)
    assert (terms.kl >= 0).all()
    assert (terms.log_px_z <= 0).all()

    with torch.no_grad():
        mu, logvar = model.encoder(model._scale(x), None)  # (B, Z)
        q = Normal(mu, torch.exp(0.5 * logvar))
        kl = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
        torch.manual_seed(7)
        z = mu + torch.randn_like(mu) * q.scale  # the same draw as elbo's
        logits = level_logits(model, model.decoder(z, None))  # (B, L, C, H, W)
        log_px_z = Categorical(logits=logits.movedim(1, -1)).log_prob(x.long()).flatten(1).sum(1)
    torch.testing.assert_close(terms.kl.detach(), kl)
    torch.testing.assert_close(terms.log_px_z.detach(), log_px_z)


def test_log_prob_is_a_bound_on_a_discrete_log_probability(tiny_vae_kwargs: dict) -> None:
    model = make_vae(tiny_vae_kwargs)
    x, _ = images(16)
    log_prob = seeded_log_prob(model, x)
    assert log_prob.shape == (16,)
    assert torch.isfinite(log_prob).all()
    assert (log_prob <= 0).all()


@pytest.mark.parametrize(("encoder", "decoder"), [("mlp", "mlp"), ("conv", "conv")])
@OUTPUTS
def test_training_on_a_fixed_batch_improves_the_elbo(
    tiny_vae_kwargs: dict, encoder: str, decoder: str, output: str
) -> None:
    model = make_vae(tiny_vae_kwargs, encoder=encoder, decoder=decoder, output=output)
    x, _ = images(16)
    before = -seeded_log_prob(model.eval(), x).mean()
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimiser.zero_grad()
        loss = -model.elbo(x).elbo.mean()
        loss.backward()
        optimiser.step()
    after = -seeded_log_prob(model.eval(), x).mean()
    assert after < before - 1.0, (before, after)


@OUTPUTS
def test_sample_is_uint8_in_levels_and_seeded(tiny_vae_kwargs: dict, output: str) -> None:
    model = make_vae(tiny_vae_kwargs, output=output).eval()
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8
    assert s.shape == (5, *SHAPE)
    assert int(s.max()) <= LEVELS - 1
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    other = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, again)
    assert not torch.equal(s, other)


def test_encode_returns_posterior_mean(tiny_vae_kwargs: dict) -> None:
    model = make_vae(tiny_vae_kwargs).eval()
    x, _ = images(4)
    z = model.encode(x)
    assert z.shape == (4, tiny_vae_kwargs["latent_dim"])
    torch.testing.assert_close(z, model.encode(x))


def test_conditional_sample_and_encode_require_labels(tiny_vae_kwargs: dict) -> None:
    model = make_vae(tiny_vae_kwargs, conditional=True).eval()
    x, _ = images(4)
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(4)
    with pytest.raises(ValueError, match="class-conditional"):
        model.encode(x)


def test_conditional_log_prob_requires_labels(tiny_vae_kwargs: dict) -> None:
    model = make_vae(tiny_vae_kwargs, conditional=True)
    x, _ = images(4)
    with pytest.raises(ValueError, match="class-conditional"):
        model.log_prob(x)


def test_unconditional_log_prob_ignores_labels(tiny_vae_kwargs: dict) -> None:
    model = make_vae(tiny_vae_kwargs).eval()
    x, y = images(4)
    torch.testing.assert_close(seeded_log_prob(model, x, y), seeded_log_prob(model, x))


def test_conditional_samples_are_seeded_and_depend_on_the_label(tiny_vae_kwargs: dict) -> None:
    model = make_vae(tiny_vae_kwargs, conditional=True).eval()
    y = torch.arange(8) % CLASSES
    s = model.sample(8, y, generator=torch.Generator().manual_seed(0))
    assert s.shape == (8, *SHAPE) and s.dtype == torch.uint8
    assert torch.equal(s, model.sample(8, y, generator=torch.Generator().manual_seed(0)))
    other_y = (y + 1) % CLASSES
    assert not torch.equal(s, model.sample(8, other_y, generator=torch.Generator().manual_seed(0)))
    x, labels = images(4)
    assert model.encode(x, labels).shape == (4, tiny_vae_kwargs["latent_dim"])
    assert seeded_log_prob(model, x, labels).shape == (4,)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_lightning_checkpoint_round_trip(
    tiny_vae_kwargs: dict, fit_and_reload, conditional: bool
) -> None:
    model = make_vae(tiny_vae_kwargs, conditional=conditional)
    x, y = images(16)
    trainer, loaded = fit_and_reload(model, x, y)
    # The validation hooks ran and logged the bound under its bound-named keys.
    assert torch.isfinite(trainer.callback_metrics[v.nll_key("val", "lower_bound")])
    assert torch.isfinite(trainer.callback_metrics[v.bpd_key("val", "lower_bound")])

    assert loaded.conditional is conditional
    labels = y if conditional else None
    assert torch.equal(seeded_log_prob(model, x, labels), seeded_log_prob(loaded, x, labels))


@pytest.mark.parametrize("conditional", [False, True])
@OUTPUTS
def test_elbo_below_iwae_k_below_iwae_larger_k(
    tiny_vae_kwargs: dict, conditional: bool, output: str
) -> None:
    """Burda et al. (2016), Theorem 1: log p(x) >= IWAE-k' >= IWAE-k >= ELBO for k' > k.

    Trained first: at initialisation the decoder hardly depends on z, so the gaps between the
    bounds are no larger than their Monte Carlo noise; after training they are."""
    model = make_vae(tiny_vae_kwargs, conditional=conditional, output=output)
    x, y = images(64)
    y = y if conditional else None
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    # The logistic decoder's few outputs come to depend on z more slowly than L free logits.
    for _ in range(100 if output == "categorical" else 300):
        optimiser.zero_grad()
        (-model.elbo(x, y).elbo.mean()).backward()
        optimiser.step()
    model.eval()
    bounds = {}
    for k in (1, 4, 32, 256):
        torch.manual_seed(7)
        with torch.no_grad():
            bounds[k] = model.log_prob(x, y, samples=k).mean().item()
    assert bounds[1] < bounds[4] < bounds[32] < bounds[256] < 0, bounds
    assert bounds[256] - bounds[1] > 0.1, bounds  # gaps well above the noise


@OUTPUTS
def test_iwae_in_chunks_equals_one_pass(
    tiny_vae_kwargs: dict, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """Chunking the k samples (to bound memory) changes nothing but the memory used."""
    model = make_vae(tiny_vae_kwargs, output=output).eval()
    x, _ = images(5)
    torch.manual_seed(3)
    z = torch.randn(7, 5, tiny_vae_kwargs["latent_dim"])  # the k=7 draws, (k, B, Z)

    def replay(self: torch.distributions.Normal, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal start
        eps = z[start : start + shape[0]]
        start += shape[0]
        return self.loc + eps * self.scale

    monkeypatch.setattr(torch.distributions.Normal, "rsample", replay)
    results = []
    for chunk in (1000, 10):  # all 7 samples at once; chunks of 2 samples (10 // 5 images)
        monkeypatch.setattr("genlab.models.vae.IWAE_CHUNK", chunk)
        start = 0
        with torch.no_grad():
            results.append(model.log_prob(x, samples=7))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@OUTPUTS
def test_decode_is_the_mode_of_the_decoder(
    tiny_vae_kwargs: dict, conditional: bool, output: str
) -> None:
    model = make_vae(tiny_vae_kwargs, conditional=conditional, output=output).eval()
    z = torch.randn(6, tiny_vae_kwargs["latent_dim"], generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) if conditional else None
    x = model.decode(z, y)
    assert x.dtype == torch.uint8 and x.shape == (6, *SHAPE)
    assert int(x.max()) <= LEVELS - 1
    assert torch.equal(x, model.decode(z, y))  # deterministic, unlike sample
    logits = level_logits(model, model.decoder(z, model._onehot(y)))  # (B, L, C, H, W)
    assert torch.equal(x, logits.argmax(dim=1).to(torch.uint8))
    # decode takes exactly what encode returns.
    labels = y[:3] if conditional else None
    assert model.decode(model.encode(images(3)[0], labels), labels).shape == (3, *SHAPE)
    if conditional:
        assert not torch.equal(x, model.decode(z, (y + 1) % CLASSES))
        with pytest.raises(ValueError, match="class-conditional"):
            model.decode(z)


def test_decode_of_encode_reconstructs_an_overfit_batch(tiny_vae_kwargs: dict) -> None:
    """Trained on four images, the mode of p(x | E[z | x]) gives the images back."""
    model = make_vae(tiny_vae_kwargs, hidden_dim=32, dropout=0.0)
    x, _ = images(4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        (-model.elbo(x).elbo.mean()).backward()
        optimiser.step()
    model.eval()
    recon = model.decode(model.encode(x))
    assert (recon == x).double().mean() > 0.9


@pytest.mark.parametrize(
    ("size", "sizes"), [(8, [8, 4]), (9, [9, 5, 3]), (28, [28, 14, 7, 4]), (64, [64, 32, 16, 8, 4])]
)
def test_conv_sizes_halve_down_to_the_smallest_map(size: int, sizes: list[int]) -> None:
    assert conv_sizes(size) == sizes


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 9, 9), (1, 28, 28), (3, 64, 64)])
@pytest.mark.parametrize(
    ("encoder", "decoder"), [("conv", "conv"), ("mlp", "conv"), ("conv", "mlp")]
)
def test_architectures_fit_any_image_shape(
    shape: tuple[int, int, int], encoder: str, decoder: str
) -> None:
    """Depths come from image_shape: every supported shape gets logits (B, L, C, H, W), latents
    (B, Z), uint8 samples in levels, and a gradient in every parameter."""
    torch.manual_seed(0)
    levels = 5
    model = VAE(
        image_shape=shape,
        levels=levels,
        num_classes=CLASSES,
        encoder=encoder,
        decoder=decoder,
        channels=2,
        hidden_dim=8,
        num_layers=1,
        latent_dim=3,
        conditional=True,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (2, *shape), generator=g, dtype=torch.uint8)
    y = torch.tensor([0, 1])
    assert model.decoder(torch.zeros(2, 3), model._onehot(y)).shape == (2, levels, *shape)
    assert model.encode(x, y).shape == (2, 3)
    s = model.sample(2, y, generator=g)
    assert s.shape == (2, *shape) and s.dtype == torch.uint8 and int(s.max()) < levels
    (-model.elbo(x, y).elbo.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
