"""Local-first tracking: every run in the local SQLite store, a team server (a real `mlflow
server`) kept equal to it by an idempotent push; an unreachable server fails a training at start
within seconds, and an outage after that never stops it and loses nothing."""

from __future__ import annotations

import fcntl
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
from mlflow.tracking import MlflowClient

import genlab.sync
from genlab.cli import main as genlab_main
from genlab.config import parse_params
from genlab.data.prepared import read_meta
from genlab.errors import TrackingError
from genlab.evaluation import vocabulary as v
from genlab.sync import LOCAL_RUN_TAG, push, push_after_stage
from genlab.tracking import (
    BASELINES_TAG,
    REPORT_TAG,
    SHORT_HTTP_SETTINGS,
    Stores,
    check_reachable,
    ensure_experiment,
    log_baselines,
    log_report,
    register_model,
    registered_model_name,
    resolve_stores,
    short_http_retries,
    tag_model_versions,
    without_userinfo,
)
from genlab.training import train_family

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
    as `<row>.<metric>` with the protocol as `eval.protocol.*` tags, the report its files."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stores = Stores(uri, None)
    (tmp_path / "baselines.json").write_text("{}")
    (tmp_path / "summary.md").write_text("# report\n")
    metrics = {f"copycat.{v.FID}": 0.0, f"copycat.{v.ci_high(v.FID)}": 0.5, f"real.{v.KID}": 0.1}
    protocol = {"num_samples": 350, "extractor": "genlab-evaluator"}
    kw = {"data_sha256": "d" * 64}
    baselines = log_baselines(
        stores, "digits", metrics, protocol=protocol, artifacts=[tmp_path / "baselines.json"], **kw
    )
    report = log_report(stores, "digits", artifacts=[tmp_path / "summary.md"], **kw)
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


