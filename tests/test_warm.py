"""Warm start (genlab.warm): a `genlab` command runs in a forked worker of a server that has the
libraries imported, with the caller's directory, environment, streams, signals and exit code; a
killed caller takes its worker with it; code or import-time settings that change get a new server;
where the warm path cannot be used, the command runs in its own process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # a dependency of dvc's
import pytest
import yaml

from genlab import paths, warm
from genlab.config import DatasetParams
from genlab.data.prepared import prepare
from pre_emption import start_until_checkpoint

GENLAB = str(Path(sys.executable).parent / "genlab")  # the console script: the warm path
WORKER = re.compile(r"\[(\d+)\] worker (\d+): (.*) \(in (.*)\)$")


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("warm-own")
    folder.chmod(0o700)
    yield folder
    warm.stop_servers(folder)


def _env(folder: Path, **extra: str) -> dict[str, str]:
    """A shell's environment: without what this process's `import lightning` set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    return env | {warm.DIR_VARIABLE: str(folder), "OMP_NUM_THREADS": "1"} | extra


def _genlab(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GENLAB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _workers(folder: Path) -> list[tuple[int, int, str, str]]:
    """(server pid, worker pid, command, cwd) of every command the servers in `folder` ran."""
    lines = "".join(log.read_text() for log in folder.glob("*.log")).splitlines()
    return [(int(m[1]), int(m[2]), m[3], m[4]) for m in map(WORKER.search, lines) if m is not None]


def test_commands_run_in_one_warm_server_with_the_callers_directory_environment_and_streams(
    warm_dir: Path, tmp_path: Path
) -> None:
    a, b, root = tmp_path / "a", tmp_path / "b", tmp_path / "root"
    for folder in (a, b, root):
        folder.mkdir()
    env = _env(warm_dir)

    # Three callers at once with no server yet: one server starts, and runs all three.
    callers = [
        subprocess.Popen(
            [GENLAB, "sync"], cwd=cwd, env=env | extra, stdout=subprocess.PIPE, text=True
        )
        for cwd, extra in ((a, {}), (b, {}), (b, {"DVC_ROOT": str(root)}))
    ]
    outputs = [c.communicate(timeout=300)[0] for c in callers]
    assert [c.returncode for c in callers] == [0, 0, 0]
    # Each ran in its caller's directory and environment (DVC_ROOT names the project root).
    assert outputs == [
        f"no spools in {folder / 'checkpoints'}: nothing to replay\n" for folder in (a, b, root)
    ]
    ran = _workers(warm_dir)
    assert len(ran) == 3 and len({server for server, *_ in ran}) == 1, ran
    assert sorted(cwd for *_, cwd in ran) == sorted(map(str, (a, b, b)))
    assert len(list(warm_dir.glob("*.sock"))) == 1
    # What the imports set in the server's environment, its workers get again (_become).
    (log,) = warm_dir.glob("*.log")
    assert "the imports set PYTORCH_NVML_BASED_CUDA_CHECK=1" in log.read_text()

    # A failing command: its one-line error on the caller's stderr, its exit code the caller's.
    bad = _genlab("--params", "missing.yaml", "prepare", cwd=a, env=env)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "genlab prepare: error: missing.yaml: file not found; run genlab from the repository root"
    ]
    assert len(_workers(warm_dir)) == 4

    # Another value of a variable libraries read at import: another server.
    other = _genlab("sync", cwd=a, env=env | {"OMP_NUM_THREADS": "2"})
    assert other.returncode == 0, other.stderr
    assert len(list(warm_dir.glob("*.sock"))) == 2


