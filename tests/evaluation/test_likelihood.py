"""Held-out likelihood: exact for a uniform model, summed then divided, seeded for bounds."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.data.datasets import Split
from genlab.evaluation import vocabulary as v
from genlab.evaluation.likelihood import (
    heldout_nll,
    likelihood_metrics,
    per_image_nll,
    subset,
    train_subset,
)
from genlab.models import MODELS
from genlab.models.base import GenerativeModule, bits_per_dim, bpd_key, nll_key
from genlab.models.diffusion import Diffusion
from genlab.models.vae import VAE


class FactorisedCategorical(GenerativeModule):
    """p(x) = prod over pixels of softmax(logits[:, c, h, w]); uniform when `scale` is 0."""

    likelihood = "exact"

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        levels: int,
        num_classes: int = 10,
        scale: float = 0.0,  # 0: all-zero logits, the uniform model
    ) -> None:
        super().__init__(image_shape=image_shape, levels=levels, num_classes=num_classes)
        g = torch.Generator().manual_seed(0)
        logits = scale * torch.randn(levels, *image_shape, generator=g, dtype=torch.float64)
        self.register_buffer("logits", logits)  # (L, C, H, W)

    def log_prob(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 1
    ) -> torch.Tensor:
        logp = torch.log_softmax(self.logits, dim=0)  # (L, C, H, W)
        return logp.gather(0, x.long()).flatten(1).sum(1)  # (B, C, H, W) -> (B,)


class NoLikelihood(GenerativeModule):
    likelihood = "none"


def random_split(n: int, shape: tuple[int, int, int], levels: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, *shape), generator=g).to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x, y)


@pytest.mark.parametrize(
    ("levels", "shape"), [(17, (1, 8, 8)), (256, (3, 4, 4))], ids=["L17", "L256"]
)
def test_uniform_model_scores_exactly_log2_levels(levels: int, shape: tuple) -> None:
    model = FactorisedCategorical(image_shape=shape, levels=levels)
    split = random_split(10, shape, levels)
    result = heldout_nll(model, split, batch_size=4, seed=0)
    dims = math.prod(shape)
    assert result.n == 10
    assert result.nats == pytest.approx(dims * math.log(levels), rel=1e-12, abs=0)
    assert result.bpd == pytest.approx(math.log2(levels), rel=1e-12, abs=0)


def test_bits_per_dim() -> None:
    assert bits_per_dim(64 * math.log(2), 64) == pytest.approx(1.0, rel=1e-15)
    assert bits_per_dim(64 * math.log(17), 64) == pytest.approx(math.log2(17), rel=1e-15)
    t = bits_per_dim(torch.tensor([3 * math.log(4)], dtype=torch.float64), 3)
    torch.testing.assert_close(t, torch.tensor([2.0], dtype=torch.float64))


def test_metric_names_say_whether_they_are_bounds() -> None:
    assert nll_key("test", "exact") == "test/nll_nats"
    assert bpd_key("test", "exact") == "test/bpd"
    assert nll_key("val", "lower_bound") == "val/nll_bound_nats"
    assert bpd_key("val", "lower_bound") == "val/bpd_bound"
    # A conditional marginal of noisy per-class bound terms is an estimate, and says so.
    assert v.nll_key("test", "lower_bound", marginal=True) == "test/marginal_nll_bound_nats"
    estimate = {"marginal": True, "estimate": True}
    assert v.nll_key("test", "lower_bound", **estimate) == "test/marginal_nll_estimate_nats"
    assert v.bpd_key("test", "lower_bound", **estimate) == "test/marginal_bpd_estimate"
    assert v.nll_key("test", "exact", **estimate) == "test/marginal_nll_nats"  # exact is exact
    assert v.se(nll_key("test", "exact")) == "test/nll_nats_se"
    assert v.single_draw_key("val") == "val/nll_bound_k1_nats"


def test_heldout_nll_sums_then_divides() -> None:
    model = FactorisedCategorical(image_shape=(1, 8, 8), levels=17, scale=2.0)
    split = random_split(7, (1, 8, 8), 17)
    nll = -model.log_prob(split.x)  # (7,)
    expected = nll.mean().item()
    # A mean of the batch means (3, 3, 1 images) would be a different number.
    batch_means = torch.stack([nll[0:3].mean(), nll[3:6].mean(), nll[6:].mean()]).mean().item()
    assert abs(batch_means - expected) > 1e-3
    for batch_size in (1, 3, 7, 100):
        result = heldout_nll(model, split, batch_size=batch_size, seed=0)
        assert result.nats == pytest.approx(expected, rel=1e-12)
        assert result.bpd == pytest.approx(expected / (64 * math.log(2)), rel=1e-12)


def test_likelihood_metrics_keys_and_standard_errors(tiny: dict) -> None:
    model = FactorisedCategorical(image_shape=(1, 8, 8), levels=17, scale=1.0)
    test = random_split(5, (1, 8, 8), 17, 1)
    metrics = likelihood_metrics(model, test, split="test", batch_size=2, seed=0)
    nll, bpd = v.nll_key("test", "exact"), v.bpd_key("test", "exact")
    assert set(metrics) == {nll, bpd, v.se(nll), v.se(bpd)}
    per_image = per_image_nll(model, test, batch_size=2, seed=0)
    assert metrics[nll] == pytest.approx(float(per_image.mean()))
    # The standard error over images: sd / sqrt(n).
    assert metrics[v.se(nll)] == pytest.approx(float(per_image.std() / math.sqrt(5)))
    assert metrics[v.se(bpd)] == pytest.approx(metrics[v.se(nll)] / (64 * math.log(2)))
    uniform = FactorisedCategorical(image_shape=(1, 8, 8), levels=17)
    exact = likelihood_metrics(uniform, test, split="val", batch_size=2, seed=0)
    assert exact[v.bpd_key("val", "exact")] == pytest.approx(math.log2(17), rel=1e-12)
    assert exact[v.se(v.nll_key("val", "exact"))] == pytest.approx(0, abs=1e-9)  # every image

    kw = {"image_shape": (1, 8, 8), "levels": 17, "num_classes": 10, "latent_dim": 2}
    bound_keys = {v.nll_key("test", "lower_bound"), v.bpd_key("test", "lower_bound")}
    bound_keys |= {v.se(k) for k in bound_keys}
    elbo_only = VAE(**kw, hidden_dim=8, eval_samples=1)
    assert set(likelihood_metrics(elbo_only, test, split="test", batch_size=2, seed=0)) == (
        bound_keys
    )
    # More importance draws tighten the bound: the one-draw bound (the ELBO) is reported too.
    iwae = VAE(**kw, hidden_dim=8, eval_samples=8)
    both = likelihood_metrics(iwae, test, split="test", batch_size=2, seed=0)
    k1 = v.single_draw_key("test")
    assert set(both) == bound_keys | {k1, v.se(k1)}
    # Diffusion's draws are terms of one bound: one term is the same bound, only noisier.
    no_ode = tiny["diffusion"] | {"ode_images": 0}
    diffusion = Diffusion(image_shape=(1, 8, 8), levels=17, num_classes=10, **no_ode)
    assert diffusion.monte_carlo == "terms" and diffusion.eval_samples > 1
    terms = likelihood_metrics(diffusion, test, split="test", batch_size=2, seed=0)
    assert set(terms) == bound_keys


def test_the_ode_bound_is_reported_beside_the_family_bound_on_the_first_images(
    tiny: dict,
) -> None:
    """Diffusion's probability-flow ODE bound: on the first `ode_images` images, under its own
    names, with the paired difference from the chain's bound on the same images."""
    kw = {"image_shape": (1, 8, 8), "levels": 17, "num_classes": 10}
    diffusion = Diffusion(**kw, **tiny["diffusion"] | {"ode_images": 3})
    test = random_split(5, (1, 8, 8), 17, 1)
    metrics = likelihood_metrics(diffusion, test, split="test", batch_size=2, seed=0)
    nll, bpd = v.ode_keys("test")
    assert metrics[v.ODE_IMAGES] == 3 and v.ode_nll_key("test") == nll
    vlb = per_image_nll(diffusion, test, batch_size=2, seed=0, samples=diffusion.eval_samples)
    first = Split(x=test.x[:3], y=test.y[:3])
    ode = per_image_nll(diffusion, first, batch_size=2, seed=0, ode=True)
    assert torch.isfinite(ode).all() and not torch.equal(ode, vlb[:3])
    assert metrics[nll] == pytest.approx(float(ode.mean()))
    assert metrics[v.se(nll)] == pytest.approx(float(ode.std() / math.sqrt(3)))
    assert metrics[bpd] == pytest.approx(metrics[nll] / (64 * math.log(2)))
    difference = ode - vlb[:3]
    assert metrics[v.ode_difference_key("test")] == pytest.approx(float(difference.mean()))
    assert metrics[v.se(v.ode_difference_key("test"))] == pytest.approx(
        float(difference.std() / math.sqrt(3))
    )
    # More images asked for than scored: all of them, no more.
    capped = Diffusion(**kw, **tiny["diffusion"] | {"ode_images": 50})
    assert likelihood_metrics(capped, first, split="test", batch_size=2, seed=0)[v.ODE_IMAGES] == 3