def test_the_local_store_is_always_there_and_http_names_the_team_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    default = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_stores(None) == Stores(default, None)
    assert resolve_stores("sqlite:///other.db") == Stores(
        f"sqlite:///{tmp_path / 'other.db'}", None
    )
    team = "http://genlab:secret@mlflow.internal:5000"
    assert resolve_stores(team) == Stores(default, team)  # credentials kept, for the push
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example")
    assert resolve_stores(team) == Stores(default, "https://mlflow.example")  # the env wins
    for bad in ("mlruns", "sqlite:///:memory:"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
        with pytest.raises(ValueError, match=r"sqlite:///path/to/mlflow\.db"):
            resolve_stores(None)


def _a_finished_run(client: MlflowClient, folder: Path) -> str:
    """A run as a training and its evaluation leave one: params, tags, curves (a NaN among
    them), an image series, nested files, a dataset input, finished."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run_id = client.create_run(ensure_experiment(client, "digits"), run_name="vae (seed 0)").info
    run_id = run_id.run_id
    client.log_param(run_id, "model.latent_dim", "4")
    client.set_tag(run_id, "family", "vae")
    for step in range(5):
        client.log_metric(run_id, v.TRAIN_LOSS, 1.0 / (step + 1), step=step, timestamp=1000 + step)
    client.log_metric(run_id, "train/grad_norm", float("nan"), step=0, timestamp=1000)
    client.log_metric(run_id, "train/grad_norm", 2.0, step=1, timestamp=1001)
    client.log_metric(run_id, v.FID, 1.5, step=4, timestamp=2000)
    client.log_image(run_id, np.zeros((4, 4, 3), np.uint8), key="samples", step=1)
    (folder / "model.ckpt").write_bytes(b"weights")
    (folder / "grids").mkdir()
    (folder / "grids" / "samples.png").write_bytes(b"png")
    client.log_artifact(run_id, str(folder / "model.ckpt"), "checkpoint")
    client.log_artifacts(run_id, str(folder / "grids"), "evaluation/figures")
    dataset = Dataset("digits", "d" * 16, "local", "data/prepared")
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])
    name = registered_model_name("digits", "vae")
    register_model(client, run_id, name=name, description="vae on digits", tags={"seed": "0"})
    tag_model_versions(
        client, run_id, {v.FID: 1.5, v.ci_low(v.FID): 1.0, v.ci_high(v.FID): 2.0}, 0.95
    )
    client.set_terminated(run_id, "FINISHED", end_time=3000)
    return run_id


def _files(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int]:
    out = {}
    for info in client.list_artifacts(run_id, path):
        out |= _files(client, run_id, info.path) if info.is_dir else {info.path: info.file_size}
    return out


def _assert_copy(local: MlflowClient, remote: MlflowClient, run_id: str, remote_id: str) -> None:
    mine, theirs = local.get_run(run_id), remote.get_run(remote_id)
    assert theirs.data.params == mine.data.params
    assert theirs.data.tags == mine.data.tags | {LOCAL_RUN_TAG: run_id}
    assert theirs.info.run_name == mine.info.run_name
    assert (theirs.info.status, theirs.info.start_time, theirs.info.end_time) == (
        mine.info.status,
        mine.info.start_time,
        mine.info.end_time,
    )

    def points(client: MlflowClient, rid: str, key: str) -> list[tuple]:
        history = client.get_metric_history(rid, key)
        return sorted((m.step, m.timestamp, str(m.value)) for m in history)

    for key in mine.data.metrics:
        assert points(remote, remote_id, key) == points(local, run_id, key), key
    assert _files(remote, remote_id) == _files(local, run_id)

    def versions(client: MlflowClient, rid: str) -> list[tuple]:
        found = client.search_model_versions(f"run_id = '{rid}'")
        return [(m.name, m.tags, m.source.replace(rid, "<run>")) for m in found]

    assert versions(remote, remote_id) == versions(local, run_id) != []
    digests = {d.dataset.digest for d in theirs.inputs.dataset_inputs}
    assert digests == {d.dataset.digest for d in mine.inputs.dataset_inputs}


def test_a_push_copies_the_run_and_a_second_push_sends_nothing(tmp_path: Path) -> None:
    """Against two real SQLite stores: the server's copy equals the local run (curves with their
    steps and times, NaN included, files, inputs, status); pushing again sends nothing; what an
    evaluation adds later is all the next push sends."""
    (tmp_path / "local").mkdir()
    (tmp_path / "team").mkdir()
    stores = Stores(
        f"sqlite:///{tmp_path / 'local/mlflow.db'}", f"sqlite:///{tmp_path / 'team/mlflow.db'}"
    )
    local, remote = MlflowClient(stores.local), MlflowClient(stores.remote)
    run_id = _a_finished_run(local, tmp_path)

    (first,) = push(stores, [run_id])
    assert first.counts.created and first.counts.metrics == 8 and first.counts.status == 1
    assert first.counts.artifacts == len(_files(local, run_id)) >= 4  # an image is 2 files
    _assert_copy(local, remote, run_id, first.remote_run_id)
    (again,) = push(stores, [run_id])
    assert again.remote_run_id == first.remote_run_id and again.counts.total == 0
    assert again.counts.summary() == "up to date"

    local.log_metric(run_id, v.KID, 0.01, step=4)  # an evaluation after the training
    local.log_metric(run_id, v.TRAIN_LOSS, 0.1, step=5)
    local.set_tag(run_id, "eval.protocol.id", "abc")
    (tmp_path / "metrics.json").write_text("{}")
    local.log_artifact(run_id, str(tmp_path / "metrics.json"), "evaluation")
    (later,) = push(stores, [run_id])
    counts = later.counts
    assert (counts.metrics, counts.tags, counts.artifacts, counts.params, counts.status) == (
        2,
        1,
        1,
        0,
        0,
    )
    _assert_copy(local, remote, run_id, first.remote_run_id)
    assert len(remote.search_runs([ensure_experiment(remote, "digits")])) == 1


def test_a_push_cut_short_is_finished_by_the_next_and_sends_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = Stores(f"sqlite:///{tmp_path / 'local.db'}", f"sqlite:///{tmp_path / 'team.db'}")
    local, remote = MlflowClient(stores.local), MlflowClient(stores.remote)
    run_id = _a_finished_run(local, tmp_path)
    real = genlab.sync._push_artifacts

    def dies(*args):
        raise OSError("connection reset by peer")

    monkeypatch.setattr(genlab.sync, "_push_artifacts", dies)  # after the metrics went
    with pytest.raises(TrackingError) as info:
        list(push(stores, [run_id]))
    assert "\n" not in str(info.value) and "genlab sync" in str(info.value)
    (copy,) = remote.search_runs([ensure_experiment(remote, "digits")])
    assert copy.info.status == "RUNNING"  # not FINISHED: it does not have everything yet
    monkeypatch.setattr(genlab.sync, "_push_artifacts", real)
    (result,) = push(stores, [run_id])
    assert not result.counts.created and result.counts.metrics == 0
    _assert_copy(local, remote, run_id, copy.info.run_id)

    remote.delete_run(copy.info.run_id)  # the team deleted it: respected, not re-created
    (skipped,) = push(stores, [run_id])
    assert skipped.remote_run_id is None
    assert len(remote.search_runs([ensure_experiment(remote, "digits")])) == 0


class StopServerAfterFirstEpoch(L.Callback):
    def __init__(self, server: MlflowServer) -> None:
        self.server = server

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.server.stop()


def test_an_outage_during_training_stops_nothing_and_sync_pushes_the_run_after(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    prepared_digits: Path,
    tiny_vae_kwargs: dict,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `train_family` logging to a team server that goes away after the first epoch: the
    training finishes in the local store, the end-of-fit push warns once and gives up within
    seconds, `genlab sync` pushes everything once the server is back, and again sends nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params(
        {
            "families": ["vae"],
            "trainer": {"sample_every_n_epochs": 1, "log_every_n_steps": 1},
            "models": {"vae": tiny_vae_kwargs | {"max_epochs": 3, "batch_size": 250}},
            "tracking": {"uri": mlflow_server.uri, "system_metrics_every_s": 1},
        }
    )
    (tmp_path / "params.yaml").write_text(
        f"families: [vae]\ntracking:\n  uri: {mlflow_server.uri}\n"
    )
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="genlab.sync"):
        result = train_family(
            params,
            "vae",
            seed=0,
            prepared_dir=prepared_digits,
            out_dir=tmp_path / "models/vae/seed0",
            checkpoint_root=tmp_path / "checkpoints",
            callbacks=[StopServerAfterFirstEpoch(mlflow_server)],
        )
    assert result.epochs == 3 and time.monotonic() - start < 120
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "genlab.sync"]
    assert "not pushed" in warning and "genlab sync" in warning and "\n" not in warning

    assert "MLFLOW_TRACKING_URI" not in os.environ  # Lightning's logger set it; put back
    local = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = local.get_run(result.run.run_id)
    assert run.info.status == "FINISHED"
    # As the MLflow UI shows a training run: the data as a dataset input (its sha256 as the
    # digest), the stage as its source, system metrics, the experiment as model development.
    meta = read_meta(prepared_digits)
    (data,) = run.inputs.dataset_inputs
    assert (data.dataset.name, data.dataset.digest) == ("digits", meta.data_sha256[:32])
    assert json.loads(data.dataset.profile)["sha256"] == meta.data_sha256
    assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    assert run.data.tags["mlflow.source.name"] == "genlab train@vae-0"
    assert any(key.startswith("system/cpu") for key in run.data.metrics), run.data.metrics
    experiment = local.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert sorted(m.step for m in local.get_metric_history(run.info.run_id, v.TRAIN_LOSS)) == list(
        range(12)
    )

    # Server still down: sync fails with one line and exit 1.
    assert genlab_main(["sync"]) == 1
    mlflow_server.start()
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def sync() -> subprocess.CompletedProcess:  # `genlab sync` as a user runs it
        return subprocess.run(
            [sys.executable, "-m", "genlab.cli", "sync"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = sync()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {run.info.run_id} (vae (seed 0)) ->" in done.stdout and "created" in done.stdout
    remote = MlflowClient(mlflow_server.uri)
    (copy,) = remote.search_runs(
        [remote.get_experiment_by_name("digits").experiment_id], "tags.family = 'vae'"
    )
    _assert_copy(local, remote, run.info.run_id, copy.info.run_id)
    pngs = [p for p in _files(remote, copy.info.run_id, "images") if p.endswith(".png")]
    assert len([p for p in pngs if "compressed" not in p]) == 3  # a sample grid per epoch

    done = sync()
    assert done.returncode == 0 and "up to date" in done.stdout, done.stdout + done.stderr

    # A hung server (stopped, not gone): the end-of-stage push gives up within seconds.
    os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="genlab.sync"):
            push_after_stage(resolve_stores(mlflow_server.uri), [run.info.run_id])
        assert time.monotonic() - start < 15
    finally:
        os.killpg(mlflow_server.proc.pid, signal.SIGCONT)


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


def test_push_lock_serialises_pushes_of_one_store(tmp_path: Path) -> None:
    """Two pushes of one local store at once would both create the server's copy."""
    stores = Stores(f"sqlite:///{tmp_path / 'local.db'}", f"sqlite:///{tmp_path / 'team.db'}")
    other = open(f"{stores.local_path}.push.lock", "a")  # noqa: SIM115 (closed below)
    try:
        with genlab.sync.push_lock(stores), pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the push
    finally:
        other.close()


def test_processes_opening_a_new_local_store_at_once_all_get_it(tmp_path: Path) -> None:
    """Two `dvc queue` workers starting together create the local store at once; unlocked,
    MLflow's schema migration fails in one of them (about one process in three here)."""
    code = (
        "import sys; from genlab.tracking import Stores, local_client; "
        "c = local_client(Stores(sys.argv[1], None)); print(len(c.search_experiments()))"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for process in starts:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == "1"  # the Default experiment
