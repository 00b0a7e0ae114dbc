"""Warm start: `genlab` commands run in a process that has already imported genlab's libraries.

Importing torch, Lightning, torchmetrics, torch-fidelity and MLflow takes about 15 s on a 2-core
machine, and `dvc repro` starts one `genlab` process per stage: 16 for the default pipeline. So the
first `genlab` command starts a server that imports them once and then waits on a unix socket.
Each command (this module's `main`, the console script) sends it its argv, working directory,
environment and standard streams, and the server forks a worker that becomes that command: it runs
in the caller's directory with the caller's environment, writes to the caller's streams, gets the
signals the caller gets (relayed), and its exit code is the caller's. A killed caller takes its
worker with it.

What makes a worker a faithful copy of a fresh process:

- The server is keyed by what its imports depend on: the interpreter, the genlab source files
  (path, size and modification time), the import path's folders and the environment variables that
  libraries read at import (thread counts, CUDA, Python's own). Change any of them and the next
  command starts a new server; the old one exits when idle.
- The server never runs a torch operation and never initialises CUDA (it checks), so a forked
  worker can start its own thread pools and devices.
- A worker's environment is the caller's, plus what the server's imports set in theirs, as the
  same imports would in a fresh process (Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1).
- A worker reseeds Python's and numpy's global generators from the OS, as a fresh process would
  (MLflow's run names come from `random`).
- A multi-process launch that re-executes `sys.argv` (Lightning's DDP launcher) starts new
  `genlab` commands, which are workers of their own.

This is the default on Linux (elsewhere `GENLAB_WARM=1` turns it on). `GENLAB_WARM=0` runs
every command in its own process instead, as does anything the warm path cannot do (an unsafe
or over-long socket folder, a server that fails to start): nothing runs twice, because a
command falls back only when no worker was started for it. A server exits after
`GENLAB_WARM_IDLE_S` seconds (default 300) without a command, and logs every command it ran to
`<key>.log` next to its socket in `GENLAB_WARM_DIR` (default: `genlab-warm-<uid>` in the temporary
folder).

Written by hand because nothing maintained in this ecosystem does it: `multiprocessing`'s
forkserver runs Python callables for its own parent process, not commands for unrelated callers
with their own streams, directory, environment and signals.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SWITCH = "GENLAB_WARM"
DIR_VARIABLE = "GENLAB_WARM_DIR"
IDLE_VARIABLE = "GENLAB_WARM_IDLE_S"
DEFAULT_IDLE_S = 300.0
START_TIMEOUT_S = 300.0  # a loaded machine can take minutes to import everything
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
# Environment variables that libraries read when they are imported (so a server started under
# other values would behave differently): thread pools, CUDA and allocators, Python, locale. Not
# the ones a launcher sets per process (RANK, MASTER_PORT, PL_GLOBAL_SEED, TORCHELASTIC_*): the
# processes of one DDP launch share a server.
KEY_VARIABLES = (
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "KMP_",
    "GOMP_",
    "CUDA_",
    "NVIDIA_",
    "PYTORCH_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "NCCL_",
    "MPL",
    "MLFLOW_CONFIGURE_LOGGING",
    "MLFLOW_LOGGING_LEVEL",
    "PYTHON",
    "LD_",
    "LANG",
    "LC_",
)
RELAYED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,  # Lightning's SLURM auto-requeue
    signal.SIGUSR2,
)
# Every module a command imports, loaded by the server before it takes commands.
PRELOAD = (
    "genlab.cli",
    "genlab.scoring",
    "genlab.spool",
    "genlab.stages.prepare",
    "genlab.stages.evaluator",
    "genlab.stages.reference",
    "genlab.stages.train",
    "genlab.stages.evaluate",
    "genlab.stages.report",
)
SERVE = "from genlab.warm import serve_main; serve_main()"
_LENGTH = struct.Struct("!I")


def enabled() -> bool:
    """On by default on Linux; elsewhere (forking a process that loaded macOS frameworks is not
    safe, Windows cannot fork) only with GENLAB_WARM=1."""
    if not hasattr(os, "fork") or not hasattr(socket, "AF_UNIX"):
        return False
    return os.environ.get(SWITCH, "1" if sys.platform.startswith("linux") else "0") != "0"


def main() -> int:
    """The `genlab` console script: the command in a warm server, or here when it cannot be."""
    if enabled():
        code = run_warm(sys.argv)
        if code is not None:
            return code
    from genlab.cli import main as cli_main

    return cli_main()


# ----------------------------------------------------------------------------------------------
# Where a server lives, and which one a command may use


def server_key(package: Path | None = None, environ: dict[str, str] | None = None) -> str:
    """What a server's imports depend on, hashed: two commands share a server only when equal."""
    package = package or Path(__file__).resolve().parent
    environ = os.environ if environ is None else environ
    digest = hashlib.sha256()
    for part in (sys.executable, sys.version, sys.prefix, str(package)):
        digest.update(f"{part}\0".encode())
    for folder, subfolders, files in os.walk(package):
        subfolders.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder, name)
            stat = path.stat()
            rel = path.relative_to(package)
            digest.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    for entry in sys.path[1:]:  # [0] is the script's folder (or the cwd): not the server's
        with contextlib.suppress(OSError):
            digest.update(f"{entry}:{os.stat(entry).st_mtime_ns}\0".encode())
    for name in sorted(environ):
        if name.startswith(KEY_VARIABLES):
            digest.update(f"{name}={environ[name]}\0".encode())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class Place:
    """A server's files: its socket, the lock held while one starts, its pid and its log."""

    socket: Path

    @property
    def lock(self) -> Path:
        return self.socket.with_suffix(".lock")

    @property
    def pid(self) -> Path:
        return self.socket.with_suffix(".pid")

    @property
    def log(self) -> Path:
        return self.socket.with_suffix(".log")


