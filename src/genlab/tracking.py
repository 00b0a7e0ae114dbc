"""MLflow: where runs go, how they are tagged, and how the evaluate stage finds its training run.

- The tracking URI is always explicit: `MLFLOW_TRACKING_URI`, else `tracking.uri` in params, else a
  SQLite file `mlflow.db` at the repository root. The root comes from `DVC_ROOT`, which DVC sets to
  the real repository also when a stage runs in an experiment's temporary copy (`dvc exp run
  --temp` / `--queue`), so every run lands in the same store.
- Experiments of a SQLite store are created with an absolute artifact location next to the store
  file (`mlartifacts/`; at the repository root for the default store), never one relative to a
  temporary working directory.
- One run per family training; its id is kept in `run.json` next to the final checkpoint so the
  evaluate stage logs into the same run.
- Only global rank 0 talks to MLflow.
- A tracking server must be reachable when training starts (`check_reachable` fails within
  seconds); an outage during training never stops it: `genlab.spool.SpoolingMLFlowLogger` spools
  what fails and replays it when the server is back, at the end of the fit, or by `genlab sync`.
"""

from __future__ import annotations

import json
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

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from genlab.errors import TrackingError
from genlab.io import write_json_atomic

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


def resolve_tracking_uri(params_uri: str | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params_uri
    if not uri:
        return f"sqlite:///{project_root() / DEFAULT_DB}"
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r} has no scheme; MLflow no longer accepts a plain folder. "
            f"Use sqlite:///path/to/mlflow.db or http://host:port"
        )
    return _absolute_sqlite(uri)


def without_userinfo(uri: str) -> str:
    """`uri` without a user name or password (`http://user:secret@host` -> `http://host`): what
    genlab writes into run.json, a spool, a log line or an MLflow param. Credentials come from
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


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of experiment `name`, created (with an absolute artifact root) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if is_local_store(client.tracking_uri):  # the store and its artifacts, side by side
        store = Path(client.tracking_uri.removeprefix("sqlite:///"))
        folder = store.parent if store.is_absolute() else project_root()
        location = (folder / DEFAULT_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process (a parallel queue worker) created it between our two calls.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def provenance_tags(*, stage: str, data_sha256: str) -> dict[str, str]:
    """Tags linking a run to the code, the data and the DVC stage/experiment that produced it."""
    commit = _git("rev-parse", "HEAD") or os.environ.get("DVC_EXP_BASELINE_REV", "unknown")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
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
    tracking URI without credentials)."""

    experiment_id: str
    run_id: str
    tracking_uri: str

    def connect_uri(self, current: str) -> str:
        """The URI to reach this run's store with: `current` (the one resolved now, with its
        credentials) when it names the same store, else the recorded one."""
        return current if without_userinfo(current) == self.tracking_uri else self.tracking_uri

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
    metrics: dict[str, float],
    *,
    params_uri: str | None,
    step: int,
    protocol: dict[str, Any],
    artifacts: list[Path],
) -> None:
    """Log the evaluate stage's metrics and files into the family's training run.

    The protocol goes in as tags (`eval.<key>`), not params: MLflow params are immutable and the
    same training run is re-evaluated when only the protocol changes.
    """
    if not is_global_zero():
        return
    client = MlflowClient(record.connect_uri(resolve_tracking_uri(params_uri)))
    tags = {f"eval.{key}": value for key, value in protocol.items()}
    try:
        _log_all(client, record.run_id, metrics, tags, artifacts, "evaluation", step)
    except MlflowException as exc:
        raise TrackingError(
            f"could not log evaluation to MLflow run {record.run_id} at {record.tracking_uri}: "
            f"{exc.message.splitlines()[0]}; the metrics file is written, re-run the stage once "
            f"the store is reachable"
        ) from None


def _log_run(
    params_uri: str | None,
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
    """One finished run of a stage that is not a training (baselines, report)."""
    if not is_global_zero():
        return None
    client = MlflowClient(resolve_tracking_uri(params_uri))
    own = provenance_tags(stage=artifact_dir, data_sha256=data_sha256) | {"family": family_tag}
    try:
        record = start_run(client, experiment, run_name=run_name, tags=own)
        _log_all(client, record.run_id, metrics, tags, artifacts, artifact_dir)
        client.set_terminated(record.run_id)
    except MlflowException as exc:
        raise TrackingError(
            f"could not log the {artifact_dir} run to {without_userinfo(client.tracking_uri)}: "
            f"{exc.message.splitlines()[0]}; the files are written, re-run the stage once the "
            f"store is reachable"
        ) from None
    return record


BASELINES_TAG = "baselines"  # tags.family of the baselines run
REPORT_TAG = "report"  # tags.family of the report run


def log_baselines(
    params_uri: str | None,
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
        params_uri,
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
    params_uri: str | None,
    experiment: str,
    *,
    data_sha256: str,
    artifacts: list[Path],
) -> RunRecord | None:
    """One run per report: the summary and its figures as files."""
    return _log_run(
        params_uri,
        experiment,
        run_name="report",
        family_tag=REPORT_TAG,
        metrics={},
        tags={},
        data_sha256=data_sha256,
        artifacts=artifacts,
        artifact_dir="report",
    )
