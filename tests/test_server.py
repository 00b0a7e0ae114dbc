"""The team tracking server: `scripts/tracking_server.py` starts a real `mlflow server` on
127.0.0.1; genlab logs locally and pushes each run to it over HTTP at the end of every stage, DVC
queue workers in parallel land complete runs in it, and its REST API returns the runs with their
`eval/*` metrics, sortable side by side."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil  # a dependency of dvc's
import pytest
import yaml
from mlflow.tracking import MlflowClient

from genlab import paths
from genlab.cli import main as genlab_main
from genlab.evaluation import vocabulary as v
from genlab.paths import run_name
from genlab.sync import LOCAL_RUN_TAG, push
from genlab.tracking import Stores, check_reachable, ensure_experiment

REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO / "scripts/tracking_server.py"
CI_TRAIN = REPO / "scripts/ci_train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """`scripts/tracking_server.py` on a free port of 127.0.0.1 with its store in `data_dir`;
    stop() and start() again keep the port and the store (an outage and its end)."""

    def __init__(
        self, data_dir: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.args, self.env = args, env or {}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port), "--workers", "1"]
        cmd += ["--data-dir", str(self.data_dir), *self.args]
        log = open(self.data_dir / "server.log", "a")  # noqa: SIM115 (kept open by the server)
        env = {k: x for k, x in os.environ.items() if not k.startswith("GENLAB_SERVER_")}
        env |= {"OMP_NUM_THREADS": "1"} | self.env
        # Own process group: stop() ends the server and its workers, nothing else.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (self.data_dir / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def rest(self, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict:
        """One call of MLflow's REST API (`/api/2.0/mlflow/<endpoint>`): POST `body` as JSON,
        or GET with `query`."""
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def search_runs(self, experiment: str, filter_: str, order_by: list[str]) -> list[dict]:
        experiment_id = self.rest("experiments/get-by-name", experiment_name=experiment)[
            "experiment"
        ]["experiment_id"]
        body = {"experiment_ids": [experiment_id], "filter": filter_, "order_by": order_by}
        return self.rest("runs/search", body).get("runs", [])


@pytest.fixture
def server(tmp_path: Path):
    server = TrackingServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


def stage_commands(dvc_yaml: Path, families: list[str], seeds: list[int]) -> list[list[str]]:
    """The `genlab ...` arguments of every stage in `dvc_yaml` for `families` and `seeds`, in
    the file's order (which lists each stage after those it depends on)."""
    commands = []
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        items = [(f, s) for f in families for s in seeds] if "matrix" in stage else [None]
        for item in items:
            cmd = stage["cmd"]
            if item is not None:
                cmd = cmd.replace("${item.family}", item[0]).replace("${item.seed}", str(item[1]))
            program, *args = cmd.split()
            assert program == "genlab", stage["cmd"]
            commands.append(args)
    return commands


def metric_text(work: Path, key: str) -> str:
    """How a model version's tag shows the vae's `key`: the value and its interval."""
    written = json.loads((work / paths.family_metrics("vae", 0)).read_text())
    e = v.estimate(written, key)
    return f"{e.value:.4g} [{e.low:.4g}, {e.high:.4g}]"


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def test_server_script_binds_loopback_and_refuses_a_store_without_scheme(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), "--backend-store-uri", str(tmp_path / "mlflow.db")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "has no scheme" in line and "sqlite:///" in line
    help_text = subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), "--help"], capture_output=True, text=True
    ).stdout
    assert "default: 127.0.0.1" in help_text


