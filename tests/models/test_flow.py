"""The multi-scale flow on tiny inputs: invertibility and log-determinants of every layer against a
brute-force Jacobian, the units of the discrete bound, sampling, conditioning and checkpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.distributions import Normal

from genlab.evaluation import vocabulary as v
from genlab.models.flow import (
    ActNorm,
    AffineCoupling,
    Flow,
    FlowStep,
    GaussianPrior,
    InvConv1x1,
    LogitTransform,
    MultiScaleFlow,
    Scale,
    Squeeze,
    VariationalDequantizer,
    num_scales,
)

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
TINY = {"hidden_channels": 8, "steps_per_scale": 2, "embedding_dim": 3, "dequantizer_steps": 1}
DEQUANTIZATIONS = ["uniform", "variational"]


def make_flow(shape: tuple[int, int, int] = SHAPE, levels: int = LEVELS, **overrides) -> Flow:
    torch.manual_seed(0)
    return Flow(image_shape=shape, levels=levels, num_classes=CLASSES, **(TINY | overrides))


def perturb(module: nn.Module, scale: float = 0.2) -> nn.Module:
    """Move every parameter off its (often identity-like, zero-initialised) starting value, so the
    checks below exercise non-trivial transforms."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def images(n: int, shape: tuple[int, ...] = SHAPE, levels: int = LEVELS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def seeded_log_prob(model: Flow, x: torch.Tensor, y=None, samples: int = 1) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.log_prob(x, y, samples=samples)


# -- every layer is a bijection whose log-determinant is log |det J| --------------------------