def test_the_gap_is_heldout_minus_as_many_training_images() -> None:
    model = FactorisedCategorical(image_shape=(1, 8, 8), levels=17, scale=1.0)
    heldout, train = random_split(5, (1, 8, 8), 17, 1), random_split(20, (1, 8, 8), 17, 2)
    metrics = likelihood_metrics(model, heldout, split="test", train=train, batch_size=4, seed=3)
    seen = train_subset(train, 5, 3)
    assert len(seen) == 5 and len({tuple(x.flatten().tolist()) for x in seen.x}) == 5
    nll_train = heldout_nll(model, seen, batch_size=4, seed=3)
    nll = v.nll_key("test", "exact")
    assert metrics[v.NLL_GAP] == pytest.approx(metrics[nll] - nll_train.nats)
    assert metrics[v.se(v.NLL_GAP)] == pytest.approx(math.hypot(metrics[v.se(nll)], nll_train.se))
    # A model that memorised its training images: a large positive gap.
    memoriser = FactorisedCategorical(image_shape=(1, 8, 8), levels=17)
    memoriser.logits = torch.full_like(memoriser.logits, -10.0).scatter_(0, seen.x[:1].long(), 10.0)
    gap = likelihood_metrics(memoriser, heldout, split="test", train=seen, batch_size=4, seed=0)
    assert gap[v.NLL_GAP] > 0