def test_tiny_training_logs_over_http_and_rest_search_returns_its_eval_metrics(
    server: TrackingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The CI profile's vae through every stage command of the pipeline, in process (a `dvc
    repro` would start one process per stage), with the server as the team server."""
    # The backend store URI (a database password, often) is in no command line of the server's
    # processes: MLflow reads it from its environment.
    started = psutil.Process(server.proc.pid)
    for process in [started, *started.children(recursive=True)]:
        assert not any("mlflow.db" in arg for arg in process.cmdline()), process.cmdline()
    work = tmp_path / "work"
    work.mkdir()
    params = work / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    done = subprocess.run(
        [sys.executable, str(CI_TRAIN), "--params-only", "--params", str(params)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    tiny = yaml.safe_load(params.read_text()) | {"families": ["vae"]}
    params.write_text(yaml.safe_dump(tiny, sort_keys=False))
    monkeypatch.chdir(work)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    # Credentials in the URI (this server ignores them) reach the server and nothing else.
    secret = "hunter2-not-in-any-file"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri.replace("://", f"://genlab:{secret}@"))
    for command in stage_commands(REPO / "dvc.yaml", ["vae"], [0]):  # what `dvc repro` runs
        assert genlab_main(command) == 0, command
    assert secret not in capsys.readouterr().err + caplog.text
    for file in [*work.rglob("*"), *(server.data_dir / "artifacts").rglob("*")]:
        assert not file.is_file() or secret.encode() not in file.read_bytes(), file

    # Local first: every run is in the local store, and each stage's end pushed it to the server.
    local = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    local_runs = local.search_runs([local.get_experiment_by_name("digits").experiment_id])
    assert {r.data.tags["family"] for r in local_runs} == {"vae", "baselines", "report"}
    (trained,) = [r for r in local_runs if r.data.tags["family"] == "vae"]
    inputs = {(d.dataset.name, d.tags[0].value) for d in trained.inputs.dataset_inputs}
    assert inputs == {("digits", "training"), ("digits (test split)", "evaluation")}
    (version,) = local.search_model_versions(f"run_id = '{trained.info.run_id}'")
    assert version.name == "digits-vae" and version.tags[v.FID] == metric_text(work, v.FID)
    pushed = server.search_runs("digits", "", [])
    assert {tags_of(r)[LOCAL_RUN_TAG] for r in pushed} == {r.info.run_id for r in local_runs}
    (run,) = server.search_runs("digits", "tags.family = 'vae'", [f"metrics.`{v.FID}` ASC"])
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == run_name("vae", 0) == "vae (seed 0)"
    metrics = metrics_of(run)
    written = json.loads((work / paths.family_metrics("vae", 0)).read_text())
    expected = {k: x for k, x in written.items() if isinstance(x, int | float)}  # the numbers
    assert {v.FID, v.KID, v.PRECISION, v.RECALL} <= set(expected)
    # Every comparison with its uncertainty: the intervals reach the server with the values.
    assert {v.ci_low(v.FID), v.ci_high(v.FID), v.se(v.nll_key("test", "lower_bound"))} <= set(
        expected
    )
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert v.TRAIN_LOSS in metrics and v.nll_key("val", "lower_bound") in metrics
    assert params_of(run)["model.latent_dim"] == "4"
    assert not any(secret in str(value) for value in params_of(run).values())
    assert (tags_of(run)["dvc_stage"], tags_of(run)["seed"]) == ("train@vae-0", "0")

    # Artifacts went through the server (served artifacts) into its own store.
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    listed = server.rest("artifacts/list", run_id=run["info"]["run_id"], path="checkpoint")
    assert [f["path"] for f in listed["files"]] == ["checkpoint/model.ckpt"]
    assert list((server.data_dir / "artifacts").rglob("model.ckpt"))


@pytest.mark.slow
def test_two_queued_experiments_run_in_parallel_land_complete_in_the_server(
    server: TrackingServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`dvc exp run --queue` twice and `dvc queue start -j 2` against the server: both runs
    complete, with their params, `eval/*` metrics and checkpoints, sorted by FID over REST."""
    from test_pipeline import _env, make_repo

    root = make_repo(tmp_path_factory.mktemp("genlab-queue-server"), {"families": ["vae"]})
    env = _env() | {"MLFLOW_TRACKING_URI": server.uri}

    def dvc(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    for name, latent in (("q-three", 3), ("q-five", 5)):
        dvc("exp", "run", "--queue", "-n", name, "-S", f"models.vae.latent_dim={latent}")
    dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 1500
    while True:
        status = dvc("queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert "Failed" not in status, status + dvc("queue", "logs", "q-three")
    assert (root / "mlflow.db").exists()  # the local store, shared by the queue's workers

    runs = server.search_runs("digits", "tags.family = 'vae'", [f"metrics.`{v.FID}` ASC"])
    by_exp = {tags_of(r).get("dvc_exp_name"): r for r in runs}
    assert set(by_exp) == {"q-three", "q-five"}
    for name, latent in (("q-three", 3), ("q-five", 5)):
        run = by_exp[name]
        assert run["info"]["status"] == "FINISHED"
        assert params_of(run)["model.latent_dim"] == str(latent)
        metrics = metrics_of(run)
        assert {v.FID, v.KID, v.nll_key("test", "lower_bound")} <= set(metrics)
        listed = server.rest("artifacts/list", run_id=run["info"]["run_id"], path="checkpoint")
        assert [f["path"] for f in listed["files"]] == ["checkpoint/model.ckpt"]
    fids = [metrics_of(r)[v.FID] for r in runs]
    assert fids == sorted(fids)  # side by side, in the server's order


def test_the_basic_auth_server_refuses_strangers_and_takes_a_push_with_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--auth`: no admin password, no start (one line); with it, /health answers anyone (genlab
    checks it at the start of a training), the API wants credentials, and a push with
    MLFLOW_TRACKING_USERNAME / _PASSWORD lands the run."""
    done = subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), "--auth", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env={k: x for k, x in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"},
    )
    assert done.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in done.stderr, done.stderr
    password = "genlab-admin-not-in-any-file"
    server = TrackingServer(
        tmp_path / "server", ("--auth",), {"MLFLOW_AUTH_ADMIN_PASSWORD": password}
    )
    server.start()
    try:
        check_reachable(server.uri)  # /health needs no credentials
        with pytest.raises(urllib.error.HTTPError) as info:
            server.rest("experiments/search", {"max_results": 1})
        assert info.value.code == 401
        local = f"sqlite:///{tmp_path / 'mlflow.db'}"
        client = MlflowClient(local)
        run_id = client.create_run(ensure_experiment(client, "digits")).info.run_id
        client.log_metric(run_id, v.FID, 1.5)
        client.set_terminated(run_id)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        (result,) = push(Stores(local, server.uri), [run_id])
        assert result.counts.created
        copy = MlflowClient(server.uri).get_run(result.remote_run_id)
        assert copy.data.metrics == {v.FID: 1.5} and copy.info.status == "FINISHED"
        for file in (tmp_path / "server").rglob("*"):
            assert not file.is_file() or password.encode() not in file.read_bytes(), file
    finally:
        server.stop()
