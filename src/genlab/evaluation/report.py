"""The comparison a user reads first: which family is best at each job, and where the data
cannot tell.

A model of p(x) should (1) generate new examples, (2) give a likelihood, which (3) tells data from
out-of-distribution images, and (4) give features learned without labels; a model of p(x | y) also
(5) generates a chosen class and (6) classifies by Bayes' rule, p(y | x) ∝ p(x | y) p(y). Per
question the report ranks the families *with their intervals*: families whose intervals overlap
are tied, and the ranking never orders them. It also reads every family against two baseline
rows measured under the same protocol (`baselines.py`): a *copycat* that redraws training
images, and *held-out real* images no model trained on. A family whose memorisation statistics
are significantly worse than real new images' is flagged, in words, in the summary table.

This module only reads the metrics files (as dicts) and writes Markdown; `figures.py` draws
the PNGs. With several training seeds a family's number is the mean over seeds, with the t
interval of that mean (training and sampling noise both inside), next to each seed's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import stats

from genlab import paths
from genlab.evaluation import vocabulary as v
from genlab.evaluation.vocabulary import Better, Estimate, Likelihood, MonteCarlo

Question = Literal[
    "generation", "likelihood", "ood", "classification", "representation", "conditional"
]
QUESTIONS: dict[Question, str] = {
    "generation": "generation: FID ↓",
    "likelihood": "likelihood: nats/image ↓",
    "ood": "OOD: AUROC, worst set ↑",
    "classification": "classification: accuracy ↑",
    "representation": "representation: probe accuracy ↑",
    "conditional": "conditional generation: accuracy ↑",
}
DIRECTION: dict[Question, Better] = {
    "generation": "lower",
    "likelihood": "lower",
    "ood": "higher",
    "classification": "higher",
    "representation": "higher",
    "conditional": "higher",
}
GridKind = Literal["samples", "classes", "interpolation", "traversal"]
GRID_FILES: dict[GridKind, Callable[[str, int], Path]] = {
    "samples": paths.family_samples,
    "classes": paths.family_class_grid,
    "interpolation": paths.family_interpolation,
    "traversal": paths.family_traversal,
}
COPYCAT, HELDOUT, REAL = "copycat", "held-out real", "real data"
BASELINE_NOTES = {
    COPYCAT: "training images redrawn with replacement: what a model that memorised its "
    "training set scores",
    HELDOUT: "real images no model trained on (the validation split), at the models' set size, "
    "against the reference split: what a generator of genuinely new images scores",
    REAL: "the reference split itself: its memorisation statistics against train, the evaluator "
    "classifier's accuracy (discriminative) and a linear probe on raw pixels",
}


# ---------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Capabilities:
    """What a family's contract and config let it answer (from `models`, passed in by the
    stage so that this module imports no torch)."""

    likelihood: Likelihood
    monte_carlo: MonteCarlo
    scores: bool  # log p(x) or -E(x) ranks images
    has_energy: bool
    has_latent: bool
    conditional: bool


def reasons(family: str, c: Capabilities) -> dict[Question, str | None]:
    """Per question, None when the family can answer it, else why not (from the contract and
    the config, never from the family's name)."""
    unconditional = f"unconditional (set models.{family}.conditional: true)"
    if c.likelihood != "none":
        likelihood = None
    elif c.has_energy:
        likelihood = "unnormalised (energy only)"
    else:
        likelihood = "no likelihood or energy"
    if not c.conditional:
        classification: str | None = unconditional
    elif not c.scores:
        classification = "no likelihood or energy for Bayes' rule"
    else:
        classification = None
    return {
        "generation": None,
        "likelihood": likelihood,
        "ood": None if c.scores else "no likelihood or energy",
        "classification": classification,
        "representation": None if c.has_latent else "no encoder",
        "conditional": None if c.conditional else unconditional,
    }


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a family (one metrics dict per training seed) or a baseline
    (one metrics dict)."""

    name: str
    runs: dict[int, dict[str, float]]  # training seed -> metrics (a baseline: {0: ...})
    confidence: float
    split: str  # the held-out split the numbers are on
    capabilities: Capabilities | None = None  # None: a baseline row
    why_not: dict[Question, str | None] | None = None

    @property
    def is_family(self) -> bool:
        return self.capabilities is not None

    def reason(self, question: Question) -> str | None:
        return None if self.why_not is None else self.why_not[question]

    def seed_estimates(self, key: str) -> dict[int, Estimate]:
        return {s: v.estimate(m, key, confidence=self.confidence) for s, m in self.runs.items()}

    def estimate(self, key: str) -> Estimate:
        """The row's value of `key`: one run's estimate, or the mean over training seeds with
        the t interval of that mean."""
        per_seed = [e for e in self.seed_estimates(key).values() if math.isfinite(e.value)]
        if not per_seed:
            return Estimate(math.nan, math.nan, math.nan)
        if len(self.runs) == 1:
            return per_seed[0]
        return seeds_interval([e.value for e in per_seed], self.confidence)

    def seed_sd(self, key: str) -> float:
        values = [e.value for e in self.seed_estimates(key).values() if math.isfinite(e.value)]
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    def likelihood_key(self) -> str | None:
        """The NLL comparable across families: the marginal -log sum_y p(x|y) p(y) for a
        conditional family (an estimate where the bound's draws are terms), else the NLL."""
        c = self.capabilities
        if c is None or c.likelihood == "none":
            return None
        if c.conditional:
            return v.marginal_nll_key(self.split, c.likelihood, c.monte_carlo)
        return v.nll_key(self.split, c.likelihood)

    def likelihood_is_bound(self) -> bool:
        """Whether `likelihood_key`'s number is an upper bound on the NLL (shown with "≤"): a
        bound family's, unless it is a marginal that is only an estimate."""
        c = self.capabilities
        if c is None or c.likelihood != "lower_bound":
            return False
        return not (c.conditional and v.marginal_is_estimate(c.likelihood, c.monte_carlo))


def seeds_interval(values: Sequence[float], confidence: float) -> Estimate:
    """Mean of per-seed values with its t interval (k - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * x.std(ddof=1) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half)


def worst_ood(row: Row, ood_sets: list[str]) -> tuple[str, Estimate] | None:
    """The OOD set the row tells apart worst (lowest AUROC), with its estimate."""
    found = {s: row.estimate(v.auroc(s)) for s in ood_sets}
    found = {s: e for s, e in found.items() if math.isfinite(e.value)}
    if not found:
        return None
    name = min(found, key=lambda s: found[s].value)
    return name, found[name]


def headline(row: Row, question: Question, ood_sets: list[str]) -> Estimate:
    """The number a question ranks rows by."""
    if question == "generation":
        return row.estimate(v.FID)
    if question == "likelihood":
        key = row.likelihood_key()
        return row.estimate(key) if key else Estimate(math.nan, math.nan, math.nan)
    if question == "ood":
        worst = worst_ood(row, ood_sets)
        return worst[1] if worst else Estimate(math.nan, math.nan, math.nan)
    if question == "classification":
        return row.estimate(v.class_acc(row.split))
    if question == "representation":
        return row.estimate(v.probe_acc(row.split))
    return row.estimate(v.COND_ACC)


# ---------------------------------------------------------------- ranking with ties


@dataclass(frozen=True)
class Ranking:
    groups: list[list[str]]  # best first; the rows of a group are tied
    values: dict[str, Estimate]
    tied_with: dict[str, list[str]]  # every row whose interval overlaps this one's

    def chain(self) -> str:
        """ "a ≈ b > c": ≈ inside a group of ties, > between groups that are separated."""
        return " > ".join(" ≈ ".join(group) for group in self.groups)

    def place(self, name: str) -> int:
        return next(i for i, group in enumerate(self.groups) if name in group) + 1


def rank(values: dict[str, Estimate], better: Better) -> Ranking:
    """Order rows by value; a group is the best remaining row and every remaining row whose
    interval overlaps its interval (tied: the data cannot order them). Rows without a finite
    value are left out; a value without an interval ties with nothing."""
    finite = {k: e for k, e in values.items() if math.isfinite(e.value)}
    sign = 1 if better == "lower" else -1
    order = sorted(finite, key=lambda k: sign * finite[k].value)
    groups, left = [], list(order)
    while left:
        leader = finite[left[0]]
        group = [k for k in left if k == left[0] or finite[k].overlaps(leader)]
        groups.append(group)
        left = [k for k in left if k not in group]
    tied = {k: [j for j in order if j != k and finite[k].overlaps(finite[j])] for k in order}
    return Ranking(groups, finite, tied)


# ---------------------------------------------------------------- copying, in words


@dataclass(frozen=True)
class Verdict:
    copies: bool
    words: str


def copying(row: Row, yardstick: Row | None) -> Verdict:
    """Whether the row's statistics say it copies its training images: more exact copies or
    nearest-neighbour memorisation, less authenticity, or a lower data-copying statistic C_T
    (Meehan et al. 2020) than real new images (`yardstick`: the held-out real row, else the
    real test split), with intervals that do not overlap. Without a yardstick's C_T, a C_T
    significantly below 0. (The yardstick matters: where the reference split's writers differ
    from the training split's, as on the digits, real validation images already score C_T < 0
    against the test split.)"""
    findings = []
    for key, what, worse in (
        (v.EXACT_COPIES, "exact copies of training images", "higher"),
        (v.NN_MEMORISED_PIXELS, "nearest-neighbour copies (pixels)", "higher"),
        (v.NN_MEMORISED_FEATURES, "nearest-neighbour copies (features)", "higher"),
        (v.AUTHENTICITY, "authentic samples", "lower"),
    ):
        mine = row.estimate(key)
        if yardstick is None or not mine.has_interval:
            continue
        real = yardstick.estimate(key)
        if not real.has_interval:
            continue
        beyond = mine.low > real.high if worse == "higher" else mine.high < real.low
        if beyond:
            findings.append(f"{mine.value:.0%} {what} (real new images: {real.value:.0%})")
    c_t = row.estimate(v.C_T)
    real_c_t = yardstick.estimate(v.C_T) if yardstick is not None else None
    if real_c_t is not None and real_c_t.has_interval:
        if c_t.has_interval and c_t.high < real_c_t.low:
            findings.append(
                f"C_T {c_t.value:.1f} (real new images: {real_c_t.value:.1f}): closer to the "
                f"training images than new data are"
            )
    elif c_t.has_interval and c_t.high < 0:
        findings.append(f"C_T {c_t.value:.1f} < 0: closer to the training images than new data")
    if findings:
        return Verdict(True, "**copies**: " + "; ".join(findings))
    return Verdict(False, "no sign of copying")


# ---------------------------------------------------------------- markdown


def fmt(e: Estimate, digits: int = 3, *, bound: bool = False) -> str:
    """ "1.234 [1.100, 1.400]"; "≤ " in front of an upper bound on an NLL."""
    if not math.isfinite(e.value):
        return "n/a"
    head = ("≤ " if bound else "") + f"{e.value:.{digits}f}"
    if not e.has_interval:
        return head
    return f"{head} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


DIGITS: dict[Question, int] = {
    "generation": 3,
    "likelihood": 2,
    "ood": 3,
    "classification": 3,
    "representation": 3,
    "conditional": 3,
}


def _cell(row: Row, question: Question, ood_sets: list[str], ranking: Ranking) -> str:
    reason = row.reason(question)
    if reason is not None:
        return f"n/a: {reason}"
    e = headline(row, question, ood_sets)
    if not math.isfinite(e.value):
        return f"n/a: not measured (re-run evaluate@{row.name})"
    bound = question == "likelihood" and row.likelihood_is_bound()
    text = fmt(e, DIGITS[question], bound=bound)
    if question == "ood":
        worst = worst_ood(row, ood_sets)
        text += f" ({worst[0]})"
    if row.name in ranking.values:
        place = ranking.place(row.name)
        tied = ranking.tied_with[row.name]
        text += f" — #{place}" + (f", tied with {', '.join(tied)}" if tied else "")
    return text


def _baseline_cell(row: Row | None, question: Question, ood_sets: list[str]) -> str:
    if row is None:
        return "—"
    e = headline(row, question, ood_sets)
    return fmt(e, DIGITS[question]) if math.isfinite(e.value) else "—"


def rankings(families: list[Row], ood_sets: list[str]) -> dict[Question, Ranking]:
    return {
        q: rank(
            {r.name: headline(r, q, ood_sets) for r in families if r.reason(q) is None},
            DIRECTION[q],
        )
        for q in QUESTIONS
    }


def _reading(families: list[Row], baselines: dict[str, Row], ranking: Ranking) -> list[str]:
    """How each family's FID reads against the copycat and the held-out real images."""
    copycat, heldout = baselines.get(COPYCAT), baselines.get(HELDOUT)
    lines = []
    for row in families:
        fid = row.estimate(v.FID)
        if not math.isfinite(fid.value):
            continue
        said = []
        if heldout is not None:
            real = heldout.estimate(v.FID)
            if fid.overlaps(real):
                said.append("tied with held-out real images")
            elif fid.value < real.value:
                said.append("*below* held-out real images: closer to the data than new images are")
            else:
                said.append("above held-out real images")
        if copycat is not None and fid.overlaps(copycat.estimate(v.FID)):
            said.append("tied with the copycat: FID cannot tell it from a copy of the training set")
        lines.append(f"- **{row.name}** (FID {fmt(fid)}): {'; '.join(said) or 'no baseline'}.")
    return lines


SAMPLE_COLUMNS = [
    ("FID ↓", v.FID, 3),
    ("KID ↓", v.KID, 4),
    ("precision ↑", v.PRECISION, 3),
    ("recall ↑", v.RECALL, 3),
    ("density ↑", v.DENSITY, 3),
    ("coverage ↑", v.COVERAGE, 3),
    ("IS ↑", v.ISC, 2),
    ("cond. acc. ↑", v.COND_ACC, 3),
]
MEMO_COLUMNS = [
    ("exact copies ↓", v.EXACT_COPIES, 3),
    ("NN copies, pixels ↓", v.NN_MEMORISED_PIXELS, 3),
    ("NN copies, features ↓", v.NN_MEMORISED_FEATURES, 3),
    ("authenticity ↑", v.AUTHENTICITY, 3),
    ("C_T (≈0; ≪0 copies)", v.C_T, 2),
]


def _metric_table(rows: list[Row], columns: list[tuple[str, str, int]]) -> list[str]:
    body = [[r.name] + [fmt(r.estimate(key), digits) for _, key, digits in columns] for r in rows]
    return _table(["row"] + [c[0] for c in columns], body)


def _likelihood_table(families: list[Row], dims: int) -> list[str]:
    header = [
        "family",
        "likelihood",
        "−log p(x) nats ↓",
        "bits/dim ↓",
        "−log p(x | y) nats ↓",
        "held-out − train gap, nats",
        "images",
    ]
    body = []
    for r in families:
        reason = r.reason("likelihood")
        if reason is not None:
            body.append([r.name, r.capabilities.likelihood, f"n/a: {reason}", "", "", "", ""])
            continue
        scored = r.estimate(v.SCORED_IMAGES).value
        c = r.capabilities
        bound = r.likelihood_is_bound()
        key = r.likelihood_key()
        nats = r.estimate(key)
        bpd = Estimate(*(x / (dims * math.log(2)) for x in nats))
        given = (
            fmt(
                r.estimate(v.nll_key(r.split, c.likelihood)), 2, bound=c.likelihood == "lower_bound"
            )
            if c.conditional
            else "n/a: unconditional"
        )
        kind = c.likelihood + (" (marginal: estimate)" if "estimate" in key else "")
        body.append(
            [
                r.name,
                kind,
                fmt(nats, 2, bound=bound),
                fmt(bpd, 3, bound=bound),
                given,
                fmt(r.estimate(v.NLL_GAP), 2),
                f"{scored:.0f}" if math.isfinite(scored) else "—",
            ]
        )
    return _table(header, body)


def _ode_likelihood_lines(families: list[Row]) -> list[str]:
    """The bound of each family's probability-flow ODE (diffusion) beside the family's own, on
    the same first images; no lines when no family has one."""
    rows = [r for r in families if math.isfinite(r.estimate(v.ode_nll_key(r.split)).value)]
    if not rows:
        return []
    body = []
    for r in rows:
        nats, bpd = (r.estimate(key) for key in v.ode_keys(r.split))
        difference = r.estimate(v.ode_difference_key(r.split))
        images = r.estimate(v.ODE_IMAGES).value
        body.append(
            [
                r.name,
                fmt(nats, 2, bound=True),
                fmt(bpd, 3, bound=True),
                fmt(difference, 2),
                f"{images:.0f}" if math.isfinite(images) else "—",
            ]
        )
    header = ["family", "ODE bound, nats ↓", "bits/dim ↓", "ODE − own bound, nats", "images"]
    return [
        "",
        "**The probability-flow ODE's likelihood.** The same network read as a continuous "
        "normalizing flow (Song et al. 2021) from N(0, I) at the family's `ode_horizon` to the "
        "chain's first step, read out by the chain's own decoder: another model than the "
        "family's own, bounded with the forward process's first step as its dequantizer and a "
        "Hutchinson trace, of p(x | y) where the family is conditional, on the first *images* "
        "scored above (each an ODE solve). *ODE − own bound*: the difference on those same "
        "images, with its paired interval (< 0: the "
        "ODE's model gives the images more probability).",
        "",
        *_table(header, body),
    ]


def _ood_table(families: list[Row], ood_sets: list[str]) -> list[str]:
    body = []
    for r in families:
        reason = r.reason("ood")
        if reason is not None:
            body.append([r.name, "—", f"n/a: {reason}"] + [""] * (len(ood_sets) - 1))
            continue
        score = "likelihood" if r.capabilities.likelihood != "none" else "−energy"
        for label, typical in ((score, False), ("typicality", True)):
            cells = [fmt(r.estimate(v.auroc(s, typicality=typical)), 3) for s in ood_sets]
            body.append([r.name, f"AUROC, {label}", *cells])
        cells = [fmt(r.estimate(v.detected(s)), 3) for s in ood_sets]
        body.append([r.name, "detected", *cells])
    return _table(["family", "statistic", *ood_sets], body)


def _class_fid_table(families: list[Row]) -> list[str]:
    conditional = [r for r in families if r.reason("conditional") is None]
    classes = sorted(
        {
            k
            for r in conditional
            for m in r.runs.values()
            for key in m
            if (k := v.class_fid_index(key)) is not None
        }
    )
    if not conditional or not classes:
        return ["No conditional family."]
    body = [
        [r.name]
        + [fmt(r.estimate(v.class_fid(k)), 2) for k in classes]
        + [fmt(r.estimate(v.CLASS_FID_MEAN), 2)]
        for r in conditional
    ]
    return _table(["family", *[f"class {k}" for k in classes], "mean"], body)


def _seeds_table(families: list[Row]) -> list[str]:
    seeds = sorted({s for r in families for s in r.runs})
    if len(seeds) < 2:  # no spread to show: say how to measure it instead of "± nan"
        return [
            f"One training seed ({', '.join(map(str, seeds))}): how much a family's numbers move "
            "with its training seed is not measured. Train several "
            "(`dvc exp run -S 'seeds=[0,1,2]' -S evaluate.sample_seeds=3`, the three-seed "
            "profile) to get each number's mean ± sd over seeds here."
        ]
    body = []
    for r in families:
        for q, key in (("generation", v.FID), ("likelihood", r.likelihood_key())):
            if key is None or r.reason(q) is not None:
                continue
            per = r.seed_estimates(key)
            cells = [fmt(per[s], 3) if s in per else "—" for s in seeds]
            mean, sd = r.estimate(key), r.seed_sd(key)
            body.append([r.name, key, *cells, f"{mean.value:.3f} ± {sd:.3f}"])
    return _table(["family", "metric", *[f"seed {s}" for s in seeds], "mean ± sd"], body)


def _compute_table(families: list[Row]) -> list[str]:
    """What each family cost: its training (steps, FLOPs, wall time) and drawing one image
    (FLOPs, network evaluations, seconds); a mean over training seeds."""

    def value(r: Row, key: str) -> float:
        return r.estimate(key).value

    def num(x: float, form: str) -> str:
        return format(x, form) if math.isfinite(x) else "—"

    body = []
    for r in families:
        per_s = value(r, v.SAMPLES_PER_S)
        body.append(
            [
                r.name,
                num(value(r, v.NUM_PARAMS), ",.0f"),
                num(value(r, v.TRAIN_STEPS), ",.0f"),
                num(value(r, v.TRAIN_FLOPS), ".3g"),
                num(value(r, v.TRAIN_WALL_S), ".0f"),
                num(value(r, v.SAMPLE_FLOPS), ".3g"),
                num(value(r, v.NFE_PER_SAMPLE), ".0f"),
                num(1e3 / per_s if per_s > 0 else math.nan, ".3g"),
            ]
        )
    header = [
        "family",
        "parameters",
        "training steps",
        "training FLOPs",
        "training s",
        "FLOPs / sample",
        "NFE / sample",
        "ms / sample",
    ]
    return _table(header, body)


def summary_markdown(
    families: list[Row],
    baselines: dict[str, Row],
    *,
    dataset: str,
    dims: int,
    ood_sets: list[str],
    figures: list[str],
    grids: dict[str, dict[GridKind, Path | str]],
    grid_seed: int,
    extractor: str,
    protocol_id: str,
) -> str:
    """reports/summary.md: the headline table with ranks, ties and copying verdicts, how to read
    it, one ranking per question, the detailed tables, the figures and the grids (links are
    relative to reports/)."""
    split = families[0].split if families else "test"
    confidence = families[0].confidence if families else 0.95
    ranked = rankings(families, ood_sets)
    yardstick = baselines.get(HELDOUT) or baselines.get(REAL)
    headline_rows = [
        [
            r.name,
            *[_cell(r, q, ood_sets, ranked[q]) for q in QUESTIONS],
            copying(r, yardstick).words,
        ]
        for r in families
    ]
    for name in (COPYCAT, HELDOUT, REAL):
        row = baselines.get(name)
        if row is None:
            continue
        cells = [_baseline_cell(row, q, ood_sets) for q in QUESTIONS]
        verdict = "—" if row is yardstick or name == REAL else copying(row, yardstick).words
        headline_rows.append([f"*{name}*", *cells, verdict])
    seeds = sorted({s for r in families for s in r.runs})
    lines = [
        f"# genlab comparison — {dataset}",
        "",
        f"Every number carries its {confidence:.0%} interval in brackets (sample metrics: "
        f"several sample sets and a bootstrap of the reference images; likelihoods: the "
        f"standard error over images; rates: Wilson; AUROC: DeLong). `#k` is a family's place "
        f"for the question; families whose intervals overlap are **tied**, and tied families "
        f"are not ordered. Held-out numbers are on the `{split}` split. "
        + (
            f"Training seeds {', '.join(map(str, seeds))}: a family's number is the mean over "
            f"seeds with the interval of that mean."
            if len(seeds) > 1
            else "One training seed: the intervals say nothing about training noise."
        ),
        "",
        *_table(["family", *QUESTIONS.values(), "memorisation"], headline_rows),
        "",
        "Baseline rows (in italics), measured under the same protocol:",
        "",
        *[f"- *{name}*: {note}." for name, note in BASELINE_NOTES.items() if name in baselines],
        "",
        "A family tied with *held-out real* on FID generates as well as the metric can see; a "
        "family tied with the *copycat* cannot be told from a copy of the training set by FID "
        "alone: read its memorisation column. A family is flagged as copying when its "
        "memorisation statistics, C_T included, are significantly worse than real new images' "
        "(intervals apart: real new images can score C_T < 0 themselves, where the reference "
        "split's writers differ from the training split's), or, with no held-out real row, when "
        "its C_T is significantly below 0.",
        "",
        "## Rankings",
        "",
        *[
            f"- **{title}**: {ranked[q].chain() or 'no family answers'}"
            for q, title in QUESTIONS.items()
        ],
        "",
        "≈: tied (intervals overlap); >: separated. Overlap is not transitive: a ≈ b and b ≈ c "
        "can hold while a > c; each family's cell above lists everything it ties with.",
        "",
        "### Generation against the baselines",
        "",
        *_reading(families, baselines, ranked["generation"]),
        "",
        "## Sample quality",
        "",
        f"Feature space `{extractor}`, reference split `{split}`, protocol `{protocol_id}` "
        f"(`metrics/baselines.json`).",
        "",
        *_metric_table(
            families + [baselines[n] for n in (COPYCAT, HELDOUT) if n in baselines], SAMPLE_COLUMNS
        ),
        "",
        "## Memorisation",
        "",
        "Against the training split: exact copies; nearest-neighbour copies, d(NN1)/d(NN2) < 1/3 "
        "in pixels and in the evaluator's features; authenticity (Alaa et al. 2022, the share "
        "of samples farther from their nearest training image than that image is from its own "
        "neighbour); the data-copying statistic C_T (Meehan et al. 2020: about 0 for new data, "
        "strongly negative for copies, positive when samples are farther from the training "
        "images than new data).",
        "",
        *_metric_table(
            families + [baselines[n] for n in (COPYCAT, HELDOUT, REAL) if n in baselines],
            MEMO_COLUMNS,
        ),
        "",
        "## Likelihood",
        "",
        "Nats per image of the discrete held-out data; `≤` marks an upper bound on the NLL. For "
        "a conditional family −log p(x) is the marginal −log Σ_y p(x | y) p(y), comparable with "
        "unconditional families; where the bound's Monte Carlo draws are terms of one bound "
        "(diffusion) that marginal is an *estimate* (biased low), not a bound. The gap is "
        "held-out NLL minus the NLL of as many training images (> 0: the model prefers its "
        "training images); *images*: the held-out images scored (`evaluate.scored_images` "
        "bounds them), the n behind every interval here, in OOD detection and in classification.",
        "",
        *_likelihood_table(families, dims),
        *_ode_likelihood_lines(families),
        "",
        "## Out-of-distribution detection",
        "",
        "AUROC of telling the held-out split from each set (1: perfect, 0.5: chance, below 0.5: "
        "the set looks *more* typical than the data), by the likelihood (or −energy) and by its "
        "typicality; *detected*: the share of each set the threshold calibrated on validation "
        "flags.",
        "",
        *_ood_table(families, ood_sets),
        "",
        "## Per-class FID",
        "",
        *_class_fid_table(families),
        "",
        "## Compute",
        "",
        "FLOPs are torch's count of the matrix multiplications and convolutions (forward, "
        "backward and optimiser steps of the training on all its processes; one `sample` call "
        "for a sample), 2 per multiply-add; seconds are wall time on the machine that ran the "
        "stage (training: the whole fit, validation included). A family given "
        "`trainer.budget_flops` stopped at that budget, within one step. "
        "`figures/compute.png` draws validation bits/dim and a cheap FID (the training's "
        "`trainer.curve_samples` images at 1/16 … 1/2 and the end of its training, against "
        "validation) against the training FLOPs spent.",
        "",
        *_compute_table(families),
        "",
        "## Training seeds",
        "",
        *_seeds_table(families),
        "",
        "## Figures",
        "",
        *[f"![{name}](figures/{name}.png)" for name in figures],
        "",
        "## Grids",
        "",
        f"Training seed {grid_seed}.",
        "",
        *_grid_table(grids, grid_seed),
    ]
    return "\n".join(lines) + "\n"


def grid_panels(
    families: list[Row], seed: int, *, root: Path = Path(".")
) -> dict[str, dict[GridKind, Path | str]]:
    """Per family and grid kind (of training seed `seed`), the grid's file when the evaluate
    stage wrote it, else the reason it is absent."""
    out: dict[str, dict[GridKind, Path | str]] = {}
    for row in families:
        reason_for: dict[GridKind, str | None] = {
            "samples": None,
            "classes": row.reason("conditional"),
            "interpolation": row.reason("representation"),
            "traversal": row.reason("representation"),
        }
        panels: dict[GridKind, Path | str] = {}
        for kind, where in GRID_FILES.items():
            path = root / where(row.name, seed)
            if path.is_file():
                panels[kind] = path
            else:
                why = reason_for[kind] or f"no {kind} grid (not written by evaluate@{row.name})"
                panels[kind] = f"n/a: {why}"
        out[row.name] = panels
    return out


def _grid_table(grids: dict[str, dict[GridKind, Path | str]], seed: int) -> list[str]:
    rows = []
    for family, panels in grids.items():
        cells = []
        for kind, panel in panels.items():
            if isinstance(panel, Path):
                link = GRID_FILES[kind](family, seed).relative_to(paths.REPORTS).as_posix()
                cells.append(f"![{family} {kind}]({link})")
            else:
                cells.append(panel)
        rows.append([family, *cells])
    return _table(["family", *GRID_FILES], rows)
