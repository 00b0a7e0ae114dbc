"""Tracking outages against a real `mlflow server`: fail fast at start, never stop training, lose
nothing (the spool is replayed by `genlab sync` once the server is back)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

import genlab.spool
from genlab.cli import main as genlab_main
from genlab.data.prepared import load_split, read_meta
from genlab.errors import TrackingError
from genlab.evaluation import vocabulary as v
from genlab.models.vae import VAE
from genlab.spool import RECORDS, REJECTED, ReplayCounts, Spool, SpoolingMLFlowLogger
from genlab.tracking import (
    BASELINES_TAG,
    REPORT_TAG,
    SHORT_HTTP_SETTINGS,
    RunRecord,
    check_reachable,
    ensure_experiment,
    log_baselines,
    log_report,
    short_http_retries,
    without_userinfo,
)

# The team server script, started as users start it; stop() and start() again: an outage.
from test_server import TrackingServer as MlflowServer
from test_server import free_port


@pytest.fixture
def mlflow_server(tmp_path: Path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


def test_check_reachable_fails_fast_with_one_clear_line() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_reachable(uri, timeout_s=5.0)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert uri in message and "refused" in message.lower()
    assert "MLFLOW_TRACKING_URI" in message and "mlflow server" in message


def test_check_reachable_sqlite_needs_a_writable_folder(tmp_path: Path) -> None:
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")


def test_short_http_retries_are_scoped() -> None:
    before = {name: os.environ.get(name) for name in SHORT_HTTP_SETTINGS}
    with short_http_retries():
        assert all(os.environ[k] == x for k, x in SHORT_HTTP_SETTINGS.items())
    assert {name: os.environ.get(name) for name in SHORT_HTTP_SETTINGS} == before


def test_the_baselines_and_report_runs_are_finished_runs_with_their_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two stages that are not a training log one finished run each: the baselines' rows
    as `<row>.<metric>` with the protocol as `eval.protocol.*` tags, the report its files; a
    store that cannot be reached is one line that says the files are written."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "baselines.json").write_text("{}")
    (tmp_path / "summary.md").write_text("# report\n")
    metrics = {f"copycat.{v.FID}": 0.0, f"copycat.{v.ci_high(v.FID)}": 0.5, f"real.{v.KID}": 0.1}
    protocol = {"num_samples": 350, "extractor": "genlab-evaluator"}
    kw = {"data_sha256": "d" * 64}
    baselines = log_baselines(
        uri, "digits", metrics, protocol=protocol, artifacts=[tmp_path / "baselines.json"], **kw
    )
    report = log_report(uri, "digits", artifacts=[tmp_path / "summary.md"], **kw)
    client = MlflowClient(uri)
    for record, name, tag, folder, logged in (
        (baselines, "baselines (copycat, held-out real)", BASELINES_TAG, "baselines", metrics),
        (report, "report", REPORT_TAG, "report", {}),
    ):
        run = client.get_run(record.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert run.data.tags["family"] == tag and run.data.tags["dvc_stage"] == folder
        assert run.data.tags["data_sha256"] == "d" * 64
        assert run.data.metrics == logged
        files = [a.path for a in client.list_artifacts(record.run_id, folder)]
        assert files == [f"{folder}/{'baselines.json' if tag == BASELINES_TAG else 'summary.md'}"]
    tags = client.get_run(baselines.run_id).data.tags
    assert (tags["eval.protocol.num_samples"], tags["eval.protocol.extractor"]) == (
        "350",
        "genlab-evaluator",
    )

    unreachable = f"http://127.0.0.1:{free_port()}"
    with short_http_retries(), pytest.raises(TrackingError) as info:
        log_report(unreachable, "digits", artifacts=[], **kw)
    message = str(info.value)
    assert "\n" not in message and unreachable in message
    assert "the files are written" in message


def _loader(prepared: Path, split: str) -> DataLoader:
    data = load_split(prepared, split)
    return DataLoader(TensorDataset(data.x, data.y), batch_size=250)


def test_spool_replay_is_in_order_exactly_once_and_sets_refusals_aside(tmp_path: Path) -> None:
    """Against a SQLite store (no server needed): original steps and timestamps, a line torn by a
    crash skipped, a refused record set aside, and a replay redone after a crash (the cursor
    lost) duplicates no metric value."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(ensure_experiment(client, "spool")).info.run_id
    client.log_param(run_id, "lr", "0.1")
    unused = Spool(tmp_path / "unused")
    unused.bind(client.tracking_uri, run_id)
    assert not unused.path.exists()  # nothing failed, nothing written
    spool = Spool(tmp_path / "spool")
    spool.bind(client.tracking_uri, run_id)
    for step in range(3):
        spool.append(
            {"kind": "metrics", "metrics": [[v.TRAIN_LOSS, 1.0 / (step + 1), 1000 + step, step]]}
        )
    with open(tmp_path / "spool" / RECORDS, "a") as f:
        f.write('{"kind": "metr')  # a crash mid-append
    spool.append({"kind": "params", "params": {"lr": "0.2"}})  # refused: params are immutable
    spool.append(
        {"kind": "image", "key": "samples", "step": 1, "timestamp": 5000},
        np.zeros((4, 4, 3), np.uint8),
    )
    spool.append({"kind": "metrics", "metrics": [[v.TRAIN_LOSS, 0.1, 1003, 3]]})
    spool.append({"kind": "terminated", "status": "FINISHED", "end_time": 6000})
    saved = (tmp_path / "spool" / RECORDS).read_bytes()

    counts = spool.replay(client)
    assert (counts.metrics, counts.images, counts.status, counts.rejected) == (4, 1, 1, 1)
    assert not spool.pending() and spool.replay(client).total == 0
    history = client.get_metric_history(run_id, v.TRAIN_LOSS)
    assert [(m.step, m.timestamp) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1000),
        (1, 1001),
        (2, 1002),
        (3, 1003),
    ]
    assert client.get_run(run_id).data.params["lr"] == "0.1"
    (refused,) = (tmp_path / "spool" / REJECTED).read_text().splitlines()
    assert json.loads(refused)["params"] == {"lr": "0.2"}
    assert client.get_run(run_id).info.end_time == 6000

    # As if the cursor had never been written (a crash after the store accepted everything; the
    # image's payload file is gone too): metric values are not duplicated, nothing blocks.
    (tmp_path / "spool" / RECORDS).write_bytes(saved)
    counts = spool.replay(client)
    assert (counts.metrics, counts.rejected) == (4, 2) and not spool.pending()
    assert len(client.get_metric_history(run_id, v.TRAIN_LOSS)) == 4