def place(key: str) -> Place | None:
    """The server's files for `key`, or None when the folder is not safe to use: only this user
    may reach the sockets (a socket is a way to run commands as this user)."""
    folder = Path(
        os.environ.get(DIR_VARIABLE) or Path(tempfile.gettempdir(), f"genlab-warm-{os.getuid()}")
    )
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        stat = folder.stat()
    except OSError:
        return None
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        return None
    path = folder.resolve() / f"{key}.sock"
    return Place(path) if len(str(path)) <= MAX_SOCKET_PATH else None


def stop_servers(folder: Path) -> None:
    """Ask every server in `folder` to stop: each stops its running commands (SIGTERM) first."""
    for pid_file in folder.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


# ----------------------------------------------------------------------------------------------
# The caller's side


def run_warm(argv: list[str]) -> int | None:
    """Run `argv` in a warm server and return its exit code; None when no worker was started (so
    the caller may run the command itself: nothing has run)."""
    where = place(server_key())
    if where is None:
        return None
    try:
        conn = _connect(where) or _start(where)
    except OSError:
        return None
    if conn is None:
        return None
    with conn:
        return _submit(conn, argv)


def _connect(where: Place) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(where.socket))
    except OSError:
        conn.close()
        return None
    return conn


def _start(where: Place) -> socket.socket | None:
    """Start the server (one at a time: concurrent callers wait on a lock) and connect to it."""
    import fcntl
    import subprocess

    with open(where.lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(where)  # another caller may have started it while this one waited
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            where.socket.unlink()  # a dead server's
        with open(where.log, "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-P", "-c", SERVE, str(where.socket)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                start_new_session=True,  # not in the caller's process group or its terminal
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while server.poll() is None and time.monotonic() < deadline:
            conn = _connect(where)
            if conn is not None:
                return conn
            time.sleep(0.05)
    return None


def _standard_fds() -> list[int]:
    """The caller's stdin, stdout and stderr; /dev/null in place of a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_RDWR)
        fds.append(fd)
    return fds


def _submit(conn: socket.socket, argv: list[str]) -> int | None:
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    worker: list[int] = []
    pending: list[int] = []

    def relay(signum: int, _frame: object) -> None:
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker[0], signum)
        else:
            pending.append(signum)

    for signum in RELAYED:
        signal.signal(signum, relay)
    try:
        socket.send_fds(conn, [_LENGTH.pack(len(request))], _standard_fds())
        conn.sendall(request)
        replies = conn.makefile("rb")
        started = replies.readline()
    except OSError:
        started = b""
    if not started:  # the server went away before it started anything: run it here
        _default_signals()
        for signum in pending:
            os.kill(os.getpid(), signum)
        return None
    worker.append(json.loads(started)["pid"])
    for signum in pending:
        relay(signum, None)
    try:
        finished = replies.readline()
    except OSError:
        finished = b""
    if not finished:
        print("genlab: the warm server stopped before the command finished", file=sys.stderr)
        return 1
    code = json.loads(finished)["exit"]
    if code < 0:  # the worker died of a signal: so does its caller, as a plain process would
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _default_signals() -> None:
    """The relayed signals' handlers as a fresh Python process has them."""
    for signum in RELAYED:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ----------------------------------------------------------------------------------------------
# The server's side


@dataclass
class Request:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    fds: list[int]


def serve_main() -> None:
    """The server process (`SERVE`). In a forked worker, `serve` returns the command to run."""
    request = serve(Path(sys.argv[1]))
    if request is None:
        sys.exit(0)
    _exit(_run(request.argv))


def _run(argv: list[str]) -> int:
    """The command's exit code, with Python's own meaning of an uncaught exception."""
    from genlab.cli import main as cli_main

    try:
        return cli_main(argv[1:])
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        return 128 + signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def _exit(code: int) -> None:
    """End a worker as the interpreter's exit would, without its last step: tearing down every
    module of a 1 GB process takes 1.5 s here and touches memory shared with the server. What a
    command relies on still happens, in the interpreter's order: non-daemon threads are joined
    (MLflow's asynchronous logging), exit handlers run, the standard streams are flushed. These
    are CPython's own functions for those steps (private, present since 3.x; checked by tests)."""
    import atexit
    import threading

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        os._exit(code)


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}", flush=True)


def serve(path: Path) -> Request | None:
    """Import everything, then fork a worker per command until idle. Returns None in the server
    when it stops, and the worker's command in each worker."""
    import importlib
    import selectors

    launched = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    imported = {k: v for k, v in os.environ.items() if launched.get(k) != v}
    import torch

    if torch.cuda.is_initialized():  # a forked worker could not use CUDA
        _log("importing initialised CUDA: not serving")
        return None
    idle_s = float(os.environ.get(IDLE_VARIABLE, DEFAULT_IDLE_S))
    server_pid = os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f"{path.stem}.{server_pid}.tmp")
    listener.bind(str(staging))
    listener.listen(64)
    os.replace(staging, path)  # callers connect only once the imports are done
    inode = path.stat().st_ino
    Place(path).pid.write_text(f"{server_pid}\n")
    _log(f"serving on {path}; the imports set {' '.join(f'{k}={v}' for k, v in imported.items())}")

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    stopping = {"asked": False, "relayed": False}
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(asked=True))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    workers: dict[int, socket.socket] = {}
    last_busy = time.monotonic()
    try:
        while True:
            if stopping["asked"] and not stopping["relayed"]:  # stop the commands, then stop
                stopping["relayed"] = True
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            if not workers and (stopping["asked"] or time.monotonic() - last_busy > idle_s):
                _log("stopping" if stopping["asked"] else f"idle for {idle_s:g} s: stopping")
                return None
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while wake_r.recv(4096):
                            pass
                elif key.fileobj is listener:
                    if stopping["asked"]:
                        continue
                    conn, _ = listener.accept()
                    request = _receive(conn)
                    if request is None:
                        conn.close()
                        continue
                    try:
                        pid = os.fork()
                    except OSError as exc:  # no worker: the caller runs the command itself
                        _log(f"fork failed: {exc}")
                        for fd in request.fds:
                            os.close(fd)
                        conn.close()
                        continue
                    if pid == 0:
                        selector.close()
                        for sock in (listener, wake_r, wake_w, conn, *workers.values()):
                            sock.close()
                        _become(request, imported)
                        return request
                    for fd in request.fds:
                        os.close(fd)
                    _log(f"worker {pid}: {' '.join(request.argv[1:])} (in {request.cwd})")
                    with contextlib.suppress(OSError):  # a caller gone already: see below
                        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                    workers[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
                else:  # a caller's socket: readable only when it closed (it sends nothing)
                    with contextlib.suppress(OSError):
                        if key.fileobj.recv(1):
                            continue
                    selector.unregister(key.fileobj)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(key.data, signal.SIGKILL)  # its caller was killed
            last_busy = _reap(workers, selector) or last_busy
    finally:
        if os.getpid() == server_pid:
            listener.close()
            with contextlib.suppress(OSError):
                if path.stat().st_ino == inode:  # not a newer server's
                    path.unlink()
                    Place(path).pid.unlink(missing_ok=True)


def _receive(conn: socket.socket) -> Request | None:
    """One command: its length and standard streams, then its JSON (argv, cwd, env)."""
    conn.settimeout(10)
    fds: list[int] = []
    try:
        head, fds, _, _ = socket.recv_fds(conn, _LENGTH.size, 3)
        (size,) = _LENGTH.unpack(head)
        body = bytearray()
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                break
            body += chunk
        message = json.loads(body)
        if len(fds) != 3:
            raise ValueError(f"{len(fds)} standard streams")
        return Request(list(message["argv"]), message["cwd"], dict(message["env"]), fds)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        for fd in fds:
            os.close(fd)
        return None
    finally:
        conn.settimeout(None)


def _reap(workers: dict[int, socket.socket], selector) -> float | None:
    """Send each finished worker's exit code to its caller; the time if any finished."""
    finished = None
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        conn = workers.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        _log(f"worker {pid}: exit {code}")
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(conn)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        conn.close()
        finished = time.monotonic()
    return finished


def _become(request: Request, imported: dict[str, str]) -> None:
    """Turn this forked worker into the caller's command: its signals, streams, directory,
    environment (with the variables the server's imports set, `imported`, set again), argv and
    fresh random state."""
    import random

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _default_signals()
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env | imported)
    sys.argv = list(request.argv)
    # Streams keep their objects (libraries hold them: MLflow's log handler does) on the new fds;
    # line-buffered where a fresh process would be.
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=unbuffered or os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
