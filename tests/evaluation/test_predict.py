"""Prediction with generative models: Bayes' rule, out-of-distribution detection, on models whose
densities are known exactly (a joint table, per-pixel categoricals fitted by counting)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from genlab.config import EvaluateParams, PredictionParams
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation import vocabulary as v
from genlab.evaluation.evaluate import prediction_metrics
from genlab.evaluation.intervals import auroc_estimate, wilson
from genlab.evaluation.ood import auroc as auroc_of
from genlab.evaluation.ood import calibrate, ood_sets
from genlab.evaluation.predict import accuracy, log_prior, posterior, score_images, scorer
from genlab.models import MODELS
from genlab.models.base import GenerativeModule
from genlab.models.ode import Solver


class PixelCategorical(GenerativeModule):
    """Independent categorical pixels, p(x | y) = prod_i theta_y[i, x_i]: an exact density whose
    parameters are given, not learned (probabilities (K or 1, D, L); zero is allowed)."""

    likelihood = "exact"

    def __init__(self, probs: torch.Tensor, *, image_shape, conditional: bool) -> None:
        classes = probs.shape[0] if conditional else 1
        super().__init__(image_shape=image_shape, levels=probs.shape[-1], num_classes=classes)
        self.save_hyperparameters({"conditional": conditional})
        self.register_buffer("log_theta", probs.double().log())

    def log_prob(self, x, y=None, *, samples: int = 1):
        flat = x.flatten(1).long()  # (B, D)
        table = self.log_theta[y] if y is not None else self.log_theta[[0] * len(x)]  # (B, D, L)
        return table.gather(2, flat[..., None])[..., 0].sum(1)  # (B,)


def counted(x: torch.Tensor, y: torch.Tensor | None, classes: int, levels: int) -> torch.Tensor:
    """Maximum-likelihood per-pixel categoricals with add-one smoothing, (K, D, L)."""
    flat = x.flatten(1).long()  # (N, D)
    groups = range(classes) if y is not None else [None]
    probs = []
    for k in groups:
        rows = flat if k is None else flat[y == k]
        counts = torch.nn.functional.one_hot(rows, levels).double().sum(0) + 1  # (D, L)
        probs.append(counts / counts.sum(1, keepdim=True))
    return torch.stack(probs)


def test_bayes_rule_on_the_four_person_table() -> None:
    """p(male, >30) = 1/4, p(male, <30) = 1/4, p(female, >30) = 1/2, p(female, <30) = 0:
    p(>30 | female) = 1 and p(>30 | male) = 1/2. x is gender (0 male, 1 female) as a 1x1 image
    with two levels; y is age (0: over 30, 1: under 30)."""
    # p(x | y): over 30, 1/3 male and 2/3 female; under 30, all male.
    probs = torch.tensor([[[1 / 3, 2 / 3]], [[1.0, 0.0]]])  # (K=2, D=1, L=2)
    model = PixelCategorical(probs, image_shape=(1, 1, 1), conditional=True)
    ages = torch.tensor([0, 1, 0, 0])  # (male, >30), (male, <30), (female, >30) twice
    prior = log_prior(ages, 2)
    assert prior.exp().tolist() == pytest.approx([3 / 4, 1 / 4])

    male, female = torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)
    x = torch.stack([male, female]).view(2, 1, 1, 1)
    scores = score_images(model, x, log_prior=prior, samples=1, batch_size=8, seed=0)
    p_over_30 = posterior(scores.joint)[:, 0].exp()
    assert p_over_30.tolist() == pytest.approx([1 / 2, 1.0])
    # The marginal is the table's row sum: p(male) = 1/2, p(female) = 1/2.
    assert scores.log_px.exp().tolist() == pytest.approx([1 / 2, 1 / 2])
    assert accuracy(scores.joint[1:], torch.tensor([0])) == 1.0  # every woman is over 30


def test_perfectly_separated_class_densities_classify_perfectly() -> None:
    """Class k puts all its mass on images whose first pixel is k: accuracy 1 on any such image,
    whatever the prior."""
    classes, levels, dims = 4, 6, 9
    probs = torch.full((classes, dims, levels), 1.0 / levels)
    probs[:, 0] = 0.0
    for k in range(classes):
        probs[k, 0, k] = 1.0
    model = PixelCategorical(probs, image_shape=(1, 3, 3), conditional=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(levels, (200, 1, 3, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(classes, (200,), generator=g)
    x[:, 0, 0, 0] = y.to(torch.uint8)
    skewed = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # any prior with full support
    scores = score_images(
        model, x, log_prior=log_prior(skewed, classes), samples=1, batch_size=32, seed=0
    )
    assert accuracy(scores.joint, y) == 1.0
    assert torch.allclose(posterior(scores.joint).exp().max(1).values, torch.ones(200).double())


def test_exact_model_tells_digits_from_noise(prepared_digits: Path) -> None:
    """Per-pixel categoricals fitted by counting on the digits: test digits against uniform noise
    have AUROC near 1, and the threshold calibrated on validation rejects about fpr of test."""
    meta = read_meta(prepared_digits)
    splits = {s: load_split(prepared_digits, s, meta) for s in ("train", "val", "test")}
    train = splits["train"]
    model = PixelCategorical(
        counted(train.x, None, 1, meta.levels), image_shape=meta.shape, conditional=False
    )
    params = PredictionParams(fpr=0.1)
    metrics = prediction_metrics(
        model, splits, heldout="test", params=params, protocol=EvaluateParams()
    )
    assert metrics[v.auroc("noise")] > 0.99
    assert metrics[v.auroc("noise", typicality=True)] > 0.99
    assert metrics[v.detected("noise")] == 1.0
    # Validation and test are written by different people: the rate moves, but stays near fpr.
    assert 0.01 < metrics[v.OOD_FPR] < 0.3
    assert metrics[v.ci_low(v.OOD_FPR)] < metrics[v.OOD_FPR] < metrics[v.ci_high(v.OOD_FPR)]
    for name in params.ood_sets:
        key = v.auroc(name)
        # DeLong intervals in float64: inside [0, 1], never 1.0000001.
        assert 0.0 <= metrics[v.ci_low(key)] <= metrics[key] <= metrics[v.ci_high(key)] <= 1.0
    assert v.class_acc("test") not in metrics  # unconditional: no classifier

    # The intervals are the rules of intervals.py applied to the scores: DeLong for the AUROC,
    # Wilson for the rates of flagged images (out of the set's, or the held-out split's, size).
    protocol = EvaluateParams()
    kw = {"log_prior": torch.zeros(1), "samples": 1, "batch_size": 250, "seed": protocol.seed}
    test = splits["test"]
    heldout = score_images(model, test.x, **kw).log_px
    (noise,) = ood_sets(["noise"], test.x, meta.levels, protocol.seed).values()
    expected = auroc_estimate(heldout, score_images(model, noise, **kw).log_px, confidence=0.95)
    key = v.auroc("noise")
    assert (metrics[key], metrics[v.ci_low(key)], metrics[v.ci_high(key)]) == tuple(expected)
    n = len(test)
    for key, rate in ((v.detected("noise"), 1.0), (v.OOD_FPR, metrics[v.OOD_FPR])):
        expected = wilson(round(rate * n), n, confidence=0.95)
        assert (metrics[key], metrics[v.ci_low(key)], metrics[v.ci_high(key)]) == pytest.approx(
            tuple(expected), rel=1e-12
        )
    assert metrics[v.ci_low(v.detected("noise"))] < 1.0 == metrics[v.ci_high(v.detected("noise"))]
    # A lower confidence: the same values inside narrower intervals.
    narrow = prediction_metrics(
        model, splits, heldout="test", params=params, protocol=EvaluateParams(confidence=0.8)
    )
    for key in (v.auroc("noise"), v.auroc("natural", typicality=True), v.OOD_FPR):
        assert narrow[key] == metrics[key]
        assert metrics[v.ci_low(key)] <= narrow[v.ci_low(key)]
        assert narrow[v.ci_high(key)] <= metrics[v.ci_high(key)]
        width = metrics[v.ci_high(key)] - metrics[v.ci_low(key)]
        # (DeLong's variance is 0 at a perfect separation: that interval is the point.)
        assert narrow[v.ci_high(key)] - narrow[v.ci_low(key)] < width or width == 0
    assert metrics[v.OOD_FPR] > 0 and narrow[v.ci_high(v.OOD_FPR)] < metrics[v.ci_high(v.OOD_FPR)]


def test_conditional_exact_model_classifies_and_reports_the_marginal(prepared_digits: Path) -> None:
    meta = read_meta(prepared_digits)
    splits = {s: load_split(prepared_digits, s, meta) for s in ("train", "val", "test")}
    train, test = splits["train"], splits["test"]
    probs = counted(train.x, train.y, meta.num_classes, meta.levels)
    model = PixelCategorical(probs, image_shape=meta.shape, conditional=True)
    metrics = prediction_metrics(
        model,
        splits,
        heldout="test",
        params=PredictionParams(ood_sets=["noise"]),
        protocol=EvaluateParams(),
    )
    # Naive Bayes on pixels: a weak but real classifier of the digits.
    acc = v.class_acc("test")
    assert metrics[acc] > 0.8
    assert metrics[v.ci_low(acc)] < metrics[acc] < metrics[v.ci_high(acc)]
    # Wilson's interval of the count of correctly classified test images.
    correct = round(metrics[acc] * len(test))
    expected = wilson(correct, len(test), confidence=0.95)
    assert (metrics[acc], metrics[v.ci_low(acc)], metrics[v.ci_high(acc)]) == pytest.approx(
        tuple(expected), rel=1e-12
    )
    prior = log_prior(train.y, meta.num_classes)
    joint = (
        torch.stack([model.log_prob(test.x, torch.full((len(test),), k)) for k in range(10)], 1)
        + prior
    )
    per_image = -torch.logsumexp(joint, 1)
    marginal = per_image.mean()
    key = v.nll_key("test", "exact", marginal=True)
    assert metrics[key] == pytest.approx(float(marginal))
    assert metrics[v.se(key)] == pytest.approx(float(per_image.std() / math.sqrt(len(test))))
    bpd = v.bpd_key("test", "exact", marginal=True)
    assert metrics[bpd] == pytest.approx(float(marginal) / (64 * math.log(2)))
    assert metrics[v.se(bpd)] == pytest.approx(metrics[v.se(key)] / (64 * math.log(2)))
    # An exact likelihood's marginal is exact: neither a bound nor an estimate by name.
    for estimate in (False, True):
        assert v.nll_key("test", "lower_bound", marginal=True, estimate=estimate) not in metrics


def test_energy_model_scores_with_its_energy(tiny: dict[str, dict]) -> None:
    """A conditional EBM: joint scores -E(x, k), log p(x) + log Z = -E(x), classes by f(x)."""
    kwargs = tiny["ebm"] | {"conditional": True}
    torch.manual_seed(0)
    model = MODELS["ebm"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs).eval()
    assert scorer(model) == "energy"
    x = torch.randint(17, (12, 1, 8, 8), dtype=torch.uint8)
    scores = score_images(model, x, log_prior=torch.zeros(10), samples=1, batch_size=5, seed=0)
    with torch.no_grad():
        assert torch.allclose(scores.log_px, -model.energy(x).double(), atol=1e-5)
        assert torch.equal(scores.joint.argmax(1), model.class_probs(x).argmax(1))
    # log p(x) alone: the energy's own marginal, one pass, the same number.
    alone = score_images(
        model, x, log_prior=torch.zeros(10), samples=1, batch_size=5, seed=0, joint=False
    )
    assert alone.joint is None
    torch.testing.assert_close(alone.log_px, scores.log_px, rtol=0, atol=1e-5)


def test_log_px_alone_of_a_family_that_needs_labels_is_its_marginal(tiny: dict[str, dict]) -> None:
    """A conditional bound family cannot score without labels: joint=False still marginalises
    the joint scores (the same numbers, the joint returned too)."""
    kwargs = tiny["vae"] | {"conditional": True}
    torch.manual_seed(0)
    model = MODELS["vae"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs).eval()
    assert not model.scores_without_labels
    x = torch.randint(17, (6, 1, 8, 8), dtype=torch.uint8)
    kw = {"log_prior": torch.full((10,), -math.log(10)), "samples": 4, "batch_size": 4, "seed": 7}
    both, alone = score_images(model, x, **kw), score_images(model, x, joint=False, **kw)
    assert torch.equal(alone.log_px, both.log_px)
    assert torch.equal(alone.joint, both.joint)


def test_a_family_without_likelihood_or_energy_cannot_score(tiny: dict[str, dict]) -> None:
    model = MODELS["gan"](image_shape=(1, 8, 8), levels=17, num_classes=10, **tiny["gan"])
    assert scorer(model) is None
    with pytest.raises(ValueError, match="neither a likelihood nor an energy"):
        score_images(
            model,
            torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
            log_prior=torch.zeros(10),
            samples=1,
            batch_size=2,
            seed=0,
        )


def test_bound_scores_reuse_the_same_draws_for_every_class(tiny: dict[str, dict]) -> None:
    """Common random numbers: scoring twice gives identical numbers, and the random state of the
    caller is left as it was."""
    kwargs = tiny["vae"] | {"conditional": True}
    torch.manual_seed(0)
    model = MODELS["vae"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs).eval()
    x = torch.randint(17, (6, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = score_images(model, x, log_prior=torch.zeros(10), samples=4, batch_size=4, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = score_images(model, x, log_prior=torch.zeros(10), samples=4, batch_size=4, seed=7)
    assert torch.equal(a.joint, b.joint)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        first = model.log_prob(x[:4], torch.full((4,), 3), samples=4).double()
    assert torch.allclose(a.joint[:4, 3], first)


def test_a_shortlist_rescores_the_best_classes_with_every_draw(tiny: dict[str, dict]) -> None:
    """Successive elimination on a conditional bound family: every class is screened with a
    fifth of the draws; the `shortlist` best of each image get exactly the all-draw score of
    full scoring (same seed, same draws), the others their screening score capped below them."""
    kwargs = tiny["vae"] | {"conditional": True}
    torch.manual_seed(0)
    model = MODELS["vae"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs).eval()
    x = torch.randint(17, (6, 1, 8, 8), dtype=torch.uint8)
    prior = torch.linspace(-3, -1.5, 10).double()
    kw = {"log_prior": prior, "samples": 10, "batch_size": 6, "seed": 7}
    full = score_images(model, x, **kw)
    short = score_images(model, x, shortlist=3, **kw)
    screen = score_images(model, x, **kw | {"samples": 2})  # 10 // 5 draws
    top = screen.joint.topk(3, dim=1).indices
    kept = torch.zeros_like(full.joint, dtype=torch.bool).scatter_(1, top, True)
    assert torch.allclose(short.joint[kept], full.joint[kept])
    lowest = short.joint.masked_fill(~kept, math.inf).min(1, keepdim=True).values
    out = torch.minimum(screen.joint, lowest)
    assert torch.allclose(short.joint[~kept], out[~kept])
    assert torch.equal(short.log_px, torch.logsumexp(short.joint, dim=1))
    # The same pass gives detection's estimate (a shortlist of one) from the same draws.
    alone = score_images(model, x, shortlist=1, joint=False, **kw)
    assert torch.equal(short.log_px_top1, alone.log_px) and alone.log_px_top1 is None
    assert full.log_px_top1 is None
    # Everything kept, or a family whose score draws nothing: the full scores.
    assert torch.equal(score_images(model, x, shortlist=10, **kw).joint, full.joint)
    probs = torch.full((10, 64, 17), 1 / 17)
    exact = PixelCategorical(probs, image_shape=(1, 8, 8), conditional=True)
    assert torch.equal(
        score_images(exact, x, shortlist=2, **kw).joint, score_images(exact, x, **kw).joint
    )


def test_flow_matching_scores_with_its_own_draws_and_no_shortlist(
    tiny: dict[str, dict],
) -> None:
    """A family whose draws are ODE solves scores prediction with its `prediction_samples`
    draws, not the protocol's: every class of an image on the same draws and probes, and no
    screening (a fifth of one draw is none). (The tolerance is not what this can tell: on an
    untrained network every tolerance gives the same numbers.)"""
    kwargs = tiny["flow_matching"] | {"conditional": True, "prediction_samples": 2}
    kwargs |= {"prediction_rtol": 0.1, "prediction_atol": 0.1}
    torch.manual_seed(0)
    model = MODELS["flow_matching"](image_shape=(1, 8, 8), levels=17, num_classes=3, **kwargs)
    model.eval()
    x = torch.randint(17, (4, 1, 8, 8), dtype=torch.uint8)
    prior = torch.tensor([0.2, 0.3, 0.5]).log().double()
    scores = score_images(model, x, log_prior=prior, samples=30, batch_size=4, seed=5, shortlist=2)
    assert model.prediction_samples(30) == 2
    solver = Solver("dopri5", rtol=0.1, atol=0.1)
    columns = []
    for k in range(3):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            columns.append(model.bound(x, torch.full((4,), k), 2, solver=solver).mean.double())
    assert torch.allclose(scores.joint, torch.stack(columns, 1) + prior)


@pytest.mark.parametrize("classification", [None, 20])
@pytest.mark.parametrize("shortlist", [3, None])
def test_detection_gives_the_best_class_every_draw_and_classification_the_shortlist(
    shortlist: int | None,
    classification: int | None,
    tiny: dict[str, dict],
    prepared_digits: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OOD detection thresholds log p(x) with the most likely class alone rescored
    (`detection_shortlist`: 1), classification keeps the params' shortlist; `shortlist: null`
    scores every class with every draw for both. Where both take the same draws the held-out
    split is scored once, the classifying pass giving detection's estimate too; with their own
    `classification_samples` Bayes' rule takes those and detection scores the split again."""
    passes: list[str] = []

    def counted_pass(*args, what: str, **kwargs):
        passes.append(what)
        return score_images(*args, what=what, **kwargs)

    monkeypatch.setattr("genlab.evaluation.evaluate.score_images", counted_pass)
    kwargs = tiny["vae"] | {"conditional": True}
    torch.manual_seed(0)
    model = MODELS["vae"](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs).eval()
    meta = read_meta(prepared_digits)
    splits = {s: load_split(prepared_digits, s, meta) for s in ("train", "val", "test")}
    splits = {s: type(split)(x=split.x[:30], y=split.y[:30]) for s, split in splits.items()}
    params = PredictionParams(
        bound_samples=10,
        classification_samples=classification,
        shortlist=shortlist,
        ood_sets=["hflip"],
    )
    protocol = EvaluateParams(batch_size=30)
    metrics = prediction_metrics(model, splits, heldout="test", params=params, protocol=protocol)
    again = [] if classification is None else ["scoring test"]
    assert passes == ["classifying test", *again, "scoring val", "scoring OOD hflip"]
    kw = {
        "log_prior": log_prior(splits["train"].y, 10),
        "samples": 10,
        "batch_size": 30,
        "seed": protocol.seed,
    }
    detect = kw | {"shortlist": None if shortlist is None else 1, "joint": False}
    val = score_images(model, splits["val"].x, **detect).log_px
    held = score_images(model, splits["test"].x, **detect).log_px
    flipped = ood_sets(["hflip"], splits["test"].x, 17, protocol.seed)["hflip"]
    outside = score_images(model, flipped, **detect).log_px
    threshold = calibrate(val, params.statistic, params.fpr).threshold
    assert metrics[v.OOD_THRESHOLD] == pytest.approx(threshold, rel=1e-12)
    assert metrics[v.auroc("hflip")] == pytest.approx(auroc_of(held, outside), rel=1e-12)
    classify = kw | {"samples": 10 if classification is None else classification}
    joint = score_images(model, splits["test"].x, shortlist=shortlist, **classify).joint
    assert metrics[v.class_acc("test")] == accuracy(joint, splits["test"].y)
    if shortlist is not None:  # the two estimates differ: detection did not reuse the joint
        assert not torch.equal(held, torch.logsumexp(joint, dim=1))


