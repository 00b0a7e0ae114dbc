"""A team MLflow tracking server for genlab: `mlflow server` with served artifacts, on 127.0.0.1.

    uv run scripts/tracking_server.py                    # 127.0.0.1:5000, store in ./mlflow-server
    uv run scripts/tracking_server.py --port 5050 --data-dir /srv/genlab-mlflow
    GENLAB_SERVER_BACKEND_STORE_URI=postgresql://genlab:secret@db.internal/mlflow \\
        uv run scripts/tracking_server.py --artifacts-destination /srv/genlab-mlflow/artifacts
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 uv run dvc repro     # genlab logs to it

Each option may come from the environment instead (GENLAB_SERVER_HOST, GENLAB_SERVER_PORT,
GENLAB_SERVER_DATA_DIR, GENLAB_SERVER_BACKEND_STORE_URI, GENLAB_SERVER_ARTIFACTS_DESTINATION,
GENLAB_SERVER_WORKERS); an option on the command line wins. Arguments after `--` go to
`mlflow server` unchanged (e.g. `-- --allowed-hosts mlflow.internal`). A backend store URI with a
password belongs in GENLAB_SERVER_BACKEND_STORE_URI, not on the command line, which every user of
the machine can read (`ps`); `mlflow server` gets it through MLFLOW_BACKEND_STORE_URI.

On a shared host (several users on the machine, or teammates on the network), start it with
`--auth` (MLflow's basic-auth app): every call then needs a user name and password, which genlab
and `genlab sync` send from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. Basic auth sends
the password with every request: over anything but 127.0.0.1 or an SSH tunnel, put TLS in front.

    MLFLOW_AUTH_ADMIN_PASSWORD=... uv run scripts/tracking_server.py --auth   # first start

Why these choices:
- 127.0.0.1 by default: MLflow has no authentication by default and a long security history.
  Teammates reach it through an SSH tunnel (`ssh -N -L 5000:127.0.0.1:5000 host`); bind to another
  interface only behind an authenticating proxy.
- Served artifacts (`--serve-artifacts`): clients upload checkpoints and grids through the server,
  so no client needs access to the artifact store's filesystem or bucket.
- A SQLite file is enough for a few users and `dvc queue start -j 2`; PostgreSQL for more (needs a
  driver: `uv add psycopg2-binary`).
- MLflow's job-execution runner is off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false unless set):
  genlab does not use it, and it is one process and one queue database less.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServerConfigError(ValueError):
    """An option that `mlflow server` would reject late, or with a traceback."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"GENLAB_SERVER_{name}") or default


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, arguments passed through to `mlflow server`)."""
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="default: %(default)s")
    parser.add_argument(
        "--port", type=_port, default=_env("PORT", "5000"), help="default: %(default)s"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("DATA_DIR", str(ROOT / "mlflow-server"))),
        help="holds mlflow.db and artifacts/ unless the next two options say otherwise "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=_env("BACKEND_STORE_URI"),
        help="sqlite:///path/mlflow.db or postgresql://user@host/db "
        "(default: <data-dir>/mlflow.db)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=_env("ARTIFACTS_DESTINATION"),
        help="folder or URI the server stores artifacts in (default: <data-dir>/artifacts)",
    )
    parser.add_argument(
        "--workers", type=int, default=_env("WORKERS"), help="server processes (MLflow's default)"
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        default=_env("AUTH", "") in ("1", "true", "yes"),
        help="MLflow's basic-auth app: every API call needs a user name and password; the admin "
        "is created at the first start from MLFLOW_AUTH_ADMIN_PASSWORD (never an argument)",
    )
    return parser.parse_args(argv), extra


AUTH_CONFIG = """\
# Written by scripts/tracking_server.py --auth (no secret here: the first admin's password comes
# from MLFLOW_AUTH_ADMIN_PASSWORD at the first start, and is ignored once the admin exists).
[mlflow]
# Users may log into experiments others created (genlab shares one per dataset); an experiment's
# creator manages its permissions.
default_permission = EDIT
database_uri = {database_uri}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = true
"""


def auth_config(data_dir: Path) -> dict[str, str]:
    """The basic-auth app's config file in `data_dir` and the environment that points `mlflow
    server` at it; ServerConfigError when the first start has no admin password."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    users = data_dir / "basic_auth.db"
    if not users.exists() and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise ServerConfigError(
            "--auth starts a new user store: set MLFLOW_AUTH_ADMIN_PASSWORD to the first "
            "admin's password (in the environment, not on the command line)"
        )
    admin = _env("ADMIN_USERNAME", "admin")
    config = data_dir / "basic_auth.ini"
    text = AUTH_CONFIG.format(database_uri=f"sqlite:///{users}", admin=admin)
    tmp = config.with_name(f".{config.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(config)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config)}
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # The auth app's CSRF protection needs a key that stays the same across restarts (and
        # workers): one made at the first start, readable by the server's user only.
        key_file = data_dir / "flask_secret_key"
        if not key_file.exists():
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key_file.read_text().strip()
    return env


def backend_store(uri: str | None, data_dir: Path) -> str:
    """The backend store URI, its folder created for SQLite; a clear error for a missing driver."""
    if uri is None:
        uri = f"sqlite:///{data_dir.resolve() / 'mlflow.db'}"
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path != uri and path != ":memory:":
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    elif scheme.startswith("postgresql"):
        driver = "psycopg" if scheme == "postgresql+psycopg" else "psycopg2"
        if importlib.util.find_spec(driver) is None:
            package = "psycopg[binary]" if driver == "psycopg" else "psycopg2-binary"
            raise ServerConfigError(
                f"a {scheme}:// backend store needs the {driver} driver; install it with "
                f"`uv add {package}` or use a sqlite:/// store"
            )
    elif not scheme:
        raise ServerConfigError(
            f"backend store {uri!r} has no scheme; use sqlite:///path/to/mlflow.db or "
            f"postgresql://user@host/db"
        )
    return uri


def artifacts_destination(value: str | None, data_dir: Path) -> str:
    """A URI as given; a folder made absolute (the server resolves it, not its clients) and
    created."""
    if value is not None and "://" in value:
        return value
    folder = Path(value) if value is not None else data_dir / "artifacts"
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def server_command(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """`mlflow server`'s command line and the environment variables it needs besides. The backend
    store URI (a database password, often) goes in the environment, which MLflow reads: a command
    line is visible to every user of the machine (`ps`)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port)]
    env = {"MLFLOW_BACKEND_STORE_URI": backend_store(args.backend_store_uri, args.data_dir)}
    cmd += ["--serve-artifacts"]
    cmd += [
        "--artifacts-destination",
        artifacts_destination(args.artifacts_destination, args.data_dir),
    ]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
        env |= auth_config(args.data_dir)
    return cmd + extra, env


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cmd, env = server_command(args, extra)
    except (ServerConfigError, OSError) as exc:
        print(f"tracking_server: error: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not args.auth:
        print(
            f"tracking_server: warning: binding to {args.host}: anyone who reaches this port can "
            f"read and change every run (MLflow has no authentication by default); put it behind "
            f"an authenticating proxy and pass `-- --allowed-hosts <name>`",
            file=sys.stderr,
        )
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    print(f"tracking_server: genlab logs here with MLFLOW_TRACKING_URI=http://{host}:{args.port}")
    sys.stdout.flush()
    os.environ.update(env)
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # exec, not a child: signals (Ctrl-C, a service manager's SIGTERM) reach the server directly.
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
