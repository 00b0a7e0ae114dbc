"""MLflow: where runs go, how they are tagged, and how the evaluate stage finds its training run.

- Local first: every run is logged into a local SQLite store, `mlflow.db` at the repository root
  (or the `sqlite:///` file MLFLOW_TRACKING_URI / `tracking.uri` names). The root comes from
  `DVC_ROOT`, which DVC sets to the real repository also when a stage runs in an experiment's
  temporary copy (`dvc exp run --temp` / `--queue`), so every run lands in the same store.
- A team server (MLFLOW_TRACKING_URI / `tracking.uri` naming http(s)) gets a copy of each run by
  an idempotent push (`genlab.sync`): at the end of each stage when it answers, and by `genlab
  sync`. It must be reachable when a training starts (`check_reachable` fails within seconds); an
  outage after that never touches the training, which logs locally, and loses nothing.
- Experiments of a SQLite store are created with an absolute artifact location next to the store
  file (`mlartifacts/`; at the repository root for the default store), never one relative to a
  temporary working directory.
- One run per family training; its id is kept in `run.json` next to the final checkpoint so the
  evaluate stage logs into the same run.
- Only global rank 0 talks to MLflow.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from genlab.errors import TrackingError
from genlab.evaluation import vocabulary as v
from genlab.io import exclusive_lock, write_json_atomic

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def project_root() -> Path:
    """The repository the pipeline belongs to (DVC_ROOT under DVC, else the working directory)."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///relative.db` is relative to the working directory; anchor it at the root."""
    path = uri.removeprefix("sqlite:///")
    if path == uri or path.startswith("/") or path == ":memory:":
        return uri
    return f"sqlite:///{project_root() / path}"


@dataclass(frozen=True)
class Stores:
    """Where runs go: the local SQLite store, always, and the team server, if there is one."""

    local: str  # sqlite:///<absolute path>
    remote: str | None  # http(s)://... as given (credentials included), or None

    @property
    def local_path(self) -> Path:
        return Path(self.local.removeprefix("sqlite:///"))


def local_client(stores: Stores) -> MlflowClient:
    """A client of the local store, its database created (or its schema upgraded) under a lock
    beside it: two processes creating one SQLite store at once fail in MLflow's schema migration
    (seen with two `dvc queue` workers starting together)."""
    stores.local_path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(f"{stores.local_path}.init.lock"):
        client = MlflowClient(stores.local)
        client.search_experiments(max_results=1)  # the store's first use creates the tables
    return client


def resolve_stores(params_uri: str | None = None) -> Stores:
    """MLFLOW_TRACKING_URI, else `tracking.uri` in params: a `sqlite:///` file is the local store
    (and there is no team server); any other URI is the team server, and the local store is
    `mlflow.db` at the repository root. Neither set: that local store alone."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params_uri
    default = f"sqlite:///{project_root() / DEFAULT_DB}"
    if not uri:
        return Stores(default, None)
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r} has no scheme; MLflow no longer accepts a plain folder. "
            f"Use sqlite:///path/to/mlflow.db or http://host:port"
        )
    if is_local_store(uri):
        if uri.endswith(":memory:"):
            raise ValueError(
                f"tracking URI {uri!r} is an in-memory store, gone when the stage ends; use "
                f"sqlite:///path/to/mlflow.db"
            )
        return Stores(_absolute_sqlite(uri), None)
    return Stores(default, uri)


def without_userinfo(uri: str) -> str:
    """`uri` without a user name or password (`http://user:secret@host` -> `http://host`): what
    genlab writes into run.json, a log line or an MLflow param. Credentials come from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or the URI given at run time."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:")


# MLflow's HTTP client retries a failing request 7 times with backoff factor 2 and a 120 s
# timeout per attempt (mlflow.environment_variables: MLFLOW_HTTP_REQUEST_MAX_RETRIES = 7,
# MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR = 2, MLFLOW_HTTP_REQUEST_TIMEOUT = 120, read at every request
# by mlflow.utils.rest_utils.http_request): about four minutes per call against a dead server.
# While training, one call may cost at most a few seconds: one retry, no backoff, 2 s timeouts.
SHORT_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
}


