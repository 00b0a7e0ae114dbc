"""A team tracking server as a copy of the local store: the idempotent push of genlab's runs.

genlab logs every run into the local SQLite store (`tracking.Stores.local`), which is a file and
never goes down. A team server (`MLFLOW_TRACKING_URI` or `tracking.uri` naming http(s)) receives
each run by a push: at the end of every stage that logged, when the server answers, and by
`genlab sync` for whatever an outage held back.

A push makes the server's copy of a run equal to the local one and sends only what the server
lacks, so pushing twice sends nothing the second time and a push cut short is finished by the
next:

- the server's copy is the run of the same experiment tagged `genlab.local_run_id` = the local
  run id (created with the local run's name, start time and tags when missing);
- params and dataset inputs the server lacks; tags whose value differs;
- metric values the server lacks, compared by (step, timestamp, value) per key (one request per
  key with more than one value; a single value equal to the server's latest is taken as sent);
- artifact files missing on the server or of another size;
- the run's model registry versions (a version of the same registered model pointing at the
  server's copy's checkpoint) and their tags;
- last, the run's status and end time, so a server run that reads FINISHED has everything the
  local run had when it finished.

Pushes of one local store are serialised by a lock file next to it (`<store>.push.lock`): two
stages finishing at once never both create the server's copy.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from genlab.errors import TrackingError
from genlab.io import exclusive_lock
from genlab.tracking import (
    Stores,
    check_reachable,
    ensure_experiment,
    local_client,
    register_model,
    short_http_retries,
    without_userinfo,
)

log = logging.getLogger(__name__)

LOCAL_RUN_TAG = "genlab.local_run_id"  # on the server's copy: the local run it mirrors
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limits per request
MAX_BATCH_PARAMS = 100  # ... for params and for tags


@dataclass
class PushCounts:
    """What one push sent to the server."""

    created: bool = False  # the server's copy was made by this push
    params: int = 0
    tags: int = 0
    metrics: int = 0  # metric values
    inputs: int = 0  # dataset inputs
    artifacts: int = 0  # files
    versions: int = 0  # model registry versions and their tags
    status: int = 0  # status / end time changes

    @property
    def total(self) -> int:
        sent = (self.params, self.tags, self.metrics, self.inputs, self.artifacts, self.versions)
        return sum(sent) + self.status + self.created

    def summary(self) -> str:
        if not self.total:
            return "up to date"
        text = (
            f"{self.params} params, {self.tags} tags, {self.metrics} metric values, "
            f"{self.inputs} dataset inputs, {self.artifacts} files, {self.versions} model "
            f"versions and version tags, {self.status} status changes"
        )
        return ("created; " if self.created else "") + text


@dataclass(frozen=True)
class PushResult:
    local_run_id: str
    run_name: str
    remote_run_id: str | None  # None: the server's copy was deleted there, nothing pushed
    counts: PushCounts


def _metric_key(m: Metric) -> tuple[int, int, float | str]:
    """A metric value as compared between the stores (NaN equals NaN here)."""
    return m.step, m.timestamp, "nan" if math.isnan(m.value) else float(m.value)


def _same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> Iterator:
    """Every file (FileInfo) under `path` of the run's artifacts, recursively."""
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            yield from _artifact_files(client, run_id, info.path)
        else:
            yield info


def _remote_copy(remote: MlflowClient, experiment_id: str, local_run_id: str):
    """The server's run tagged as the copy of `local_run_id` (deleted ones included), or None."""
    found = remote.search_runs(
        [experiment_id],
        filter_string=f"tags.`{LOCAL_RUN_TAG}` = '{local_run_id}'",
        run_view_type=ViewType.ALL,
        max_results=1,
    )
    return found[0] if found else None


def push_run(local: MlflowClient, remote: MlflowClient, run_id: str) -> PushResult:
    """Make the server's copy of local run `run_id` equal to it, sending only what it lacks."""
    run = local.get_run(run_id)
    experiment = local.get_experiment(run.info.experiment_id)
    experiment_id = ensure_experiment(remote, experiment.name)
    counts = PushCounts()
    tags = dict(run.data.tags) | {LOCAL_RUN_TAG: run_id}
    copy = _remote_copy(remote, experiment_id, run_id)
    if copy is None:
        copy = remote.create_run(
            experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name
        )
        counts.created = True
    elif copy.info.lifecycle_stage == "deleted":  # deleted on the server: the team's choice
        return PushResult(run_id, run.info.run_name, None, counts)
    remote_id = copy.info.run_id

    params = [Param(k, x) for k, x in run.data.params.items() if k not in copy.data.params]
    changed = [RunTag(k, x) for k, x in tags.items() if copy.data.tags.get(k) != x]
    for i in range(0, len(params), MAX_BATCH_PARAMS):
        remote.log_batch(remote_id, params=params[i : i + MAX_BATCH_PARAMS])
    for i in range(0, len(changed), MAX_BATCH_PARAMS):
        remote.log_batch(remote_id, tags=changed[i : i + MAX_BATCH_PARAMS])
    counts.params, counts.tags = len(params), len(changed)

    missing: list[Metric] = []
    for key in run.data.metrics:
        history = local.get_metric_history(run_id, key)
        if key in copy.data.metrics:
            if len(history) == 1 and _same_value(history[0].value, copy.data.metrics[key]):
                continue
            sent = Counter(map(_metric_key, remote.get_metric_history(remote_id, key)))
        else:
            sent = Counter()
        for metric in history:
            if sent[_metric_key(metric)]:
                sent[_metric_key(metric)] -= 1
            else:
                missing.append(metric)
    for i in range(0, len(missing), MAX_BATCH_METRICS):
        remote.log_batch(remote_id, metrics=missing[i : i + MAX_BATCH_METRICS])
    counts.metrics = len(missing)

    def identity(dataset_input) -> tuple[str, str, str]:
        d = dataset_input.dataset
        return d.name, d.digest, str(sorted((t.key, t.value) for t in dataset_input.tags))

    have = {identity(d) for d in (copy.inputs.dataset_inputs if copy.inputs else [])}
    inputs = [
        d for d in (run.inputs.dataset_inputs if run.inputs else []) if identity(d) not in have
    ]
    if inputs:
        remote.log_inputs(remote_id, datasets=inputs)
    counts.inputs = len(inputs)

    counts.artifacts = _push_artifacts(local, remote, run_id, remote_id)
    counts.versions = _push_versions(local, remote, run_id, remote_id)

    if (copy.info.status, copy.info.end_time) != (run.info.status, run.info.end_time):
        if RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
            remote.set_terminated(remote_id, run.info.status, end_time=run.info.end_time)
        else:
            remote.update_run(remote_id, status=run.info.status)
        counts.status = 1
    return PushResult(run_id, run.info.run_name, remote_id, counts)


