"""The comparison a user reads first: one table and one figure over all families.

The real-data row is the floor: the same sample metrics computed between the real train split
(standing in for "samples") and the test split. A model that beats it on FID is memorising or the
metric is saturated; one far above it has room to improve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from genlab.config import EvaluateParams
from genlab.data.prepared import load_split, read_meta
from genlab.evaluation.fidelity import sample_metrics
from genlab.models import MODELS
from genlab.models.base import bpd_key, nll_key

REAL = "real data (train vs test)"


def real_data_floor(
    prepared_dir: str | Path, evaluator_path: str | Path, protocol: EvaluateParams
) -> dict[str, float]:
    """Sample metrics of the real train split against the test split (at most N train images)."""
    meta = read_meta(prepared_dir)
    train = load_split(prepared_dir, "train", meta)
    test = load_split(prepared_dir, "test", meta)
    reference = train.x[: protocol.num_samples]
    return sample_metrics(reference, test.x, evaluator_path, protocol=protocol).as_dict()


@dataclass(frozen=True)
class Column:
    header: str
    keys: tuple[str, ...]  # first key present in a row's metrics is shown
    fmt: str
    better: str  # "↓", "↑" or ""


def _columns() -> list[Column]:
    nll = tuple(nll_key("test", kind) for kind in ("exact", "lower_bound"))
    bpd = tuple(bpd_key("test", kind) for kind in ("exact", "lower_bound"))
    return [
        Column("test nats/image", nll, "{:.2f}", "↓"),
        Column("test bits/dim", bpd, "{:.3f}", "↓"),
        Column("FID", ("eval/fid",), "{:.3f}", "↓"),
        Column("KID", ("eval/kid_mean",), "{:.4f}", "↓"),
        Column("precision", ("eval/precision",), "{:.3f}", "↑"),
        Column("recall", ("eval/recall",), "{:.3f}", "↑"),
        Column("IS", ("eval/isc_mean",), "{:.2f}", "↑"),
        Column("cond. acc.", ("eval/cond_acc",), "{:.3f}", "↑"),
        Column("samples/s", ("eval/samples_per_s",), "{:.0f}", "↑"),
        Column("NFE/sample", ("eval/nfe_per_sample",), "{:.0f}", "↓"),
    ]


def _cell(metrics: dict[str, float], col: Column, bound: bool) -> str:
    for key in col.keys:
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            text = col.fmt.format(value)
            return f"≤ {text}" if bound and col.header.startswith("test") else text
    return "n/a"


def summary_markdown(
    families: dict[str, dict[str, float]], floor: dict[str, float], dataset: str
) -> str:
    cols = _columns()
    header = ["family", "likelihood"] + [f"{c.header} {c.better}".strip() for c in cols]
    lines = [
        f"# genlab comparison — {dataset}",
        "",
        "Held-out likelihoods are nats per image of the discrete test data (lower is better); "
        "`≤` marks an upper bound on the NLL (the family reports a lower bound on log p(x)). "
        "Sample metrics use the dataset's evaluator classifier as feature extractor, "
        "against the test split.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for family, metrics in families.items():
        kind = MODELS[family].likelihood
        bound = kind == "lower_bound"
        row = [family, kind] + [_cell(metrics, c, bound) for c in cols]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| " + " | ".join([REAL, "—"] + [_cell(floor, c, False) for c in cols]) + " |")
    lines += ["", "![comparison](comparison.png)", ""]
    lines += [f"![{family} samples](samples/{family}.png)" for family in families]
    return "\n".join(lines) + "\n"


def comparison_figure(
    families: dict[str, dict[str, float]], floor: dict[str, float], path: str | Path
) -> None:
    """FID, test nats/image and precision-recall per family, with the real-data floor."""
    names = list(families)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    ax = axes[0]
    ax.bar(names, [families[n].get("eval/fid", math.nan) for n in names], color="tab:blue")
    ax.axhline(floor["eval/fid"], color="k", ls="--", label="real data")
    ax.set_title("FID (evaluator features) ↓")
    ax.legend()

    ax = axes[1]
    nll = tuple(nll_key("test", kind) for kind in ("exact", "lower_bound"))
    values = [next((families[n][k] for k in nll if k in families[n]), math.nan) for n in names]
    bars = ax.bar(names, values, color="tab:green")
    for bar, n in zip(bars, names, strict=True):
        if MODELS[n].likelihood == "lower_bound":
            bar.set_hatch("//")
    ax.set_title("test nats/image ↓ (hatched: bound)")

    ax = axes[2]
    for n in names:
        ax.scatter(families[n].get("eval/recall"), families[n].get("eval/precision"), label=n)
    ax.scatter(
        floor["eval/recall"], floor["eval/precision"], marker="*", s=150, c="k", label="real"
    )
    ax.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel="recall", ylabel="precision")
    ax.set_title("precision / recall ↑")
    ax.legend(fontsize=8)

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