@contextmanager
def short_http_retries() -> Iterator[None]:
    """MLflow calls inside fail within seconds instead of minutes.

    MLflow reads these settings only from the environment (the client takes no retry argument),
    so they are set for the duration of the block and restored after it: nothing leaks into other
    code, but another thread calling MLflow during the block would see them too.
    """
    saved = {name: os.environ.get(name) for name in SHORT_HTTP_SETTINGS}
    os.environ.update(SHORT_HTTP_SETTINGS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError within about `timeout_s` if the tracking store at `uri` is unusable.

    http(s): the server's `/health` must answer 2xx. sqlite: the database's folder must exist and
    be writable (the file itself is created on first use). Other schemes are not checked.
    """
    fix = "fix MLFLOW_TRACKING_URI or tracking.uri in params.yaml"
    uri = without_userinfo(uri)  # /health needs no credentials, and messages show none
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError) as exc:  # URLError, refused, DNS, timeout; bad URL
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                reason = f"no answer within {timeout_s:g} s"
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                f"(mlflow server --host 127.0.0.1 --port <port> --backend-store-uri ...) or {fix}"
            ) from None
        if not 200 <= status < 300:
            raise TrackingError(
                f"MLflow tracking server {uri} is not healthy ({url} answered {status}); "
                f"check the server, or {fix}"
            )
    elif uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(
                f"MLflow store {uri}: folder {folder} does not exist or is not writable; "
                f"create it or {fix}"
            )


def is_global_zero() -> bool:
    """True in the process that owns tracking (before or outside any distributed launch)."""
    return (
        int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
        and int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0)) == 0
    )


# MLflow's marker of what an experiment is for: model training, not GenAI (traces, token usage).
# (MLflow 3.17's UI opens its GenAI workspace by default all the same; README says how to switch.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of experiment `name`, created (with an absolute artifact root, marked as model
    development) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if is_local_store(client.tracking_uri):  # the store and its artifacts, side by side
        store = Path(client.tracking_uri.removeprefix("sqlite:///"))
        folder = store.parent if store.is_absolute() else project_root()
        location = (folder / DEFAULT_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:
        # Another process (a parallel queue worker) created it between our two calls.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_dataset(
    client: MlflowClient,
    run_id: str,
    *,
    name: str,
    sha256: str,
    profile: dict[str, Any],
    context: str,
) -> None:
    """The prepared dataset as an MLflow dataset input of the run (the UI's Dataset column,
    searchable as `dataset.digest`): its digest is the first 32 hex digits of its sha256 (MLflow
    keeps at most 36 characters), the whole sha256 is in its profile; `context` says what the
    run used it for (training: train and validation splits; evaluation: the test split)."""
    dataset = Dataset(
        name=name,
        digest=sha256[:32],
        source_type="local",
        source=json.dumps({"uri": "data/prepared"}),
        profile=json.dumps(profile | {"sha256": sha256}),
    )
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (some containers)
        return "unknown"


def provenance_tags(*, stage: str, data_sha256: str) -> dict[str, str]:
    """Tags linking a run to the code, the data and the DVC stage/experiment that produced it."""
    commit = _git("rev-parse", "HEAD") or os.environ.get("DVC_EXP_BASELINE_REV", "unknown")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        # The UI's Source column: the stage, as DVC runs it.
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"genlab {os.environ.get('DVC_STAGE', stage)}",
        "mlflow.user": _user(),
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "data_sha256": data_sha256,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        tags["dvc_exp_baseline"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return tags


@dataclass(frozen=True)
class RunRecord:
    """Where a family's training run lives; written as run.json beside its checkpoints (the
    local store's URI and the run's id there)."""

    experiment_id: str
    run_id: str
    tracking_uri: str

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; train the family first (dvc repro train@...)"
            )
        return cls(**json.loads(path.read_text()))


def start_run(
    client: MlflowClient, experiment: str, *, run_name: str, tags: dict[str, str]
) -> RunRecord:
    experiment_id = ensure_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return RunRecord(experiment_id, run.info.run_id, without_userinfo(client.tracking_uri))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested params as MLflow param names."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _log_all(
    client: MlflowClient,
    run_id: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    artifacts: list[Path],
    artifact_dir: str,
    step: int = 0,
) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
        tags=[RunTag(key, str(value)) for key, value in tags.items()],
    )
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_dir)


def log_evaluation(
    record: RunRecord,
    stores: Stores,
    metrics: dict[str, float],
    *,
    step: int,
    protocol: dict[str, Any],
    artifacts: list[Path],
    data: tuple[str, str, dict[str, Any]],
    confidence: float,
) -> None:
    """Log the evaluate stage's metrics and files into the family's training run, in the local
    store (the one of this repository: run.json may name the store of a moved copy of it), with
    the data (name, sha256, profile) as its evaluation dataset input.

    The protocol goes in as tags (`eval.<key>`), not params: MLflow params are immutable and the
    same training run is re-evaluated when only the protocol changes.
    """
    if not is_global_zero():
        return
    client = local_client(stores)
    tags = {f"eval.{key}": value for key, value in protocol.items()}
    name, sha256, profile = data
    try:
        log_dataset(
            client, record.run_id, name=name, sha256=sha256, profile=profile, context="evaluation"
        )
        _log_all(client, record.run_id, metrics, tags, artifacts, "evaluation", step)
        tag_model_versions(client, record.run_id, metrics, confidence)
    except MlflowException as exc:
        raise TrackingError(
            f"could not log evaluation to MLflow run {record.run_id} in {stores.local}: "
            f"{exc.message.splitlines()[0]}; the metrics file is written, re-run the stage once "
            f"the store is usable"
        ) from None


def _log_run(
    stores: Stores,
    experiment: str,
    *,
    run_name: str,
    family_tag: str,
    metrics: dict[str, float],
    tags: dict[str, Any],
    data_sha256: str,
    artifacts: list[Path],
    artifact_dir: str,
) -> RunRecord | None:
    """One finished run, in the local store, of a stage that is not a training (baselines,
    report)."""
    if not is_global_zero():
        return None
    client = local_client(stores)
    own = provenance_tags(stage=artifact_dir, data_sha256=data_sha256) | {"family": family_tag}
    try:
        record = start_run(client, experiment, run_name=run_name, tags=own)
        _log_all(client, record.run_id, metrics, tags, artifacts, artifact_dir)
        client.set_terminated(record.run_id)
    except MlflowException as exc:
        raise TrackingError(
            f"could not log the {artifact_dir} run to {stores.local}: "
            f"{exc.message.splitlines()[0]}; the files are written, re-run the stage once the "
            f"store is usable"
        ) from None
    return record


def registered_model_name(experiment: str, family: str) -> str:
    """The model registry's entry of a family on a dataset: one version per training run."""
    return f"{experiment}-{family}"