@pytest.mark.parametrize(("family", "estimate"), [("vae", False), ("diffusion", True)])
def test_the_conditional_marginal_is_a_bound_or_an_estimate_as_the_draws_say(
    family: str, estimate: bool, tiny: dict[str, dict], prepared_digits: Path
) -> None:
    """Importance-weighted draws (VAE): log sum_y p(y) p_hat(x|y) is still a bound in
    expectation. Terms of one bound (diffusion): a log-sum-exp of noisy per-class estimates is
    biased low, so the marginal is named an estimate."""
    kwargs = tiny[family] | {"conditional": True}
    torch.manual_seed(0)
    model = MODELS[family](image_shape=(1, 8, 8), levels=17, num_classes=10, **kwargs).eval()
    assert model.monte_carlo == ("terms" if estimate else "importance")
    meta = read_meta(prepared_digits)
    splits = {s: load_split(prepared_digits, s, meta) for s in ("train", "val", "test")}
    splits = {s: type(split)(x=split.x[:40], y=split.y[:40]) for s, split in splits.items()}
    metrics = prediction_metrics(
        model,
        splits,
        heldout="test",
        params=PredictionParams(bound_samples=2, shortlist=None, ood_sets=["noise"]),
        protocol=EvaluateParams(),
    )
    key = v.nll_key("test", "lower_bound", marginal=True, estimate=estimate)
    assert key in metrics and v.se(key) in metrics
    other = v.nll_key("test", "lower_bound", marginal=True, estimate=not estimate)
    assert other not in metrics
    bpd = v.bpd_key("test", "lower_bound", marginal=True, estimate=estimate)
    assert metrics[bpd] == pytest.approx(metrics[key] / (64 * math.log(2)))
    assert metrics[v.se(bpd)] == pytest.approx(metrics[v.se(key)] / (64 * math.log(2)))
    assert v.bpd_key("test", "lower_bound", marginal=True, estimate=not estimate) not in metrics
    # The name says which: "estimate" for terms of one bound, "bound" for importance draws.
    assert ("estimate" in key) is estimate and ("bound" in key) is not estimate
