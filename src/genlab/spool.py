"""A local spool of MLflow logging that could not reach the tracking store, and its replay.

A spool is a folder (training uses `<checkpoint dir>/spool`) holding:

- `spool.json`: the header, the tracking URI and run id every record belongs to (written with the
  first record: a training that never failed to log leaves no spool);
- `records.jsonl`: one JSON record per failed logging call, appended in call order (metrics keep
  the step and timestamp of the original call, so a replay draws the same curves);
- `files/`: the payloads of image and artifact records (written before their record line, so a
  record never names a missing file);
- `replayed`: how many bytes of `records.jsonl` the store has accepted (replaced atomically);
- `rejected.jsonl`: records the store refused (a 4xx answer, not an outage) or that could not be
  sent (a deleted payload), kept with the error: a poison record neither blocks the rest nor
  disappears.

Replay is exactly-once up to one batch: the `replayed` offset moves past a batch only after the
store accepted it, so a crash between the two re-sends that batch (metrics are de-duplicated by
the store; an image would appear twice) and never loses one. A drained spool keeps only its
header and lock file; the lock serialises the training process and `genlab sync` on one spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from genlab.errors import TrackingError
from genlab.io import write_text_atomic
from genlab.tracking import check_reachable, short_http_retries, without_userinfo

log = logging.getLogger(__name__)

RETRY_AFTER_S = 20.0  # after a failure, spool without contacting the store for this long
# Metric values are sent at most this often (and at every checkpoint, any other record, the end).
# One MLflow write costs about 4-8 ms of CPU on a SQLite store whatever it holds: at every
# logging step it was about a tenth of a logging epoch of the small models (benchmarks/overhead.py).
FLUSH_S = 5.0
HEADER = "spool.json"
RECORDS = "records.jsonl"
CURSOR = "replayed"
REJECTED = "rejected.jsonl"
FILES = "files"
LOCK = ".lock"
FORMAT = 1
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit on metrics per request
MAX_BATCH_PARAMS = 100  # ... and on params/tags


def now_ms() -> int:
    return int(time.time() * 1000)


def is_outage(exc: BaseException) -> bool:
    """True when the store could not be reached or failed on its side (worth retrying later).

    False when it answered and refused the call (4xx), or the record itself is faulty: such a
    record would fail on every replay, so it is set aside instead of blocking the spool.
    """
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests.HTTPError
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    if isinstance(status, int):
        return not 400 <= status < 500
    return isinstance(exc, OSError)  # connection refused, DNS, timeouts (requests, urllib3)


@dataclass
class ReplayCounts:
    """What one replay sent to the store (and what it refused)."""

    metrics: int = 0  # metric values
    params: int = 0
    tags: int = 0
    images: int = 0
    texts: int = 0
    artifacts: int = 0
    status: int = 0  # run status changes (set_terminated)
    rejected: int = 0  # records the store refused, moved to rejected.jsonl

    def add(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "metrics":
            self.metrics += len(record["metrics"])
        elif kind == "params":
            self.params += len(record["params"])
        elif kind == "tags":
            self.tags += len(record["tags"])
        elif kind == "image":
            self.images += 1
        elif kind == "text":
            self.texts += 1
        elif kind == "artifact":
            self.artifacts += 1
        elif kind == "terminated":
            self.status += 1

    @property
    def total(self) -> int:
        return sum(
            (self.metrics, self.params, self.tags, self.images, self.texts, self.artifacts)
        ) + (self.status + self.rejected)

    def summary(self) -> str:
        text = (
            f"{self.metrics} metric values, {self.params} params, {self.tags} tags, "
            f"{self.images} images, {self.texts} texts, {self.artifacts} artifacts, "
            f"{self.status} status changes"
        )
        return text + (f", {self.rejected} rejected" if self.rejected else "")


def send(client: MlflowClient, run_id: str, record: dict[str, Any], payload: Any = None) -> None:
    """Send one record to the store. `payload`: the image array or artifact file of the record.

    Synchronous even where MLFLOW_ENABLE_ASYNC_LOGGING is set: a failure must surface here.
    """
    kind = record["kind"]
    if kind == "metrics":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(metrics), MAX_BATCH_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH_METRICS], synchronous=True)
    elif kind == "params":
        params = [Param(k, str(v)) for k, v in record["params"].items()]
        for i in range(0, len(params), MAX_BATCH_PARAMS):
            client.log_batch(run_id, params=params[i : i + MAX_BATCH_PARAMS], synchronous=True)
    elif kind == "tags":
        tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
        for i in range(0, len(tags), MAX_BATCH_PARAMS):
            client.log_batch(run_id, tags=tags[i : i + MAX_BATCH_PARAMS], synchronous=True)
    elif kind == "image":
        client.log_image(
            run_id,
            payload,
            key=record["key"],
            step=record["step"],
            timestamp=record["timestamp"],
            synchronous=True,
        )
    elif kind == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif kind == "artifact":
        client.log_artifact(run_id, str(payload), record["artifact_path"])
    elif kind == "terminated":
        client.set_terminated(run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown spool record kind {kind!r}")


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record line, or None for a line torn by a crash mid-append (the lock is held while a
    line is written, so under the lock an incomplete line can only come from a dead writer, whose
    call never returned)."""
    if not line.endswith(b"\n"):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Spool:
    """One spool folder; see the module docstring for its layout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._binding: dict[str, Any] | None = None  # header of a spool being written (bind)

    # -- header ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.path / HEADER).is_file()

    def header(self) -> dict[str, Any]:
        return json.loads((self.path / HEADER).read_text())

    @property
    def run_id(self) -> str:
        return self.header()["run_id"]

    @property
    def tracking_uri(self) -> str:
        return self.header()["tracking_uri"]

    def bind(self, tracking_uri: str, run_id: str) -> None:
        """Make this folder the spool of (tracking_uri, run_id); the header is written with the
        first record, so a training that never failed to log leaves no spool behind.

        Raises ValueError if it still holds records of another run: they must be synced first,
        never replayed into the wrong run.
        """
        # Credentials never go into the spool (a DVC output): `genlab sync` takes them from
        # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
        tracking_uri = without_userinfo(tracking_uri)
        if self.exists() and self.pending():
            header = self.header()
            if (header["tracking_uri"], header["run_id"]) != (tracking_uri, run_id):
                raise ValueError(
                    f"spool {self.path} holds unsynced records of run {header['run_id']} at "
                    f"{header['tracking_uri']}; run `genlab sync {self.path}` first"
                )
        self._binding = {"format": FORMAT, "tracking_uri": tracking_uri, "run_id": run_id}

    def _write_header(self) -> None:
        if self._binding is None or (self.exists() and self.header() == self._binding):
            return
        write_text_atomic(self.path / HEADER, json.dumps(self._binding, indent=2) + "\n")

    # -- state ----------------------------------------------------------------------------------

    def _offset(self) -> int:
        cursor = self.path / CURSOR
        return int(cursor.read_text()) if cursor.is_file() else 0

    def _set_offset(self, offset: int) -> None:
        write_text_atomic(self.path / CURSOR, str(offset))

    def pending(self) -> bool:
        """True while some record has not been accepted by the store."""
        records = self.path / RECORDS
        return records.is_file() and records.stat().st_size > self._offset()

    def pending_records(self) -> list[dict[str, Any]]:
        """The records not yet accepted, oldest first."""
        records = self.path / RECORDS
        if not records.is_file():
            return []
        with records.open("rb") as f:
            f.seek(self._offset())
            return [record for line in f if (record := _parse(line)) is not None]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- writing --------------------------------------------------------------------------------

    def append(self, record: dict[str, Any], payload: Any = None) -> None:
        """Add a record (and its image array / artifact file) at the end of the spool."""
        record = dict(record)
        with self._locked():
            self._write_header()
            if payload is not None:
                files = self.path / FILES
                files.mkdir(exist_ok=True)
                stem = f"{time.time_ns()}-{os.getpid()}"
                if record["kind"] == "image":
                    target = files / f"{stem}.npy"
                    np.save(target, np.asarray(payload))
                else:
                    target = files / f"{stem}-{Path(payload).name}"
                    shutil.copyfile(payload, target)
                record["file"] = target.name
            line = json.dumps(record, separators=(",", ":")) + "\n"
            with open(self.path / RECORDS, "ab+") as f:
                if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    line = "\n" + line  # end a line torn by a crash mid-append; replay skips it
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())

    # -- replay ---------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[list[dict[str, Any]], int]]:
        """(records, end offset) groups from the cursor on: runs of metrics records merged up to
        MAX_BATCH_METRICS values into one request, every other record alone."""
        records = self.path / RECORDS
        if not records.is_file():
            return
        with records.open("rb") as f:
            f.seek(self._offset())
            group: list[dict[str, Any]] = []
            size = 0
            while line := f.readline():
                record = _parse(line)
                if record is None:
                    continue
                is_metrics = record["kind"] == "metrics"
                n = len(record["metrics"]) if is_metrics else 0
                if group and (not is_metrics or size + n > MAX_BATCH_METRICS):
                    yield group, f.tell() - len(line)
                    group, size = [], 0
                group.append(record)
                size += n
                if not is_metrics:
                    yield group, f.tell()
                    group, size = [], 0
            if group or f.tell() > self._offset():
                yield group, f.tell()  # (an empty group: only torn lines were left)

    def _own_file(self, record: dict[str, Any]) -> Path | None:
        """The payload file a record names, which must be a plain file of this spool's files/
        folder: a spool is a DVC output, so whoever can write the DVC remote wrote this record,
        and an absolute, `..` or symlinked name would make `genlab sync` upload (and delete)
        a file of theirs choosing. ValueError if it is not; None for a record without one."""
        if "file" not in record:
            return None
        name = record["file"]
        folder = (self.path / FILES).resolve()
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"payload name {name!r} is not a file name of {folder}")
        path = folder / name
        if path.is_symlink() or path.resolve().parent != folder:
            raise ValueError(f"payload {path} leads outside {folder}")
        return path

    def _payload(self, record: dict[str, Any]) -> Any:
        path = self._own_file(record)
        if path is None:
            return None
        if not path.is_file():  # deleted by hand: a record that can never be sent
            raise FileNotFoundError(f"payload {path} is missing")
        return np.load(path, allow_pickle=False) if record["kind"] == "image" else path

    def replay(self, client: MlflowClient) -> ReplayCounts:
        """Send every pending record to `client`, in order; raise on the first outage.

        What was accepted before the failure stays accepted (the cursor moved past it).
        """
        counts = ReplayCounts()
        if not (self.path / RECORDS).is_file():
            return counts
        run_id = self.run_id
        with self._locked():
            for group, end in self._batches():
                if not group:
                    self._set_offset(end)
                    continue
                if group[0]["kind"] == "metrics":
                    merged = [m for r in group for m in r["metrics"]]
                    record: dict[str, Any] = {"kind": "metrics", "metrics": merged}
                else:
                    record = group[0]
                try:
                    payload = self._payload(record)
                except (OSError, ValueError) as exc:  # missing or not the spool's own: refused
                    self.reject(group, exc)
                    counts.rejected += len(group)
                    self._set_offset(end)
                    continue
                try:
                    send(client, run_id, record, payload)
                except Exception as exc:
                    if is_outage(exc):
                        raise
                    self.reject(group, exc)
                    counts.rejected += len(group)
                else:
                    counts.add(record)
                self._set_offset(end)
                for r in group:
                    with contextlib.suppress(ValueError):  # never delete what is not ours
                        if (own := self._own_file(r)) is not None:
                            own.unlink(missing_ok=True)
            self._drop_replayed()
        return counts

    def reject(self, group: list[dict[str, Any]], exc: BaseException) -> None:
        """Set records the store refused aside in rejected.jsonl, with the store's answer."""
        self._write_header()  # which run they were meant for
        with open(self.path / REJECTED, "a") as f:
            for record in group:
                f.write(json.dumps(record | {"error": str(exc).splitlines()[0]}) + "\n")

    def _drop_replayed(self) -> None:
        """Once every record is accepted, keep only the header (and rejected records)."""
        records = self.path / RECORDS
        if records.is_file() and records.stat().st_size <= self._offset():
            records.unlink()
            (self.path / CURSOR).unlink(missing_ok=True)
            shutil.rmtree(self.path / FILES, ignore_errors=True)