@pytest.mark.parametrize(
    ("family", "draws_tighten"), [("vae", True), ("flow", True), ("diffusion", False)]
)
def test_bound_metrics_are_per_image_bounds_with_their_standard_errors(
    family: str, draws_tighten: bool, tiny: dict
) -> None:
    """Each number is the mean of `per_image_nll` with the family's `eval_samples` (the k1
    bound: with one draw), its `_se` the sd over images / sqrt(n); the k1 bound only where the
    draws are importance draws (`monte_carlo == "importance"`), and the gap with the same
    estimator on as many training images as `train_subset` draws."""
    torch.manual_seed(0)
    kwargs = tiny[family] | ({"eval_samples": 4} if family == "vae" else {})
    model = MODELS[family](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs)
    assert model.likelihood == "lower_bound" and model.eval_samples > 1
    assert (model.monte_carlo == "importance") is draws_tighten
    heldout, train = random_split(6, (1, 8, 8), 17, 1), random_split(20, (1, 8, 8), 17, 2)
    kw = {"batch_size": 4, "seed": 2}
    metrics = likelihood_metrics(model, heldout, split="val", train=train, **kw)

    def mean_and_se(split: Split, samples: int) -> tuple[float, float]:
        nats = per_image_nll(model, split, samples=samples, **kw)
        return float(nats.mean()), float(nats.std() / math.sqrt(len(nats)))

    nll, bpd = v.nll_key("val", "lower_bound"), v.bpd_key("val", "lower_bound")
    mean, error = mean_and_se(heldout, model.eval_samples)
    assert metrics[nll] == pytest.approx(mean, rel=1e-12)
    assert metrics[v.se(nll)] == pytest.approx(error, rel=1e-9)
    assert metrics[bpd] == pytest.approx(mean / (64 * math.log(2)), rel=1e-12)
    assert metrics[v.se(bpd)] == pytest.approx(error / (64 * math.log(2)), rel=1e-9)
    assert error > 0
    k1 = v.single_draw_key("val")
    if draws_tighten:
        single, single_error = mean_and_se(heldout, 1)
        assert metrics[k1] == pytest.approx(single, rel=1e-12)
        assert metrics[v.se(k1)] == pytest.approx(single_error, rel=1e-9)
    else:
        assert k1 not in metrics and v.se(k1) not in metrics
    seen, seen_error = mean_and_se(train_subset(train, 6, 2), model.eval_samples)
    assert metrics[v.NLL_GAP] == pytest.approx(mean - seen, rel=1e-9)
    assert metrics[v.se(v.NLL_GAP)] == pytest.approx(math.hypot(error, seen_error), rel=1e-9)
    keys = {nll, bpd, v.NLL_GAP} | ({k1} if draws_tighten else set())
    if model.ode_images:  # diffusion's probability-flow ODE bound (its own test above)
        keys |= {*v.ode_keys("val"), v.ode_difference_key("val")}
    extra = {v.ODE_IMAGES} if model.ode_images else set()
    assert set(metrics) == keys | {v.se(k) for k in keys} | extra