def test_signals_reach_the_worker_and_a_killed_caller_takes_its_worker_with_it(
    warm_dir: Path, tmp_path: Path
) -> None:
    prepare(DatasetParams(), tmp_path / "data/prepared")
    params = {
        "families": ["vae"],
        "trainer": {"sample_every_n_epochs": 1000},
        "models": {"vae": {"max_epochs": 300, "batch_size": 500, "hidden_dim": 8}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = _env(warm_dir, DVC_ROOT=str(tmp_path))

    def start_training() -> tuple[subprocess.Popen[str], psutil.Process]:
        known = {pid for _, pid, *_ in _workers(warm_dir)}
        caller = start_until_checkpoint([GENLAB, "train", "vae"], cwd=tmp_path, env=env)
        (worker,) = [pid for _, pid, *_ in _workers(warm_dir) if pid not in known]
        return caller, psutil.Process(worker)

    # SIGTERM to the caller (what dvc or a scheduler sends) is the worker's SIGTERM: training
    # stops, keeps its checkpoint and exits non-zero, and so does the caller.
    caller, worker = start_training()
    caller.send_signal(signal.SIGTERM)
    output, _ = caller.communicate(timeout=120)
    assert caller.returncode != 0, output
    assert "received SIGTERM" in output
    assert not worker.is_running()

    # A caller killed outright cannot relay anything: the server kills its worker.
    shutil.rmtree(tmp_path / "checkpoints")
    caller, worker = start_training()
    caller.kill()
    caller.wait(timeout=10)
    worker.wait(timeout=30)  # not this process's child: psutil polls until it is gone
    # The server reaped it (and logs that right after): it died of the SIGKILL.
    reaped = f"worker {worker.pid}: exit {-signal.SIGKILL}"
    deadline = time.monotonic() + 30
    while not any(reaped in log.read_text() for log in warm_dir.glob("*.log")):
        assert time.monotonic() < deadline, "the server did not reap the worker"
        time.sleep(0.1)
    assert not (tmp_path / paths.family_model_dir("vae", 0) / "model.ckpt").exists()


def test_the_server_key_follows_the_code_and_the_environment_imports_read(
    tmp_path: Path,
) -> None:
    package = shutil.copytree(Path(warm.__file__).parent, tmp_path / "genlab")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/bin"}
    key = warm.server_key(package, env)
    assert warm.server_key(package, dict(env)) == key
    # What a launcher or the pipeline sets per process does not start another server.
    per_process = {
        "RANK": "1",
        "MASTER_PORT": "29500",
        "DVC_ROOT": "/x",
        "MLFLOW_TRACKING_URI": "y",
    }
    assert warm.server_key(package, env | per_process) == key
    assert warm.server_key(package, env | {"OMP_NUM_THREADS": "2"}) != key
    assert warm.server_key(package, env | {"CUDA_VISIBLE_DEVICES": "0"}) != key
    source = package / "models/vae.py"
    source.write_text(source.read_text() + "\n# edited\n")
    assert warm.server_key(package, env) != key


def test_an_unsafe_or_over_long_folder_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a socket here and run this user's commands
    monkeypatch.setenv(warm.DIR_VARIABLE, str(shared))
    assert warm.place("k") is None
    assert warm.run_warm([GENLAB, "sync"]) is None  # nothing ran: the caller runs it itself
    assert list(shared.iterdir()) == []
    deep = tmp_path / ("d" * 120)
    monkeypatch.setenv(warm.DIR_VARIABLE, str(deep))
    assert warm.place("k") is None
    own = tmp_path / "own"
    monkeypatch.setenv(warm.DIR_VARIABLE, str(own))
    assert warm.place("k") == warm.Place(own.resolve() / "k.sock")
    assert own.stat().st_mode & 0o777 == 0o700


def test_switched_off_the_command_runs_in_its_own_process(tmp_path: Path) -> None:
    folder = tmp_path / "warm"
    done = _genlab("sync", cwd=tmp_path, env=_env(folder, GENLAB_WARM="0"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"no spools in {tmp_path / 'checkpoints'}: nothing to replay\n"
    assert not folder.exists()


def test_on_by_default_on_linux_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(warm.SWITCH, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert warm.enabled()
    monkeypatch.setenv(warm.SWITCH, "0")
    assert not warm.enabled()
    monkeypatch.setattr(sys, "platform", "darwin")  # forking after macOS frameworks is unsafe
    monkeypatch.delenv(warm.SWITCH)
    assert not warm.enabled()
    monkeypatch.setenv(warm.SWITCH, "1")
    assert warm.enabled()


def test_a_worker_takes_the_callers_directory_and_environment_plus_what_imports_set(
    tmp_path: Path,
) -> None:
    """`_become` in a forked-like process: the caller's cwd, argv and environment replace the
    server's, and the variables the server's imports set are set again on top."""
    script = f"""
import json, os, sys
from genlab.warm import Request, _become
fds = [os.dup(0), os.dup(1), os.dup(2)]
caller = {{"PATH": os.environ["PATH"], "CALLERS": "own", "PYTORCH_NVML_BASED_CUDA_CHECK": "0"}}
os.environ["SERVERS"] = "not the caller's"
_become(Request(["genlab", "sync"], {str(tmp_path)!r}, caller, fds),
        {{"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}})
print(json.dumps([os.getcwd(), sys.argv, dict(os.environ)]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cwd, argv, env = json.loads(done.stdout)
    assert (cwd, argv) == (str(tmp_path), ["genlab", "sync"])
    assert env == {
        "PATH": os.environ["PATH"],
        "CALLERS": "own",
        "PYTORCH_NVML_BASED_CUDA_CHECK": "1",  # what a fresh process's `import lightning` sets
    }


def test_a_worker_ends_as_the_interpreter_would_without_tearing_down_modules(
    tmp_path: Path,
) -> None:
    """Non-daemon threads are joined, then exit handlers run, then unterminated output is
    flushed, and the exit code is the command's."""
    trace = tmp_path / "trace"
    script = f"""
import atexit, threading, time
from genlab.warm import _exit
def note(text):
    with open({str(trace)!r}, "a") as f:
        f.write(text + "\\n")
atexit.register(note, "exit handler")
threading.Thread(target=lambda: (time.sleep(0.5), note("thread"))).start()
print("unterminated", end="")
_exit(3)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unterminated"
    assert trace.read_text() == "thread\nexit handler\n"