def register_model(
    client: MlflowClient, run_id: str, *, name: str, description: str, tags: dict[str, str]
) -> str:
    """Run `run_id`'s `checkpoint/` artifact as a version of registered model `name` (created if
    missing); the version links to the run, so its page leads to the training curves and the
    evaluation's metrics. Registering a run again returns its version."""
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return str(existing[0].version)
    source = f"runs:/{run_id}/checkpoint"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)


def _headline(key: str) -> bool:
    """The evaluation metrics a model version shows as tags: sample quality, memorisation, held-out
    likelihood."""
    if v.is_uncertainty(key):
        return False
    if key in (v.FID, v.KID, v.PRECISION, v.RECALL, v.COND_ACC, v.AUTHENTICITY, v.C_T):
        return True
    return key.startswith("test/") and key.endswith("_nats")


def tag_model_versions(
    client: MlflowClient, run_id: str, metrics: dict[str, float], confidence: float
) -> None:
    """The headline evaluation metrics, each with its interval, as tags of the run's registered
    model versions (the registry's page then compares them without opening the runs)."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        for key in filter(_headline, metrics):
            e = v.estimate(metrics, key, confidence=confidence)
            text = f"{e.value:.4g}"
            if math.isfinite(e.low) and math.isfinite(e.high):
                text += f" [{e.low:.4g}, {e.high:.4g}]"
            client.set_model_version_tag(version.name, version.version, key, text)


BASELINES_TAG = "baselines"  # tags.family of the baselines run
REPORT_TAG = "report"  # tags.family of the report run


def log_baselines(
    stores: Stores,
    experiment: str,
    metrics: dict[str, float],
    *,
    data_sha256: str,
    protocol: dict[str, Any],
    artifacts: list[Path],
) -> RunRecord | None:
    """One run per baselines stage: every row's metrics as `<row>.<metric>`, the protocol as
    `eval.protocol.*` tags (as in the families' runs), the metrics file."""
    return _log_run(
        stores,
        experiment,
        run_name="baselines (copycat, held-out real)",
        family_tag=BASELINES_TAG,
        metrics=metrics,
        tags={f"eval.protocol.{key}": value for key, value in protocol.items()},
        data_sha256=data_sha256,
        artifacts=artifacts,
        artifact_dir="baselines",
    )


def log_report(
    stores: Stores,
    experiment: str,
    *,
    data_sha256: str,
    artifacts: list[Path],
) -> RunRecord | None:
    """One run per report: the summary and its figures as files."""
    return _log_run(
        stores,
        experiment,
        run_name="report",
        family_tag=REPORT_TAG,
        metrics={},
        tags={},
        data_sha256=data_sha256,
        artifacts=artifacts,
        artifact_dir="report",
    )