def test_metrics_are_gathered_and_sent_at_checkpoints_before_other_records_and_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a SQLite store: values logged within FLUSH_S of the last send travel together in
    one request, at the next checkpoint, before the next other record or at the end, each with
    the step and time of its call."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "gathered")).info.run_id
    logger = SpoolingMLFlowLogger(tracking_uri=uri, run_id=run_id, spool_dir=tmp_path / "spool")
    requests: list[str] = []
    real_send = genlab.spool.send

    def counted_send(client, run_id, record, payload=None):  # the real send, counted
        requests.append(f"{record['kind']}:{len(record.get('metrics', []))}")
        real_send(client, run_id, record, payload)

    monkeypatch.setattr(genlab.spool, "send", counted_send)
    monkeypatch.setattr(genlab.spool, "FLUSH_S", 3600.0)

    def history() -> dict[int, int]:
        return {m.step: m.timestamp for m in client.get_metric_history(run_id, v.TRAIN_LOSS)}

    called_ms = {}
    for step in range(5):
        before = int(time.time() * 1000)
        logger.log_metrics({v.TRAIN_LOSS: 1.0 / (step + 1)}, step=step)
        called_ms[step] = (before, int(time.time() * 1000))
    assert list(history()) == [0] and requests == ["metrics:1"]  # the first goes at once
    logger.after_save_checkpoint(ModelCheckpoint(dirpath=tmp_path / "ckpt"))
    assert requests == ["metrics:1", "metrics:4"]
    assert all(lo <= history()[step] <= hi for step, (lo, hi) in called_ms.items())

    logger.log_metrics({v.TRAIN_LOSS: 0.1}, step=5)
    logger.log_image(np.zeros((4, 4, 3), np.uint8), "samples", step=1)
    logger.log_metrics({v.TRAIN_LOSS: 0.05}, step=6)
    assert requests[2:] == ["metrics:1", "image:0"] and 6 not in history()
    logger.finalize("success")
    assert requests[4:] == ["metrics:1", "terminated:0"] and sorted(history()) == list(range(7))
    assert client.get_run(run_id).info.status == "FINISHED"

    monkeypatch.setattr(genlab.spool, "FLUSH_S", 0.0)  # past FLUSH_S: the call sends
    logger.log_metrics({v.TRAIN_LOSS: 0.01}, step=7)
    assert requests[6:] == ["metrics:1"] and 7 in history()
    assert not Spool(tmp_path / "spool").exists()  # nothing failed, nothing spooled