class UniformDensityFlow(nn.Module):
    """Pushes U[0, L)^D to N(0, I): z = Phi^-1(v / L), so log N(z) + log |det| = -D log L."""

    def __init__(self, levels: int, latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.levels = levels
        self.latent_shape = latent_shape

    def forward(self, v: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        z = math.sqrt(2) * torch.erfinv(2 * v / self.levels - 1)
        logdet = -math.log(self.levels) - Normal(0.0, 1.0).log_prob(z)
        return z, logdet.flatten(1).sum(1)

    def inverse(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return Normal(0.0, 1.0).cdf(z) * self.levels


def brute_force_logdet(layer: nn.Module, x: torch.Tensor, cond) -> torch.Tensor:
    """log |det d layer(x_i) / d x_i| for each example i, from the full Jacobian."""
    out = []
    for i in range(x.shape[0]):
        c = None if cond is None else cond[i : i + 1]

        def f(flat: torch.Tensor, i: int = i, c=c) -> torch.Tensor:
            return layer(flat.view(1, *x.shape[1:]), c)[0].flatten()

        jac = jacobian(f, x[i].flatten())  # (n, n)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def _initialised_actnorm(x: torch.Tensor) -> ActNorm:
    layer = ActNorm(x.shape[1]).double().train()
    layer(x * 3 + 1)  # data-dependent initialisation on a first (training) batch
    return layer


def _layers() -> dict[str, tuple]:
    """name -> (layer, input, cond): float64, tiny, parameters perturbed."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = randn(2, 4, 2, 2)
    cond = randn(2, 3, 2, 2)
    levels_in = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * LEVELS
    image = torch.randint(0, LEVELS, (2, 1, 4, 4), generator=g).double()
    torch.manual_seed(0)
    return {
        "squeeze": (Squeeze(), randn(2, 1, 4, 4), None),
        "logit": (LogitTransform(LEVELS, 0.05), levels_in, None),
        "actnorm": (_initialised_actnorm(x), x, None),
        "invconv1x1": (perturb(InvConv1x1(4).double()), x, None),
        "coupling": (perturb(AffineCoupling(4, 0, 5).double()), x, None),
        "coupling_conditional": (perturb(AffineCoupling(4, 3, 5).double()), x, cond),
        "flowstep": (perturb(FlowStep(4, 3, 5).double()), x, cond),
        "split_prior": (perturb(GaussianPrior(4, 3, split=True).double()), x, cond),
        "top_prior": (perturb(GaussianPrior(4, 3, split=False).double()), x, cond),
        "multiscale_block": (
            perturb(Scale(1, 2, 3, 5, inner=Scale(2, 1, 3, 5, inner=None)).double()),
            randn(2, 1, 4, 4),
            randn(2, 3),  # class vector, broadcast by each scale
        ),
        "whole_flow": (
            perturb(MultiScaleFlow((1, 4, 4), LEVELS, 0.05, 2, 2, 3, 5).double()),
            levels_in,
            randn(2, 3),
        ),
        "dequantizer": (
            perturb(VariationalDequantizer((1, 4, 4), LEVELS, 2, 5).double()),
            randn(2, 1, 4, 4),  # eps -> u, conditioned on the integer image
            image,
        ),
        "uniform_density_test_flow": (UniformDensityFlow(LEVELS, (1, 4, 4)), levels_in, None),
    }


LAYER_NAMES = [
    "squeeze",
    "logit",
    "actnorm",
    "invconv1x1",
    "coupling",
    "coupling_conditional",
    "flowstep",
    "split_prior",
    "top_prior",
    "multiscale_block",
    "whole_flow",
    "dequantizer",
    "uniform_density_test_flow",
]


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_layer_inverts_and_its_logdet_is_the_brute_force_jacobian(name: str) -> None:
    layer, x, cond = _layers()[name]
    layer.eval()
    y, logdet = layer(x, cond)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(layer.inverse(y, cond), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, brute_force_logdet(layer, x, cond), atol=1e-6, rtol=1e-9)


def test_actnorm_initialises_on_the_first_training_batch_only() -> None:
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 5 + 2
    layer = ActNorm(3).double().eval()
    y, _ = layer(x)
    torch.testing.assert_close(y, x)  # eval before training (Lightning's sanity check): identity
    assert not layer.initialized
    layer.train()
    y, _ = layer(x)
    assert layer.initialized and "initialized" in layer.state_dict()
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64))
    std = y.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(std, torch.ones(3).double(), atol=1e-5, rtol=0)  # std + 1e-6
    before = layer.bias.detach().clone()
    layer(x * 7)  # a second batch does not re-initialise
    torch.testing.assert_close(layer.bias.detach(), before)


@pytest.mark.parametrize(
    ("shape", "max_scales", "expected"),
    [((8, 8), 3, 3), ((28, 28), 5, 2), ((32, 32), 3, 3), ((4, 6), 4, 1), ((7, 8), 3, 0)],
)
def test_number_of_scales_follows_the_image_sides(shape, max_scales, expected) -> None:
    assert num_scales(*shape, max_scales) == expected


def test_odd_image_sides_are_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        make_flow((1, 7, 7))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)], ids=["rgb32", "mnist28"])
def test_larger_image_shapes(shape: tuple[int, int, int]) -> None:
    model = make_flow(shape, levels=256, hidden_channels=4, steps_per_scale=1).eval()
    x, _ = images(2, shape, levels=256)
    assert torch.isfinite(seeded_log_prob(model, x)).all()
    assert model.encode(x).shape == (2, math.prod(shape))
    assert torch.equal(model.decode(model.encode(x)), x)


# -- the discrete bound: units, normalisation, importance weighting -----------------------------


@pytest.mark.parametrize("samples", [1, 4])
def test_a_flow_with_uniform_density_scores_exactly_minus_d_log_levels(samples: int) -> None:
    """log p(x + u) = -D log L for every u, and uniform q has log q = 0: no constant is lost."""
    model = make_flow().double().eval()
    model.flow = UniformDensityFlow(LEVELS, SHAPE)
    x, _ = images(8)
    expected = torch.full((8,), -math.prod(SHAPE) * math.log(LEVELS), dtype=torch.float64)
    torch.testing.assert_close(seeded_log_prob(model, x, samples=samples), expected)


def test_bin_probabilities_of_all_images_sum_to_one() -> None:
    """exp(IW bound) is an unbiased estimate of P(x) = ∫_bin p; summed over all L^D images it
    estimates ∫ p over [0, L)^D, which is 1 when the logit transform leaves no mass outside
    (alpha -> 0). A scaling Jacobian left out would give L^(±D) = 81^(±1)."""
    shape, levels = (1, 2, 2), 3
    model = perturb(make_flow(shape, levels, logit_alpha=1e-6).double(), 0.1).eval()
    grid = torch.tensor(list(itertools.product(range(levels), repeat=4)), dtype=torch.uint8)
    x = grid.view(-1, *shape)  # (81, 1, 2, 2): every image
    total = seeded_log_prob(model, x, samples=256).exp().sum()
    assert abs(total.item() - 1) < 0.02, total
    # With alpha > 0 the flow's density also covers v outside [0, L): a valid, looser bound.
    model = perturb(make_flow(shape, levels, logit_alpha=0.05).double(), 0.1).eval()
    assert seeded_log_prob(model, x, samples=256).exp().sum() < 1


def test_variational_dequantizer_is_a_density_on_the_unit_cube() -> None:
    """E_{u ~ U(0,1)^D}[q(u | x)] = 1, with log q(u | x) = log N(eps) - log |du/deps| and
    eps = g^-1(u; x), so log q is counted in the right units."""
    shape = (1, 2, 2)
    model = perturb(make_flow(shape, 3, dequantization="variational").double(), 0.1).eval()
    x = torch.tensor([0, 1, 2, 1], dtype=torch.float64).view(1, *shape).expand(200_000, *shape)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        eps = model.dequantizer.inverse(u, x)
        u_again, logdet = model.dequantizer(eps, x)
        log_q = Normal(0.0, 1.0).log_prob(eps).flatten(1).sum(1) - logdet
    torch.testing.assert_close(u_again, u)
    assert abs(log_q.exp().mean().item() - 1) < 0.02


@pytest.mark.parametrize("dequantization", DEQUANTIZATIONS)
def test_log_prob_is_a_bound_on_a_discrete_log_probability(dequantization: str) -> None:
    model = perturb(make_flow(dequantization=dequantization), 0.05).eval()
    x, _ = images(32)
    log_prob = seeded_log_prob(model, x)
    assert log_prob.shape == (32,)
    assert torch.isfinite(log_prob).all()
    assert (log_prob <= 0).all()


@pytest.mark.parametrize("dequantization", DEQUANTIZATIONS)
def test_importance_weighting_tightens_the_bound(dequantization: str) -> None:
    model = perturb(make_flow(dequantization=dequantization).double(), 0.05).eval()
    x, _ = images(32)
    k1 = seeded_log_prob(model, x, samples=1)
    k16 = seeded_log_prob(model, x, samples=16)
    assert k16.mean() > k1.mean()


def test_training_on_a_fixed_batch_improves_the_bound() -> None:
    model = make_flow(dequantization="variational")
    x, _ = images(16)
    before = -seeded_log_prob(model.eval(), x).mean()
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        optimiser.zero_grad()
        loss = -model.log_prob(x).mean()
        loss.backward()
        optimiser.step()
    after = -seeded_log_prob(model.eval(), x).mean()
    assert after < before - 5.0, (before, after)


# -- sampling, encoding, conditioning -----------------------------------------------------------


def test_sample_is_uint8_in_levels_and_seeded() -> None:
    model = perturb(make_flow(), 0.05).eval()
    s = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (6, *SHAPE)
    assert int(s.max()) <= LEVELS - 1
    assert torch.equal(s, model.sample(6, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(s, model.sample(6, generator=torch.Generator().manual_seed(1)))


def test_temperature_zero_gives_one_image_per_label() -> None:
    model = perturb(make_flow(conditional=True), 0.05).eval()
    y = torch.tensor([3, 3, 5])
    a = model.sample(3, y, generator=torch.Generator().manual_seed(0), temperature=0.0)
    b = model.sample(3, y, generator=torch.Generator().manual_seed(1), temperature=0.0)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])


def test_encode_is_the_latent_of_the_bin_centre_and_decode_inverts_it() -> None:
    model = perturb(make_flow().double(), 0.05).eval()
    x, _ = images(5)
    z = model.encode(x)
    assert z.shape == (5, math.prod(SHAPE))
    torch.testing.assert_close(z, model.encode(x))
    centre = model.flow.inverse(z.view(5, *model.flow.latent_shape))
    torch.testing.assert_close(centre, x.double() + 0.5, atol=1e-6, rtol=0)
    assert torch.equal(model.decode(z), x)


def test_conditional_model_requires_labels() -> None:
    model = make_flow(conditional=True).eval()
    x, _ = images(4)
    for call in (lambda: model.log_prob(x), lambda: model.sample(4), lambda: model.encode(x)):
        with pytest.raises(ValueError, match="class-conditional"):
            call()


def test_conditional_samples_are_seeded_and_depend_on_the_label() -> None:
    model = perturb(make_flow(conditional=True), 0.05).eval()
    y = torch.arange(8) % CLASSES
    s = model.sample(8, y, generator=torch.Generator().manual_seed(0))
    assert s.shape == (8, *SHAPE) and s.dtype == torch.uint8
    assert torch.equal(s, model.sample(8, y, generator=torch.Generator().manual_seed(0)))
    other = model.sample(8, (y + 1) % CLASSES, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(s, other)
    x, labels = images(4)
    assert model.encode(x, labels).shape == (4, math.prod(SHAPE))
    assert torch.isfinite(seeded_log_prob(model, x, labels)).all()


def test_unconditional_log_prob_ignores_labels() -> None:
    model = perturb(make_flow(), 0.05).eval()
    x, y = images(4)
    torch.testing.assert_close(seeded_log_prob(model, x, y), seeded_log_prob(model, x))


# -- Lightning ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditional", "dequantization"),
    [(False, "uniform"), (True, "variational")],
    ids=["unconditional-uniform", "conditional-variational"],
)
def test_lightning_checkpoint_round_trip(
    fit_and_reload, conditional: bool, dequantization: str
) -> None:
    model = make_flow(conditional=conditional, dequantization=dequantization)
    x, y = images(16)
    trainer, loaded = fit_and_reload(model, x, y)
    assert torch.isfinite(trainer.callback_metrics[v.TRAIN_LOSS])
    assert torch.isfinite(trainer.callback_metrics[v.nll_key("val", "lower_bound")])
    actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert actnorms and all(m.initialized for m in actnorms)

    assert loaded.conditional is conditional
    assert loaded.hparams.dequantization == dequantization
    labels = y if conditional else None
    for mode in ("eval", "train"):  # in train mode a lost ActNorm flag would re-initialise
        getattr(model, mode)()
        getattr(loaded, mode)()
        assert torch.equal(
            seeded_log_prob(model, x, labels, samples=2),
            seeded_log_prob(loaded, x, labels, samples=2),
        ), mode