def find_spools(paths: list[Path]) -> list[Spool]:
    """Spools at or under `paths` (a spool folder, or a folder searched for spool headers)."""
    found: dict[Path, Spool] = {}
    for path in paths:
        candidates = [path] if (path / HEADER).is_file() else sorted(path.rglob(HEADER))
        for candidate in candidates:
            folder = (candidate if candidate.is_dir() else candidate.parent).resolve()
            found.setdefault(folder, Spool(folder))
    return list(found.values())


class SpoolingMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger for an existing run, that never lets the store stop training.

    Metric values are gathered and sent together, in one request: at the first call FLUSH_S
    after the last send, before any other record, after every checkpoint Lightning saves (so
    what a resumed run would not log again is never only in memory), at `finalize` and by
    `flush`. Each value keeps the step and timestamp of its call.

    Every call that talks to the store (metrics, params, tags, images, texts, artifacts, the
    final status) is sent with short HTTP retries (`short_http_retries`). If it fails for an
    outage, the record goes to the spool at `spool_dir` with its original step and timestamp, one
    warning per outage names the spool and `genlab sync`, and for RETRY_AFTER_S every further call
    is spooled without contacting the store; the next call after that replays the spool and, if
    the store took it, logs directly again. `finalize` (end of fit) replays what is left and keeps
    the spool, with a warning, if the store is still down. A call the store refuses (4xx) is set
    aside in the spool's rejected.jsonl with a warning.

    Only global rank 0 logs (as in MLFlowLogger). `experiment` is the plain MlflowClient: calls
    made on it directly are not spooled.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        run_id: str,
        spool_dir: str | Path,
        experiment_id: str | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(tracking_uri=tracking_uri, run_id=run_id, prefix=prefix)
        # The run exists: no get_run round trip on first use (MLFlowLogger.experiment does one,
        # with the default four-minute retries, and sets mlflow's global tracking URI).
        self._experiment_id = experiment_id
        self._initialized = True
        self.spool = Spool(spool_dir)
        self._down_until = 0.0  # time.monotonic() before which the store is not contacted
        self._outage = False
        self._metrics: list[list[Any]] = []  # [key, value, timestamp, step] not yet sent
        self._flushed_at = -math.inf  # time.monotonic() of the last metrics send
        if rank_zero_only.rank == 0:
            try:
                self.spool.bind(tracking_uri, run_id)
            except ValueError as exc:
                raise TrackingError(str(exc)) from None

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        return self._mlflow_client

    # -- what Lightning and genlab call ---------------------------------------------------------

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        timestamp = now_ms()
        values = []
        for key, value in metrics.items():
            if isinstance(value, str):
                continue
            key = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
            values.append([key, float(value), timestamp, step or 0])
        self._metrics += values
        if time.monotonic() - self._flushed_at >= FLUSH_S:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the metric values gathered since the last send, in one request."""
        if self._metrics:
            values, self._metrics = self._metrics, []
            self._flushed_at = time.monotonic()
            self._submit({"kind": "metrics", "metrics": values})

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        self.flush()

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Any) -> None:
        flat = _flatten_dict(_convert_params(params))
        self._submit({"kind": "params", "params": {k: str(v)[:250] for k, v in flat.items()}})

    @rank_zero_only
    def log_tags(self, tags: dict[str, Any]) -> None:
        self._submit({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    @rank_zero_only
    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An image (H, W, 3) uint8 as a step of the image series `key` (e.g. sample grids)."""
        record = {"kind": "image", "key": key, "step": step, "timestamp": now_ms()}
        self._submit(record, np.asarray(image))

    @rank_zero_only
    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"kind": "text", "text": text, "artifact_file": artifact_file})

    @rank_zero_only
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file as a run artifact (copied into the spool if the store is down)."""
        self._submit({"kind": "artifact", "artifact_path": artifact_path}, Path(path))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(
            status, status
        )
        self._down_until = 0.0  # the end of the fit: one more try whatever the backoff
        self._submit({"kind": "terminated", "status": status, "end_time": now_ms()})
        if self.spool.pending():
            log.warning(
                "MLflow store %s still unreachable at the end of training: the spool %s is "
                "kept; run `genlab sync %s` once the store is back",
                without_userinfo(self._tracking_uri),
                self.spool.path,
                self.spool.path,
            )

    def replay(self) -> ReplayCounts | None:
        """Replay the spool now (ignoring the backoff); None if the store is still down."""
        self._down_until = 0.0
        return self._replay() if self.spool.pending() else ReplayCounts()

    # -- the spooling ---------------------------------------------------------------------------

    def _submit(self, record: dict[str, Any], payload: Any = None) -> None:
        if record["kind"] != "metrics":
            self.flush()  # the gathered metrics go first: records reach the store in call order
        if time.monotonic() < self._down_until:
            self.spool.append(record, payload)
            return
        if self.spool.pending() and self._replay() is None:
            self.spool.append(record, payload)
            return
        try:
            with short_http_retries():
                send(self._mlflow_client, self._run_id, record, payload)
            self._outage = False
        except Exception as exc:
            if not is_outage(exc):
                log.warning(
                    "MLflow refused a %s record for run %s (%s); kept in %s",
                    record["kind"],
                    self._run_id,
                    str(exc).splitlines()[0],
                    self.spool.path / REJECTED,
                )
                self.spool.reject([record], exc)
                return
            self._went_down(exc)
            self.spool.append(record, payload)

    def _replay(self) -> ReplayCounts | None:
        try:
            with short_http_retries():
                counts = self.spool.replay(self._mlflow_client)
        except Exception as exc:
            self._went_down(exc)
            return None
        if self._outage:
            log.warning(
                "MLflow store %s is back: replayed %s from %s",
                without_userinfo(self._tracking_uri),
                counts.summary(),
                self.spool.path,
            )
        self._outage = False
        return counts

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER_S
        if not self._outage:
            self._outage = True
            log.warning(
                "MLflow store %s unreachable (%s); training goes on, logging is spooled to %s "
                "and replayed when the store is back (or by `genlab sync %s`)",
                without_userinfo(self._tracking_uri),
                str(exc).splitlines()[0][:200],
                self.spool.path,
                self.spool.path,
            )


@dataclass(frozen=True)
class SyncResult:
    spool: Path
    run_id: str
    counts: ReplayCounts
    left: bool  # records still pending after the replay (appended by a running training)


def sync(paths: list[Path]) -> Iterator[SyncResult]:
    """Replay every spool at or under `paths` into its run, one result per spool as it is done;
    TrackingError (the spool left as it was) if its store is down."""
    for spool in find_spools(paths):
        if not spool.pending():
            yield SyncResult(spool.path, spool.run_id, ReplayCounts(), False)
            continue
        uri = spool.tracking_uri
        check_reachable(uri)
        client = MlflowClient(uri)
        try:
            with short_http_retries():
                counts = spool.replay(client)
        except Exception as exc:
            raise TrackingError(
                f"replaying {spool.path} into run {spool.run_id} at {uri} failed "
                f"({str(exc).splitlines()[0][:200]}); what was accepted is recorded, "
                f"run `genlab sync` again once the store is reachable"
            ) from None
        yield SyncResult(spool.path, spool.run_id, counts, spool.pending())
