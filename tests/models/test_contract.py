"""The contract every family in MODELS keeps (DESIGN.md, "One contract for all families").

Each family is built from its params defaults, shrunk by the `tiny` overrides of conftest.py.
"""

from __future__ import annotations

import copy
import io
from typing import get_args

import pytest
import torch

from genlab.config import family_params_model, parse_params
from genlab.evaluation.evaluate import for_inference
from genlab.evaluation.vocabulary import MonteCarlo
from genlab.models import MODELS, GenerativeModule

SHAPE = (1, 8, 8)
LEVELS = 17
CLASSES = 10
N = 5

FAMILIES = sorted(MODELS)


def build(family: str, tiny: dict[str, dict], **overrides) -> GenerativeModule:
    """The family at its params defaults, shrunk; unconditional unless `conditional=True`."""
    kwargs = family_params_model(family)().model_kwargs() | tiny.get(family, {})
    kwargs |= {"conditional": False} | overrides
    torch.manual_seed(0)
    model = MODELS[family](image_shape=SHAPE, levels=LEVELS, num_classes=CLASSES, **kwargs)
    return model.eval()


def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, LEVELS, (n, *SHAPE), generator=g).to(torch.uint8)
    return x, torch.arange(n) % CLASSES


def assert_valid_samples(samples: torch.Tensor, n: int) -> None:
    assert samples.dtype == torch.uint8
    assert samples.shape == (n, *SHAPE)
    assert int(samples.max()) <= LEVELS - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_params_section_has_a_default_for_every_key(family: str) -> None:
    params = parse_params({"families": [family]})
    assert params.family(family).model_dump() == family_params_model(family)().model_dump()
    # The class-conditional form is a flag in params for every family.
    assert "conditional" in params.family(family).model_kwargs()


@pytest.mark.parametrize("family", FAMILIES)
def test_likelihood_kind_is_declared(family: str) -> None:
    cls = MODELS[family]
    assert issubclass(cls, GenerativeModule)
    assert cls.likelihood in ("exact", "lower_bound", "none")
    assert isinstance(cls.has_latent, bool)
    # What a bound's Monte Carlo draws are: importance draws (more tighten the bound, and the
    # single-draw bound is reported too) or terms of one bound (diffusion's timesteps).
    assert cls.monte_carlo in get_args(MonteCarlo)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_cost_is_declared(family: str, tiny: dict) -> None:
    """The evaluate stage reports `nfe_per_sample` next to samples per second."""
    for conditional in (False, True):
        nfe = build(family, tiny, conditional=conditional).nfe_per_sample
        assert isinstance(nfe, float) and nfe >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_is_valid_and_seeded(family: str, tiny: dict) -> None:
    model = build(family, tiny)
    samples = model.sample(N, generator=torch.Generator().manual_seed(0))
    assert_valid_samples(samples, N)
    assert torch.equal(samples, model.sample(N, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("family", FAMILIES)
def test_conditional_form(family: str, tiny: dict) -> None:
    model = build(family, tiny, conditional=True)
    assert model.conditional
    y = torch.arange(N) % CLASSES
    samples = model.sample(N, y, generator=torch.Generator().manual_seed(0))
    assert_valid_samples(samples, N)
    assert torch.equal(samples, model.sample(N, y, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError):
        model.sample(N)
    if model.likelihood != "none":
        x, labels = images(N)
        with torch.no_grad():
            log_prob = model.log_prob(x, labels)
        assert log_prob.shape == (N,) and torch.isfinite(log_prob).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_log_prob_is_a_finite_discrete_log_probability(family: str, tiny: dict) -> None:
    model = build(family, tiny)
    if model.likelihood == "none":
        pytest.skip(f"{family} reports no likelihood")
    x, _ = images(N)
    torch.manual_seed(0)
    with torch.no_grad():
        log_prob = model.log_prob(x)
    assert log_prob.shape == (N,)
    assert torch.isfinite(log_prob).all()
    # log P(x) of discrete data, or a lower bound on it, cannot be positive.
    assert (log_prob <= 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_when_the_family_has_a_latent(family: str, tiny: dict) -> None:
    model = build(family, tiny)
    if not model.has_latent:
        pytest.skip(f"{family} has no latent space")
    x, _ = images(N)
    z = model.encode(x)
    assert z.shape[0] == N
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_and_hparams_load_with_weights_only(family: str, tiny: dict) -> None:
    """Checkpoints hold only plain Python values and tensors (DESIGN.md, known traps)."""
    model = build(family, tiny)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "hparams": dict(model.hparams)}, buffer)
    buffer.seek(0)
    blob = torch.load(buffer, weights_only=True)
    rebuilt = MODELS[family](**blob["hparams"])
    rebuilt.load_state_dict(blob["state_dict"])


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_inference_layout_changes_no_number(family: str, conditional: bool, tiny: dict) -> None:
    """Evaluation and scoring run a CPU model's convolutions channels_last (`for_inference`):
    every pass the evaluation makes gives the contiguous layout's numbers, to float rounding,
    and works on its tensors (a `.view` of a channels_last activation would fail here)."""
    model = build(family, tiny, conditional=conditional)
    x, labels = images(N)
    y = labels if conditional else None

    def passes(m: GenerativeModule) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        out = {"samples": m.sample(N, y, generator=torch.Generator().manual_seed(0)).float()}
        if m.likelihood != "none":
            torch.manual_seed(0)
            out["log_prob"] = m.log_prob(x, y, samples=2)
        if m.ode_likelihood:
            torch.manual_seed(0)
            out["ode_log_prob"] = m.ode_log_prob(x, y)
        if m.has_energy:
            out["energy"] = m.energy(x, y)
        if m.has_latent:
            torch.manual_seed(0)
            out["latent"] = m.encode(x, y)
        return {k: v.detach() for k, v in out.items()}

    contiguous = passes(model)
    fast = for_inference(copy.deepcopy(model), channels_last=False)
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # Only convolutions change layout: a buffer of images (an EBM's replay store) keeps its
    # strides, which DDP's buffer broadcast needs (`convolutions_channels_last`).
    conv = torch.nn.Conv2d | torch.nn.ConvTranspose2d
    before = {n: m for n, m in model.named_modules() if not isinstance(m, conv)}
    for name, module in fast.named_modules():
        if name in before:
            for key, b in module.named_buffers(recurse=False):
                assert b.stride() == getattr(before[name], key).stride(), f"{name}.{key}"
    fast_passes = passes(fast)
    assert fast_passes.keys() == contiguous.keys()
    for name in contiguous:
        torch.testing.assert_close(fast_passes[name], contiguous[name], rtol=1e-4, atol=1e-4)
