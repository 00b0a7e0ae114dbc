"""The report's figures: one per question, each a forest plot of the rows' values with their
intervals drawn (so a tie is visible as overlapping bars), plus the families' grids side by side.

Only reads `report.Row`s (the metrics files) and writes PNGs, atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from genlab.evaluation import vocabulary as v
from genlab.evaluation.report import (
    COPYCAT,
    GRID_FILES,
    HELDOUT,
    REAL,
    GridKind,
    Row,
    headline,
    worst_ood,
)
from genlab.evaluation.vocabulary import Estimate
from genlab.io import atomic_file

FIGURES = (
    "generation",
    "memorisation",
    "likelihood",
    "prediction",
    "representation",
    "conditional",
    "compute",
    "grids",
)
BASELINE_STYLE = {COPYCAT: "tab:red", HELDOUT: "tab:green", REAL: "tab:green"}


def _save(fig: Figure, path: Path) -> Path:
    """Write atomically: a PNG is either complete or absent."""
    fig.tight_layout()
    try:
        with atomic_file(path) as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def forest(ax: Axes, items: list[tuple[str, Estimate, str | None]], title: str) -> None:
    """One row per (label, estimate, n/a reason): the value as a dot and its interval as a bar;
    baseline rows in their colour; a row without a value shows its reason instead."""
    y = np.arange(len(items))[::-1]
    for yi, (label, e, reason) in zip(y, items, strict=True):
        color = BASELINE_STYLE.get(label, "tab:blue")
        if math.isfinite(e.value):
            if e.has_interval:
                ax.plot([e.low, e.high], [yi, yi], color=color, lw=2.5, alpha=0.7)
            ax.plot(e.value, yi, "o", color=color)
        else:
            ax.text(
                0.02,
                yi,
                f"n/a: {reason or 'not measured'}",
                transform=ax.get_yaxis_transform(),
                va="center",
                fontsize=7,
                color="grey",
            )
    ax.set_yticks(y, [label for label, _, _ in items])
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _items(rows: list[Row], key: str) -> list[tuple[str, Estimate, str | None]]:
    return [(r.name, r.estimate(key), None) for r in rows]


def generation_figure(families: list[Row], baselines: dict[str, Row], path: Path) -> Path:
    rows = families + [baselines[n] for n in (COPYCAT, HELDOUT) if n in baselines]
    panels = [
        (v.FID, "FID ↓"),
        (v.KID, "KID ↓"),
        (v.PRECISION, "precision ↑"),
        (v.RECALL, "recall ↑"),
        (v.DENSITY, "density ↑"),
        (v.COVERAGE, "coverage ↑"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 1.2 + 0.9 * len(rows)))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        forest(ax, _items(rows, key), title)
    return _save(fig, path)


def memorisation_figure(families: list[Row], baselines: dict[str, Row], path: Path) -> Path:
    rows = families + [baselines[n] for n in (COPYCAT, HELDOUT, REAL) if n in baselines]
    panels = [
        (v.EXACT_COPIES, "exact copies ↓"),
        (v.NN_MEMORISED_PIXELS, "NN copies, pixels ↓"),
        (v.NN_MEMORISED_FEATURES, "NN copies, features ↓"),
        (v.AUTHENTICITY, "authenticity ↑"),
        (v.C_T, "C_T (≈ 0; ≪ 0: copies)"),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(18, 1.2 + 0.5 * len(rows)))
    for ax, (key, title) in zip(axes, panels, strict=True):
        forest(ax, _items(rows, key), title)
    axes[-1].axvline(0, color="k", ls=":", lw=1)
    return _save(fig, path)


def _question(rows: list[Row], question: str, ood_sets: list[str]) -> list:
    return [(r.name, headline(r, question, ood_sets), r.reason(question)) for r in rows]


def likelihood_figure(families: list[Row], ood_sets: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(families)))
    forest(ax, _question(families, "likelihood", ood_sets), "held-out nats/image of −log p(x) ↓")
    return _save(fig, path)


def prediction_figure(
    families: list[Row], baselines: dict[str, Row], ood_sets: list[str], path: Path
) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(families)))
    items = []
    for r in families:
        worst = worst_ood(r, ood_sets) if r.reason("ood") is None else None
        label = f"{r.name} ({worst[0]})" if worst else r.name
        items.append(
            (label, worst[1] if worst else Estimate(math.nan, math.nan, math.nan), r.reason("ood"))
        )
    forest(axes[0], items, "OOD AUROC on the worst set ↑")
    axes[0].axvline(0.5, color="grey", ls=":", lw=1)
    forest(
        axes[1],
        _question(families, "classification", ood_sets),
        "classification accuracy (Bayes' rule) ↑",
    )
    real = baselines.get(REAL)
    if real is not None:
        e = real.estimate(v.class_acc(real.split))
        if math.isfinite(e.value):
            axes[1].axvline(e.value, color="k", ls="--", lw=1, label="evaluator (discriminative)")
            axes[1].legend(fontsize=8)
    return _save(fig, path)


def representation_figure(
    families: list[Row], baselines: dict[str, Row], ood_sets: list[str], path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(families)))
    forest(ax, _question(families, "representation", ood_sets), "linear-probe accuracy ↑")
    real = baselines.get(REAL)
    if real is not None:
        e = real.estimate(v.probe_acc(real.split))
        if math.isfinite(e.value):
            ax.axvline(e.value, color="k", ls="--", lw=1, label="raw pixels")
            ax.legend(fontsize=8)
    return _save(fig, path)


def conditional_figure(families: list[Row], ood_sets: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.5 * len(families)))
    forest(
        axes[0],
        _question(families, "conditional", ood_sets),
        "conditional accuracy (evaluator on samples) ↑",
    )
    forest(
        axes[1],
        [(r.name, r.estimate(v.CLASS_FID_MEAN), r.reason("conditional")) for r in families],
        "mean per-class FID ↓",
    )
    return _save(fig, path)


# A family's curve: training seed -> [{"steps": .., "flops": .., <val metric>: ..}, ...]
Curves = dict[str, dict[int, list[dict[str, float]]]]


def compute_figure(curves: Curves, dims: int, path: Path) -> Path:
    """Quality against training compute, against the training FLOPs spent by then, a line per
    family and training seed: left, each likelihood family's validation NLL (bits/dim, a bound
    where the family's is one) at every validation of its training; right, every family's
    cheap FID (`v.CURVE_FID`: the training's sample sets against the validation split). Lower
    is better in both; where the lines cross, which family is best depends on the budget."""
    fig, (nll_ax, fid_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn: dict[str, list[str]] = {"nll": [], "fid": []}
    for i, (family, seeds) in enumerate(curves.items()):
        colour = f"C{i}"
        for k, (_, points) in enumerate(sorted(seeds.items())):
            points = [p for p in points if p.get("flops", 0) > 0]
            nll_keys = {key for p in points for key in p} - {"steps", "flops", v.CURVE_FID}
            for kind, ax, key in (
                ("nll", nll_ax, min(nll_keys, default=None)),
                ("fid", fid_ax, v.CURVE_FID),
            ):
                line = [p for p in points if key in p]
                if not line:
                    continue
                scale = dims * math.log(2) if kind == "nll" else 1.0
                label = (f"{family} ({key})" if kind == "nll" else family) if k == 0 else None
                ys = [p[key] / scale for p in line]
                ax.plot([p["flops"] for p in line], ys, marker=".", color=colour, label=label)
                drawn[kind].append(family)
    for kind, ax, ylabel, title in (
        ("nll", nll_ax, "validation NLL, bits/dim (lower is better)", "Likelihood"),
        ("fid", fid_ax, "FID of the curve's samples against validation ↓", "Sample quality"),
    ):
        if drawn[kind]:
            ax.set_xscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(ylabel)
        missing = [f for f in curves if f not in drawn[kind]]
        if missing:
            title += f"\n(no points: {', '.join(missing)})"
        ax.set_title(title, fontsize=10)
    fig.suptitle("Quality against training compute", fontsize=11)
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
    families: list[Row],
    baselines: dict[str, Row],
    *,
    ood_sets: list[str],
    grids: dict[str, dict[GridKind, Path | str]],
    curves: Curves,
    dims: int,
    out_dir: Path,
) -> list[Path]:
    """Every figure of the report into `out_dir` (names: FIGURES)."""
    return [
        generation_figure(families, baselines, out_dir / "generation.png"),
        memorisation_figure(families, baselines, out_dir / "memorisation.png"),
        likelihood_figure(families, ood_sets, out_dir / "likelihood.png"),
        prediction_figure(families, baselines, ood_sets, out_dir / "prediction.png"),
        representation_figure(families, baselines, ood_sets, out_dir / "representation.png"),
        conditional_figure(families, ood_sets, out_dir / "conditional.png"),
        compute_figure(curves, dims, out_dir / "compute.png"),
        grids_figure(grids, out_dir / "grids.png"),
    ]
