"""What the benchmark scripts share: params.yaml with its profiles, reading what the last `dvc
repro` measured."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import yaml
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.config import Params, load_params, read_yaml
from genlab.data.prepared import read_meta
from genlab.errors import GenlabError
from genlab.evaluation import vocabulary as v
from genlab.evaluation.protocol import Protocol, check_protocols, measurement
from genlab.paths import RUN_FILE
from genlab.profiles import overlay, resolve
from genlab.tracking import RunRecord

# The key under which the evaluate and baselines stages write the protocol next to the metrics
# (stages/evaluate.py, stages/baselines.py). The library spells it as a literal and exports no
# name for it; this is the benchmarks' one copy.
PROTOCOL_KEY = v.PROTOCOL

Metrics = dict[str, float]


def profiled(root: Path, profiles: Sequence[str]) -> dict:
    """root/params.yaml as a mapping, with each profile merged over it in order: a name of
    root/profiles or a .yaml path, as `genlab profile` takes them (ProfileError, one line, for
    one that is not there or does not fit)."""
    found = [resolve(name, root) for name in profiles]  # every one found before any is read
    raw = read_yaml((root / "params.yaml").read_text(), root / "params.yaml")
    for path in found:
        overlay(raw, read_yaml(path.read_text(), path) or {})
    return raw


def set_key(raw: dict, dotted: str) -> None:
    """Apply one `--set a.b.c=value` (the value read as YAML) to the params mapping."""
    key, _, value = dotted.partition("=")
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = yaml.safe_load(value)


class Repro(NamedTuple):
    """What the last `dvc repro` measured: its params, the training seeds to read, and the
    protocol every metrics file read was checked against."""

    params: Params
    seeds: list[int]
    protocol: Protocol


def read_last_repro(doc: str, argv: list[str] | None) -> Repro:
    """Command line of a benchmark that reads the last `dvc repro`: `--repro` runs it first;
    `--seed k` (repeatable) reads only those training seeds (default: every one of `seeds`)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repro", action="store_true", help="run `dvc repro` first")
    parser.add_argument(
        "--seed", type=int, action="append", help="training seed (repeatable; default: all)"
    )
    args = parser.parse_args(argv)
    if args.repro:
        subprocess.run(["dvc", "repro"], check=True)
    params = load_params()
    seeds = args.seed or params.seeds
    unknown = sorted(set(seeds) - set(params.seeds))
    if unknown:
        sys.exit(f"seed(s) {unknown} are not in params.yaml's seeds {params.seeds}")
    _, protocol = measurement(params.evaluate, paths.EVALUATOR, read_meta(paths.PREPARED))
    return Repro(params, seeds, protocol)


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        sys.exit(f"{path} not found: run `uv run dvc repro {stage}` first")
    return json.loads(path.read_text())


def _checked(path: Path, stage: str, protocol: Protocol) -> dict:
    blob = _read(path, stage)
    try:
        check_protocols({str(path): blob.get(PROTOCOL_KEY)}, protocol)
    except GenlabError as exc:
        sys.exit(str(exc))
    return blob


def family_metrics(family: str, seed: int, protocol: Protocol) -> Metrics:
    """metrics/<family>/seed<k>.json without its protocol, checked to be measured under
    `protocol` (numbers of different protocols are never compared)."""
    path = paths.family_metrics(family, seed)
    blob = _checked(path, f"evaluate@{family}-{seed}", protocol)
    return {k: x for k, x in blob.items() if k != PROTOCOL_KEY}


def baseline_metrics(protocol: Protocol) -> dict[str, Metrics]:
    """The copycat, held-out real and real-data rows (metrics/baselines.json; no held-out row
    when evaluate.split is val), checked to be measured under `protocol`."""
    blob = _checked(paths.BASELINE_METRICS, "baselines", protocol)
    return {k: row for k, row in blob.items() if k != PROTOCOL_KEY}


def num(value: float, spec: str = ".3f") -> str:
    """`value` formatted by `spec`, "n/a" when it is missing or not finite."""
    return format(value, spec) if math.isfinite(value) else "n/a"


def cell(metrics: Metrics, key: str, digits: int = 3, *, confidence: float = 0.95) -> str:
    """ "1.234 [1.100, 1.400]": the value with its interval (or standard error), "n/a" if absent."""
    e = v.estimate(metrics, key, confidence=confidence)
    if not math.isfinite(e.value):
        return "n/a"
    if not e.has_interval:
        return f"{e.value:.{digits}f}"
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def train_seconds(family: str, seed: int) -> float:
    """Wall time of the family's training with `seed`, as its MLflow run recorded it (nan when
    the run is not there)."""
    path = paths.family_model_dir(family, seed) / RUN_FILE
    if not path.is_file():
        return math.nan
    record = RunRecord.load(path)
    history = MlflowClient(record.tracking_uri).get_metric_history(record.run_id, v.TRAIN_WALL_S)
    # A re-run that resumes a finished checkpoint logs its few seconds again; the fit is the max.
    return max((m.value for m in history), default=math.nan)
