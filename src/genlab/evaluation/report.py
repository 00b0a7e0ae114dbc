"""The comparison a user reads first: the five questions a generative model answers, per family.

A model of p(x) should (1) generate new examples, (2) give a likelihood, which (3) tells data from
out-of-distribution images ("is this a digit?"), and (4) give features learned without labels; a
model of p(x | y) also (5) generates a chosen class and (6) classifies by Bayes' rule,
p(y | x) ∝ p(x | y) p(y). `summary_markdown` writes one table with a row per family and a column
per question, `n/a` with the reason where the family's contract (`likelihood`, `has_energy`,
`has_latent`) or its config (`conditional`) has no method; then the detailed tables. One figure
per question and the families' grids side by side go to `reports/figures/`.

The real-data row is the floor: the same sample metrics computed between the real train split
(standing in for "samples") and the test split, and a linear probe on raw pixels. A model that
beats it on FID is memorising or the metric is saturated; a latent whose probe does not beat raw
pixels has learned nothing a classifier could use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from genlab import paths
from genlab.config import EvaluateParams, Params
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation.fidelity import Reference, floor_metrics
from genlab.evaluation.predict import scorer
from genlab.evaluation.representation import linear_probe
from genlab.models import MODELS
from genlab.models.base import Likelihood, bits_per_dim, bpd_key, nll_key

REAL = "real data (train vs test)"

Question = Literal[
    "generation", "likelihood", "ood", "classification", "representation", "conditional"
]
QUESTIONS: dict[Question, str] = {
    "generation": "generation: FID ↓ (KID)",
    "likelihood": "likelihood: test nats/image ↓",
    "ood": "prediction: OOD AUROC ↑ (worst set)",
    "classification": "prediction: class accuracy ↑",
    "representation": "representation: probe accuracy ↑",
    "conditional": "conditional generation: accuracy ↑ (class FID ↓)",
}
GridKind = Literal["samples", "classes", "interpolation", "traversal"]
GRID_FILES: dict[GridKind, Callable[[str], Path]] = {
    "samples": paths.family_samples,
    "classes": paths.family_class_grid,
    "interpolation": paths.family_interpolation,
    "traversal": paths.family_traversal,
}
FIGURES = ("generation", "likelihood", "prediction", "representation", "conditional", "grids")


# ---------------------------------------------------------------- the real-data reference row


def real_data_floor(reference: Reference, protocol: EvaluateParams) -> dict[str, float]:
    """Sample metrics of the real train split (its first N images) against the test split, from
    the features the `reference` stage cached under the protocol."""
    return floor_metrics(reference, protocol).as_dict()


def pixel_probe(prepared_dir: str | Path, *, c: float) -> float:
    """Test accuracy of the linear probe on raw pixels: the baseline a learned latent has to
    beat (the same probe, standardised features, as on the families' latents)."""
    meta = read_meta(prepared_dir)
    train = load_split(prepared_dir, "train", meta)
    test = load_split(prepared_dir, "test", meta)
    train_z = train.x.flatten(1).float()  # (N, C*H*W)
    test_z = test.x.flatten(1).float()
    return linear_probe(train_z, train.y, test_z, test.y, c=c)


# ---------------------------------------------------------------- what each family can answer


def capabilities(family: str, params: Params) -> dict[Question, str | None]:
    """Per question, None when the family can answer it, else the reason it cannot.

    Decided from the contract (`likelihood`, `has_energy`, `has_latent`) and the family's config
    (`conditional`), never from its name."""
    cls = MODELS[family]
    has_likelihood = cls.likelihood != "none"
    scores = scorer(cls) is not None  # log p(x) or -E(x) ranks images
    conditional = bool(params.family(family).model_kwargs().get("conditional", False))
    unconditional = f"unconditional (set models.{family}.conditional: true)"
    if has_likelihood:
        likelihood = None
    elif cls.has_energy:
        likelihood = "unnormalised (energy only)"
    else:
        likelihood = "no likelihood or energy"
    if not conditional:
        classification: str | None = unconditional
    elif not scores:
        classification = "no likelihood or energy for Bayes' rule"
    else:
        classification = None
    return {
        "generation": None,
        "likelihood": likelihood,
        "ood": None if scores else "no likelihood or energy",
        "classification": classification,
        "representation": None if cls.has_latent else "no encoder",
        "conditional": None if conditional else unconditional,
    }


class FamilyReport(NamedTuple):
    name: str
    likelihood: Likelihood
    conditional: bool
    metrics: dict[str, float]  # metrics/<family>.json
    reasons: dict[Question, str | None]  # `capabilities`: None where the family answers


def family_reports(metrics: dict[str, dict[str, float]], params: Params) -> list[FamilyReport]:
    """One entry per family of `params.families`, in that order."""
    missing = [f for f in params.families if f not in metrics]
    if missing:
        raise ValueError(
            f"no metrics for {', '.join(missing)}: run `dvc repro` (evaluate@<family>)"
        )
    return [
        FamilyReport(
            name=f,
            likelihood=MODELS[f].likelihood,
            conditional=bool(params.family(f).model_kwargs().get("conditional", False)),
            metrics=metrics[f],
            reasons=capabilities(f, params),
        )
        for f in params.families
    ]


def likelihood_nats(family: FamilyReport) -> float:
    """Test nats/image of -log p(x), comparable across families: the marginal for a conditional
    likelihood family (-log sum_y p(x | y) p(y)), else the test NLL; nan where absent."""
    if family.likelihood == "none":
        return math.nan
    return _get(family.metrics, nll_key("test", family.likelihood, marginal=family.conditional))


def class_fids(family: FamilyReport) -> dict[int, float]:
    """Per-class FID (eval/class_fid_<k>) by class k."""
    out = {}
    for key, value in family.metrics.items():
        match = re.fullmatch(r"eval/class_fid_(\d+)", key)
        if match:
            out[int(match.group(1))] = value
    return dict(sorted(out.items()))


def _get(metrics: dict[str, float], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None and math.isfinite(value) else math.nan


def mean_auroc(metrics: dict[str, float], sets: list[str], *, typicality: bool = False) -> float:
    infix = "auroc_typicality_" if typicality else "auroc_"
    values = [_get(metrics, f"ood/{infix}{s}") for s in sets]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------- grids


def grid_panels(
    families: list[FamilyReport], *, root: Path = Path(".")
) -> dict[str, dict[GridKind, Path | str]]:
    """Per family and grid kind, the grid's file when the evaluate stage wrote it, else the
    reason it is absent (the family's `n/a` reason where it has no method for it)."""
    out: dict[str, dict[GridKind, Path | str]] = {}
    for family in families:
        reason_for: dict[GridKind, str | None] = {
            "samples": None,
            "classes": family.reasons["conditional"],
            "interpolation": family.reasons["representation"],
            "traversal": family.reasons["representation"],
        }
        panels: dict[GridKind, Path | str] = {}
        for kind, where in GRID_FILES.items():
            path = root / where(family.name)
            if path.is_file():
                panels[kind] = path
            else:
                reason = (
                    reason_for[kind] or f"no {kind} grid (not written by evaluate@{family.name})"
                )
                panels[kind] = f"n/a: {reason}"
        out[family.name] = panels
    return out


# ---------------------------------------------------------------- the markdown summary


def _fmt(value: float, fmt: str, *, bound: bool = False) -> str | None:
    if not math.isfinite(value):
        return None
    return ("≤ " if bound else "") + fmt.format(value)


def _na(reason: str) -> str:
    return f"n/a: {reason}"


def headline_cells(family: FamilyReport, ood_sets: list[str]) -> dict[Question, str]:
    """The family's row of the first table: a number where it answers, `n/a: <reason>` where not."""
    m, reasons = family.metrics, family.reasons
    not_measured = _na(f"not measured (re-run evaluate@{family.name})")
    cells: dict[Question, str | None] = {}

    fid = _fmt(_get(m, "eval/fid"), "{:.3f}")
    kid = _fmt(_get(m, "eval/kid_mean"), "{:.4f}")
    cells["generation"] = fid and (f"{fid} (KID {kid})" if kid else fid)

    bound = family.likelihood == "lower_bound"
    nats = _fmt(likelihood_nats(family), "{:.2f}", bound=bound)
    cells["likelihood"] = nats and (f"{nats} (marginal)" if family.conditional else nats)

    aurocs = {s: _get(m, f"ood/auroc_{s}") for s in ood_sets}
    aurocs = {s: v for s, v in aurocs.items() if math.isfinite(v)}
    if aurocs:
        worst = min(aurocs, key=aurocs.__getitem__)
        cells["ood"] = f"{mean_auroc(m, ood_sets):.3f} (worst: {worst} {aurocs[worst]:.3f})"
    else:
        cells["ood"] = None

    cells["classification"] = _fmt(_get(m, "test/class_acc"), "{:.3f}")
    cells["representation"] = _fmt(_get(m, "test/probe_acc"), "{:.3f}")

    acc = _fmt(_get(m, "eval/cond_acc"), "{:.3f}")
    class_fid = _fmt(_get(m, "eval/class_fid_mean"), "{:.2f}")
    cells["conditional"] = acc and (f"{acc} (class FID {class_fid})" if class_fid else acc)

    return {
        q: _na(reasons[q]) if reasons[q] is not None else (cells[q] or not_measured)
        for q in QUESTIONS
    }


def real_cells(real: dict[str, float], evaluator_accuracy: float) -> dict[Question, str]:
    """The real-data row: the FID/KID floor, the evaluator's (discriminative) accuracy and the
    raw-pixel probe; "—" where a question has no real-data counterpart."""
    fid = _fmt(_get(real, "eval/fid"), "{:.3f}") or "—"
    kid = _fmt(_get(real, "eval/kid_mean"), "{:.4f}")
    acc = _fmt(evaluator_accuracy, "{:.3f}")
    probe = _fmt(_get(real, "test/probe_acc"), "{:.3f}")
    return {
        "generation": f"{fid} (KID {kid})" if kid else fid,
        "likelihood": "—",
        "ood": "—",
        "classification": f"{acc} (evaluator, discriminative)" if acc else "—",
        "representation": f"{probe} (raw pixels)" if probe else "—",
        "conditional": "—",
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    fmt: str


SAMPLE_COLUMNS = [
    Column("FID ↓", "eval/fid", "{:.3f}"),
    Column("KID ↓", "eval/kid_mean", "{:.4f}"),
    Column("precision ↑", "eval/precision", "{:.3f}"),
    Column("recall ↑", "eval/recall", "{:.3f}"),
    Column("IS ↑", "eval/isc_mean", "{:.2f}"),
    Column("cond. acc. ↑", "eval/cond_acc", "{:.3f}"),
    Column("samples/s ↑", "eval/samples_per_s", "{:.0f}"),
    Column("NFE/sample ↓", "eval/nfe_per_sample", "{:.0f}"),
]


def _sample_quality(families: list[FamilyReport], real: dict[str, float]) -> list[str]:
    rows = [
        [f.name] + [_fmt(_get(f.metrics, c.key), c.fmt) or "n/a" for c in SAMPLE_COLUMNS]
        for f in families
    ]
    rows.append([REAL] + [_fmt(_get(real, c.key), c.fmt) or "—" for c in SAMPLE_COLUMNS])
    return _table(["family"] + [c.header for c in SAMPLE_COLUMNS], rows)


def _likelihood(families: list[FamilyReport], dims: int) -> list[str]:
    header = [
        "family",
        "likelihood",
        "conditional",
        "−log p(x) nats ↓",
        "−log p(x) bits/dim ↓",
        "−log p(x \\| y) nats ↓",
        "−log p(x \\| y) bits/dim ↓",
    ]
    rows = []
    for f in families:
        reason = f.reasons["likelihood"]
        if reason is not None:
            rows.append([f.name, f.likelihood, _yes(f.conditional), *_na_row(reason, 4)])
            continue
        bound = f.likelihood == "lower_bound"
        marginal = likelihood_nats(f)
        nats = [
            _fmt(marginal, "{:.2f}", bound=bound),
            _fmt(bits_per_dim(marginal, dims), "{:.3f}", bound=bound),
        ]
        if f.conditional:
            given = _get(f.metrics, nll_key("test", f.likelihood))
            bpd = _get(f.metrics, bpd_key("test", f.likelihood))
            nats += [_fmt(given, "{:.2f}", bound=bound), _fmt(bpd, "{:.3f}", bound=bound)]
        else:
            nats += ["n/a: unconditional"] * 2
        rows.append([f.name, f.likelihood, _yes(f.conditional)] + [n or "n/a" for n in nats])
    return _table(header, rows)


def _na_row(reason: str, cells: int) -> list[str]:
    """A detailed table's row for a family that cannot answer: the reason once, then blanks."""
    return [_na(reason)] + [""] * (cells - 1)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _ood(
    families: list[FamilyReport], ood_sets: list[str], statistic: str, fpr: float
) -> list[str]:
    header = ["family", "score", *ood_sets, "mean", "test FPR"]
    rows = []
    for f in families:
        m, reason = f.metrics, f.reasons["ood"]
        if reason is not None or not any(k.startswith("ood/") for k in m):
            reason = reason or f"not measured (re-run evaluate@{f.name})"
            rows.append([f.name, "—", *_na_row(reason, len(ood_sets) + 2)])
            continue
        score = "likelihood" if f.likelihood != "none" else "−energy"
        for label, infix, typical in (
            (f"AUROC, {score}", "auroc_", False),
            ("AUROC, typicality", "auroc_typicality_", True),
        ):
            values = [_fmt(_get(m, f"ood/{infix}{s}"), "{:.3f}") or "n/a" for s in ood_sets]
            mean = _fmt(mean_auroc(m, ood_sets, typicality=typical), "{:.3f}") or "n/a"
            rows.append([f.name, label, *values, mean, ""])
        detected = [_fmt(_get(m, f"ood/detected_{s}"), "{:.3f}") or "n/a" for s in ood_sets]
        test_fpr = _fmt(_get(m, "ood/test_fpr"), "{:.3f}") or "n/a"
        by = score if statistic == "likelihood" else statistic
        rows.append([f.name, f"detected ({by})", *detected, "", test_fpr])
    lines = _table(header, rows)
    note = (
        f"Detected: the fraction of each set the threshold flags, with the threshold on the "
        f"{statistic} statistic set so that {fpr:.0%} of the validation split is flagged; test "
        f"FPR is the fraction of the test split it flags."
    )
    return [*lines, "", note]


def _class_fid(families: list[FamilyReport]) -> list[str]:
    per_family = {f.name: class_fids(f) for f in families}
    classes = sorted({k for fids in per_family.values() for k in fids})
    header = ["family"] + [f"class {k}" for k in classes] + ["mean"]
    rows = []
    for f in families:
        reason = f.reasons["conditional"]
        if reason is not None:
            rows.append([f.name, *_na_row(reason, len(classes) + 1)])
            continue
        fids = per_family[f.name]
        rows.append(
            [f.name]
            + [_fmt(fids.get(k, math.nan), "{:.2f}") or "n/a" for k in classes]
            + [_fmt(_get(f.metrics, "eval/class_fid_mean"), "{:.2f}") or "n/a"]
        )
    return _table(header, rows)


def summary_markdown(
    families: list[FamilyReport],
    real: dict[str, float],
    *,
    evaluator_accuracy: float,
    dataset: str,
    dims: int,
    ood_sets: list[str],
    statistic: str,
    fpr: float,
    grids: dict[str, dict[GridKind, Path | str]],
    extractor: str = "genlab-evaluator",
) -> str:
    """reports/summary.md: the headline table, the detailed tables, the figures and the grids
    (figure and grid links are relative to reports/)."""
    headline = [[f.name, *list(headline_cells(f, ood_sets).values())] for f in families]
    headline.append([REAL, *list(real_cells(real, evaluator_accuracy).values())])
    lines = [
        f"# genlab comparison — {dataset}",
        "",
        "What each family answers: generating new images, the likelihood of held-out images, "
        "telling data from out-of-distribution images, classifying by Bayes' rule "
        "(argmax_y log p(x | y) + log p(y)), features for a linear probe, and generating a "
        "chosen class. `n/a` says why a family cannot answer; the last row is the reference "
        "(real train vs test images, the evaluator classifier, a probe on raw pixels).",
        "",
        *_table(["family", *list(QUESTIONS.values())], headline),
        "",
        "## Sample quality",
        "",
        f"Sample metrics use the features of `{extractor}` (the protocol in "
        "`reports/real_data.json`), against the test split.",
        "",
        *_sample_quality(families, real),
        "",
        "## Likelihood",
        "",
        "Nats per image of the discrete test data (lower is better); `≤` marks an upper bound on "
        "the NLL (the family reports a lower bound on log p(x)). For a conditional family "
        "−log p(x) is the marginal −log Σ_y p(x | y) p(y), the number comparable with "
        "unconditional families.",
        "",
        *_likelihood(families, dims),
        "",
        "## Out-of-distribution detection",
        "",
        "AUROC of telling the test split from each set (1: perfect, 0.5: chance, below 0.5: the "
        "set looks *more* typical than the data), by the likelihood (or −energy) and by its "
        "typicality, −|log p(x) − mean log p(x) on validation| (Nalisnick et al. 2019).",
        "",
        *_ood(families, ood_sets, statistic, fpr),
        "",
        "## Per-class FID",
        "",
        *_class_fid(families),
        "",
        "## Figures",
        "",
        *[f"![{name}](figures/{name}.png)" for name in FIGURES],
        "",
        "## Grids",
        "",
        *_grid_table(grids),
    ]
    return "\n".join(lines) + "\n"


def _grid_table(grids: dict[str, dict[GridKind, Path | str]]) -> list[str]:
    rows = []
    for family, panels in grids.items():
        cells = []
        for kind, panel in panels.items():
            if isinstance(panel, Path):
                link = GRID_FILES[kind](family).relative_to(paths.REPORTS).as_posix()
                cells.append(f"![{family} {kind}]({link})")
            else:
                cells.append(panel)
        rows.append([family, *cells])
    return _table(["family", *GRID_FILES], rows)


# ---------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> Path:
    """Write atomically: a PNG is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _bars(
    ax: Axes,
    families: list[FamilyReport],
    values: list[float],
    reasons: list[str | None],
    *,
    color: str,
    hatched: list[bool] | None = None,
) -> None:
    """One bar per family; where a family has no value, its n/a reason written in the slot."""
    names = [f.name for f in families]
    heights = [v if math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(names, heights, color=color)
    for i, (bar, value) in enumerate(zip(bars, values, strict=True)):
        if hatched is not None and hatched[i]:
            bar.set_hatch("//")
        if not math.isfinite(value):
            text = _na(reasons[i]) if reasons[i] else "n/a: not measured"
            ax.text(i, 0, " " + text, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.tick_params(axis="x", labelrotation=30)


def generation_figure(families: list[FamilyReport], real: dict[str, float], path: Path) -> Path:
    """FID per family with the real-data floor, and precision against recall."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    fids = [_get(f.metrics, "eval/fid") for f in families]
    _bars(ax, families, fids, [None] * len(families), color="tab:blue")
    ax.axhline(_get(real, "eval/fid"), color="k", ls="--", label="real data")
    ax.set_title("FID ↓")
    ax.legend()
    ax = axes[1]
    for f in families:
        ax.scatter(_get(f.metrics, "eval/recall"), _get(f.metrics, "eval/precision"), label=f.name)
    ax.scatter(
        _get(real, "eval/recall"),
        _get(real, "eval/precision"),
        marker="*",
        s=150,
        c="k",
        label="real",
    )
    ax.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel="recall", ylabel="precision")
    ax.set_title("precision / recall ↑")
    ax.legend(fontsize=8)
    return _save(fig, path)


def likelihood_figure(families: list[FamilyReport], path: Path) -> Path:
    """Test nats/image of -log p(x) (the marginal for conditional families); hatched: bounds."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    values = [likelihood_nats(f) for f in families]
    _bars(
        ax,
        families,
        values,
        [f.reasons["likelihood"] for f in families],
        color="tab:green",
        hatched=[f.likelihood == "lower_bound" for f in families],
    )
    ax.set_title("test nats/image of −log p(x) ↓ (hatched: bound)")
    return _save(fig, path)


def prediction_figure(
    families: list[FamilyReport], evaluator_accuracy: float, ood_sets: list[str], path: Path
) -> Path:
    """AUROC per OOD set and family for both statistics; generative classification accuracy
    against the evaluator's (discriminative) accuracy."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [2, 2, 1.3]})
    scoring = [f for f in families if f.reasons["ood"] is None]
    width = 0.8 / max(len(scoring), 1)
    x = np.arange(len(ood_sets))
    for ax, infix, title in (
        (axes[0], "auroc_", "OOD AUROC, likelihood ↑"),
        (axes[1], "auroc_typicality_", "OOD AUROC, typicality ↑"),
    ):
        for i, f in enumerate(scoring):
            values = [_get(f.metrics, f"ood/{infix}{s}") for s in ood_sets]
            ax.bar(x + (i - (len(scoring) - 1) / 2) * width, values, width, label=f.name)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(x, ood_sets)
        ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), title=title)
        if not scoring:
            ax.text(0.5, 0.5, "no family scores images", ha="center", transform=ax.transAxes)
    if scoring:
        axes[0].legend(fontsize=8, loc="upper center", ncols=min(len(scoring), 6))
    ax = axes[2]
    accs = [_get(f.metrics, "test/class_acc") for f in families]
    _bars(ax, families, accs, [f.reasons["classification"] for f in families], color="tab:purple")
    if math.isfinite(evaluator_accuracy):
        ax.axhline(evaluator_accuracy, color="k", ls="--", label="evaluator (discriminative)")
        ax.legend(fontsize=8, loc="upper center")
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), title="classification accuracy ↑")
    return _save(fig, path)