def _push_artifacts(local: MlflowClient, remote: MlflowClient, run_id: str, remote_id: str) -> int:
    """Upload the local run's artifact files the server's copy lacks (by path and size)."""
    have = {f.path: f.file_size for f in _artifact_files(remote, remote_id)}
    todo = [f for f in _artifact_files(local, run_id) if have.get(f.path) != f.file_size]
    with tempfile.TemporaryDirectory(prefix="genlab-push-") as tmp:
        for info in todo:
            path = local.download_artifacts(run_id, info.path, tmp)
            folder = str(Path(info.path).parent)
            remote.log_artifact(remote_id, path, None if folder == "." else folder)
    return len(todo)


def _push_versions(local: MlflowClient, remote: MlflowClient, run_id: str, remote_id: str) -> int:
    """The local run's model registry versions, as versions of the server's copy (by registered
    name and run), with their tags; the number of versions and tags sent."""
    sent = 0
    for mine in local.search_model_versions(f"run_id = '{run_id}'"):
        found = remote.search_model_versions(f"name = '{mine.name}' and run_id = '{remote_id}'")
        if found:
            version, theirs = str(found[0].version), found[0].tags
        else:
            description = local.get_registered_model(mine.name).description or ""
            version = register_model(
                remote, remote_id, name=mine.name, description=description, tags=mine.tags
            )
            theirs, sent = dict(mine.tags), sent + 1
        for key, value in mine.tags.items():
            if theirs.get(key) != value:
                remote.set_model_version_tag(mine.name, version, key, value)
                sent += 1
    return sent


def push_lock(stores: Stores) -> AbstractContextManager[None]:
    """One push at a time per local store (a lock file beside it)."""
    return exclusive_lock(f"{stores.local_path}.push.lock")


def local_runs(stores: Stores, experiment: str | None = None) -> list[str]:
    """Ids of the local store's active runs, oldest first (of `experiment` only, if named)."""
    local = local_client(stores)
    if experiment is None:
        experiments = [e.experiment_id for e in local.search_experiments()]
    else:
        found = local.get_experiment_by_name(experiment)
        experiments = [] if found is None else [found.experiment_id]
    if not experiments:
        return []
    runs = local.search_runs(experiments, order_by=["attributes.start_time ASC"])
    ids = [r.info.run_id for r in runs]
    while runs.token:
        runs = local.search_runs(
            experiments, order_by=["attributes.start_time ASC"], page_token=runs.token
        )
        ids += [r.info.run_id for r in runs]
    return ids


def push(stores: Stores, run_ids: list[str]) -> Iterator[PushResult]:
    """Push `run_ids` of the local store to the team server, one result per run as it is done.

    TrackingError (one line) when the server is unreachable or fails: what it took before stays
    taken, and the next push sends the rest."""
    if stores.remote is None:
        raise TrackingError(
            "no team tracking server to push to: set MLFLOW_TRACKING_URI (or tracking.uri in "
            "params.yaml) to its http(s):// address"
        )
    try:
        check_reachable(stores.remote)
    except TrackingError as exc:
        raise TrackingError(
            f"{exc}; the runs stay in the local store {stores.local}, and `genlab sync` pushes "
            f"them once the server answers"
        ) from None
    local, remote = local_client(stores), MlflowClient(stores.remote)
    with push_lock(stores):
        for run_id in run_ids:
            try:
                yield push_run(local, remote, run_id)
            except (MlflowException, OSError) as exc:
                raise TrackingError(
                    f"pushing run {run_id} to {without_userinfo(stores.remote)} failed "
                    f"({str(exc).splitlines()[0][:200]}); it is complete in the local store "
                    f"{stores.local}: run `genlab sync` once the server works"
                ) from None


def push_after_stage(stores: Stores, run_ids: list[str]) -> None:
    """The push at the end of a stage: to the team server if there is one and it answers now
    (calls give up within seconds), else one warning naming `genlab sync`. Never raises: the
    stage's work is done and in the local store either way."""
    if stores.remote is None or not run_ids:
        return
    try:
        with short_http_retries():
            for result in push(stores, run_ids):
                log.info("pushed run %s: %s", result.local_run_id, result.counts.summary())
    except TrackingError as exc:
        log.warning("not pushed to the team server: %s", exc)