class StopServerAfterFirstEpoch(L.Callback):
    """Logs a sample-grid-like image at each epoch end, then stops the server after epoch 1."""

    def __init__(self, server: MlflowServer, logger: SpoolingMLFlowLogger) -> None:
        self.server = server
        self.logger = logger
        self.images: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self.logger.log_image(np.full((8, 8, 3), 40 * epoch, np.uint8), "samples", epoch)
        self.images.append(epoch)
        if epoch == 1:
            self.server.stop()


def test_outage_during_fit_is_spooled_and_synced_after_restart(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    prepared_digits: Path,
    tiny_vae_kwargs: dict,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    spool_dir = tmp_path / "checkpoints/vae/abc123/spool"
    logger = SpoolingMLFlowLogger(
        tracking_uri=mlflow_server.uri, run_id=run_id, spool_dir=spool_dir
    )
    logger.log_hyperparams({"model": {"hidden_dim": 8}, "seed": 0})
    meta = read_meta(prepared_digits)
    model = VAE(
        image_shape=meta.shape,
        levels=meta.levels,
        num_classes=meta.num_classes,
        eval_samples=2,
        **tiny_vae_kwargs,
    )
    outage = StopServerAfterFirstEpoch(mlflow_server, logger)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[outage],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    L.seed_everything(0)
    with caplog.at_level(logging.WARNING, logger="genlab.spool"):
        trainer.fit(model, _loader(prepared_digits, "train"), _loader(prepared_digits, "val"))
    fit_done_ms = int(time.time() * 1000)

    # Training finished despite the outage; the spool holds epochs 2-3 and the final status.
    assert trainer.current_epoch == 3 and trainer.global_step == 12
    spool = Spool(spool_dir)
    records = spool.pending_records()
    spooled_steps = {
        step for r in records if r["kind"] == "metrics" for k, _, _, step in r["metrics"]
    }
    assert set(range(4, 12)) <= spooled_steps
    assert [r["step"] for r in records if r["kind"] == "image"] == [2, 3]
    assert records[-1]["kind"] == "terminated" and records[-1]["status"] == "FINISHED"
    warnings = [r.getMessage() for r in caplog.records if r.name == "genlab.spool"]
    assert sum("unreachable (" in w for w in warnings) == 1, warnings  # once per outage
    assert all(str(spool_dir) in w and "genlab sync" in w for w in warnings)

    # Server still down: sync fails with one line, exit 1, and leaves the spool as it was.
    before = (spool_dir / RECORDS).read_bytes()
    assert genlab_main(["sync", str(spool_dir)]) == 1
    assert (spool_dir / RECORDS).read_bytes() == before

    mlflow_server.start()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "genlab.cli", "sync", str(spool_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {run_id}: replayed" in done.stdout and "2 images" in done.stdout
    assert not spool.pending() and not (spool_dir / "rejected.jsonl").exists()

    # Every optimizer step's train/loss is in the run, with the time it was logged at.
    history = client.get_metric_history(run_id, v.TRAIN_LOSS)
    assert sorted(m.step for m in history) == list(range(trainer.global_step))
    assert all(m.timestamp <= fit_done_ms for m in history)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    pngs = [p for p in images if p.endswith(".png")]  # each image also has a .webp thumbnail
    assert sorted(p.split("+step+")[1].split("+")[0] for p in pngs) == ["1", "2", "3"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time <= fit_done_ms
    assert run.data.params["model/hidden_dim"] == "8"

    # A second sync finds nothing to do and changes nothing.
    assert genlab_main(["sync", str(tmp_path / "checkpoints")]) == 0
    assert len(client.get_metric_history(run_id, v.TRAIN_LOSS)) == len(history)
    assert len(client.list_artifacts(run_id, "images")) == len(images)
    assert json.loads((spool_dir / "spool.json").read_text())["run_id"] == run_id

    # A hung server (stopped, not gone): a call gives up within seconds, the next ones are spooled
    # without waiting, and after the backoff the spool is replayed and logging goes direct again.
    monkeypatch.setattr(genlab.spool, "RETRY_AFTER_S", 1.0)
    monkeypatch.setattr(genlab.spool, "FLUSH_S", 0.0)  # every call sends (or spools) at once
    # The outage at the end of the fit started a backoff of the old length: end it (the spool is
    # empty), or the calls below are spooled without contacting the store when this test runs
    # faster than that backoff.
    assert logger.replay() == ReplayCounts()
    os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        logger.log_metrics({"hung": 1.0}, step=0)
        first_s = time.monotonic() - start
        start = time.monotonic()
        logger.log_metrics({"hung": 2.0}, step=1)
        second_s = time.monotonic() - start
    finally:
        os.killpg(mlflow_server.proc.pid, signal.SIGCONT)
    assert first_s < 10 and second_s < 0.5, (first_s, second_s)
    assert [r["kind"] for r in spool.pending_records()] == ["metrics", "metrics"]
    time.sleep(1.0)
    logger.log_metrics({"hung": 3.0}, step=2)
    assert not spool.pending()
    assert sorted(m.step for m in client.get_metric_history(run_id, "hung")) == [0, 1, 2]


@pytest.mark.parametrize(
    ("uri", "written"),
    [
        ("http://user:secret@mlflow.internal:5000", "http://mlflow.internal:5000"),
        ("https://token@[::1]:8443/prefix", "https://[::1]:8443/prefix"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ],
)
def test_credentials_are_stripped_from_every_uri_genlab_writes(uri: str, written: str) -> None:
    assert without_userinfo(uri) == written
    record = RunRecord("1", "abc", without_userinfo(uri))
    assert record.connect_uri(uri) == uri  # the same store: connect with the credentials
    assert record.connect_uri("http://elsewhere:1") == written


def test_replay_sends_only_the_spools_own_files_and_a_missing_one_blocks_nothing(
    tmp_path: Path,
) -> None:
    """A spool is a DVC output (anyone who can write the remote can write it): a record naming
    a file outside its files/ folder (absolute, `..`, a symlink) is refused and that file is
    neither uploaded nor deleted; a payload deleted by hand is refused and the records after it
    still go."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(ensure_experiment(client, "trust")).info.run_id
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    spool = Spool(tmp_path / "spool")
    spool.bind(client.tracking_uri, run_id)
    spool.append({"kind": "artifact", "artifact_path": "checkpoint"}, victim)  # a real one
    (own,) = (spool.path / "files").iterdir()
    (spool.path / "files" / "link.txt").symlink_to(victim)
    forged = [str(victim), "../../victim.txt", "link.txt", own.name]
    with open(spool.path / RECORDS, "a") as f:
        for name in forged:
            f.write(json.dumps({"kind": "artifact", "artifact_path": "evil", "file": name}) + "\n")
    spool.append({"kind": "artifact", "artifact_path": "gone"}, victim)
    (gone,) = {*(spool.path / "files").iterdir()} - {own, spool.path / "files" / "link.txt"}
    gone.unlink()  # deleted by hand
    spool.append({"kind": "metrics", "metrics": [[v.TRAIN_LOSS, 0.5, 1000, 0]]})

    counts = spool.replay(client)
    # The genuine artifact and the metric went; three forged records and the missing file were
    # refused; the duplicate of the genuine name found its file already sent and deleted.
    assert (counts.artifacts, counts.metrics, counts.rejected) == (1, 1, 5)
    assert not spool.pending()
    assert victim.read_text() == "not yours"
    assert [a.path for a in client.list_artifacts(run_id)] == ["checkpoint"]
    rejected = [json.loads(line) for line in (spool.path / REJECTED).read_text().splitlines()]
    assert [r["file"] for r in rejected[:3]] == forged[:3]