def representation_figure(families: list[FamilyReport], real: dict[str, float], path: Path) -> Path:
    """Linear-probe test accuracy on each family's latent against the probe on raw pixels."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    values = [_get(f.metrics, "test/probe_acc") for f in families]
    _bars(ax, families, values, [f.reasons["representation"] for f in families], color="tab:orange")
    pixels = _get(real, "test/probe_acc")
    if math.isfinite(pixels):
        ax.axhline(pixels, color="k", ls="--", label="raw pixels")
        ax.legend(fontsize=8, loc="upper center")
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), title="linear-probe accuracy ↑")
    return _save(fig, path)


def conditional_figure(families: list[FamilyReport], path: Path) -> Path:
    """Conditional accuracy per family and per-class FID as a heatmap, families x classes."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    ax = axes[0]
    values = [_get(f.metrics, "eval/cond_acc") for f in families]
    _bars(ax, families, values, [f.reasons["conditional"] for f in families], color="tab:red")
    ax.set(ylim=(0, 1.05), title="conditional accuracy (evaluator on samples) ↑")
    ax = axes[1]
    conditional = [f for f in families if f.reasons["conditional"] is None]
    per_family = [class_fids(f) for f in conditional]
    classes = sorted({k for fids in per_family for k in fids})
    if conditional and classes:
        table = np.array([[fids.get(k, math.nan) for k in classes] for fids in per_family])
        image = ax.imshow(table, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(classes)), [str(k) for k in classes])
        ax.set_yticks(range(len(conditional)), [f.name for f in conditional])
        ax.set_xlabel("class")
        fig.colorbar(image, ax=ax, label="FID")
    else:
        ax.text(0.5, 0.5, "no per-class FID", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("per-class FID ↓")
    return _save(fig, path)


def grids_figure(grids: dict[str, dict[GridKind, Path | str]], path: Path) -> Path:
    """The families' grids side by side: a row per family, a column per grid kind; a missing grid
    is an empty panel with its reason."""
    kinds = list(GRID_FILES)
    fig, axes = plt.subplots(
        len(grids), len(kinds), figsize=(3.2 * len(kinds), 3.2 * len(grids)), squeeze=False
    )
    for row, (family, panels) in enumerate(grids.items()):
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            panel = panels[kind]
            if isinstance(panel, Path):
                with Image.open(panel) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
            else:
                text = panel.replace(" (", "\n(")
                ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(kind)
            if col == 0:
                ax.set_ylabel(family, fontsize=12)
    return _save(fig, path)


def write_figures(
    families: list[FamilyReport],
    real: dict[str, float],
    *,
    evaluator_accuracy: float,
    ood_sets: list[str],
    grids: dict[str, dict[GridKind, Path | str]],
    out_dir: Path,
) -> list[Path]:
    """Every figure of the report into `out_dir`, one per question plus the grids."""
    return [
        generation_figure(families, real, out_dir / "generation.png"),
        likelihood_figure(families, out_dir / "likelihood.png"),
        prediction_figure(families, evaluator_accuracy, ood_sets, out_dir / "prediction.png"),
        representation_figure(families, real, out_dir / "representation.png"),
        conditional_figure(families, out_dir / "conditional.png"),
        grids_figure(grids, out_dir / "grids.png"),
    ]
