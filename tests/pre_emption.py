"""A training process caught mid-run, as a pre-empting scheduler finds it (shared by the tests
that signal a real `genlab train` or `dvc repro`)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def start_until_checkpoint(
    cmd: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float = 180
) -> subprocess.Popen[str]:
    """Start a training command (stdout and stderr captured together) and return it once its
    first resumable checkpoint (a `last.ckpt` anywhere under `cwd`/checkpoints, e.g.
    `checkpoints/<family>/seed<k>/<config hash>/last.ckpt`)
    exists: the moment a pre-empting signal finds training under way."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + timeout_s
    while not list((cwd / "checkpoints").rglob("last.ckpt")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    return proc