def test_train_subset_is_a_seeded_draw_without_replacement() -> None:
    train = random_split(20, (1, 8, 8), 17, 2)
    a = train_subset(train, 5, 3)
    assert torch.equal(a.x, train_subset(train, 5, 3).x) and torch.equal(
        a.y, train_subset(train, 5, 3).y
    )
    assert not torch.equal(a.x, train_subset(train, 5, 4).x)
    rows = {tuple(x.flatten().tolist()): int(y) for x, y in zip(train.x, train.y, strict=True)}
    assert all(rows[tuple(x.flatten().tolist())] == int(y) for x, y in zip(a.x, a.y, strict=True))
    # A held-out split larger than train: every training image once.
    every = train_subset(train, 50, 0)
    assert len(every) == 20
    assert sorted(map(tuple, every.x.flatten(1).tolist())) == sorted(
        map(tuple, train.x.flatten(1).tolist())
    )


def test_a_scored_subset_is_the_whole_split_unless_bounded() -> None:
    split = random_split(20, (1, 8, 8), 17, 2)
    assert subset(split, None, 0) is split and subset(split, 20, 0) is split
    part = subset(split, 7, 1)
    assert len(part) == 7 and torch.equal(part.x, train_subset(split, 7, 1).x)
    assert len({tuple(x.flatten().tolist()) for x in part.x}) == 7  # no image twice


def test_heldout_nll_of_the_vae_is_seeded(tiny_vae_kwargs: dict) -> None:
    torch.manual_seed(0)
    model = VAE(image_shape=(1, 8, 8), levels=17, num_classes=10, **tiny_vae_kwargs)
    split = random_split(7, (1, 8, 8), 17)
    rng = torch.get_rng_state()
    a = heldout_nll(model, split, batch_size=3, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert heldout_nll(model, split, batch_size=3, seed=5) == a
    assert heldout_nll(model, split, batch_size=3, seed=6).nats != a.nats
    assert a.nats > 0 and math.isfinite(a.nats)


def test_heldout_nll_conditions_a_conditional_model_on_the_labels(tiny_vae_kwargs: dict) -> None:
    torch.manual_seed(0)
    model = VAE(
        image_shape=(1, 8, 8), levels=17, num_classes=10, conditional=True, **tiny_vae_kwargs
    ).eval()
    split = random_split(6, (1, 8, 8), 17)
    result = heldout_nll(model, split, batch_size=6, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = -model.log_prob(split.x, split.y).double().mean().item()
    assert result.nats == pytest.approx(expected, rel=1e-12)


def test_heldout_nll_refuses_a_model_without_likelihood() -> None:
    model = NoLikelihood(image_shape=(1, 8, 8), levels=17, num_classes=10)
    with pytest.raises(ValueError, match="no likelihood"):
        heldout_nll(model, random_split(2, (1, 8, 8), 17), batch_size=2, seed=0)
